"""Fetch a model from the Hugging Face Hub into the user's HF cache, every byte verified.

`fetch` resolves a revision to a commit, checks every file name the hub lists, chooses the files
worth having (safetensors over pickle), and downloads each one into the standard HF cache layout
(`blobs/<etag>`, `snapshots/<commit>/<file>` symlinks, `refs/<revision>`). transformers and
`hf_hub_download` find the files there, and the store hard-links the blobs into git-lfs, so the
weights are on disk once. Files already in the cache are re-hashed and reused, not downloaded.

Why the bytes are not fetched with `hf_hub_download`: in huggingface_hub 2.4 it downloads into a
per-process temporary file that it deletes on any failure (an interrupted pull starts again from
zero), and it reads 10 MiB at a time (progress and cancel no finer than that). Here the partial
file is `blobs/<etag>.incomplete`, a later pull continues it with an HTTP Range request, and the
sha256 is computed as the bytes arrive. huggingface_hub still does the rest: the model_info call,
each file's metadata (HEAD), headers and token, the shared HTTP session, its error classes, and
the per-blob cache lock it takes itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from hyprstream_tui import names
from hyprstream_tui.errors import Cancelled, HubError, HyprError, InvalidInput, NotFound, StorageError, UnsafeContent, is_disk_full
from hyprstream_tui.store.inspect import is_pickle

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 10.0  # connect/read timeout of every request: an unreachable hub fails in seconds
RETRIES = 4  # stalled or cut downloads resumed in place before giving up (reset by progress)
REPORT_EVERY = 256 << 10  # bytes between progress reports of one file
# Weights for other frameworks: skipped when the repository has weights we load.
OTHER_FRAMEWORKS = (".h5", ".msgpack", ".ot", ".onnx", ".onnx_data", ".tflite", ".gguf", ".mlmodel")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ETAG_RE = re.compile(r"[0-9A-Za-z_-]{8,128}")  # becomes a file name in blobs/


@dataclass(frozen=True, kw_only=True)
class HubFile:
    relpath: str  # name inside the repository, validated by names.repo_relpath
    path: Path  # the verified blob in the HF cache (a real file, not the snapshot symlink)
    size: int
    sha256: str  # of the content: the hub's LFS oid for LFS files, computed for the others
    lfs: bool


@dataclass(frozen=True, kw_only=True)
class HubSnapshot:
    repo_id: str
    revision: str  # as asked: branch, tag or commit
    commit: str  # the commit it resolved to; every file was fetched at this commit
    files: tuple[HubFile, ...]
    skipped: tuple[str, ...] = ()  # listed on the hub, not fetched (pickle next to safetensors, ...)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True, kw_only=True)
class DownloadProgress:
    relpath: str
    done: int  # bytes of this file on disk
    total: int
    index: int  # 1-based position of this file in the pull
    count: int
    bytes_done: int  # bytes of the whole pull (files reused from the cache count as done)
    bytes_total: int


@dataclass(frozen=True)
class _Entry:
    """One file as the hub lists it, names and digests checked."""

    relpath: str
    size: int | None
    sha256: str | None  # LFS oid
    git_oid: str | None  # git blob id; for a non-LFS file, the sha1 of its content

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


def fetch(
    repo_id: str,
    *,
    revision: str = "main",
    token: str | None = None,
    allow_pickle: bool = False,
    progress: Callable[[DownloadProgress], None] | None = None,
    cancel: threading.Event | None = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
    timeout: float = TIMEOUT_S,
) -> HubSnapshot:
    """Download `repo_id` at `revision` into the HF cache and return the verified files.

    `endpoint` and `cache_dir` default to $HF_ENDPOINT and the HF cache ($HF_HUB_CACHE, $HF_HOME),
    read at call time. `token` None uses huggingface_hub's own (HF_TOKEN or `hf auth login`).
    Raises InvalidInput, NotFound, UnsafeContent, HubError, StorageError or Cancelled.
    """
    names.repo_id(repo_id)
    names.revision(revision)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    if urlparse(endpoint).scheme not in ("http", "https"):
        raise InvalidInput(f"HF_ENDPOINT {endpoint!r} is not an http(s) address.")
    pull = _Pull(repo_id, revision, endpoint, cache_dir or hf_cache_dir(), token, timeout, progress, cancel)
    with _hub_errors(pull):
        commit, entries = pull.list_files()
        chosen, skipped = _choose(repo_id, entries, allow_pickle=allow_pickle)
        files = pull.download_all(commit, chosen)
    return HubSnapshot(repo_id=repo_id, revision=revision, commit=commit, files=files, skipped=skipped)


def hf_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub computes it, but from the environment of now."""
    env = os.environ
    raw = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not raw:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        raw = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(raw))).absolute()


