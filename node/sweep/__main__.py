"""``python -m node.sweep sweep ...``."""

from node.sweep.cli import main

raise SystemExit(main())
