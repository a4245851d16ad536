"""Node order: the architectures of a fuzz log (one JSON line per example, as ``make fuzz`` writes
to ``out/fuzz-architectures.jsonl``) rebuilt, exported to ONNX (TorchScript exporter, as the
property test), and inferred with their nodes in file order and in two other topological orders
(``tests.corpus.shuffled_nodes``): the classes must agree member for member.

Run (from the repository root; about 0.1 s per architecture on 2 cores):
    python -m benchmarks.order_sweep out/fuzz-architectures.jsonl [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings

import onnx

import rebasin
from tests.archgen import Arch, build  # noqa: F401  (Arch: the logged descriptions name it)
from tests.corpus import member_classes, shuffled_nodes
from tests.test_property import export_onnx


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("log", help="JSON lines with 'desc' (repr of an Arch) and 'seed'")
    p.add_argument("--limit", type=int, default=0, help="only the first N architectures (0: all)")
    a = p.parse_args()
    rows = [json.loads(line) for line in open(a.log) if line.strip()]
    rows = rows[:a.limit] if a.limit else rows
    done = skipped = differ = 0
    for r in rows:
        try:
            model, inputs = build(eval(r["desc"], {"Arch": Arch}), r["seed"])
            with tempfile.TemporaryDirectory() as d:
                export_onnx(model, inputs, f"{d}/m.onnx")
                m = onnx.load(f"{d}/m.onnx")
            base = member_classes(rebasin.infer_spec(m))
        except Exception:  # an architecture the exporter or the analysis refused (the log says which)
            skipped += 1
            continue
        done += 1
        for seed in (0, 1):
            if member_classes(rebasin.infer_spec(shuffled_nodes(m, seed))) != base:
                differ += 1
                print(f"  differs (order seed {seed}): {r['arch']}\n    {r['desc']}", flush=True)
                break
    print(f"{done} architectures in three node orders, {differ} with classes that differ "
          f"({skipped} skipped: not exported or not analysed)")
    return 1 if differ else 0


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    sys.exit(main())
