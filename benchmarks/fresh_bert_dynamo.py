"""A freshly initialized BERT exported by the dynamo exporter (which merges equal initializers):
classes and sum log(size!) of the ONNX spec against the torch module's.

Run (from the repository root):
    python -m benchmarks.fresh_bert_dynamo
"""

from __future__ import annotations

import tempfile

import rebasin
from tests.corpus import export_fresh_bert_dynamo


def main():
    with tempfile.TemporaryDirectory() as d:
        module, ids = export_fresh_bert_dynamo(f"{d}/bert.onnx")
        onnx_spec = rebasin.infer_spec(f"{d}/bert.onnx")
    torch_spec = rebasin.infer_spec(module, (ids,))
    for label, spec in (("onnx (dynamo, optimize=True)", onnx_spec), ("torch module", torch_spec)):
        print(f"{label}: {len(spec)} classes, sum log(size!) {spec.log_symmetry:.1f}")


if __name__ == "__main__":
    main()
