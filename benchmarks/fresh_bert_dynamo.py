"""A freshly initialized BERT exported by the dynamo exporter (which merges equal initializers):
classes and sum log(size!) of the ONNX spec against the torch module's.

Run (from the repository root):
    python -m benchmarks.fresh_bert_dynamo
"""

from __future__ import annotations

import tempfile
import warnings

import torch
import transformers as tf

import rebasin
from tests.corpus import _Logits


def main():
    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=16)
    module = _Logits(tf.BertModel(cfg, add_pooling_layer=False)).eval()
    ids = torch.randint(0, 100, (2, 8))
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = f"{d}/bert.onnx"
        torch.onnx.export(module, (ids,), path, dynamo=True, opset_version=18, optimize=True, verbose=False,
                          input_names=["input"], output_names=["output"])
        onnx_spec = rebasin.infer_spec(path)
    torch_spec = rebasin.infer_spec(module, (ids,))
    for label, spec in (("onnx (dynamo, optimize=True)", onnx_spec), ("torch module", torch_spec)):
        print(f"{label}: {len(spec)} classes, sum log(size!) {spec.log_symmetry:.1f}")


if __name__ == "__main__":
    main()
