"""The OpenAI-compatible HTTP server: `server.app.create_app(...)`, run by `hyprstream serve`."""
