"""A live loss plot (textual-plotext): named series of (step, value), redrawn at most a few times a
second however fast points arrive. Training shows loss (and lr on the right axis); History overlays
the loss curves of two commits."""

from __future__ import annotations

from typing import Iterable

from textual_plotext import PlotextPlot

from hyprstream_tui.tui.batch import UI_HZ


class LossPlot(PlotextPlot):
    MAX_POINTS = 2000  # older points are thinned so a long run still draws fast

    def __init__(self, *, title: str = "loss", **kwargs) -> None:
        super().__init__(**kwargs)
        self.title = title
        self.series: dict[str, tuple[list[float], list[float], str]] = {}  # name -> (steps, values, side)
        self.redraws = 0  # how many times the plot was rebuilt (tests check the rate)
        self._dirty = False

    def on_mount(self) -> None:
        super().on_mount()
        self.set_interval(1 / UI_HZ, self._redraw_if_dirty)
        self._draw()

    def clear_series(self) -> None:
        self.series.clear()
        self._dirty = True

    def set_series(self, name: str, points: Iterable[tuple[float, float]], *, side: str = "left") -> None:
        steps, values = [], []
        for x, y in points:
            steps.append(float(x))
            values.append(float(y))
        self.series[name] = (steps, values, side)
        self._dirty = True

    def add_points(self, name: str, points: Iterable[tuple[float, float]], *, side: str = "left") -> None:
        steps, values, _ = self.series.setdefault(name, ([], [], side))
        for x, y in points:
            steps.append(float(x))
            values.append(float(y))
        if len(steps) > self.MAX_POINTS:
            del steps[: len(steps) - self.MAX_POINTS]
            del values[: len(values) - self.MAX_POINTS]
        self._dirty = True

    def points(self, name: str) -> int:
        return len(self.series.get(name, ((), (), ""))[0])

    def _redraw_if_dirty(self) -> None:
        if self._dirty:
            self._draw()

    def _draw(self) -> None:
        self._dirty = False
        self.redraws += 1
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self.title)
        plt.xlabel("step")
        drawn = False
        for name, (steps, values, side) in self.series.items():
            if steps:
                plt.plot(steps, values, label=name, yside=side, marker="braille")
                drawn = True
        if not drawn:
            plt.title(f"{self.title}: no steps yet")
        self.refresh()
