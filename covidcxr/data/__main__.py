from covidcxr.data.cli import main

raise SystemExit(main())
