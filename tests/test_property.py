"""Property tests: on random architectures (tests/archgen.py) the inferred spec is always sound.

For every drawn architecture, through both frontends (``torch.export`` on the module, and the
TorchScript ONNX export): infer the spec, permute every class at random, and check that the
outputs are unchanged.

Run:
    pytest -q tests/test_property.py                       # "ci" profile: quick, reproducible
    HYPOTHESIS_PROFILE=fuzz REBASIN_FUZZ_EXAMPLES=2000 REBASIN_FUZZ_LOG=/tmp/fuzz.jsonl \\
        pytest -q tests/test_property.py                   # long random search, one JSON line per example
    python -m tests.test_property /tmp/fuzz.jsonl          # summarize a log

In the fuzz profile ``REBASIN_FUZZ_EXAMPLES`` is the total over the four per-domain tests (the
``nn.RMSNorm`` torch-path test runs a quarter of it too). The ci profile is derandomized (the same
examples every run, no example database); fuzz keeps failures in ``.cache/hypothesis`` and replays
them first on the next run.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

import rebasin
from tests import archgen
from tests.archgen import Arch, architectures, build
from tests.corpus import member_classes, shuffled_nodes

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ_EXAMPLES = int(os.environ.get("REBASIN_FUZZ_EXAMPLES", "2000"))
CI_EXAMPLES = 20  # per domain: the whole file runs in about a minute on 2 cores
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, database=None, **_COMMON)
settings.register_profile(
    "fuzz", max_examples=math.ceil(FUZZ_EXAMPLES / len(archgen.DOMAINS)),
    database=DirectoryBasedExampleDatabase(Path(__file__).resolve().parents[1] / ".cache" / "hypothesis"),
    **_COMMON)
PROPERTY = settings(settings.get_profile(PROFILE))  # per test, not global: other modules keep theirs


# --------------------------------------------------------------------------- helpers


def nontrivial_permutations(spec: rebasin.Spec, seed: int) -> dict[str, np.ndarray]:
    """``spec.random_permutations(seed)`` with every identity replaced by a cyclic shift, so that
    every class really moves (a size-2 class draws the identity half the time)."""
    perms = spec.random_permutations(seed)
    return {k: np.roll(p, 1) if np.array_equal(p, np.arange(len(p))) else p for k, p in perms.items()}


def export_onnx(model: torch.nn.Module, inputs: tuple, path: str) -> None:
    """The TorchScript export the corpus uses, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, path, dynamo=False, opset_version=17, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE,
                          input_names=["input"], output_names=["output"])


def torch_check(model, inputs, seed: int):
    """Spec from ``torch.export``, a random permutation of every class, and the comparison.

    In float64: a permutation only reorders sums, so the outputs then agree to ~1e-15, far from
    any unsound rewrite; in float32 an output much smaller than its intermediate values (a tiny
    GroupNorm-normalized signal) can differ by a rounding error of 1e-5 relative to it.
    """
    model, inputs = copy.deepcopy(model).double(), tuple(x.double() for x in inputs)
    spec = rebasin.infer_spec(model, inputs)
    sd = rebasin.apply_permutation(model.state_dict(), spec, nontrivial_permutations(spec, seed))
    return spec, rebasin.verify_torch(model, sd, inputs)


def onnx_check(model, inputs, seed: int):
    """Spec from the ONNX export, a random permutation of every class, and the comparison. The
    export's nodes in another topological order (``seed``) must give the same classes, member for
    member: any order a tool writes is the same graph."""
    with tempfile.TemporaryDirectory(prefix="rebasin-prop-") as d:
        path = os.path.join(d, "model.onnx")
        export_onnx(model, inputs, path)
        spec = rebasin.infer_spec(path)
        exported = onnx.load(path)
        other = rebasin.infer_spec(shuffled_nodes(exported, seed))
        assert member_classes(other) == member_classes(spec), "node order changes the spec:\n" + \
            spec.table() + "\nshuffled:\n" + other.table()
        permuted = rebasin.apply_permutation(path, spec, nontrivial_permutations(spec, seed))
        # the example inputs, as the torch check: build() sees that the outputs are not all tiny there
        graph = exported.graph
        names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        feeds = {n: np.asarray(x.detach().numpy()) for n, x in zip(names, inputs)}
        return spec, rebasin.verify(path, permuted, feeds=feeds)


