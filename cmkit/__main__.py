from cmkit.cli import main

raise SystemExit(main())