def _choose(repo_id: str, entries: list[_Entry], *, allow_pickle: bool) -> tuple[list[_Entry], tuple[str, ...]]:
    """Safetensors beat pickle; pickle alone needs `allow_pickle`. Returns (chosen, skipped)."""
    has_safetensors = any(e.relpath.endswith(".safetensors") for e in entries)
    pickles = [e.relpath for e in entries if is_pickle(e.relpath)]
    if pickles and not has_safetensors and not allow_pickle:
        shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        raise UnsafeContent(
            f"{repo_id} has only pickle weights ({shown}), which can run code when loaded: "
            "set `allow_pickle` only if you trust its author."
        )

    def skip(relpath: str) -> bool:
        if relpath == ".gitattributes":  # the hub's LFS rules; the store writes its own
            return True
        if has_safetensors and (is_pickle(relpath) or is_pickle(relpath.removesuffix(".index.json"))):
            return True
        return bool(has_safetensors or pickles) and relpath.lower().endswith(OTHER_FRAMEWORKS)

    chosen = [e for e in entries if not skip(e.relpath)]
    skipped = tuple(e.relpath for e in entries if skip(e.relpath))
    # Small files first: a bad config shows up before gigabytes are spent.
    return sorted(chosen, key=lambda e: (e.lfs, e.relpath)), skipped


