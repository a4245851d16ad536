"""Symmetry kept by onnxruntime's transformer optimizer: log_symmetry(optimized) / log_symmetry(source).

Run (from the repository root):
    REBASIN_CACHE=.cache/corpus python -m benchmarks.ort_optimized
"""

from __future__ import annotations

import onnx

import rebasin
from tests.test_ort_optimized import _feeds, optimized

CASES = [("bert", 0), ("bert", 1), ("bert", 2), ("gpt2", 0), ("gpt2", 1), ("gpt2", 2), ("bert_ts", 1),
         ("bert_ts", 2), ("bert_classic", 1), ("bert_classic", 2)]


def main():
    print("| model | opt_level | fused contrib ops | log_sym source | log_sym optimized | ratio |")
    print("|---|---|---|---|---|---|")
    for name, level in CASES:
        src, opt = optimized(name, level)
        m = onnx.load(str(opt))
        fused = sorted({n.op_type for n in m.graph.node if n.domain == "com.microsoft"})
        s0 = rebasin.infer_spec(str(src), feeds=_feeds(onnx.load(str(src)), 0))
        s1 = rebasin.infer_spec(m, feeds=_feeds(m, 0))
        print(f"| {name} | {level} | {', '.join(fused)} | {s0.log_symmetry:.1f} | {s1.log_symmetry:.1f} | "
              f"{s1.log_symmetry / s0.log_symmetry:.3f} |")


if __name__ == "__main__":
    main()
