"""A model store's ingest pipeline with rebasin's passes between onnx-ir's own.

Two uploads arrive: a network and a copy of it whose hidden units were reordered (a random
permutation of every class: same function, different bytes). Each upload goes through one
``onnx_ir.passes.PassManager``: onnx-ir's clean-up passes, then rebasin's analysis and canonical
form, then a topological sort and onnx-ir's checker. The store keys models by
``rebasin.canonical.fingerprint``: the two uploads get one key, and a third upload with one weight
changed gets another. Last, the pipeline shows the guard on stale specs: a graph-changing pass
between the analysis and a permutation makes the permutation pass refuse to run.

Run: ``python examples/deploy_pipeline.py [MODEL.onnx]`` (without a model, a small residual CNN
with BatchNorm is built and exported first).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import (
    CheckerPass,
    IdentityEliminationPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)

import rebasin
from rebasin.canonical import fingerprint
from rebasin.passes import ApplyPermutationPass, CanonicalizePass, InferSpecPass


def small_cnn(path: str) -> str:
    """Export a residual CNN with BatchNorm and trained-like values to ``path``."""
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), Block(16), Block(16),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), path, dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"])
    return path


class TemperaturePass(ir.passes.InPlacePass):
    """A deployment step of the store's own: divide the first output by a calibrated temperature."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __repr__(self) -> str:
        return f"TemperaturePass({self.temperature})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        out = model.graph.outputs[0]
        t = ir.Value(name="temperature", const_value=ir.tensor(np.float32(self.temperature)))
        model.graph.register_initializer(t)
        node = ir.node("Div", [out, t])
        model.graph.append(node)
        node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = out.name, out.type, out.shape
        out.name = out.name + "_raw"
        model.graph.outputs[0] = node.outputs[0]
        return ir.passes.PassResult(model, True)


def ingest(path: str):
    """The store's pipeline: clean up, analyse, canonicalize, sort, check. Returns the model."""
    pipeline = ir.passes.PassManager([
        RemoveUnusedNodesPass(),
        IdentityEliminationPass(),
        InferSpecPass(),
        CanonicalizePass(),
        TopologicalSortPass(),
        CheckerPass(),
    ])
    result = pipeline(ir.load(path))
    return result.model


def main(argv: list[str]) -> int:
    work = tempfile.mkdtemp(prefix="rebasin-deploy-")
    model = argv[0] if argv else small_cnn(os.path.join(work, "cnn.onnx"))
    spec = rebasin.infer_spec(model)
    print(f"model: {len(spec)} permutation classes, sum log(size!) = {spec.log_symmetry:.1f}")

    permuted = os.path.join(work, "upload-permuted.onnx")
    ir.save(ir.serde.deserialize_model(rebasin.apply_permutation(model, spec, spec.random_permutations(7))),
            permuted)
    changed = os.path.join(work, "upload-changed.onnx")
    m = ir.load(model)
    w = next(v for v in m.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT)
    a = w.const_value.numpy().copy()
    a.flat[0] += 1e-3
    w.const_value = ir.tensor(a, name=w.name)
    ir.save(m, changed)

    store: dict[str, str] = {}
    for label, path in (("original", model), ("permuted copy", permuted), ("one weight changed", changed)):
        canonical = ingest(path)
        key = fingerprint(ir.serde.serialize_model(canonical))
        verdict = f"duplicate of '{store[key]}'" if key in store else "new model"
        store.setdefault(key, label)
        print(f"{label:<20} fingerprint {key[:16]}  {verdict}")
    equal = rebasin.verify(model, ir.serde.serialize_model(ingest(permuted)))
    print(f"canonical form of the permuted copy vs the original: {equal}")

    print("stale spec: TemperaturePass between InferSpecPass and ApplyPermutationPass")
    m = ir.load(model)
    pipeline = ir.passes.PassManager([InferSpecPass(), TemperaturePass(1.5),
                                      ApplyPermutationPass(perms=spec.random_permutations(0))])
    refused = False
    try:
        pipeline(m)
    except ir.passes.PassError as e:
        refused = isinstance(e.__cause__.__cause__, ir.passes.PreconditionError)
        print(f"  {e.__cause__}\n  because: {e.__cause__.__cause__}")
    return 0 if len(store) == 2 and equal.equal and refused else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
