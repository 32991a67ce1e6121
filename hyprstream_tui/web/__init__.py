"""`hyprstream web`: the TUI in a browser through textual-serve, one app process per tab.

`server.py` is the aiohttp server (textual-serve's, extended), `guard.py` the Host / Origin /
token checks, `sessions.py` the app processes and their cap, `pages.py` the refusal pages.
Never imports textual's app, the engine or the store: each session's app process does.
"""
