from hyprstream_tui import interrupt

interrupt.during_start_up()  # Ctrl-C while the CLI loads: one line, not a traceback

from hyprstream_tui.cli import main  # noqa: E402

raise SystemExit(main())
