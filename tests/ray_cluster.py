"""A local multi-node Ray cluster for tests and benches: one head and N worker nodes on 127.0.0.1.

Every node is a ``ray start --block`` process in its own session, on free ports, with usage
statistics off and no dashboard (nothing leaves the machine); a node is stopped by killing its
process group (its raylet and workers), never by name.  The head has no CPUs, so tasks and
actors run on the worker nodes only (a killed worker node takes its jobs with it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers import REPO, free_port

RAY = str(Path(sys.executable).parent / "ray")


def _env() -> dict[str, str]:
    return dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO),
                RAY_DISABLE_DOCKER_CPU_WARNING="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")


def descendants(root: int) -> list[int]:
    """PIDs of every process below ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _node_ports() -> list[str]:
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]


@dataclass
class RayCluster:
    """``with RayCluster(workers=2) as c: ... c.address ...``; ``kill_worker(i)`` for failure tests."""

    workers: int = 1
    cpus_per_worker: int = 1
    gpu_workers: int = 0  # the first ones declare one GPU (Ray schedules on the declaration; none needed here)
    object_store_bytes: int = 100 * 1024 * 1024
    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pn-ray-", dir="/tmp")))
    port: int = 0
    client_port: int = 0  # Ray Client server of the head: ray://127.0.0.1:<client_port>
    head: subprocess.Popen[bytes] | None = None
    nodes: list[subprocess.Popen[bytes] | None] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    def _start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.temp_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed when the process ends
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                                 "--object-store-memory", str(self.object_store_bytes), "--include-log-monitor", "false",
                                 *_node_ports(), *args],
                                env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> RayCluster:
        self.port, self.client_port = free_port(), free_port()
        self.head = self._start(["--head", "--port", str(self.port), "--num-cpus", "0",
                                 "--include-dashboard", "false", "--ray-client-server-port", str(self.client_port),
                                 "--temp-dir", str(self.temp_dir)], "head")
        self._wait_started(self.head, "head", 90)
        for _ in range(self.workers):
            self.start_worker()
        return self

    def add_worker(self) -> int:
        i = len(self.nodes)
        gpus = ["--num-gpus", "1"] if i < self.gpu_workers else ["--num-gpus", "0"]
        self.nodes.append(self._start(["--address", self.address, "--num-cpus", str(self.cpus_per_worker), *gpus],
                                      f"worker{i}"))
        return i

    def start_worker(self, tries: int = 3) -> int:
        """Add a worker node and wait until it has registered; on a loaded machine a raylet can miss
        Ray's fixed 30 s start-up window, so a node that exited is started again."""
        for attempt in range(tries):
            i = self.add_worker()
            try:
                self._wait_started(self.nodes[i], f"worker{i}", 120)
                return i
            except RuntimeError:
                self._kill(self.nodes[i])
                self.nodes[i] = None
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def _wait_started(self, proc: subprocess.Popen[bytes] | None, name: str, timeout: float) -> None:
        """``ray start`` prints "Ray runtime started" once its node is registered with the GCS."""
        log = self.temp_dir / f"{name}.log"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = log.read_text(errors="replace") if log.exists() else ""
            if "Ray runtime started" in text:
                return
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"ray {name} exited: {text[-2000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"ray {name}: not started after {timeout} s")

    def alive_nodes(self) -> int:
        """Nodes the GCS counts as alive (asked from a separate driver)."""
        code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        r = subprocess.run([sys.executable, "-c", code, self.address], env=_env(), capture_output=True, text=True,
                           timeout=60)
        return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else 0

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes] | None) -> None:
        """SIGKILL a node: its ``ray start`` process group and every descendant (Ray puts its worker
        processes in groups of their own), each by PID."""
        if proc is None:
            return
        pids = descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.wait(10)

    def node_of(self, pid: int) -> int | None:
        """The index of the worker node whose ``ray start`` process is an ancestor of ``pid``."""
        for i, p in enumerate(self.nodes):
            if p is not None and pid in descendants(p.pid):
                return i
        return None

    def kill_worker(self, i: int) -> None:
        """SIGKILL worker node ``i``: its ``ray start``, raylet and worker processes."""
        self._kill(self.nodes[i])
        self.nodes[i] = None

    def stop(self) -> None:
        for i in range(len(self.nodes)):
            self._kill(self.nodes[i])
        self._kill(self.head)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