def log_example(record: dict) -> None:
    """Append one JSON line to ``$REBASIN_FUZZ_LOG`` (when set)."""
    path = os.environ.get("REBASIN_FUZZ_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


CHECKS = {"torch": torch_check, "onnx": onnx_check}


def explain(arch: Arch, spec, res) -> str:
    return f"\n{arch.summary()}\n{arch!r}\n{spec.table()}\n{res}"


def run_example(arch: Arch, seed: int, test: str, paths=("torch", "onnx")) -> dict:
    """Build ``arch`` and check it through each frontend in ``paths``; log one JSON line.

    Returns ``{path: (spec, VerifyResult)}``. An exception (an exporter failure, a rebasin error)
    is logged with the example and raised.
    """
    model, inputs = build(arch, seed)
    t0 = time.perf_counter()
    record = {"test": test, "arch": arch.summary(), "seed": seed, "ok": False, "desc": repr(arch)}
    results = {}
    try:
        for path in paths:
            spec, res = results[path] = CHECKS[path](model, inputs, seed)
            record.update({f"classes_{path}": len(spec), f"blocked_{path}": len(spec.blocked),
                           f"rel_{path}": res.max_rel})
        record["ok"] = all(res.equal for _, res in results.values())
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        record["seconds"] = round(time.perf_counter() - t0, 3)
        log_example(record)
    return results


def check_sound(arch: Arch, seed: int, test: str) -> None:
    """Both frontends: the permuted model equals the original; (when the architecture surely has
    hidden units) the spec has a class, so that the check does not pass vacuously; and both
    frontends find the same classes."""
    results = run_example(arch, seed, test)
    for path, (spec, res) in results.items():
        assert res.equal, f"{path} path unsound:" + explain(arch, spec, res)
    (spec_t, res_t), (spec_o, res_o) = results["torch"], results["onnx"]
    if archgen.has_hidden_units(arch):
        assert len(spec_o), "ONNX path: no class despite hidden units:" + explain(arch, spec_o, res_o)
        assert len(spec_t), "torch path: no class despite hidden units:" + explain(arch, spec_t, res_t)
    assert class_sets(spec_t) == class_sets(spec_o), "the frontends disagree:" + \
        explain(arch, spec_t, res_t) + "\nONNX path:\n" + spec_o.table()


def class_sets(spec: rebasin.Spec) -> collections.Counter:
    """The classes as a multiset of (size, members), members as (tensor, axis, offset, block,
    stride) of weights only: exporter constants (an InstanceNormalization's unit scale) are left
    out, and the TorchScript exporter names initializers by their state_dict keys."""
    out: collections.Counter = collections.Counter()
    for c in spec.classes:
        mem = frozenset((m.tensor, m.axis, m.offset, m.block, m.stride, m.at) for m in c.members
                        if not m.tensor.startswith("/"))
        if mem:
            out[(c.size, mem)] += 1
    return out


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("domain", archgen.DOMAINS)
@PROPERTY
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_random_permutation_of_every_class_is_sound(domain, data, seed):
    arch = data.draw(architectures((domain,)).filter(archgen.has_layers), label="arch")
    check_sound(arch, seed, f"sound[{domain}]")


@PROPERTY
@given(arch=architectures(("vec", "seq")).filter(archgen.has_layers), seed=st.integers(0, 2**16))
def test_nn_rmsnorm_is_sound_on_the_torch_path(arch, seed):
    """``nn.RMSNorm`` before the head (torch path only: no ``aten::rms_norm`` export at opset 17)."""
    norm = {"op": "norm", "norm": "nn_rmsnorm", "c": arch.head["cin"]}
    arch = dataclasses.replace(arch, blocks=(*arch.blocks, norm))
    spec, res = run_example(arch, seed, "nn_rmsnorm", paths=("torch",))["torch"]
    assert res.equal, "torch path unsound:" + explain(arch, spec, res)


# --------------------------------------------------------------------------- fixed examples


def _linear(cin: int, cout: int) -> dict:
    return {"op": "linear", "cin": cin, "cout": cout, "bias": True}


def _head(cin: int, cout: int = 2, pool: str = "none") -> dict:
    return {"op": "head", "pool": pool, "cin": cin, "cout": cout}


# architectures the fuzz profile found unsound (or the frontends disagreeing) once, checked on every run
REGRESSIONS = {
    # per-head LayerNorm (2 x 12) then per-head softmax (8 x 3) over a padded model input: the
    # pinned input's instance of the 12 channels was given its 4 x 3 layout after the pins had
    # spread (AxisAlgebra._distribute), so its 3-blocks were free (the mixing check once hid this
    # by dissolving the families); only the padding's 3-block may move
    "two_head_layouts_padded": Arch("vec", (21,), (
        {"op": "pad", "before": 0, "after": 3},
        {"op": "heads", "heads": 2, "head_dim": 12, "kind": "layernorm"},
        {"op": "heads", "heads": 8, "head_dim": 3, "kind": "softmax"},
        {"op": "matmul", "cin": 24, "cout": 10, "einsum": False}), _head(10)),
    # group-limited routing after a padded stream: the TorchScript export writes the routing's
    # zeros_like(scores[..., :2]) as a Slice read only by Shape, which cut the experts axis into
    # pieces on the ONNX path (the groups of 2 experts could not swap; the torch path lowers it
    # to a fill): a node whose outputs only Shape reads constrains nothing (infer._unread)
    "routing_slice_read_for_shape": Arch("vec", (2,), (
        _linear(2, 12), {"op": "act", "kind": "relu"}, {"op": "pad", "before": 0, "after": 1},
        {"op": "moe", "d": 13, "experts": 4, "k": 1, "hidden": 2, "kind": "relu", "residual": False,
         "stacked": True, "routing": "grouped"}), _head(13)),
    # a concatenation of two branches narrowed to the first: the second branch is dead. The torch
    # path read the narrow from the first branch and skipped the rest; the ONNX export computes the
    # narrow's end with an Add of constants, which read_pieces and dead weights had to see through
    # (frontends disagreed; both sound)
    "dead_branch_vec": Arch("vec", (2,), ({"op": "concat", "cin": 2, "a": 2, "b": 2, "identity": False,
                                           "kind": "relu"}, {"op": "narrow", "start": 0, "length": 2}),
                            _head(2)),
    "dead_branch_seq": Arch("seq", (3, 2), ({"op": "concat", "cin": 2, "a": 2, "b": 2, "identity": True,
                                             "kind": "relu"}, {"op": "narrow", "start": 0, "length": 2}),
                            _head(2)),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regression_sound(name):
    for seed in (0, 1, 2):
        check_sound(REGRESSIONS[name], seed, f"regression[{name}]")


def test_mlp_has_one_class():
    """The smallest model with hidden units: one class, its 4 hidden units."""
    arch = Arch("vec", (3,), (_linear(3, 4),), _head(4))
    model, inputs = build(arch)
    assert [c.size for c in rebasin.infer_spec(model, inputs).classes] == [4]
    check_sound(arch, 0, "mlp")


def test_nn_rmsnorm_weight_moves_with_its_class():
    arch = Arch("vec", (3,), (_linear(3, 4), {"op": "norm", "norm": "nn_rmsnorm", "c": 4}), _head(4))
    model, inputs = build(arch)
    spec = rebasin.infer_spec(model, inputs)
    assert [sorted(m.tensor for m in c.members) for c in spec.classes] == \
        [["0.bias", "0.weight", "1.weight", "2.linear.weight"]]


def _after_linear(block: dict, width: int) -> Arch:
    """``Linear(3, 7) -> block -> head``, ``width`` features reaching the head."""
    return Arch("vec", (3,), (_linear(3, 7), block), _head(width))


_GQA = {"op": "attention", "d": 8, "heads": 4, "kv_heads": 2, "head_dim": 4, "sdpa": False, "causal": False,
        "residual": True, "bias": True}
# Models whose hidden units a frontend does not see: their axes are blocked (sound, no symmetry found).
GAPS: dict = {}  # none known now (former ones are in FOUND)
# Hand-counted maximal symmetry of small cases, found by both frontends (classes as {size: count}).
FOUND = {
    # 4 query heads of 4 dims sharing 2 key/value heads (the residual stream is the input: fixed):
    # the kv heads (2) with their query heads; the 2 query heads of each kv head (2 classes of 2);
    # the query/key dims and the value/output dims of each kv head (4 classes of 4)
    "gqa": (Arch("seq", (3, 8), (_GQA,), _head(8)), {2: 3, 4: 4}),
    # the same, from one projection viewed as (kv heads, 2 query heads + key + value, 4 dims) and
    # sliced on its middle axis (Falcon's query_key_value): the same classes
    "gqa-grouped": (Arch("seq", (3, 8), ({**_GQA, "packed": "grouped"},), _head(8)), {2: 3, 4: 4}),
    "prelu": (_after_linear({"op": "act", "kind": "prelu", "c": 7}, 7), {7: 1}),
    # GroupNorm(2, 8) after a conv: the 2 groups, and the 4 channels of each group on their own
    "groupnorm": (Arch("conv2d", (3, 5, 5), (
        {"op": "conv", "cin": 3, "cout": 8, "k": 3, "pad": 1, "stride": 1, "groups": 1, "bias": True},
        {"op": "norm", "norm": "groupnorm", "c": 8, "groups": 2}, {"op": "act", "kind": "relu"}),
        _head(8, 3, "gap")), {2: 1, 4: 2}),
    # a Linear written as an einsum: its 4 outputs
    "einsum": (Arch("vec", (5,), ({"op": "matmul", "cin": 5, "cout": 4, "einsum": True},), _head(4)), {4: 1}),
    # constant padding of the feature axis (1 before, 2 after a width of 7): the input is a piece of
    # the padded axis (7), the two trailing pads a piece of their own (2), the single one none
    "channel-pad": (_after_linear({"op": "pad", "before": 1, "after": 2}, 10), {2: 1, 7: 1}),
    # a strided slice (start 1, step 2) of 6 features: whole strides move together (3, block 2)
    "strided-slice": (_after_linear({"op": "slice", "start": 1, "step": 2}, 3), {3: 1}),
    # experts stacked in 3-D tensors, batched: the linear's 6 (the experts' input), the 3 experts
    # with their router rows, each expert's 4 hidden units on its own, the experts' output 6
    "stacked-moe": (Arch("vec", (5,), (_linear(5, 6), {
        "op": "moe", "d": 6, "experts": 3, "k": 2, "hidden": 4, "kind": "relu", "residual": False,
        "stacked": True}), _head(6)), {6: 2, 3: 1, 4: 3}),
    # the same routed other ways: picks of an unsorted top-k, or by argmax each masking the last,
    # weights gathered and scattered into the mix (as above); picks weighted by their place along
    # an unsorted k (the order is read: the experts stay, their hidden units one class); the best
    # of 2 groups of 2 experts first (the 2 groups, the 2 experts in each group)
    **{f"{routing}-moe": (Arch("vec", (5,), (_linear(5, 6), {
        "op": "moe", "d": 6, "experts": experts, "k": 2, "hidden": 4, "kind": "relu", "residual": False,
        "stacked": True, "routing": routing}), _head(6)), sizes)
       for routing, experts, sizes in [("unsorted", 3, {6: 2, 3: 1, 4: 3}), ("argmax", 3, {6: 2, 3: 1, 4: 3}),
                                       ("ranked", 3, {6: 2, 4: 1}), ("grouped", 4, {6: 2, 2: 3, 4: 4})]},
}


@pytest.mark.parametrize("name", list(FOUND))
def test_both_frontends_find_the_maximal_symmetry(name):
    """Formerly known gaps (``aten::repeat_interleave``, ``aten::prelu``, GroupNorm's groups, Einsum,
    Pad and strided Slice of the feature axis): both frontends find the same classes, of the
    hand-counted sizes, soundly."""
    arch, sizes = FOUND[name]
    results = run_example(arch, 0, f"found[{name}]")
    for path, (spec, res) in results.items():
        assert res.equal, f"{path} path unsound:" + explain(arch, spec, res)
        assert dict(collections.Counter(c.size for c in spec.classes)) == sizes, f"{path}\n{spec.table()}"
    assert class_sets(results["torch"][0]) == class_sets(results["onnx"][0])


def test_layernorm_per_head_frontends_agree():
    """``F.layer_norm`` per head (no affine) mixes the dims of one head only: each head's dims
    permute on their own (2 classes of 4) on both paths. The ONNX export gives LayerNormalization
    a constant unit scale and zero bias of ``[head_dim]``, read by the one node: a literal constant
    along its axis, so it ties nothing (it stays in place, listed as blocked)."""
    arch = _after_linear({"op": "heads", "heads": 2, "head_dim": 4, "kind": "layernorm"}, 7)
    arch = Arch("vec", (3,), (_linear(3, 8), arch.blocks[1]), _head(8))
    results = run_example(arch, 0, "layernorm-per-head")
    for path, (spec, res) in results.items():
        assert res.equal, f"{path} path unsound:" + explain(arch, spec, res)
    assert class_sets(results["torch"][0]) == class_sets(results["onnx"][0])
    assert sorted(c.size for c in results["onnx"][0].classes) == [2, 4, 4]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                                                          reason=why))
                                  for n, (_, why) in GAPS.items()])
