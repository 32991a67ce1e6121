"""A small Hugging Face Hub on 127.0.0.1, for tests: the HTTP API huggingface_hub 2.4 really uses.

    with FakeHub() as hub:
        hub.add_repo("org/tiny", folder)             # or files={"config.json": b"{}"}
        monkeypatch.setenv("HF_ENDPOINT", hub.url)

What it serves, as the hub does:
- GET  /api/models/{org}/{name}[/revision/{rev}][?blobs=true]  model_info: `sha` and `siblings`
  (with blobs: size, blobId and, for LFS files, lfs.{sha256,size,pointerSize});
- HEAD/GET /{org}/{name}/resolve/{rev}/{path}  with X-Repo-Commit and ETag (the git blob id);
  an LFS file answers 302 to a CDN on another port (another origin, like the real CDN) with
  X-Linked-Etag (sha256) and X-Linked-Size;
- GET /cdn/{org}/{name}/{path} on the CDN: the bytes, with Range -> 206 / Content-Range;
- errors with X-Error-Code: RepoNotFound (404), RevisionNotFound (404), EntryNotFound (404),
  GatedRepo (401), and 401 for a private repository without its token.

And what huggingface_hub 2.4 sends to write (`create_repo`, `create_branch`, `create_commit` /
`upload_folder`, with Xet switched off: the fixture sets HF_HUB_DISABLE_XET, as this hub has no CAS):
- POST /api/repos/create  a new repository holding the hub's `.gitattributes` (409 if it exists);
- POST /api/validate-yaml  a README's metadata: always valid;
- POST /api/models/{org}/{name}/preupload/{rev}  `uploadMode` lfs or regular for each file;
- POST /{org}/{name}.git/info/lfs/objects/batch  LFS batch API, `basic` transfer: an upload action
  (PUT to /upload/{oid} on the CDN, without the token) and a verify action; none for known objects;
- POST /api/models/{org}/{name}/commit/{rev}  the NDJSON commit (header, file, lfsFile, deletedFile);
  the new commit's files are what downloads serve from then on;
- POST /api/models/{org}/{name}/branch/{branch}  a branch at the tip of main.
Writes need `Authorization: Bearer <token>` with a token of `hub.tokens` whose right is "write"
(FakeHub.WRITE_TOKEN by default): none or an unknown one -> 401 "Invalid credentials in
Authorization header", a "read" token -> 403. Every request body is kept in `hub.bodies`.

Fault knobs: `cut_after` (send N bytes of a file then drop the connection), `corrupt` (flip a
byte: right size, wrong sha256), a repository's `extra_siblings` (listed, e.g. '../../x'), and a
repository's `commit` can be overwritten. Every request is logged in `hub.hits`.

The `hub_server` fixture (for the folders whose conftest makes it theirs) runs one per test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx")
LFS_MIN_SIZE = 10 << 20  # the hub stores larger files in LFS whatever their name
CHUNK = 64 << 10


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


@dataclass
class FakeFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        """The git blob id: of the pointer for an LFS file, of the content otherwise."""
        return git_blob_id(lfs_pointer(self.data) if self.lfs else self.data)


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, FakeFile]
    branches: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commit: str = ""
    gated: bool = False
    token: str | None = None  # private: this token is required
    extra_siblings: tuple[str, ...] = ()  # listed by the API (e.g. hostile names), served as b"x"

    def resolve(self, revision: str) -> str | None:
        if revision == self.commit:
            return self.commit
        return self.branches.get(revision)


@dataclass(frozen=True)
class Hit:
    method: str
    path: str  # unquoted path, without the query
    range: str | None
    status: int
    sent: int  # body bytes written
    auth: str | None  # the Authorization header
    cdn: bool


GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES)


class FakeHub:
    """Threaded hub + CDN on two random ports of 127.0.0.1. A context manager."""

    WRITE_TOKEN = "hf_FakeWriteToken0123456789"

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.hits: list[Hit] = []
        self.tokens: dict[str, str] = {self.WRITE_TOKEN: "write"}  # token -> "write" or "read"
        self.objects: dict[str, bytes] = {}  # LFS objects uploaded, by sha256
        self.bodies: list[bytes] = []  # every request body received (POST, PUT)
        self._cuts: dict[tuple[str, str], list[int]] = {}  # (repo, path) -> [bytes, times left]
        self._corrupt: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._servers = [self._server(cdn=False), self._server(cdn=True)]
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        self._threads: list[threading.Thread] = []

    # -- set-up ----------------------------------------------------------------------------------
    def add_repo(
        self, repo_id: str, folder: Path | None = None, *, files: dict[str, bytes] | None = None,
        branches: tuple[str, ...] = ("main",), gated: bool = False, token: str | None = None,
        extra_siblings: tuple[str, ...] = (),
    ) -> FakeRepo:
        """Serve `folder` (every file under it, read now) and/or `files` as `repo_id`."""
        content: dict[str, bytes] = {}
        if folder is not None:
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    content[path.relative_to(folder).as_posix()] = path.read_bytes()
        content.update(files or {})
        fake = {
            rel: FakeFile(data, lfs=rel.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE)
            for rel, data in content.items()
        }
        listing = "".join(f"{rel}\0{f.blob_id}\n" for rel, f in sorted(fake.items()))
        commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        repo = FakeRepo(repo_id, fake, dict.fromkeys(branches, commit), commit, gated, token, extra_siblings)
        self.repos[repo_id] = repo
        return repo

    def cut_after(self, repo_id: str, relpath: str, nbytes: int, *, times: int = 1) -> None:
        """The next `times` downloads of the file stop after `nbytes` and drop the connection."""
        self._cuts[(repo_id, relpath)] = [nbytes, times]

    def corrupt(self, repo_id: str, relpath: str, on: bool = True) -> None:
        """Serve the file with one byte flipped (same size, wrong digest)."""
        (self._corrupt.add if on else self._corrupt.discard)((repo_id, relpath))

    # -- what happened ---------------------------------------------------------------------------
    def file_hits(self, relpath: str, *, method: str = "GET") -> list[Hit]:
        """Requests that fetched `relpath`'s bytes (hub resolve or CDN)."""
        return [h for h in self.hits if h.method == method and h.path.endswith("/" + relpath)
                and ("/resolve/" in h.path or h.cdn)]

    def bytes_served(self, relpath: str) -> int:
        return sum(h.sent for h in self.file_hits(relpath))

    # -- life cycle ------------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def _server(self, *, cdn: bool) -> ThreadingHTTPServer:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub, Handler.cdn = hub, cdn
        server = _Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        return server


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client hung up: normal here
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub
    cdn: bool

    def log_message(self, *args: object) -> None:  # quiet
        pass

    # -- routing ---------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def do_POST(self) -> None:
        self._route(body=True)

    def do_PUT(self) -> None:
        self._route(body=True)

    def _route(self, *, body: bool) -> None:
        self._sent = 0
        self._status = 0
        url = urlsplit(self.path)
        path = unquote(url.path)
        try:
            if self.command in ("POST", "PUT"):
                self._write(url.path, self._read_body())
            elif self.cdn and path.startswith("/cdn/"):
                self._cdn(url.path[len("/cdn/"):], body)
            elif not self.cdn and path.startswith("/api/models/"):
                self._api(url.path[len("/api/models/"):], "blobs=" in url.query.lower())
            elif not self.cdn and "/resolve/" in url.path:
                self._resolve(url.path, body)
            else:
                self._error(404, "EntryNotFound", "no such route")
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self.hub._lock:
                self.hub.hits.append(Hit(self.command, path, self.headers.get("Range"), self._status,
                                         self._sent, self.headers.get("Authorization"), self.cdn))

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        auth = self.headers.get("Authorization")
        if repo.token is not None and auth != f"Bearer {repo.token}":
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and auth is None:
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
            return None
        return repo

    # -- endpoints -------------------------------------------------------------------------------
    def _api(self, rest: str, blobs: bool) -> None:
        parts = rest.split("/")
        repo = self._repo("/".join(parts[:2]))
        if repo is None:
            return
        revision = unquote(parts[3]) if len(parts) == 4 and parts[2] == "revision" else "main"
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        siblings = []
        for rel, f in sorted(repo.files.items()):
            entry: dict = {"rfilename": rel}
            if blobs:
                entry.update(size=len(f.data), blobId=f.blob_id)
                if f.lfs:
                    entry["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": len(lfs_pointer(f.data))}
            siblings.append(entry)
        for rel in repo.extra_siblings:
            siblings.append({"rfilename": rel, **({"size": 1, "blobId": git_blob_id(b"x")} if blobs else {})})
        info = {"_id": "0" * 24, "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                "private": repo.token is not None, "gated": "auto" if repo.gated else False, "disabled": False,
                "tags": [], "lastModified": "2026-11-01T00:00:00.000Z", "siblings": siblings}
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body=True)

    def _resolve(self, raw: str, body: bool) -> None:
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", raw)
        if match is None:
            return self._error(404, "EntryNotFound", "bad resolve url")
        repo = self._repo(unquote(match[1]))
        if repo is None:
            return
        commit = repo.resolve(unquote(match[2]))
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        rel = unquote(match[3])
        f = repo.files.get(rel) or (FakeFile(b"x", lfs=False) if rel in repo.extra_siblings else None)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{f.blob_id}"', "Accept-Ranges": "bytes"}
        if f.lfs:  # like the hub: the bytes live on a CDN (another origin)
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data)),
                            "Location": f"{self.hub.cdn_url}/cdn/{quote(repo.repo_id)}/{quote(rel)}"})
            return self._send(302, b"", headers, body=body)
        self._file(repo.repo_id, rel, f.data, headers, body)

    def _cdn(self, raw: str, body: bool) -> None:
        org, name, rel = (unquote(p) for p in raw.split("/", 2))
        repo = self.hub.repos.get(f"{org}/{name}")
        f = repo.files.get(rel) if repo else None
        if f is None:
            return self._send(404, b"NoSuchKey", {}, body=body)
        self._file(repo.repo_id, rel, f.data, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"}, body)

    # -- writes ----------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, up to the empty line
                pass
            data = b"".join(parts)
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.hub._lock:
            self.hub.bodies.append(data)
        return data

    def _writer(self, repo_id: str | None = None) -> bool:
        """The request carries a write token (else the error is sent and False returned)."""
        auth = self.headers.get("Authorization") or ""
        right = self.hub.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        if right is None:
            self._error(401, "", "Invalid credentials in Authorization header")
            return False
        if right != "write":
            self._error(403, "", f"You don't have the rights to write to {repo_id or 'this namespace'}")
            return False
        return True

    def _json(self, status: int, value: object) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"}, body=True)

    def _write(self, raw: str, data: bytes) -> None:
        path = unquote(raw)
        if self.cdn:
            match = re.fullmatch(r"/upload/([0-9a-f]{64})", path)
            if match is None or self.command != "PUT":
                return self._send(404, b"NoSuchUpload", {}, body=True)
            if hashlib.sha256(data).hexdigest() != match[1]:
                return self._send(400, b"BadDigest", {}, body=True)
            with self.hub._lock:
                self.hub.objects[match[1]] = data
            return self._send(200, b"", {"ETag": f'"{match[1]}"'}, body=True)
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create":
            return self._create_repo(json.loads(data or b"{}"))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if match is not None:
            return self._repo_write(match[1], match[2], match[3], data)
        match = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)", path)
        if match is not None:
            return self._lfs(match[1], match[2], json.loads(data or b"{}"))
        self._error(404, "EntryNotFound", "no such route")

    def _create_repo(self, payload: dict) -> None:
        if not self._writer():
            return
        repo_id = f"{payload.get('organization') or 'user'}/{payload.get('name')}"
        if repo_id in self.hub.repos:  # the hub's answer names the repository (create_repo reads it)
            message = "You already created this model repo"
            return self._send(409, json.dumps({"error": message, "url": f"{self.hub.url}/{repo_id}"}).encode(),
                              {"X-Error-Message": message, "Content-Type": "application/json"}, body=True)
        self.hub.add_repo(repo_id, files={".gitattributes": GITATTRIBUTES},
                          token=self.hub.WRITE_TOKEN if payload.get("visibility") == "private" else None)
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _repo_write(self, repo_id: str, action: str, revision: str, data: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._writer(repo_id):
            return
        if action == "branch":
            if revision in repo.branches:
                return self._error(409, "", "Reference already exists")
            repo.branches[revision] = repo.branches.get("main", repo.commit)
            return self._json(200, {})
        if revision not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if action == "preupload":
            files = []
            for f in json.loads(data)["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
                have = repo.files.get(f["path"])
                oid = None if have is None else have.sha256 if have.lfs else git_blob_id(have.data)
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            return self._json(200, {"files": files, "commitOid": repo.branches[revision]})
        self._commit(repo, revision, data)

    def _commit(self, repo: FakeRepo, revision: str, data: bytes) -> None:
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "", "The commit has no header")
        parent = lines[0]["value"].get("parentCommit")
        if parent is not None and parent != repo.branches[revision]:
            return self._error(412, "", "A commit has happened since. Please refresh and try again.")
        files = dict(repo.files)
        for line in lines[1:]:
            value = line["value"]
            rel = value["path"]
            if line["key"] == "file":
                files[rel] = FakeFile(base64.b64decode(value["content"]), lfs=False)
            elif line["key"] == "lfsFile":
                with self.hub._lock:
                    obj = self.hub.objects.get(value["oid"])
                if obj is None:
                    return self._error(400, "", f"LFS object {value['oid']} of {rel} was never uploaded")
                files[rel] = FakeFile(obj, lfs=True)
            elif line["key"] == "deletedFile":
                if files.pop(rel, None) is None:
                    return self._error(404, "EntryNotFound", "A file with this name doesn't exist")
            else:
                return self._error(400, "", f"Unsupported commit operation {line['key']}")
        listing = "".join(f"{rel}\0{f.blob_id}\n" for rel, f in sorted(files.items()))
        commit = hashlib.sha1(f"{repo.repo_id}\n{repo.branches[revision]}\n{listing}".encode()).hexdigest()
        repo.files, repo.commit, repo.branches[revision] = files, commit, commit
        self._json(200, {"success": True, "commitOid": commit, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit}",
                         "commitMessage": lines[0]["value"].get("summary", "")})

    def _lfs(self, repo_id: str, action: str, payload: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._writer(repo_id):
            return
        if action == "verify":
            obj = self.hub.objects.get(payload.get("oid", ""))
            if obj is None or len(obj) != payload.get("size"):
                return self._error(404, "", "Object not found or of another size")
            return self._json(200, {"message": "ok"})
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.cdn_url}/upload/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    # -- bytes -----------------------------------------------------------------------------------
    def _file(self, repo_id: str, rel: str, data: bytes, headers: dict, body: bool) -> None:
        if (repo_id, rel) in self.hub._corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if wanted:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if m is None or int(m[1]) >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body=body)
            start, end = int(m[1]), int(m[2]) + 1 if m[2] else len(data)
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
            data, status = data[start:end], 206
        cut = None
        if body:
            with self.hub._lock:
                knob = self.hub._cuts.get((repo_id, rel))
                if knob and knob[1] > 0:
                    knob[1] -= 1
                    cut = knob[0]
        self._send(status, data, headers, body=body, cut=cut)

    def _error(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        codes = {"X-Error-Code": code} if code else {}
        self._send(status, body, {**codes, "X-Error-Message": message,
                                  "Content-Type": "application/json", **(headers or {})}, body=self.command != "HEAD")

    def _send(self, status: int, data: bytes, headers: dict, *, body: bool, cut: int | None = None) -> None:
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        limit = len(data) if cut is None else min(cut, len(data))
        for i in range(0, limit, CHUNK):
            piece = data[i:min(i + CHUNK, limit)]
            self.wfile.write(piece)
            self._sent += len(piece)
        if cut is not None:  # drop the connection mid-body, as a flaky network does
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


# ---- the fixture ----------------------------------------------------------------------------------
@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A running FakeHub; HF_ENDPOINT points at it and the HF cache (HF_HOME) is in tmp_path.

    The conftests set HF_HUB_OFFLINE=1 before huggingface_hub is imported, which freezes it into
    huggingface_hub.constants: that constant is switched off here for the test's duration (and a
    developer's own HF token is never sent: HF_HUB_DISABLE_IMPLICIT_TOKEN, also read at import, and
    HF_TOKEN_PATH). Uploads go by LFS: HF_HUB_DISABLE_XET, as this hub has no Xet storage.
    """
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)  # never send a real token here
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))  # nor read one (get_token)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # uploads by LFS: this hub has no Xet CAS
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub
