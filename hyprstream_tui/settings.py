"""Paths and configuration. No globals: everything is derived from a `Paths` value."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "HYPRSTREAM_HOME"
DEFAULT_HOME = Path("~/.cache/hyprstream")


@dataclass(frozen=True, kw_only=True)
class Paths:
    """Where hyprstream keeps its data. `home` defaults to $HYPRSTREAM_HOME or ~/.cache/hyprstream."""

    home: Path

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None) -> "Paths":
        raw = home if home is not None else os.environ.get(ENV_HOME) or DEFAULT_HOME
        return cls(home=Path(raw).expanduser().absolute())

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def working(self) -> Path:
        """Adapter worktrees: models/working/<uuid>."""
        return self.models / "working"

    @property
    def locks(self) -> Path:
        return self.home / "locks"

    @property
    def cache(self) -> Path:
        """Derived, disposable data (snapshots of commits for loading)."""
        return self.home / "cache"

    @property
    def conversations_db(self) -> Path:
        return self.home / "conversations.sqlite3"

    def model_dir(self, name: str) -> Path:
        from hyprstream_tui.names import model_name

        return self.models / model_name(name)
