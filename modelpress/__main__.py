from modelpress.cli import main

raise SystemExit(main())
