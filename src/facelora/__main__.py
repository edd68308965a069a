from facelora.workflow.cli import main

raise SystemExit(main())
