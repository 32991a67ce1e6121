"""The one place where names that become paths or git refs are validated.

Model names, adapter names, tag labels, hub repo ids, hub revisions and hub file names all pass
through here before they touch the filesystem or a ref. The rules are a whitelist (ASCII letters,
digits and a few separators), so `..`, absolute paths, NUL, newlines, Unicode look-alikes, Windows
drive and UNC forms and ref-illegal sequences are refused with one clear line.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from hyprstream_tui.errors import InvalidInput

MAX_NAME = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Names that would collide with the store's own folders under models/.
RESERVED_MODEL_NAMES = frozenset({"working", "tmp", "cache"})
# Names no model, adapter or tag may take: git's own refs (a tag `HEAD/v1`, a model `HEAD` read by
# plain git, are ambiguous) and Windows device names (a repository holding them cannot be checked
# out, copied or shared there), with or without an extension, in any case.
_GIT_SPECIAL = frozenset({"head", "fetch_head", "orig_head", "merge_head", "cherry_pick_head", "revert_head",
                          "bisect_head", "rebase_head"})
_DEVICE_RE = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?", re.IGNORECASE)
_HUB_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION_RE = re.compile(r"[A-Za-z0-9._/-]+")
_FILE_PART_RE = re.compile(r"[A-Za-z0-9_.+=@,\[\]()#%-][A-Za-z0-9_.+=@,\[\]()#% -]*")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def _simple(value: object, what: str, *, max_len: int = MAX_NAME) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be text, got {type(value).__name__}.")
    hint = f"use letters, digits, '.', '_' or '-' (at most {max_len} characters, starting with a letter or digit)"
    if not value:
        raise InvalidInput(f"The {what} is empty: {hint}.")
    if len(value) > max_len:
        raise InvalidInput(f"The {what} {_show(value)} is too long: {hint}.")
    if not _NAME_RE.fullmatch(value):
        raise InvalidInput(f"The {what} {_show(value)} is not allowed: {hint}.")
    if ".." in value or value.endswith((".", ".lock")):
        raise InvalidInput(
            f"The {what} {_show(value)} is not allowed: no '..', and no '.' or '.lock' at the end."
        )
    if value.lower() in _GIT_SPECIAL or _DEVICE_RE.fullmatch(value):
        raise InvalidInput(f"The {what} {_show(value)} is reserved (by git or Windows): choose another name.")
    return value


def model_name(value: object) -> str:
    """A model's name: the folder `models/<name>`."""
    name = _simple(value, "model name")
    if name.lower() in RESERVED_MODEL_NAMES:
        raise InvalidInput(f"The model name {name!r} is reserved by the store: choose another name.")
    return name


def adapter_name(value: object) -> str:
    """An adapter's human name (the branch itself is adapter/<uuid>)."""
    return _simple(value, "adapter name")


def tag_label(value: object) -> str:
    """The label part of a milestone tag `<adapter>/<label>`."""
    return _simple(value, "tag label")


def repo_id(value: object) -> tuple[str, str]:
    """A hub repository id `ORG/NAME`; returns (org, name)."""
    if not isinstance(value, str) or value.count("/") != 1:
        raise InvalidInput(f"The hub repository {_show(value)} must look like ORG/NAME, e.g. Qwen/Qwen2.5-0.5B-Instruct.")
    org, name = value.split("/")
    for part in (org, name):
        if not part or len(part) > 96 or not _HUB_PART_RE.fullmatch(part) or ".." in part or part.endswith("."):
            raise InvalidInput(f"The hub repository {_show(value)} must look like ORG/NAME with letters, digits, '.', '_' or '-'.")
    return org, name


def revision(value: object) -> str:
    """A hub revision: a branch, tag or commit sha."""
    if not isinstance(value, str) or not value or len(value) > 200 or not _REVISION_RE.fullmatch(value):
        raise InvalidInput(f"The revision {_show(value)} is not a branch, tag or commit id.")
    if ".." in value or value.startswith("/") or value.endswith(("/", ".lock", ".")) or "//" in value:
        raise InvalidInput(f"The revision {_show(value)} is not a valid branch, tag or commit id.")
    return value


def repo_relpath(value: object) -> PurePosixPath:
    """A file name inside a model repository (from the hub or an import folder).

    Relative, '/'-separated, every part a plain name: never absolute, never '..', no backslash,
    no drive letter, no control character, nothing inside `.git`.
    """
    if not isinstance(value, str) or not value or len(value) > 255:
        raise InvalidInput(f"The file name {_show(value)} is not a valid relative file name.")
    parts = value.split("/")
    for part in parts:
        if part in ("", ".", "..") or not _FILE_PART_RE.fullmatch(part) or part.endswith(" "):
            raise InvalidInput(f"The file name {_show(value)} is not a plain relative file name inside the model.")
    if any(part.lower() == ".git" for part in parts):
        raise InvalidInput(f"The file name {_show(value)} would write inside git's own folder.")
    return PurePosixPath(value)


def inside(root: Path, relative: PurePosixPath | str) -> Path:
    """Join `relative` under `root` and prove the result stays inside `root`."""
    root_resolved = root.resolve()
    target = (root_resolved / str(relative)).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise InvalidInput(f"The path {_show(str(relative))} points outside {root}.")
    return target
