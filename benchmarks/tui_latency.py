"""TUI responsiveness: first paint, and event-loop lag and key-to-repaint while the app streams a
chat reply and trains a LoRA adapter at full speed on a Qwen2.5-0.5B-shaped random model.

    python benchmarks/tui_latency.py [--keys 100] [--paint-runs 5] [--layers 24] [--threads 2]

The app runs as a real terminal program in a pseudo-terminal (100x30, xterm-256color), so every
frame is rendered and written as it would be for a user; this script plays the user.

- First paint: from launching `python -m hyprstream_tui` to the first frame on the terminal (the
  footer's mode keys), wall time; and, inside the app, the CPU seconds the process had used by its
  first frame (independent of what else the machine runs) and whether torch was imported by then
  (it must not be). Python's bytecode caches are on, as on a user's machine (this sandbox sets
  PYTHONDONTWRITEBYTECODE=1, which the app's environment drops here); an untimed start comes first.
- Under load (`--slow-ms` adds a diagnosis of the slowest keys): the app opens the Training screen
  and starts training adapter `bench` (LoRA r=8 on q,v; batch 2 x 64 tokens), then opens Chat and
  asks for an 8000-token reply (the random model's tokenizer has no end-of-text, so it streams
  until stopped). Once both run, this script types `¤` into the chat input N times and a backspace
  after each (50 ms after `¤` is shown; the next `¤` 100-350 ms after the backspace is shown), and
  times every key from the write to the pty to the first frame that shows it: the `¤`, or the
  input's placeholder once it is empty again. Inside the app an asyncio task sleeps 10 ms in a
  loop and records how late it wakes up: the event loop's lag.

Targets (issue 5): lag and key-to-repaint p99 under 50 ms; first paint under 1 s.
`--plain` runs the app with HYPRSTREAM_TUI_YIELD=0 (no lower priority for the jobs, default GIL
switch interval), to see what that buys.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import pty
import random
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL, ADAPTER = "half-b", "bench"
SIZE = (100, 30)
KEY = "¤".encode()  # typed into the chat input; rare enough not to arrive in the reply's text
EMPTY = b"enter sends"  # the chat input's placeholder: drawn once a backspace has emptied it
ANSI = re.compile(rb"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[PX^_][^\x1b]*\x1b\\|[@-Z\\-_])")


# ---- setup ---------------------------------------------------------------------------------------
def prepare(tmp: Path, layers: int) -> Path:
    """A home with the 0.5B-shaped model and an adapter with 8 samples."""
    from benchmarks import serve
    from hyprstream_tui.engine.train.samples import add_samples
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    serve.QWEN25_05B["num_hidden_layers"] = layers
    src = serve.build_model(tmp / "model")
    home = tmp / "home"
    store = Store(Paths.from_env(home))
    store.import_model(src, name=MODEL, link=True)
    store.create_adapter(MODEL, ADAPTER)
    rows = [{"input": f"Tell me fact number {i} about the sea.", "output": f"Fact {i}: the sea is deep and wide."}
            for i in range(8)]
    add_samples(store, MODEL, ADAPTER, rows)
    return home


class Terminal:
    """A child process on a pty of SIZE (Textual draws on stderr, so all three are the pty); a reader
    thread keeps (time, bytes) of everything it writes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", SIZE[1], SIZE[0], 0, 0))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     cwd=ROOT, start_new_session=True)
        os.close(slave)
        self.master = master
        self.chunks: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()
        self._watch: tuple | None = None  # (needle, [time seen], event): see send_and_wait
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            now = time.monotonic()
            if not data:
                return
            with self._lock:
                self.chunks.append((now, data))
                watch = self._watch
            if watch is not None and watch[0] in ANSI.sub(b"", data):
                watch[1].append(now)
                watch[2].set()

    def write(self, data: bytes) -> float:
        now = time.monotonic()
        os.write(self.master, data)
        return now

    def wait_for(self, needle: bytes, timeout: float) -> float | None:
        """The time of the first chunk (so far or to come) whose visible text has `needle`, or
        None. The reader thread spots it, so waiting costs this process no CPU (a loop that
        scanned the output would compete with the app for it)."""
        watch = (needle, [], threading.Event())
        with self._lock:
            seen = [t for t, chunk in self.chunks if needle in ANSI.sub(b"", chunk)]
            if not seen:
                self._watch = watch
        if seen:
            return seen[0]
        watch[2].wait(timeout)
        with self._lock:
            self._watch = None
        return watch[1][0] if watch[1] else None

    def send_and_wait(self, data: bytes, needle: bytes, timeout: float) -> tuple[float, float | None]:
        """Write `data`; return (when written, when the first chunk showing `needle` came back, or
        None)."""
        watch = (needle, [], threading.Event())
        with self._lock:
            self._watch = watch
        sent = self.write(data)
        watch[2].wait(timeout)
        with self._lock:
            self._watch = None
        return sent, (watch[1][0] if watch[1] else None)

    def close(self) -> None:
        """Kill the app and everything it started (the training forkserver, which may still be
        importing torch: left alone, it would slow the next run's start)."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self.master)


def child_env(home: Path, threads: int) -> dict[str, str]:
    return dict(os.environ, HYPRSTREAM_HOME=str(home), TERM="xterm-256color", COLORTERM="truecolor",
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
                COLUMNS=str(SIZE[0]), LINES=str(SIZE[1]))


# ---- first paint -----------------------------------------------------------------------------------
def first_paint(home: Path, runs: int, threads: int) -> dict:
    """`python -m hyprstream_tui` (what `hyprstream` runs) to its first frame, `runs` times; then
    once more inside the app, to see whether torch was imported by the first frame."""
    times = []
    # Python caches compiled modules unless PYTHONDONTWRITEBYTECODE is set, as this sandbox does: the
    # starts are timed as a user's Python makes them (one untimed start first writes the caches).
    env = {k: v for k, v in child_env(home, threads).items() if k != "PYTHONDONTWRITEBYTECODE"}
    for run in range(runs + 1):
        term = Terminal([sys.executable, "-m", "hyprstream_tui"], env)
        try:
            painted = term.wait_for(b"History", timeout=30)
            if painted is None:
                raise SystemExit("the app painted nothing within 30 s")
            if run:
                times.append(painted - term.started)
        finally:
            term.close()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "paint.json")
        term = Terminal([sys.executable, __file__, "--child", "paint", "--out", str(out)], env)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not out.exists():
                time.sleep(0.02)
            inside = json.loads(out.read_text()) if out.exists() else {}
        finally:
            term.close()
    return {"first_paint_s": pct(times, 1.0), "first_paint_cpu_s": round(inside.get("cpu_s", float("nan")), 3),
            "torch_imported_at_first_paint": inside.get("torch_at_paint")}


# ---- under load ------------------------------------------------------------------------------------
def under_load(home: Path, keys: int, threads: int, timeout: float, slow_ms: float = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ready, stop, out = Path(tmp, "ready"), Path(tmp, "stop"), Path(tmp, "out.json")
        term = Terminal([sys.executable, __file__, "--child", "load", "--ready", str(ready), "--stop", str(stop),
                         "--out", str(out), "--slow-ms", str(slow_ms)], child_env(home, threads))
        try:
            deadline = time.monotonic() + timeout
            while not ready.exists():
                if term.proc.poll() is not None or time.monotonic() > deadline:
                    status = Path(str(out) + ".status")
                    log = Path(str(out) + ".log")
                    raise SystemExit("the app did not get both jobs running; its last status: "
                                     + (status.read_text() if status.exists() else "none")
                                     + (("\n" + log.read_text()) if log.exists() else ""))
                time.sleep(0.1)
            latencies, erases, missed, spans = [], [], 0, []
            rng = random.Random(0)
            for _ in range(keys):
                for data, needle, took in ((KEY, KEY, latencies), (b"\x7f", EMPTY, erases)):
                    sent, shown = term.send_and_wait(data, needle, timeout=5)
                    if shown is None:
                        missed += 1
                    else:
                        took.append(shown - sent)
                        spans.append((sent, shown))
                    time.sleep(0.05 if data == KEY else rng.uniform(0.1, 0.35))
            stop.touch()
            while not out.exists() and term.proc.poll() is None:
                time.sleep(0.1)
            inside = json.loads(out.read_text()) if out.exists() else {}
        finally:
            term.close()
    slow = inside.pop("slow_callbacks", None)
    frames = inside.pop("slow_frames", [])
    full = inside.pop("gc_full", [])
    result = {"key_to_repaint_s": pct(latencies + erases, 1000.0),
              "typed_key_ms": pct(latencies, 1000.0), "backspace_ms": pct(erases, 1000.0),
              "keys": 2 * keys, "keys_not_shown": missed, **inside}
    if slow is not None:
        result["slow_callbacks"] = slow_report(slow, spans, slow_ms)
        result["slow_frames"] = slow_report(frames + [(s, p, "full gc") for s, p in full], spans, slow_ms)
    return result


def slow_report(slow: list, spans: list[tuple[float, float]], slow_ms: float) -> dict:
    """What the app's event loop ran, in callbacks of `slow_ms` or more, while the slowest keys
    waited for their frame."""
    from collections import Counter

    spans = sorted(spans, key=lambda span: span[1] - span[0], reverse=True)
    worst = spans[: max(1, len(spans) // 20)]  # the slowest 5% of keys
    during = Counter()
    most: dict[str, float] = {}
    hit = 0
    keys = []
    for sent, shown in worst:
        found = [(what, took) for start, took, what in slow if start < shown and start + took > sent]
        hit += bool(found)
        keys.append((round((shown - sent) * 1000, 1),
                     [(what, round(took * 1000, 1), round((start - sent) * 1000, 1))
                      for start, took, what in slow if start < shown and start + took > sent]))
        for what, took in found:
            during[what] += 1
            most[what] = max(most.get(what, 0.0), took * 1000)
    overall = Counter(what for _, _, what in slow)
    return {"threshold_ms": slow_ms, "n": len(slow),
            "slowest_keys": [round((b - a) * 1000, 1) for a, b in worst],
            "slowest_keys_overlapping_one": hit,
            "during_slowest_keys": [(what, n, round(most[what], 1)) for what, n in during.most_common(6)],
            "overall": overall.most_common(6),
            "slowest_keys_waited_behind": keys[:8]}  # (ms, [(what, ms, started ms after the key)])


def wait_for_training_to_let_go(home: Path, timeout: float = 120.0) -> None:
    """The app trains in a child process, which finishes its step and commits when the app exits:
    wait for it before the temp folder goes."""
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store
    from hyprstream_tui.store.locks import is_locked

    store = Store(Paths.from_env(home))
    lock = store.train_lock_path(MODEL, store.resolve_adapter(MODEL, ADAPTER).uuid)
    deadline = time.monotonic() + timeout
    while is_locked(lock) and time.monotonic() < deadline:
        time.sleep(0.2)


def pct(xs: list[float], scale: float) -> dict:
    if not xs:
        return {}
    xs = sorted(x * scale for x in xs)
    q = lambda p: xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]  # noqa: E731
    unit = "ms" if scale == 1000.0 else "s"
    return {f"p50_{unit}": round(q(50), 3), f"p90_{unit}": round(q(90), 3), f"p95_{unit}": round(q(95), 3),
            f"p99_{unit}": round(q(99), 3), f"max_{unit}": round(xs[-1], 3),
            f"mean_{unit}": round(statistics.fmean(xs), 3), "n": len(xs)}


# ---- the app side ----------------------------------------------------------------------------------
def child_paint(out: str) -> None:
    from hyprstream_tui.tui.app import HyprApp

    class PaintApp(HyprApp):
        def on_mount(self) -> None:
            super().on_mount()
            self.call_after_refresh(self._painted)

        def _painted(self) -> None:
            # CPU seconds of this process so far: what the first frame costs, whatever else the machine runs.
            Path(out).write_text(json.dumps({"torch_at_paint": "torch" in sys.modules, "cpu_s": time.process_time()}))

    PaintApp().run()


PROFILE = None
if os.environ.get("TUI_LATENCY_PROFILE"):
    import cProfile

    PROFILE = cProfile.Profile()


def child_load(ready: str, stop: str, out: str, slow_ms: float = 0) -> None:
    import logging

    logging.basicConfig(filename=out + ".log", level=logging.ERROR)  # worker tracebacks, if any
    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.tui.app import HyprApp
    from hyprstream_tui.tui.screens.chat import ChatScreen
    from hyprstream_tui.tui.screens.training import TrainingScreen

    async def until(condition, timeout: float = 1200.0):
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if time.monotonic() > deadline:
                raise TimeoutError("benchmark setup timed out")
            await asyncio.sleep(0.05)
        return value

    import gc

    gc_pauses: list[tuple[float, int, float]] = []  # (start, generation, seconds)
    gc_started = [0.0]

    def gc_clock(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started[0] = time.monotonic()
        else:
            gc_pauses.append((gc_started[0], info["generation"], time.monotonic() - gc_started[0]))

    gc.callbacks.append(gc_clock)

    slow: list[tuple[float, float, str]] = []  # (start, seconds, what) of slow event-loop callbacks
    frames: list[tuple[float, float, str]] = []  # (start, seconds, what it redrew) of slow frames
    if slow_ms:
        from asyncio import events

        run = events.Handle._run

        def timed(handle) -> None:
            start = time.monotonic()
            run(handle)
            took = time.monotonic() - start
            if took * 1000 >= slow_ms:
                callback = getattr(handle, "_callback", None)
                task = getattr(callback, "__self__", None)
                what = (f"{task.get_coro().__qualname__} {task.get_name()}"
                        if isinstance(task, asyncio.Task)
                        else getattr(callback, "__qualname__", repr(callback)))
                slow.append((start, took, what))

        events.Handle._run = timed

        from textual.screen import Screen

        update = Screen._on_timer_update

        def traced_update(screen) -> None:
            """What each slow frame redrew: a new layout, a scroll, or which widgets."""
            flags = "".join(name[1] for name in ("_layout_required", "_scroll_required", "_repaint_required")
                            if getattr(screen, name))
            dirty = sorted({type(widget).__name__ for widget in screen._dirty_widgets})
            start = time.monotonic()
            if PROFILE is not None:
                PROFILE.enable()
            update(screen)
            if PROFILE is not None:
                PROFILE.disable()
            took = time.monotonic() - start
            if took * 1000 >= slow_ms:
                frames.append((start, took, f"{flags or '-'} {'+'.join(dirty[:4])}"))

        Screen._on_timer_update = traced_update

    class LoadApp(HyprApp):
        lags: list[tuple[float, float]] = []

        def on_mount(self) -> None:
            super().on_mount()
            self.demo_offered = True
            self.run_worker(self.orchestrate(), group="bench")
            self.run_worker(self.probe(), group="bench-probe")

        async def probe(self) -> None:
            while True:
                start = time.monotonic()
                await asyncio.sleep(0.01)
                self.lags.append((start, time.monotonic() - start - 0.01))

        async def report(self, training, chat) -> None:
            """Where setup stands, for the parent to show if it times out."""
            while True:
                job = next(iter(training.jobs.values()), None) if training else None
                status = {"screen": type(self.screen).__name__, "errors": self.errors,
                          "train_state": job.state if job else None, "train_step": job.step if job else None,
                          "token_deltas": chat.log_view.deltas if chat else None}
                Path(out + ".status").write_text(json.dumps(status))
                await asyncio.sleep(1)

        async def orchestrate(self) -> None:
            self.run_worker(self.report(None, None), group="bench-report", exclusive=True)
            self.open_training(MODEL, ADAPTER)
            training = await until(lambda: isinstance(self.screen, TrainingScreen) and self.screen.selected
                                   and self.screen.selected.name == ADAPTER and self.screen)
            config = TrainConfig(steps=100_000, learning_rate=1e-4, batch_size=2, max_seq_len=64,
                                 checkpoint_every=100_000)
            training.start_training(training.selected, config)
            self.open_chat(MODEL)
            chat = await until(lambda: isinstance(self.screen, ChatScreen) and self.screen.model == MODEL
                               and self.screen)
            self.run_worker(self.report(training, chat), group="bench-report", exclusive=True)
            chat.params.set_values(temperature=0, max_tokens=8000)
            chat.send("Write a long story about the sea")
            job = await until(lambda: next(iter(training.jobs.values()), None))
            await until(lambda: job.step and chat.log_view.deltas > 0)
            chat.query_one("#chat-input").focus()
            t0, step0, tokens0 = time.monotonic(), job.step, chat.log_view.deltas
            Path(ready).touch()
            while not Path(stop).exists():
                await asyncio.sleep(0.1)
                if not chat.log_view.streaming:
                    chat.send("Go on")
            elapsed = time.monotonic() - t0
            lags = [lag for start, lag in self.lags if start >= t0]
            pauses = [p for start, gen, p in gc_pauses if start >= t0]
            full = [p for start, gen, p in gc_pauses if start >= t0 and gen == 2]
            reply = chat.log_view.last_reply()
            result = {"event_loop_lag_ms": pct(lags, 1000.0),
                      "gc_pauses_ms": pct(pauses, 1000.0), "gc_full_collections_ms": pct(full, 1000.0),
                      "seconds": round(elapsed, 1),
                      "train_steps_per_s": round((job.step - step0) / elapsed, 3),
                      "reply_chars": len(reply.text) if reply else 0, "token_deltas": chat.log_view.deltas - tokens0,
                      "token_deltas_per_s": round((chat.log_view.deltas - tokens0) / elapsed, 2),
                      "app_errors": list(self.errors)}
            if slow_ms:
                result["slow_callbacks"] = [item for item in slow if item[0] >= t0]
                result["slow_frames"] = [item for item in frames if item[0] >= t0]
                if PROFILE is not None:
                    PROFILE.dump_stats(os.environ["TUI_LATENCY_PROFILE"])
                result["gc_full"] = [(start, p) for start, gen, p in gc_pauses if start >= t0 and gen == 2]
            Path(out).write_text(json.dumps(result))
            os._exit(0)  # the jobs are daemon threads; a checkpoint on the way out is not measured

    LoadApp().run()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100, help="keys typed, each followed by a backspace (both timed)")
    ap.add_argument("--paint-runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=24, help="fewer layers for a quick check of this script")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900, help="seconds to get both jobs running")
    ap.add_argument("--plain", action="store_true", help="HYPRSTREAM_TUI_YIELD=0 in the app")
    ap.add_argument("--skip-paint", action="store_true")
    ap.add_argument("--skip-load", action="store_true", help="first paint only")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--slow-ms", type=float, default=0,
                    help="note event-loop callbacks that take this long or more, and which ran while the "
                         "slowest keys waited (a diagnosis; the timing adds a little to every callback)")
    ap.add_argument("--child", choices=("paint", "load"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    ap.add_argument("--stop", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "paint":
        return child_paint(args.out)
    if args.child == "load":
        return child_load(args.ready, args.stop, args.out, args.slow_ms)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.plain:
        os.environ["HYPRSTREAM_TUI_YIELD"] = "0"
    with tempfile.TemporaryDirectory(prefix="hs-tui-bench-") as tmp:
        t = time.perf_counter()
        home = prepare(Path(tmp), 1 if args.skip_load else args.layers)
        print(f"built and imported the {args.layers}-layer Qwen2.5-0.5B-shaped model in "
              f"{time.perf_counter() - t:.1f}s", file=sys.stderr)
        result = {"layers": args.layers, "threads": args.threads, "cpus": os.cpu_count(),
                  "load_average_before": round(os.getloadavg()[0], 2), "yield": not args.plain}
        if not args.skip_paint:
            result.update(first_paint(home, args.paint_runs, args.threads))
        if not args.skip_load:
            result.update(under_load(home, args.keys, args.threads, args.timeout, args.slow_ms))
            wait_for_training_to_let_go(home)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key:32} {value}")


if __name__ == "__main__":
    main()
