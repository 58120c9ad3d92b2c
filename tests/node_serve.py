"""``python tests/node_serve.py serve --config ...``: prognode's CLI with the test pipelines
(for the kill -9 tests, which must run the node as a separate process)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.cli import main  # noqa: E402
from tests.node_pipelines import FACTORIES  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], factories=FACTORIES))
