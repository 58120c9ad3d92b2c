"""A throw-away PostgreSQL server for tests and benchmarks (Debian's ``postgresql`` package).

``initdb`` and ``postgres`` run from ``/usr/lib/postgresql/<version>/bin`` (or PATH) in a
temporary folder, listening on 127.0.0.1 on a free port, with trust authentication for the
local user ``prognode``; the server is stopped by PID.  PostgreSQL refuses to run as root: as
root the folder is handed to the ``postgres`` system user (made by the Debian package) and both
programs run as that user through ``setpriv`` (which execs, so the PID is the server's).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.peers import free_port

USER = "prognode"  # the database role the node connects as (superuser of the throw-away cluster)
SYSTEM_USERS = ("postgres", "nobody")  # who runs the server when the tests run as root


class Unavailable(RuntimeError):
    """No PostgreSQL server binaries here, or no user to run them as (the reason says which)."""


def binaries() -> Path:
    """The folder holding ``initdb`` and ``postgres`` (newest version), or :class:`Unavailable`."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    raise Unavailable("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin): "
                      "install Debian's postgresql package (`make setup`)")


def _runner() -> tuple[list[str], int | None]:
    """The command prefix that drops root, and the uid the data folder must belong to."""
    if os.geteuid() != 0:
        return [], None
    for name in SYSTEM_USERS:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("setpriv"):
            return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"], pw.pw_uid
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], pw.pw_uid
    raise Unavailable("running as root with no unprivileged user (postgres, nobody) or no setpriv/runuser")


@dataclass
class PgServer:
    port: int
    folder: Path
    process: subprocess.Popen[bytes]
    command: list[str]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop (fast shutdown: clients are disconnected), wait, start again on the same port and data."""
        self.stop()
        time.sleep(down_seconds)
        self.process = _spawn(self.command, self.folder)
        _wait_ready(self)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextmanager
def postgres(fsync: bool = False, settings: Sequence[str] = ()) -> Iterator[PgServer]:
    """Start a private server (``fsync=False``: a test database, no durability needed);
    ``settings``: more ``name=value`` server settings."""
    bin_dir = binaries()
    prefix, uid = _runner()
    folder = Path(tempfile.mkdtemp(prefix="prognode-pg-"))
    server: PgServer | None = None
    try:
        if uid is not None:
            os.chown(folder, uid, -1)
        data = folder / "data"
        r = subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", USER,
                            "-E", "UTF8", "--no-sync"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise Unavailable(f"initdb failed: {r.stderr[-400:]}")
        port = free_port()
        args = ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={folder}",
                "-c", "max_connections=200", "-c", f"fsync={'on' if fsync else 'off'}",
                "-c", "full_page_writes=off" if not fsync else "full_page_writes=on"]
        args += [x for kv in settings for x in ("-c", kv)]
        command = [*prefix, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), *args]
        server = PgServer(port, folder, _spawn(command, folder), command)
        _wait_ready(server)
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _spawn(command: list[str], folder: Path) -> subprocess.Popen[bytes]:
    with open(folder / "server.log", "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(server: PgServer, timeout: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            tail = (server.folder / "server.log").read_text(errors="replace")[-800:]
            raise Unavailable(f"postgres exited with {server.process.returncode}: {tail}")
        try:
            with psycopg.connect(f"host=127.0.0.1 port={server.port} user={USER} dbname=postgres", connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
