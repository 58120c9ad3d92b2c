"""One reading: more mutants than tests/test_node_oneread.py, and the tables of the closing note.

Every readable DICOM file of ../shared/data and generated CTs (explicit VR, implicit VR, deflated), mutated at
random (tests/oneread.py); each mutant is refused by the C-STORE path's reading or indexed exactly as pydicom
reads the stored file, or it is a disagreement.  Prints the totals, the counts per mutation kind, and the
disagreements grouped by what differs (with the mutation and seed file of the first of each group).

    .venv/bin/python bench/oneread_fuzz.py [--mutants 20000] [--seed 1] [--budget 300]
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.oneread import Seed, Verdict, run, seeds  # noqa: E402


def kind_of(detail: str) -> str:
    """A disagreement's class: what differs, without the values."""
    if detail.startswith("pydicom cannot read the stored file"):
        return "stored file unreadable by pydicom (" + detail.split(": ")[1] + ")"
    if detail.startswith("index"):
        return "index differs: " + ", ".join(sorted(set(re.findall(r"'([\w.]+)': \(", detail))))
    if detail.startswith("pydicom cannot read an image attribute"):
        return "image attribute unreadable by pydicom (" + detail.split(": ")[1] + ")"
    return "image attribute differs: " + detail.split(" ")[1] if " " in detail else detail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutants", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    seed_list = seeds()
    per_kind: dict[str, Counter[str]] = {}

    def count(seed: Seed, kind: str, data: bytes, verdict: Verdict) -> None:
        for k in kind.split("+"):
            per_kind.setdefault(k, Counter())[verdict.outcome] += 1

    tally = run(seed_list, args.seed, args.mutants, args.budget, count)
    print(f"\none reading: {len(seed_list)} seed data sets, RNG seed {args.seed}, {tally.seconds:.0f} s")
    print("| mutants tried | refused | agreed | disagreements |\n|---:|---:|---:|---:|")
    print(f"| {tally.tried} | {tally.refused} | {tally.agreed} | {len(tally.disagreed)} |")
    print("\n| mutation | in mutants | refused | agreed | disagreed |\n|---|---:|---:|---:|---:|")
    for k, c in sorted(per_kind.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"| {k} | {sum(c.values())} | {c['refused']} | {c['agreed']} | {c['disagreed']} |")
    groups: Counter[str] = Counter()
    example: dict[str, tuple[str, str]] = {}
    for kind, detail, seed, _ in tally.disagreed:
        key = kind_of(detail)
        groups[key] += 1
        example.setdefault(key, (kind, seed.name))
    if groups:
        print("\n| disagreement | count | first mutation | seed |\n|---|---:|---|---|")
        for key, n in groups.most_common():
            print(f"| {key} | {n} | {example[key][0]} | {example[key][1]} |")
    print("\n| refusal (first words) | count |\n|---|---:|")
    for reason, n in tally.refusals.most_common(15):
        print(f"| {reason} | {n} |")


if __name__ == "__main__":
    main()
