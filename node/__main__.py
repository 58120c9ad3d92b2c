"""``python -m node`` is ``prognode``."""

from node.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
