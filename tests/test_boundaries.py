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
    # the web server only relays bytes: each session's app process loads the rest
    ("web", {"textual", "torch", "transformers", "peft", "pygit2", "hyprstream_tui.tui", "hyprstream_tui.engine",
             "hyprstream_tui.store"}),
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


# ---- the shape of the package (issue 19) ------------------------------------------------------
def package_modules() -> dict[str, Path]:
    root = PACKAGE.parent
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def internal_imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules `module` imports, at any depth (imports under `if TYPE_CHECKING:` aside)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            found |= subs
            if len(subs) < len(node.names) and node.module in modules:
                found.add(node.module)
    return found - {module}


def test_no_import_cycles_inside_the_package():
    modules = package_modules()
    graph = {m: internal_imports(m, p, modules) for m, p in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


# Private names of other libraries that the package reaches on purpose, each for a reason.
FOREIGN_PRIVATE = {
    "os._exit",  # leave at once after Ctrl-C (interrupt.py)
    "aten._weight_int8pack_mm",  # torch's int8 weight-only matmul: no public name exists
    "aten._weight_int4pack_mm_for_cpu",  # torch's int4 weight-only matmul (CPU), and its packing:
    "aten._convert_weight_to_int4pack_for_cpu",  # no public names either
    "module._non_persistent_buffers_set",  # torch: which buffers a state dict leaves out
    "super()._watch_value",  # textual: extending Input's own watcher
    "argparse._SubParsersAction",  # the type of add_subparsers()' result: argparse names no other
    "super()._make_app",  # textual-serve: where its Server builds the aiohttp app (web/ adds its guard)
}


def test_no_module_reads_another_modules_underscored_names():
    """`self._x` and `cls._x` are a class's own; `other._x` or `from m import _x` reach inside."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = str(path.relative_to(PACKAGE))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hyprstream_tui"):
                offenders += [f"{where}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                owner = ast.unparse(node.value)
                if owner in ("self", "cls") or f"{owner.split('.')[-1]}.{node.attr}" in FOREIGN_PRIVATE:
                    continue
                offenders.append(f"{where}:{node.lineno}: {owner}.{node.attr}")
    assert offenders == []
