"""`hyprstream web`'s guard on the real server: the token on the page and the websocket, Host and
Origin against DNS rebinding and other sites, and the bind rule at start."""

from __future__ import annotations

import aiohttp
import httpx
import pytest

from hyprstream_tui.errors import InvalidInput
from hyprstream_tui.web.guard import check_bind, same_origin, token_matches
from tests.helpers import assert_one_line_error
from tests.web.live import TOKEN


# ---- the rules, as functions --------------------------------------------------------------------
@pytest.mark.parametrize("origin,host,same", [
    ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
    ("http://LOCALHOST:8000", "localhost:8000", True),
    ("https://hs.example.com", "hs.example.com", True),
    ("https://hs.example.com", "hs.example.com:443", True),
    ("http://[::1]:8000", "[::1]:8000", True),
    ("http://localhost:9999", "localhost:8000", False),  # another port on this machine is another site
    ("http://evil.example", "127.0.0.1:8000", False),
    ("https://127.0.0.1:8000", "127.0.0.1", False),
    ("null", "127.0.0.1:8000", False),
    ("file://", "127.0.0.1:8000", False),
    ("http://127.0.0.1:8000", "", False),
])
def test_same_origin(origin, host, same):
    assert same_origin(origin, host) is same


def test_a_token_matches_only_itself():
    assert token_matches("abc", "abc")
    assert not token_matches("abd", "abc") and not token_matches("", "abc") and not token_matches(None, "abc")


def test_check_bind_needs_a_token_beyond_loopback():
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "t")
    with pytest.raises(InvalidInput, match="--token"):
        check_bind("0.0.0.0", None)


# ---- at start -----------------------------------------------------------------------------------
def test_a_non_loopback_host_without_a_token_is_refused_at_start(cli):
    result = cli("web", "--host", "0.0.0.0", "--port", "8123", env={"HYPRSTREAM_WEB_TOKEN": ""}, timeout=60)
    assert_one_line_error(result, "Refusing to listen on 0.0.0.0 without a token", "--token")
    assert result.returncode == 2


@pytest.mark.parametrize("args,needle", [(["--port", "0"], "--port"), (["--max-sessions", "0"], "--max-sessions")])
def test_bad_settings_are_one_line_errors(cli, args, needle):
    assert_one_line_error(cli("web", *args, timeout=60), needle)


# ---- the page ----------------------------------------------------------------------------------
def test_the_page_needs_the_token_and_keeps_it_as_a_cookie(web):
    server = web()
    with httpx.Client(base_url=server.url, follow_redirects=False) as client:
        missing = client.get("/")
        assert missing.status_code == 401 and "Token required" in missing.text
        assert missing.headers["x-frame-options"] == "DENY"
        assert client.get("/", params={"token": TOKEN + "x"}).status_code == 401
        assert client.get("/download/abc").status_code == 401

        given = client.get("/", params={"token": TOKEN, "fontsize": "14"})
        assert given.status_code == 303 and given.headers["location"] == "./?fontsize=14"
        cookie = given.headers["set-cookie"]
        assert f"hyprstream_web_{server.port}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie

        page = client.get("/?fontsize=14")  # the cookie now
        assert page.status_code == 200
        assert 'data-session-websocket-url="ws"' in page.text and 'src="static/js/textual.js"' in page.text
    assert httpx.get(f"{server.url}/static/js/textual.js").status_code == 200  # textual's assets are public
    assert TOKEN not in server.log.read_text().split("\n", 1)[1]  # no access log with the token in it


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io"])
def test_a_rebound_host_name_gets_400(web, host):
    server = web()
    response = httpx.get(server.page(), headers={"Host": host})
    assert response.status_code == 400 and "Invalid Host header" in response.text


def test_allowed_host_adds_a_name(web):
    server = web("--allowed-host", "hs.example.com")
    assert httpx.get(server.page(), headers={"Host": "hs.example.com"}).status_code == 303
    assert httpx.get(server.page(), headers={"Host": "other.example.com"}).status_code == 400


def test_another_origin_gets_403_on_the_page(web):
    server = web()
    response = httpx.get(server.page(), headers={"Origin": "http://evil.example"})
    assert response.status_code == 403


# ---- the websocket -------------------------------------------------------------------------------
async def handshake(url: str, headers: dict[str, str]) -> int:
    """The websocket handshake's status (101 when it opened); the socket is closed at once."""
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(url, headers=headers)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


@pytest.mark.asyncio
async def test_the_websocket_needs_the_token_and_the_page_s_origin(web):
    server = web()
    no_token = server.ws().replace(f"token={TOKEN}&", "")
    assert await handshake(no_token, {"Origin": server.origin}) == 401
    assert await handshake(server.ws().replace(TOKEN, "wrong"), {"Origin": server.origin}) == 401
    assert await handshake(no_token, {"Origin": server.origin,
                                      "Cookie": f"hyprstream_web_{server.port}=wrong"}) == 401
    # Origin: another site, another port on this machine, none at all (a browser always sends one).
    for origin in ("http://evil.example", f"http://127.0.0.1:{server.port + 1}", "null"):
        assert await handshake(server.ws(), {"Origin": origin}) == 403, origin
    assert await handshake(server.ws(), {}) == 403
    assert await handshake(server.ws(), {"Origin": server.origin, "Host": "evil.example"}) == 400
    # With all of it, the session opens: by query token, and by the page's cookie.
    assert await handshake(server.ws(), {"Origin": server.origin}) == 101
    cookie = f"hyprstream_web_{server.port}={TOKEN}"
    assert await handshake(no_token, {"Origin": server.origin, "Cookie": cookie}) == 101


def test_without_a_token_loopback_is_open(web):
    server = web(token=None)
    assert httpx.get(server.page()).status_code == 200


@pytest.mark.asyncio
async def test_the_token_from_the_environment_guards_and_stays_out_of_the_app(web):
    import asyncio
    import time

    server = web(token=None, env={"HYPRSTREAM_WEB_TOKEN": TOKEN})
    server.token = TOKEN  # the URLs of the test carry it
    assert httpx.get(f"{server.url}/").status_code == 401
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.ws(), headers={"Origin": server.origin})
        deadline = time.monotonic() + 30
        while not (apps := [p for p in server.descendants() if p.cmdline()[-1:] == ["tui"]]):  # exec'd
            assert time.monotonic() < deadline, "no app process"
            await asyncio.sleep(0.1)
        environ = open(f"/proc/{apps[0].pid}/environ", "rb").read().split(b"\0")
        assert not any(e.startswith(b"HYPRSTREAM_WEB_TOKEN=") for e in environ)
        await ws.close()
