"""Commit messages as data: `Checkpoint at step N` + `key: value` trailers, and back."""

from __future__ import annotations

import re
from typing import Any, Mapping

_TRAILER_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*): (.*)$")
_STEP_RE = re.compile(r"^(?:Checkpoint at|Roll back to) step (\d+)\b")
KINDS = {
    "Checkpoint at step": "checkpoint",
    "Roll back to": "rollback",
    "Import ": "import",
    "Pull ": "import",
    "Create adapter": "create",
    "Add ": "samples",
    "Merge ": "merge",
}


def format_message(summary: str, trailers: Mapping[str, Any]) -> str:
    lines = [summary]
    if trailers:
        lines.append("")
        lines += [f"{key}: {_format_value(value)}" for key, value in trailers.items()]
    return "\n".join(lines) + "\n"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return " ".join(str(value).split())


def parse_trailers(message: str) -> dict[str, Any]:
    body = message.split("\n\n", 1)[1] if "\n\n" in message else ""
    out: dict[str, Any] = {}
    for line in body.splitlines():
        match = _TRAILER_RE.match(line.strip())
        if match:
            out[match.group(1)] = _number(match.group(2))
    return out


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def kind_of(summary: str) -> str:
    for prefix, kind in KINDS.items():
        if summary.startswith(prefix):
            return kind
    return "other"


def step_of(summary: str, trailers: Mapping[str, Any]) -> int | None:
    match = _STEP_RE.match(summary)
    if match:
        return int(match.group(1))
    step = trailers.get("step")
    return step if isinstance(step, int) else None
