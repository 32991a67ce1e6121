"""What stands between the network and the app processes of `hyprstream web`.

textual-serve has no authentication, no Origin check and no session limit; the rules here are
`serve`'s (server/security.py), applied to a page and its websocket:

- Binding: 127.0.0.1 by default; any other address needs a token (`check_bind`).
- Host header: only the names the server was bound for are answered (DNS rebinding gets 400).
- Origin: a request that carries one (every browser websocket does, and it is required there) must
  come from the page's own origin, port included: another site, or another port on localhost,
  gets 403.
- Token: `?token=T` on the page, kept as an HttpOnly, SameSite=Lax cookie that the websocket
  then carries; compared in constant time. Without it: 401. Only textual-serve's static files
  (its JavaScript, CSS and fonts) are served without it.

`guard_middleware` runs these checks before any handler of the aiohttp application.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from hyprstream_tui.errors import InvalidInput
from hyprstream_tui.server.security import allowed_hosts_for, host_name, is_loopback
from hyprstream_tui.web.pages import PAGE_HEADERS, message_page

TOKEN_PARAM = "token"
STATIC_PREFIX = "/static/"
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise InvalidInput(
            f"Refusing to listen on {host} without a token: anyone on the network could use the "
            "workstation. Pass --token TOKEN (or set HYPRSTREAM_WEB_TOKEN), or bind 127.0.0.1."
        )


def token_matches(given: str | None, token: str) -> bool:
    """`given` is the token, compared in constant time (for a given length)."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def _authority(value: str, scheme: str) -> str:
    """`Example.com:443` for https -> `example.com`: host and port, the scheme's default port left out."""
    value = value.strip().lower()
    default = DEFAULT_PORTS.get(scheme)
    return value.removesuffix(f":{default}") if default is not None else value


def same_origin(origin: str, host_header: str) -> bool:
    """The page at `origin` is the one this Host serves: same host and port (the scheme's default
    port counts as given). `null` and anything not http(s) never is."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or not host_header:
        return False
    return _authority(parts.netloc, parts.scheme) == _authority(host_header, parts.scheme)


@dataclass(frozen=True, kw_only=True)
class GuardRules:
    token: str | None
    allowed_hosts: frozenset[str]
    cookie_name: str

    @classmethod
    def for_bind(cls, host: str, port: int, *, token: str | None, extra_hosts: tuple[str, ...] = ()) -> "GuardRules":
        # one cookie per port: two web views on one machine would otherwise overwrite each other's
        return cls(token=token, allowed_hosts=allowed_hosts_for(host, extra_hosts),
                   cookie_name=f"hyprstream_web_{port}")

    def host_ok(self, header: str) -> bool:
        return "*" in self.allowed_hosts or host_name(header) in self.allowed_hosts


def is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def _without_token(request: web.Request) -> str:
    """The page's own address (relative, so it holds behind a reverse proxy) without the token."""
    rest = [(k, v) for k, v in request.query.items() if k != TOKEN_PARAM]
    return "./" + (f"?{urlencode(rest)}" if rest else "")


def _refuse(status: int, title: str, text: str) -> web.Response:
    return web.Response(status=status, text=message_page(title, text), content_type="text/html",
                        headers=PAGE_HEADERS)


def guard_middleware(rules: GuardRules) -> Middleware:
    """aiohttp middleware: Host, then Origin, then the token (in that order)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host, origin = request.headers.get("Host", ""), request.headers.get("Origin")
        if not rules.host_ok(host):
            return _refuse(400, "Invalid Host header",
                           "This server answers only the names it was started for (--allowed-host adds one).")
        if (origin is not None or is_websocket(request)) and not same_origin(origin or "", host):
            return _refuse(403, "Cross-origin request refused",
                           "Only pages served by this hyprstream web view may connect to it.")
        if rules.token is None or request.path.startswith(STATIC_PREFIX):
            return await handler(request)
        if token_matches(request.cookies.get(rules.cookie_name), rules.token):
            return await handler(request)
        if token_matches(request.query.get(TOKEN_PARAM), rules.token):
            if is_websocket(request) or request.method != "GET" or request.path != "/":
                return await handler(request)
            # The page with its token: keep it as a cookie and take it out of the address bar.
            redirect = web.Response(status=303, headers={**PAGE_HEADERS, "Location": _without_token(request)})
            redirect.set_cookie(rules.cookie_name, rules.token, httponly=True, samesite="Lax")
            return redirect
        return _refuse(401, "Token required",
                       "Open the address that `hyprstream web` printed: it ends in ?token=... "
                       "(the token given to --token or $HYPRSTREAM_WEB_TOKEN).")

    return guard