def test_known_gap(name):
    """Each frontend finds a class in these models (not yet: strict xfails, so a fix shows up).
    They must be sound all the same (``pytest.fail`` is not the expected AssertionError)."""
    arch = GAPS[name][0]
    results = run_example(arch, 0, f"gap[{name}]")
    for path, (spec, res) in results.items():
        if not res.equal:
            pytest.fail(f"{path} path unsound:" + explain(arch, spec, res))
    assert all(len(spec) for spec, _ in results.values()), {p: len(s) for p, (s, _) in results.items()}


# --------------------------------------------------------------------------- the check can fail


def _bn_arch() -> Arch:
    """conv -> BatchNorm -> relu -> global average -> Linear: the running mean matters."""
    conv = {"op": "conv", "cin": 3, "cout": 6, "k": 3, "pad": 1, "stride": 1, "groups": 1, "bias": True}
    return Arch("conv2d", (3, 5, 5), (conv, {"op": "norm", "norm": "batchnorm", "c": 6},
                                      {"op": "act", "kind": "relu"}),
                {"op": "head", "pool": "gap", "cin": 6, "cout": 3})


def _without_running_mean(spec: rebasin.Spec) -> rebasin.Spec:
    """``spec`` with the BatchNorm running_mean member dropped from its class."""
    c = next(c for c in spec.classes if any("running_mean" in m.tensor for m in c.members))
    kept = tuple(m for m in c.members if "running_mean" not in m.tensor)
    classes = tuple(dataclasses.replace(k, members=kept) if k is c else k for k in spec.classes)
    return dataclasses.replace(spec, classes=classes)


