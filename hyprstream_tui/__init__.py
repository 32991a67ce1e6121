"""hyprstream-tui: a terminal workstation for local LLMs backed by git."""

__version__ = "0.1.0"
