from lmexec.cli import main

raise SystemExit(main())
