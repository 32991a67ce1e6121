"""Git-backed storage: every model a repository, every adapter a branch, every checkpoint a commit.

The only package that imports pygit2. Import `Store` from here; it loads pygit2 on first use of
this package, so modules that only need the dataclasses import `hyprstream_tui.store.types`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hyprstream_tui.store.store import Store


def __getattr__(name: str):  # lazy: `hyprstream --help` must not pay for pygit2
    if name == "Store":
        from hyprstream_tui.store.store import Store

        return Store
    raise AttributeError(name)


__all__ = ["Store"]
