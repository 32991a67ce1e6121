"""The in-process engine: loading, sampling, generation. Imports torch lazily.

The facade is `hyprstream_tui.engine.engine.Engine`; importing this package stays cheap.
"""
