"""Adding samples to an adapter branch: `data/samples.jsonl`, appended and committed.

Appends are serialised by a per-adapter samples lock (read, append, write, commit), so two
`lora train sample` calls never lose each other's rows; a training start takes the same lock while
it resets the worktree. Rows are validated before anything is written: one bad row, nothing added.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hyprstream_tui.engine.train.data import SAMPLES_PATH, check_row, dump_rows, parse_jsonl
from hyprstream_tui.errors import InvalidInput, NotFound
from hyprstream_tui.store.locks import FileLock
from hyprstream_tui.store.types import CommitInfo

if TYPE_CHECKING:
    from hyprstream_tui.store import Store


def samples_lock(store: Store, model: str, adapter_uuid: str) -> FileLock:
    return FileLock(store.paths.locks / f"samples-{model}-{adapter_uuid}.lock", "The adapter's samples")


def read_rows(store: Store, model: str, commit: str) -> list[dict[str, Any]]:
    """The samples committed at `commit` (none if the file does not exist yet)."""
    try:
        data = store.read_file(model, commit, SAMPLES_PATH)
    except NotFound:
        return []
    return parse_jsonl(data, SAMPLES_PATH)


def rows_from_file(path: Path) -> list[dict[str, Any]]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"No such file {str(path)!r}: give a JSONL file of samples.") from None
    except OSError as exc:
        raise InvalidInput(f"Could not read {str(path)!r}: {exc.strerror}.") from None
    rows = parse_jsonl(data, Path(path).name)
    if not rows:
        raise InvalidInput(f"{Path(path).name} has no samples: one JSON object per line, with input/output or messages.")
    return rows


def add_samples(store: Store, model: str, ref: str, rows: Sequence[dict[str, Any]]) -> tuple[CommitInfo, int]:
    """Append `rows` to the adapter's samples and commit; returns (commit, total rows)."""
    clean = [check_row(r, f"sample {i}") for i, r in enumerate(rows, 1)]
    if not clean:
        raise InvalidInput("No samples given: give `input` and `output`, or `file`.")
    adapter = store.worktree_info(model, ref)
    with samples_lock(store, model, adapter.uuid).acquire(wait=60):
        tip = store.resolve_adapter(model, adapter.uuid).tip
        current = read_rows(store, model, tip)
        total = len(current) + len(clean)
        noun = "sample" if len(clean) == 1 else "samples"
        commit = store.write_files(model, adapter.uuid, {SAMPLES_PATH: dump_rows(current + clean)},
                                   f"Add {len(clean)} {noun}", {"samples": total})
    return commit, total
