"""The small pages `hyprstream web` answers with instead of the app: refusals and "all sessions
in use". Plain HTML, no script, nothing loaded from elsewhere."""

from __future__ import annotations

from html import escape

# On every page: never framed by another site (clickjacking), never cached, no Referer sent on.
PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>hyprstream: {title}</title>
<style>
body {{ background: #0c181f; color: #e0e0e0; font-family: menlo, "DejaVu Sans Mono", monospace;
       display: flex; align-items: center; justify-content: center; height: 90vh; margin: 0; }}
main {{ background: #12232d; padding: 32px 48px; max-width: 640px; }}
h1 {{ font-size: 20px; color: #ffffff; }}
p {{ line-height: 1.5; }}
</style>
</head>
<body><main><h1>{title}</h1><p>{text}</p></main></body>
</html>
"""


def message_page(title: str, text: str) -> str:
    return TEMPLATE.format(title=escape(title), text=escape(text))


def busy_page(limit: int) -> str:
    sessions = "session" if limit == 1 else "sessions"
    return message_page(
        "All sessions are in use",
        f"This hyprstream web view runs at most {limit} {sessions} at once, and all are open. "
        "Close another hyprstream tab (its app stops with it), then reload this page.",
    )
