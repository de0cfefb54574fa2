from medusa_liger.cli import main

raise SystemExit(main())
