"""What the benchmarks share: a ``prognode serve`` process on a config written for the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.peers import REPO, wait_port


def serve_config(port: int, extra: str = "") -> str:
    """A node config: DICOM on ``port``, storage in ``var``, no disk floor, web off, warnings only; ``extra``: TOML."""
    return (f'[node]\nport = {port}\nstorage = "var"\nmin_free_bytes = 0\n[web]\nenabled = false\n'
            f'[logging]\nlevel = "WARNING"\n{extra}')


def start_serve(work: Path, config_text: str, port: int, name: str = "prognode",
                timeout: float = 60.0) -> subprocess.Popen[bytes]:
    """Write ``work/<name>.toml``, start ``python -m node serve`` on it (stderr to ``work/<name>.log``) and
    wait for its DICOM port; the caller stops it with ``tests.peers.stop_pid``."""
    cfg = work / f"{name}.toml"
    cfg.write_text(config_text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with (work / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(cfg)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_port(port, timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc
