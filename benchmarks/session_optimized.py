"""Symmetry kept by onnxruntime's own graph optimizations, in the graph a session saves
(``session.optimized_model_filepath``): log_symmetry(saved) / log_symmetry(source).

Run (from the repository root):
    REBASIN_CACHE=.cache/corpus python -m benchmarks.session_optimized
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import rebasin
from tests import corpus
from tests.test_session_optimized import session_optimized

MODELS = ("mlp", "resnet18", "mobilenet_v2", "bert", "gpt2")


def main():
    print("| model | level | contrib ops | log_sym source | log_sym saved | ratio |")
    print("|---|---|---|---|---|---|")
    for name in MODELS:
        source = str(corpus.export(name))
        base = rebasin.infer_spec(source)
        for level in ("extended", "all"):
            with tempfile.TemporaryDirectory() as d:
                model = session_optimized(source, level, Path(d))
                ops = sorted({f"{n.domain.removeprefix('com.microsoft')}::{n.op_type}".lstrip(":")
                              for n in model.graph.node if n.domain.startswith("com.microsoft")})
                spec = rebasin.infer_spec(model)
            print(f"| {name} | {level} | {', '.join(ops) or '(none)'} | {base.log_symmetry:.1f} | "
                  f"{spec.log_symmetry:.1f} | {spec.log_symmetry / base.log_symmetry:.3f} |")


if __name__ == "__main__":
    main()
