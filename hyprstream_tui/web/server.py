"""`hyprstream web`: the Textual app in a browser, through textual-serve.

Each websocket (one browser tab) gets its own app process (`sessions.AppSession`), all on the same
home, so they share one store and its locks: two tabs training one adapter get the one-writer
error, as two terminals would. `WebServer` is textual-serve's aiohttp `Server` with:

- `guard.guard_middleware` in front of every route (Host, Origin, token);
- the page's URLs relative (`ws`, `static/`), so it works behind a reverse proxy, under a sub-path
  and over https, with no public URL to configure;
- a session cap: past `max_sessions` the page is a plain "all sessions in use" page (503), and a
  websocket that comes anyway is refused before an app starts;
- shutdown ending every session's process group; no access log (URLs may carry the token).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web
from textual_serve.server import Server, to_int

from hyprstream_tui.errors import InvalidInput
from hyprstream_tui.web.guard import TOKEN_PARAM, GuardRules, check_bind, guard_middleware
from hyprstream_tui.web.pages import PAGE_HEADERS, busy_page
from hyprstream_tui.web.sessions import AppSession, SessionLimit

log = logging.getLogger(__name__)

TOKEN_ENV = "HYPRSTREAM_WEB_TOKEN"
HEARTBEAT_S = 15.0  # a tab that vanished without closing its websocket is noticed within 2x this
SHUTDOWN_TIMEOUT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class WebConfig:
    home: Path  # every session's store
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_sessions: int = 4
    allowed_hosts: tuple[str, ...] = ()  # Host names to answer besides loopback and `host`

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InvalidInput(f"`port` must be between 1 and 65535, got {self.port}.")
        if self.max_sessions < 1:
            raise InvalidInput(f"`max_sessions` must be at least 1, got {self.max_sessions}.")
        if self.token is not None and not self.token.strip():
            raise InvalidInput("`token` is empty: give a token, or none at all on 127.0.0.1.")
        check_bind(self.host, self.token)

    def app_argv(self) -> list[str]:
        """The command each session runs: the TUI on this home, with this interpreter."""
        return [sys.executable, "-m", "hyprstream_tui", "--home", str(self.home), "tui"]

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?{TOKEN_PARAM}={quote(self.token, safe='')}" if self.token else "")


class WebServer(Server):
    """textual-serve's Server with the guard, relative URLs, the session cap and group shutdown."""

    def __init__(self, config: WebConfig) -> None:
        self.config = config
        self.argv = config.app_argv()
        super().__init__(" ".join(self.argv), host=config.host, port=config.port, title="hyprstream")
        self.rules = GuardRules.for_bind(config.host, config.port, token=config.token,
                                         extra_hosts=config.allowed_hosts)
        self.sessions = SessionLimit(config.max_sessions)

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()
        app.middlewares.append(guard_middleware(self.rules))
        return app

    async def make_app(self) -> web.Application:
        """The aiohttp application (tests run it with their own runner)."""
        return await self._make_app()

    async def on_startup(self, app: web.Application) -> None:
        print(f"hyprstream web on {self.config.url()} (at most {self.config.max_sessions} sessions; "
              "Ctrl+C stops)", file=sys.stderr, flush=True)

    async def on_shutdown(self, app: web.Application) -> None:
        await self.sessions.stop_all()

    async def handle_index(self, request: web.Request) -> web.StreamResponse:
        if self.sessions.full:
            return web.Response(status=503, text=busy_page(self.sessions.limit), content_type="text/html",
                                headers=PAGE_HEADERS)
        context: dict[str, Any] = {
            "font_size": to_int(request.query.get("fontsize", "16"), 16),
            "app_websocket_url": "ws",  # relative: the browser makes it ws(s)://<this page's host>/.../ws
            "config": {"static": {"url": "static/"}},
            "application": {"name": self.title},
        }
        response = aiohttp_jinja2.render_template("app_index.html", request, context)
        response.headers.update(PAGE_HEADERS)
        return response

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        if self.sessions.full:
            raise web.HTTPServiceUnavailable(text=f"All {self.sessions.limit} sessions are in use.")
        websocket = web.WebSocketResponse(heartbeat=HEARTBEAT_S)
        session = AppSession(self.argv, hide_env=[TOKEN_ENV], write_bytes=websocket.send_bytes,
                             write_str=websocket.send_str, close=websocket.close,
                             download_manager=self.download_manager, debug=self.debug)
        self.sessions.add(session)  # no await since `full` was read: the cap holds
        try:
            await websocket.prepare(request)
            await session.start(to_int(request.query.get("width", "80"), 80),
                                to_int(request.query.get("height", "24"), 24))
            await self._process_messages(websocket, session)
        except asyncio.CancelledError:
            await websocket.close()
        except Exception as error:  # a malformed message from the browser ends its session
            log.warning("web session ended: %s", error)
        finally:
            try:
                await session.stop()
            finally:
                self.sessions.discard(session)
        return websocket

    def serve(self, debug: bool = False) -> None:
        """Run until Ctrl+C or SIGTERM; then every session's app and engine end too."""
        self.debug = debug
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
        web.run_app(self._make_app(), host=self.config.host, port=self.config.port, access_log=None,
                    print=None, handle_signals=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S)


def serve(config: WebConfig, *, debug: bool = False) -> None:
    WebServer(config).serve(debug=debug)
