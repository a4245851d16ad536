"""Graphs optimized for deployment by onnxruntime's transformer optimizer keep their symmetry.

The corpus BERT and GPT-2 (dynamo exports, trained-like random values) and a TorchScript BERT
export with an attention mask are optimized with ``onnxruntime.transformers.optimizer``
(``optimize_model``), which fuses SkipLayerNormalization, (Fast/Bias)Gelu ... (com.microsoft).
The optimized graph must keep at least 0.95 of the unoptimized graph's symmetry (sum of
log size!), and random permutations of every class must leave its outputs unchanged.
Optimized exports are cached next to the corpus exports ($REBASIN_CACHE).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import pytest

import rebasin
from rebasin.execute import make_inputs, run_model
from tests import corpus

pytest.importorskip("onnxruntime.transformers.optimizer")


def _ts_bert():
    """BERT exported by the TorchScript exporter, with attention mask and token types."""
    import torch
    import transformers as tf

    tag = f"{torch.__version__}-{tf.__version__}".replace("+", "_")
    path = corpus.CACHE / f"bert_ts-{tag}.onnx"
    if path.exists():
        return path
    model, (ids,) = corpus.build("bert")
    inner = model.m

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = inner

        def forward(self, ids, mask, types):
            return self.m(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

    corpus.CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Masked().eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(tmp),
                          dynamo=False, opset_version=17, input_names=["input_ids", "mask", "types"],
                          output_names=["output"])
    os.replace(tmp, path)
    return path


SOURCES = {"bert": lambda: corpus.export("bert"), "gpt2": lambda: corpus.export("gpt2"), "bert_ts": _ts_bert}
MODEL_TYPE = {"bert": "bert", "gpt2": "gpt2", "bert_ts": "bert"}


def optimized(name: str, level: int):
    """(unoptimized path, optimized path), the optimized one cached."""
    from onnxruntime.transformers.optimizer import optimize_model

    src = SOURCES[name]()
    path = src.with_name(f"{src.stem}-ortopt{level}.onnx")
    if not path.exists():
        om = optimize_model(str(src), model_type=MODEL_TYPE[name], num_heads=4, hidden_size=32,
                            opt_level=level)
        tmp = path.with_suffix(".tmp")
        onnx.save(om.model, str(tmp))
        os.replace(tmp, path)
    return src, path


def _feeds(m, seed):
    feeds = make_inputs(m, seed=seed)
    rng = np.random.default_rng(seed)
    for k, v in feeds.items():  # token ids for every integer input named like ids; masks stay 1
        if v.dtype.kind == "i" and "ids" in k or k == "input":
            feeds[k] = rng.integers(0, 100, v.shape).astype(v.dtype)
    return feeds


@pytest.mark.parametrize("name,level", [("bert", 1), ("bert", 2), ("gpt2", 2), ("bert_ts", 1),
                                        ("bert_ts", 2)])
def test_optimized_graph_keeps_symmetry(name, level):
    src, opt = optimized(name, level)
    m = onnx.load(str(opt))
    fused = {n.op_type for n in m.graph.node if n.domain == "com.microsoft"}
    assert fused, "the optimizer fused nothing: the test would not exercise contrib ops"
    s0 = rebasin.infer_spec(str(src), feeds=_feeds(onnx.load(str(src)), 0))
    s1 = rebasin.infer_spec(m, feeds=_feeds(m, 0))
    ratio = s1.log_symmetry / s0.log_symmetry
    print(f"\n{name} opt_level={level}: fused {sorted(fused)}; log_sym {s0.log_symmetry:.1f} -> "
          f"{s1.log_symmetry:.1f} ({ratio:.3f})")
    assert ratio >= 0.95
    for seed in (0, 1):
        p = rebasin.apply_permutation(m, s1, s1.random_permutations(seed))
        for f in (_feeds(m, 0), _feeds(m, 1)):
            res = rebasin.verify(m, p, feeds=f)
            assert res.equal, res
    a, b = (run_model(m, _feeds(m, s)) for s in (0, 1))
    assert any(not np.allclose(a[k], b[k]) for k in a)


def test_optimized_and_4bit_quantized_bert_is_sound():
    """The optimized BERT with every MatMul quantized to 4 bits (MatMulNBits, blocks of 16)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _, opt = optimized("bert", 2)
    q = MatMulNBitsQuantizer(onnx.load(str(opt)), block_size=16, is_symmetric=True)
    q.process()
    m = q.model.model
    assert sum(n.op_type == "MatMulNBits" for n in m.graph.node) >= 8
    spec = rebasin.infer_spec(m, feeds=_feeds(m, 0))
    assert any(mb.tensor.endswith("_Q4") for c in spec.classes for mb in c.members)
    for seed in (0, 1):
        p = rebasin.apply_permutation(m, spec, spec.random_permutations(seed))
        for f in (_feeds(m, 0), _feeds(m, 1)):
            res = rebasin.verify(m, p, feeds=f)
            assert res.equal, res
