from facelora.cli import main

raise SystemExit(main())