class _Pull:
    """One fetch: where it talks to, where it writes, how it reports."""

    def __init__(
        self, repo_id: str, revision: str, endpoint: str, cache_dir: Path, token: str | None, timeout: float,
        progress: Callable[[DownloadProgress], None] | None, cancel: threading.Event | None,
    ) -> None:
        from huggingface_hub.file_download import repo_folder_name

        self.repo_id, self.revision, self.endpoint = repo_id, revision, endpoint
        self.token, self.timeout = token, timeout
        self.cache_dir = Path(cache_dir)
        self.storage = self.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
        self.cancel = cancel or threading.Event()
        self.report = progress or (lambda _p: None)
        self.index = self.count = self.bytes_done = self.bytes_total = self.reported = 0

    # -- listing ---------------------------------------------------------------------------------
    def list_files(self) -> tuple[str, list[_Entry]]:
        """The commit `revision` resolves to, and every file at it (names checked, nothing written)."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, library_name="hyprstream-tui")
        try:
            info = api.model_info(self.repo_id, revision=self.revision, files_metadata=True, token=self.token, timeout=self.timeout)
        except (ValueError, KeyError, TypeError) as err:  # an answer that is not the hub's API
            raise HubError(f"The hub at {self.endpoint} sent an answer that cannot be read ({_reason(err)}): check HF_ENDPOINT.") from None
        commit = info.sha
        if not isinstance(commit, str) or not _COMMIT_RE.fullmatch(commit):
            raise HubError(f"The hub at {self.endpoint} gave no valid commit for {self.repo_id}: check HF_ENDPOINT.")
        return commit, [self._entry(s) for s in info.siblings or ()]

    def _entry(self, sibling: Any) -> _Entry:
        try:
            relpath = str(names.repo_relpath(sibling.rfilename))
        except InvalidInput:
            raise HubError(
                f"The hub lists an unsafe file name {sibling.rfilename!r} in {self.repo_id}: refused, nothing was downloaded."
            ) from None
        lfs = sibling.lfs
        size = lfs.size if lfs else sibling.size
        sha256 = lfs.sha256 if lfs else None
        bad_size = size is not None and (not isinstance(size, int) or size < 0)
        if bad_size or (lfs and not (isinstance(sha256, str) and _SHA256_RE.fullmatch(sha256))):
            raise HubError(f"The hub sent malformed metadata for {relpath} in {self.repo_id}: refused, nothing was downloaded.")
        git_oid = sibling.blob_id if isinstance(sibling.blob_id, str) and _COMMIT_RE.fullmatch(sibling.blob_id) else None
        return _Entry(relpath, size, sha256, git_oid)

    # -- downloading -----------------------------------------------------------------------------
    def download_all(self, commit: str, entries: list[_Entry]) -> tuple[HubFile, ...]:
        self.count, self.bytes_total = len(entries), sum(e.size or 0 for e in entries)
        files = []
        for self.index, entry in enumerate(entries, start=1):
            self.check_cancel()
            files.append(self.fetch_file(commit, entry))
            self.bytes_done += files[-1].size
        if self.revision != commit:
            _write_atomic(self.storage / "refs" / self.revision, commit.encode())
        return tuple(files)

    def fetch_file(self, commit: str, entry: _Entry) -> HubFile:
        self.progress(entry, 0, force=True)
        pointer = self.storage / "snapshots" / commit / entry.relpath  # relpath checked: no '..'
        if pointer.exists():  # in the cache already: reuse it if its bytes are right
            blob = pointer.resolve()
            if digest := self.verified(blob, entry):
                return self.done(entry, blob, digest)
            _discard(blob if self.cache_dir in blob.parents else None, pointer)
        elif pointer.is_symlink():  # dangling: its blob was deleted
            pointer.unlink()
        blob, url = self.locate(commit, entry)
        with _blob_lock(self.cache_dir / ".locks" / self.storage.name / f"{blob.name}.lock", self.cancel):
            digest = self.verified(blob, entry) if blob.exists() else None
            if digest is None:
                blob.unlink(missing_ok=True)
                digest = self.download(url, blob, entry)
        _link(blob, pointer)
        return self.done(entry, blob, digest)

    def locate(self, commit: str, entry: _Entry) -> tuple[Path, str]:
        """HEAD the file: its blob name (etag) and where its bytes are (the hub or its CDN)."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(self.repo_id, entry.relpath, revision=commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(url, token=self.token, timeout=self.timeout, endpoint=self.endpoint)
        if meta.commit_hash != commit:
            raise HubError(f"The hub served {entry.relpath} from another commit than {commit[:12]}: pull again.")
        if not (meta.etag and _ETAG_RE.fullmatch(meta.etag)):
            raise HubError(f"The hub sent no usable ETag for {entry.relpath}: check HF_ENDPOINT.")
        if entry.size is not None and meta.size is not None and meta.size != entry.size:
            raise HubError(f"The hub disagrees with itself about the size of {entry.relpath}: pull again later.")
        return self.storage / "blobs" / meta.etag, meta.location

    def download(self, url: str, blob: Path, entry: _Entry) -> _Digest:
        """Fill `blob` from `url`, continuing `<blob>.incomplete`; verified before it becomes visible."""
        import httpx2

        partial = blob.with_name(blob.name + ".incomplete")
        partial.parent.mkdir(parents=True, exist_ok=True)
        failures = 0
        with open(partial, "a+b") as f:  # append: keep what an earlier, interrupted pull wrote
            digest = _Digest.of_file(f, entry, self.check_cancel)
            if entry.size is not None and digest.size > entry.size:
                digest.restart(f)
            elif digest.size:
                self.progress(entry, digest.size, force=True)  # resuming: show what is there
            while not digest.complete():
                before = digest.size
                try:
                    self.stream(url, f, digest, entry)
                except (httpx2.TransportError, _Retry) as err:
                    failures = 0 if digest.size > before else failures + 1
                    if failures > RETRIES:
                        raise HubError(
                            f"The download of {entry.relpath} keeps failing ({_reason(err)}): "
                            "pull again later, it resumes where it stopped."
                        ) from None
                    if self.cancel.wait(min(0.25 * 2**failures, 4.0)):
                        self.check_cancel()
            f.flush()
            os.fsync(f.fileno())
        problem = digest.mismatch()
        if problem:
            partial.unlink(missing_ok=True)
            raise HubError(f"{entry.relpath} from {self.repo_id} {problem}: the download was discarded; pull again.")
        os.replace(partial, blob)
        return digest

    def stream(self, url: str, f: BinaryIO, digest: _Digest, entry: _Entry) -> None:
        """One GET from byte `digest.size` on, appended to `f` and hashed on the way."""
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers(token=self.token, library_name="hyprstream-tui")
        headers["Accept-Encoding"] = "identity"  # sizes and ranges in bytes of the file itself
        if _origin(url) != _origin(self.endpoint):
            headers.pop("authorization", None)  # never send the token to a CDN
        start = digest.size
        if start:
            headers["Range"] = f"bytes={start}-"
        with get_session().stream("GET", url, headers=headers, timeout=self.timeout, follow_redirects=True) as r:
            if r.status_code == 416 or (start and r.status_code == 206 and not _starts_at(r, start)):
                digest.restart(f)
                raise _Retry(f"the server would not resume at byte {start}")
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            if start and r.status_code == 200:  # the server ignored the Range: start over
                digest.restart(f)
            for chunk in r.iter_bytes():
                self.check_cancel()  # before writing: the file only ever holds whole chunks
                if entry.size is not None and digest.size + len(chunk) > entry.size:
                    digest.poisoned = True  # more bytes than announced: wrong content
                    return
                f.write(chunk)
                digest.update(chunk)
                self.progress(entry, digest.size)
        if entry.size is not None and digest.size < entry.size:
            raise _Retry("the connection ended early")
        digest.ended = True

    def verified(self, path: Path, entry: _Entry) -> _Digest | None:
        with open(path, "rb") as f:
            digest = _Digest.of_file(f, entry, self.check_cancel)
        return None if digest.mismatch() else digest

    def done(self, entry: _Entry, blob: Path, digest: _Digest) -> HubFile:
        self.progress(entry, digest.size, force=True)
        return HubFile(relpath=entry.relpath, path=blob, size=digest.size, sha256=digest.sha256.hexdigest(), lfs=entry.lfs)

    def progress(self, entry: _Entry, done: int, *, force: bool = False) -> None:
        total = entry.size if entry.size is not None else done
        if not force and done < total and done - self.reported < REPORT_EVERY:
            return  # throttle: one report per REPORT_EVERY bytes, and the last one
        self.reported = done
        self.report(DownloadProgress(
            relpath=entry.relpath, done=done, total=total, index=self.index, count=self.count,
            bytes_done=self.bytes_done + done, bytes_total=max(self.bytes_total, self.bytes_done + done),
        ))

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled(f"Pull of {self.repo_id} stopped: run it again to resume.")


