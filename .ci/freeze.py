"""Print the installed versions of hyprstream-tui[dev]'s whole dependency tree as pip constraints.

`bash .ci/run --latest --record` writes them to .ci/constraints.txt after a green run, so the file
holds exactly what the suite last passed with, and nothing else the machine happens to have.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

ROOT, EXTRAS = "hyprstream-tui", {"dev"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure() -> dict[str, str]:
    """name -> version of every installed distribution the project needs, with its dev extra."""
    seen: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(ROOT, frozenset(EXTRAS))]
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in visited:
            continue
        visited.add((canonical(name), extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency whose marker did not apply here
        seen[canonical(dist.metadata["Name"])] = dist.version
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    seen.pop(canonical(ROOT))
    return seen


def main() -> int:
    print("# The versions `python -m pytest -q` last passed with (bash .ci/run --latest --record).")
    for name, version in sorted(closure().items()):
        print(f"{name}=={version.split('+')[0]}")  # torch 2.13.0+cpu -> 2.13.0: any build of that release
    return 0


if __name__ == "__main__":
    sys.exit(main())