def test_wrong_spec_is_caught_torch():
    """The same permutations pass with the inferred spec and fail without the running mean."""
    model, inputs = build(_bn_arch())
    spec = rebasin.infer_spec(model, inputs)
    perms = nontrivial_permutations(spec, 0)
    good = rebasin.apply_permutation(model.state_dict(), spec, perms)
    bad = rebasin.apply_permutation(model.state_dict(), _without_running_mean(spec), perms)
    assert rebasin.verify_torch(model, good, inputs).equal
    assert not rebasin.verify_torch(model, bad, inputs).equal


def test_wrong_spec_is_caught_onnx(tmp_path):
    model, inputs = build(_bn_arch())
    path = str(tmp_path / "bn.onnx")
    export_onnx(model, inputs, path)
    spec = rebasin.infer_spec(path)
    perms = nontrivial_permutations(spec, 0)
    assert rebasin.verify(path, rebasin.apply_permutation(path, spec, perms)).equal
    bad = rebasin.apply_permutation(path, _without_running_mean(spec), perms)
    assert not rebasin.verify(path, bad).equal


# --------------------------------------------------------------------------- log summary


def summarize(path: str) -> dict:
    """Totals of a ``REBASIN_FUZZ_LOG`` file: examples, failures, errors, worst errors, time."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rel = [r.get(k, 0.0) for r in rows for k in ("rel_torch", "rel_onnx") if k in r]
    return {"examples": len(rows), "failures": sum(not r["ok"] for r in rows),
            "errors": sum("error" in r for r in rows),
            "without_classes": sum(r.get("classes_torch", 1) == 0 for r in rows),
            "max_rel": max(rel, default=0.0), "seconds": round(sum(r["seconds"] for r in rows), 1),
            "by_test": {t: sum(r["test"] == t for r in rows) for t in sorted({r["test"] for r in rows})}}


if __name__ == "__main__":
    print(json.dumps(summarize(sys.argv[1]), indent=1))