class _Retry(Exception):
    """This attempt failed in a way the next one (from `digest.size`) may get past."""


class _Digest:
    """sha256 of the content, and the git blob id (sha1 of 'blob <size>\\0' + content)."""

    def __init__(self, entry: _Entry) -> None:
        self.entry = entry
        self.size = 0
        self.poisoned = False  # the server sent more bytes than announced
        self.ended = False  # a response body ended normally (the end, when the size is unknown)
        self.sha256 = hashlib.sha256()
        self.git = hashlib.sha1(b"blob %d\0" % entry.size) if entry.git_oid and entry.size is not None else None

    @classmethod
    def of_file(cls, f: BinaryIO, entry: _Entry, check_cancel: Callable[[], None]) -> _Digest:
        digest = cls(entry)
        f.seek(0)
        while chunk := f.read(8 << 20):
            check_cancel()
            digest.update(chunk)
        return digest

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.sha256.update(chunk)
        if self.git is not None:
            self.git.update(chunk)

    def restart(self, f: BinaryIO) -> None:
        f.truncate(0)
        _Digest.__init__(self, self.entry)

    def complete(self) -> bool:
        size = self.entry.size
        return self.poisoned or (self.ended if size is None else self.size >= size)

    def mismatch(self) -> str | None:
        """What is wrong with the bytes, in words; None when they are right."""
        entry = self.entry
        if self.poisoned or (entry.size is not None and self.size != entry.size):
            return f"has the wrong size ({self.size} bytes, expected {entry.size})"
        if entry.sha256 and self.sha256.hexdigest() != entry.sha256:
            return f"does not match its sha256 (got {self.sha256.hexdigest()[:12]}, expected {entry.sha256[:12]})"
        if not entry.sha256 and self.git is not None and entry.git_oid and self.git.hexdigest() != entry.git_oid:
            return f"does not match its git blob id (got {self.git.hexdigest()[:12]}, expected {entry.git_oid[:12]})"
        return None


