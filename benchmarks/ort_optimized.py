"""Symmetry kept by onnxruntime's transformer optimizer: log_symmetry(optimized) / log_symmetry(source).

Run (from the repository root):
    REBASIN_CACHE=.cache/corpus python -m benchmarks.ort_optimized

UNet rows: the corpus diffusers UNets exported with dynamic axes and folded constants
(tests.test_ort_optimized._dynamic_unet); their GPU-only contrib ops run on CPU as the CPU image
(rebasin.sources.contrib_image). A row whose optimization fails says how.
"""

from __future__ import annotations

import contextlib
import io

import onnx

import rebasin
from tests.test_ort_optimized import SOURCES, _feeds, optimized

CASES = [("bert", 0), ("bert", 1), ("bert", 2), ("gpt2", 0), ("gpt2", 1), ("gpt2", 2), ("bert_ts", 1),
         ("bert_ts", 2), ("bert_classic", 1), ("bert_classic", 2), ("vit", 1), ("vit", 2), ("t5", 1),
         ("t5", 2), ("llama", 1), ("llama", 2), ("phi3", 2), ("unet", 0), ("unet", 1), ("unet", 2),
         ("unet_cond", 0), ("unet_cond", 1), ("unet_cond", 2), ("unet_cond_fp16", 2),
         ("unet_nchw", 2), ("unet_cond_mha", 0)]


def row(name, level):
    SOURCES[name]()  # the export (cached): its failure is not the optimizer's
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the optimizer prints its own notes
            src, opt = optimized(name, level)
    except Exception as e:  # the optimizer's own failure, reported as such
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
        return f"| {name} | {level} | optimizer failed ({why}) | | | |"
    m = onnx.load(str(opt))
    fused = sorted({n.op_type for n in m.graph.node if n.domain == "com.microsoft"})
    s0 = rebasin.infer_spec(str(src), feeds=_feeds(onnx.load(str(src)), 0))
    s1 = rebasin.infer_spec(m, feeds=_feeds(m, 0))
    return (f"| {name} | {level} | {', '.join(fused)} | {s0.log_symmetry:.1f} | {s1.log_symmetry:.1f} | "
            f"{s1.log_symmetry / s0.log_symmetry:.3f} |")


def main():
    print("| model | opt_level | fused contrib ops | log_sym source | log_sym optimized | ratio |")
    print("|---|---|---|---|---|---|")
    for name, level in CASES:
        print(row(name, level), flush=True)


if __name__ == "__main__":
    main()
