"""What stands between the network and the engine.

- Binding: 127.0.0.1 by default; any other address needs an API key (`check_bind`).
- Host header: only the names the server was bound for are answered, so a web page whose DNS name
  was re-pointed at 127.0.0.1 (DNS rebinding) gets 400, not the API.
- API key: `Authorization: Bearer KEY` on every /v1 route, compared in constant time.
- Body size: a body beyond `max_body_bytes` is refused with 413 before it is parsed.
- No CORS headers at all: browsers keep other origins' pages from reading responses.

`Guard` is a plain ASGI middleware, so these checks run before FastAPI parses anything.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Iterable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hyprstream_tui.errors import InvalidInput

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_MAX_BODY = 4 * 1024 * 1024


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise InvalidInput(
            f"Refusing to listen on {host} without an API key: anyone on the network could use "
            "it. Pass --api-key KEY (or set HYPRSTREAM_API_KEY), or bind 127.0.0.1."
        )


def allowed_hosts_for(bind: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names to answer: loopback names, the bound address, and `extra`.

    Bound to every interface (0.0.0.0 / ::), any name is answered: an API key is required there.
    """
    if bind in ("0.0.0.0", "::", ""):
        return frozenset({"*"})
    return frozenset({*LOOPBACK_NAMES, bind.lower().strip("[]"), *(h.lower() for h in extra)})


def host_name(header: str) -> str:
    """`example.com:8080` -> `example.com`; `[::1]:8080` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware: Host check, API key, body size limit (in that order)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, allowed_hosts: Iterable[str],
                 max_body_bytes: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.api_key = api_key
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not self._host_ok(headers.get("host", "")):
            await _reply(send, 400, "Invalid Host header: this server answers only the names it "
                                    "was started for.", code="invalid_host")
            return
        if self.api_key and scope["path"].startswith("/v1") and not self._key_ok(headers):
            await _reply(send, 401, "Incorrect API key provided: send it as 'Authorization: "
                                    "Bearer KEY'.", code="invalid_api_key",
                         headers=[(b"www-authenticate", b"Bearer")])
            return
        body = await self._read_body(headers, receive, send)
        if body is None:
            return
        await self.app(scope, _replay(body, receive), send)

    def _host_ok(self, header: str) -> bool:
        return "*" in self.allowed_hosts or host_name(header) in self.allowed_hosts

    def _key_ok(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or self.api_key is None:
            return False
        return hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _read_body(self, headers: dict[str, str], receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 when it is too large."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send) -> None:
        await _reply(send, 413, f"The request body is larger than {self.max_body_bytes} bytes: "
                                "send a shorter prompt.", code="request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the buffered body once, then the real channel (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Send, status: int, message: str, *, code: str,
                 headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                    "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})
