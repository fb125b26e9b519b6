from bench.serve.cli import main

raise SystemExit(main())
