"""Symmetry kept by quantization: log_symmetry(quantized) / log_symmetry(float), per format.

The corpus models quantized by ``onnxruntime.quantization`` (see tests/test_quantized.py): dynamic
(per tensor and per channel), static QDQ and static QOperator, both per channel.

Run (from the repository root):
    REBASIN_CACHE=.cache/corpus python -m benchmarks.quantized_table
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import onnx

import rebasin
from tests import corpus
from tests.test_quantized import FORMATS, quantized

MODELS = ("mlp", "resnet18", "mobilenet_v2", "bert")
QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QuantizeLinear",
                 "DequantizeLinear",
                 "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSoftmax",
                 "QLinearGlobalAveragePool", "QLinearConcat"}


def main():
    print("| model | format | quantized ops | log_sym float | log_sym quantized | ratio |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for name in MODELS:
            source = rebasin.infer_spec(str(corpus.export(name)))
            for fmt in FORMATS:
                model = onnx.load(quantized(name, fmt, Path(d)))
                ops = collections.Counter(n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS)
                spec = rebasin.infer_spec(model)
                listed = ", ".join(f"{op} {k}" for op, k in sorted(ops.items())) or "(none)"
                print(f"| {name} | {fmt} | {listed} | {source.log_symmetry:.1f} | {spec.log_symmetry:.1f} | "
                      f"{spec.log_symmetry / source.log_symmetry:.3f} |")


if __name__ == "__main__":
    main()
