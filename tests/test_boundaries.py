"""The package's dependency rules, checked on the source: tui -> engine -> store; pygit2 only in
store; textual never in engine/store/server; heavy libraries never imported by `--help`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hyprstream_tui"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
            if node.module.startswith("hyprstream_tui."):
                found.add(".".join(node.module.split(".")[:2]))
    return found


def files_of(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py")) if (PACKAGE / sub).is_dir() else []


@pytest.mark.parametrize("sub,forbidden", [
    ("tui", {"torch", "transformers", "peft", "pygit2", "hyprstream_tui.server"}),
    ("engine", {"textual", "pygit2", "hyprstream_tui.tui", "hyprstream_tui.server"}),
    ("store", {"textual", "torch", "transformers", "peft", "hyprstream_tui.tui", "hyprstream_tui.engine", "hyprstream_tui.server"}),
    ("server", {"textual", "pygit2", "hyprstream_tui.tui"}),
])
def test_layer_imports(sub, forbidden):
    offenders = {str(p.relative_to(PACKAGE)): sorted(imported_modules(p) & forbidden) for p in files_of(sub)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_store_imports_pygit2():
    outside = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if "pygit2" in imported_modules(p) and p.relative_to(PACKAGE).parts[0] != "store"]
    assert outside == []


def test_help_and_model_list_import_no_torch(tmp_path):
    code = (
        "import sys, contextlib, io\n"
        "from hyprstream_tui.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        f"    main(['--home', {str(tmp_path)!r}, 'model', 'list'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'textual') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
