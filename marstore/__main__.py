from marstore.cli import main

raise SystemExit(main())
