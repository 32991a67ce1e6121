from hyprstream_tui.cli import main

raise SystemExit(main())
