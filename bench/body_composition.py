"""Benchmark: per-stage time and peak RSS of the body-composition pipeline on a ~300-slice phantom.

    .venv/bin/python bench/body_composition.py [--size 512] [--slice-mm 1.0] [--keep DIR]

Writes a 512x512 phantom CT series (about 300 slices at 1 mm), runs the pipeline in a fresh
child process (so peak RSS is the pipeline's own), and prints a table of stage times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from pipelines.body_composition.pipeline import run_folder
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
ru0 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
out = run_folder(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
wall = time.perf_counter() - t0
ru1 = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
cpu = sum((b.ru_utime - a.ru_utime) + (b.ru_stime - a.ru_stime) for a, b in zip(ru0, ru1))
s = json.loads((Path(sys.argv[2]) / "summary.json").read_text())
print(json.dumps({"import_s": t_import, "wall_s": wall, "timings": s.get("timings_s", {}),
                  "cpu_timings": s.get("cpu_timings_s", {}),
                  "evaluable": out.evaluable, "level": s.get("level"), "cpu_s": cpu,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "child_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slice-mm", type=float, default=1.0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the phantom and outputs here")
    ap.add_argument("--options", default="{}", help="pipeline options as JSON")
    a = ap.parse_args(argv)
    from pipelines.body_composition.phantom import PhantomSpec, write_phantom

    base = a.keep or Path(tempfile.mkdtemp(prefix="bench-bodycomp-"))
    ct, out = base / "ct", base / "out"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    if not (ct.is_dir() and any(ct.iterdir())):
        write_phantom(PhantomSpec(size=a.size, pixel_mm=384.0 / a.size, slice_mm=a.slice_mm, noise_sd=8.0), ct)
    n = len(list(ct.iterdir()))
    print(f"phantom: {n} slices of {a.size}x{a.size} ready in {time.perf_counter() - t0:.1f} s ({base})")
    load0 = os.getloadavg()[0]
    r = subprocess.run([sys.executable, "-c", CHILD, str(ct), str(out), a.options], capture_output=True, text=True,
                       cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    if r.returncode != 0:
        print(r.stderr[-3000:])
        return 1
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{'stage':<22}{'wall s':>10}{'CPU s':>10}")
    print(f"{'(imports)':<22}{res['import_s']:>10.2f}")
    for stage, sec in res["timings"].items():
        print(f"{stage:<22}{sec:>10.2f}{res['cpu_timings'].get(stage, float('nan')):>10.2f}")
    print(f"{'total (run_folder)':<22}{res['wall_s']:>10.2f}")
    print(f"{'CPU time (user+sys)':<22}{res['cpu_s']:>10.2f}")
    print(f"load average at the start {load0:.1f}, at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"peak RSS {res['peak_rss_mb']:.0f} MB", end="")
    if res.get("child_rss_mb"):  # forked segmentation workers: pages shared with the parent count in both
        print(f" (largest forked worker {res['child_rss_mb']:.0f} MB, shared pages counted in both)", end="")
    print(f"; level {res['level']}; evaluable {res['evaluable']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
