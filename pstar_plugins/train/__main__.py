from pstar_plugins.train import main

raise SystemExit(main())