# -- the HF cache on disk ----------------------------------------------------------------------
@contextmanager
def _blob_lock(path: Path, cancel: threading.Event) -> Iterator[None]:
    """huggingface_hub's own per-blob lock, so it and we never write one blob at once."""
    from filelock import Timeout
    from huggingface_hub.utils import WeakFileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        while True:
            if cancel.is_set():
                raise Cancelled("Pull stopped while waiting for another download of the same file.")
            try:
                stack.enter_context(WeakFileLock(path, timeout=0.5))
                break
            except Timeout:
                continue
        yield


def _link(blob: Path, pointer: Path) -> None:
    """snapshots/<commit>/<file> -> ../../blobs/<etag>, atomically; a hard link where symlinks fail."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), tmp)
    except OSError:
        os.link(blob, tmp)
    os.replace(tmp, pointer)


def _discard(blob: Path | None, pointer: Path) -> None:
    """Remove a bad blob and the snapshot entry that shows it: nothing bad stays visible."""
    pointer.unlink(missing_ok=True)
    if blob is not None:  # only inside the cache: a link may point anywhere
        blob.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.incomplete")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urlparse(url)
    return u.scheme, (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme)


def _starts_at(response: Any, start: int) -> bool:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return match is not None and int(match.group(1)) == start


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# -- errors ------------------------------------------------------------------------------------
@contextmanager
def _hub_errors(pull: _Pull) -> Iterator[None]:
    """Every huggingface_hub / HTTP / disk failure becomes one HyprError line."""
    import httpx2
    from huggingface_hub import errors as hf

    repo, where = pull.repo_id, pull.endpoint
    try:
        yield
    except HyprError:
        raise
    except hf.GatedRepoError:
        raise HubError(f"{repo} is gated: accept its terms on the hub, then set HF_TOKEN to a token with access.") from None
    except hf.RepositoryNotFoundError:
        hint = "" if pull.token else "; a private model needs HF_TOKEN"
        raise NotFound(f"No model {repo} on the hub (check the name{hint}).") from None
    except hf.RevisionNotFoundError:
        raise NotFound(f"No revision {pull.revision!r} of {repo} on the hub (check the branch, tag or commit).") from None
    except hf.RemoteEntryNotFoundError as err:
        raise HubError(f"The hub lists a file of {repo} that it does not serve ({err.response.url.path}): pull again later.") from None
    except hf.OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set, so the hub is not contacted: unset it to pull.") from None
    except hf.HfHubHTTPError as err:
        raise HubError(_http_message(repo, err.response.status_code if err.response is not None else None)) from None
    except httpx2.TimeoutException:
        raise HubError(f"The hub at {where} did not answer within {pull.timeout:g} s: check your network or HF_ENDPOINT.") from None
    except httpx2.HTTPError as err:
        raise HubError(f"Cannot reach the hub at {where} ({_reason(err)}): check your network or HF_ENDPOINT.") from None
    except OSError as err:
        if is_disk_full(err):
            raise StorageError(f"Not enough disk space in the Hugging Face cache ({err.filename or pull.cache_dir}): "
                               "free some space, then pull again (it resumes).") from None
        raise StorageError(
            f"Cannot write to the Hugging Face cache ({err.strerror or err}: {err.filename or pull.cache_dir}): "
            "free some space or fix its permissions, then pull again."
        ) from None


def _http_message(repo: str, status: int | None) -> str:
    if status == 401:
        return f"The hub refused the token for {repo} (HTTP 401): check HF_TOKEN."
    if status == 403:
        return f"The hub denied access to {repo} (HTTP 403): check that your token may read it."
    if status == 429:
        return "The hub is rate-limiting requests (HTTP 429): wait a minute, then pull again."
    return f"The hub answered HTTP {status} for {repo}: pull again later, it resumes where it stopped."
