"""Helpers for the web tests: the real `hyprstream web` in a subprocess, a tab driven over the raw
websocket (aiohttp's client, what textual.js speaks), the screen text out of the terminal stream,
and the process tree around the server (psutil)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.helpers import REPO_ROOT

TOKEN = "test-token-1f3a"
F2, F3, CTRL_S, ENTER = "\x1bOQ", "\x1bOR", "\x13", "\r"
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)")


def screen_text(stream: str) -> str:
    """What a terminal stream draws, as plain text (escape sequences out; enough to find words)."""
    return ANSI.sub("", stream)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WebServer:
    """`hyprstream web` running in a subprocess on 127.0.0.1:`port`."""

    proc: subprocess.Popen
    port: int
    token: str | None
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return self.url

    def page(self) -> str:
        return f"{self.url}/?token={self.token}" if self.token else f"{self.url}/"

    def ws(self, width: int = 120, height: int = 36) -> str:
        query = f"token={self.token}&" if self.token else ""
        return f"ws://127.0.0.1:{self.port}/ws?{query}width={width}&height={height}"

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_web(home: Path, tmp_path: Path, *args: str, token: str | None = TOKEN,
              env: dict[str, str] | None = None) -> WebServer:
    port = free_port()
    log = tmp_path / f"web-{port}.log"
    argv = [sys.executable, "-m", "hyprstream_tui", "--home", str(home), "web", "--port", str(port), *args]
    if token:
        argv += ["--token", token]
    full_env = {**os.environ, "HYPRSTREAM_HOME": str(home)}
    full_env.pop("HYPRSTREAM_WEB_TOKEN", None)
    full_env.update(env or {})
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=full_env)
    server = WebServer(proc, port, token, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"hyprstream web exited ({proc.returncode}): {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise AssertionError(f"hyprstream web did not listen within 30 s: {log.read_text()}")


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie whose parent has not reaped it yet counts as gone)."""
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def wait_gone(procs: list[psutil.Process], timeout: float = 40) -> list[psutil.Process]:
    """Wait until none of `procs` runs; returns those left after `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def engine_children(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Among `procs`, the children of a session's forkserver: the engine child (or a training run)."""
    forkservers = {p.pid for p in procs if "multiprocessing.forkserver" in cmdline(p)}
    out = []
    for p in procs:
        try:
            if p.ppid() in forkservers:
                out.append(p)
        except psutil.Error:
            pass
    return out


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(str(p.pid))
    return out


@dataclass
class Tab:
    """One browser tab's websocket, driven the way textual.js drives it."""

    ws: object
    stream: str = ""
    reader: asyncio.Task | None = None
    decoder: object = field(default=None)

    @classmethod
    async def open(cls, session, server: WebServer, **kwargs) -> "Tab":
        import codecs

        ws = await session.ws_connect(server.ws(**kwargs), headers={"Origin": server.origin})
        tab = cls(ws, decoder=codecs.getincrementaldecoder("utf-8")(errors="replace"))
        tab.reader = asyncio.create_task(tab._read())
        return tab

    async def _read(self) -> None:
        from aiohttp import WSMsgType

        async for message in self.ws:
            if message.type == WSMsgType.BINARY:
                self.stream += self.decoder.decode(message.data)

    @property
    def text(self) -> str:
        return screen_text(self.stream)

    async def wait_for(self, needle: str, timeout: float = 60, *, after: int = 0) -> int:
        """Wait until `needle` is drawn (after stream position `after`); returns the position."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (at := self.text.find(needle, after)) >= 0:
                return at
            await asyncio.sleep(0.1)
        raise AssertionError(f"{needle!r} was not drawn within {timeout} s; the screen drew:\n{self.text[-3000:]}")

    async def press(self, *keys: str) -> None:
        for key in keys:
            await self.ws.send_str(json.dumps(["stdin", key]))
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self.ws.close()
        if self.reader is not None:
            await self.reader
