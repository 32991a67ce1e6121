"""Messages and small values the screens exchange through the app."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass(frozen=True)
class Target:
    """What a screen was asked to show: a model, an adapter, a commit."""

    model: str
    adapter: str | None = None
    commit: str | None = None
    compare: str | None = None  # chat: a second MODEL[:ADAPTER[@REV]] answering side by side


class TargetChanged(Message):
    """The app holds a new Target for the screen that receives this (see HyprApp.take_target)."""
