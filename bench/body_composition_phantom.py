"""Phantom errors of the weight-free body-composition pipeline: measured vs painted truth.

    .venv/bin/python bench/body_composition_phantom.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import tempfile
from pathlib import Path

from pipelines.body_composition.phantom import PhantomSpec, write_phantom
from pipelines.body_composition.pipeline import run_folder

d = Path(tempfile.mkdtemp())
t = write_phantom(PhantomSpec(noise_sd=5.0, seed=1), d / "ct")
run_folder(d / "ct", d / "out", {})
s = json.loads((d / "out" / "summary.json").read_text())
k = t.level_slices["L3"]
print("level", s["level"], "slice", s["slice_index"], "truth", k)
for key in ["skeletal_muscle", "psoas_left", "psoas_right", "erector_left", "erector_right", "sat", "vat", "imat"]:
    ta = t.muscle_area_cm2(k) if key == "skeletal_muscle" else t.area_cm2(key, k)
    th = t.muscle_mean_hu(k) if key == "skeletal_muscle" else t.mean_hu(key, k)
    a, h = s["areas_cm2"][key]["value"], s["mean_hu"][key]["value"]
    print(f"{key:16s} area {a:8.2f} truth {ta:8.2f} err {100*(a-ta)/ta:+.2f}%  HU {h:7.2f} truth {th:7.2f} err {h-th:+.2f}")
k0, k1 = s["volume_slices"]
for key in ["psoas_left", "psoas_right", "erector_left", "erector_right"]:
    v, tv = s["volumes_cm3"][key]["value"], t.volume_cm3(key, k0, k1)
    print(f"{key:16s} volume {v:8.2f} truth {tv:8.2f} err {100*(v-tv)/tv:+.2f}%")
