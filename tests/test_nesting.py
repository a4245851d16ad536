"""Members nested in one index of another axis (``Member.at``): the per-expert hidden units of
experts stacked in one tensor. The format, the rewrite, the plain view the solvers work on
(rebasin/nesting.py), every solver on a planted permutation, and the analysis: it nests only
where each expert's units meet only that expert's (adversarial contractions stay shared)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import rebasin
from rebasin import Member, PermutationClass, Spec
from rebasin.canonical import canonicalize_arrays
from rebasin.errors import SpecMismatchError
from rebasin.exchange import to_gitrebasin
from rebasin.graph.rewrite import permute_arrays, permute_tensor
from rebasin.nesting import NestedView
from rebasin.solvers import merge_many
from tests.test_torch_frontend import assert_sound

E, H, D = 3, 5, 4


def _spec(experts_first: bool = True) -> Spec:
    """Experts (axis 0 of w1, w2 and the router), each expert's hidden units (w1 axis 1, w2 axis 2,
    b1 axis 1, at index e of axis 0), the stream D (w1 axis 2, w2 axis 1, acting on every expert)."""
    experts = PermutationClass("E", E, (Member("w1", 0), Member("b1", 0), Member("w2", 0),
                                        Member("router", 0)))
    hidden = [PermutationClass(f"H{e}", H, (Member("w1", 1, at=((0, e),)), Member("b1", 1, at=((0, e),)),
                                            Member("w2", 2, at=((0, e),)))) for e in range(E)]
    stream = PermutationClass("D", D, (Member("w1", 2), Member("w2", 1), Member("router", 1)))
    classes = [experts, *hidden, stream] if experts_first else [*hidden, experts, stream]
    return Spec(tuple(classes), shapes=_shapes())


def _shapes():
    return {"w1": (E, H, D), "b1": (E, H), "w2": (E, D, H), "router": (E, D)}


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s) for k, s in _shapes().items()}


def test_json_round_trip_and_bad_at():
    spec = _spec()
    again = Spec.from_json(spec.to_json())
    assert again == spec and again["H1"].members[0].at == ((0, 1),)
    assert "at" not in spec["D"].members[0].to_dict()
    for bad in ([[1, 0]], [[0, -1]], "x", [[0, 1], [0, 2]], 5):
        with pytest.raises(SpecMismatchError):
            Spec.from_dict({"classes": [{"name": "P", "size": 2,
                                         "members": [{"tensor": "w", "axis": 1, "at": bad}]}]})
    with pytest.raises(SpecMismatchError, match="does not fit"):
        Spec((PermutationClass("P", 2, (Member("w", 1, at=((0, 3),)),)),), shapes={"w": (3, 2)})


def test_rewrite_touches_only_the_slice():
    p = _params()
    perm = np.array([4, 2, 0, 1, 3])
    out = permute_arrays(p, _spec(), {"H1": perm})
    assert np.array_equal(out["w1"][1], p["w1"][1][perm])
    assert np.array_equal(out["w1"][[0, 2]], p["w1"][[0, 2]])
    assert np.array_equal(out["w2"][1], p["w2"][1][:, perm])
    t = permute_tensor("w2", torch.from_numpy(p["w2"]), _spec(), {"H1": perm})
    assert torch.equal(t, torch.from_numpy(out["w2"]))


@pytest.mark.parametrize("experts_first", [True, False])
def test_view_applies_exactly_what_the_spec_applies(experts_first):
    spec, p = _spec(experts_first), _params()
    view = NestedView.build(spec, _shapes())
    assert not any(m.at for c in view.spec.classes for m in c.members)
    assert [c.name for c in view.spec.classes] == [c.name for c in spec.classes]
    before = {k: v.copy() for k, v in p.items()}
    for seed in range(3):
        perms = spec.random_permutations(seed)
        real = permute_arrays(p, spec, perms)
        assert all(np.array_equal(p[k], before[k]) for k in p)  # the slices are written into copies
        flat = permute_arrays({k: view.view(k, v) for k, v in p.items()}, view.spec, perms)
        for k in p:
            assert np.array_equal(view.unview(k, flat[k]), real[k]), k


def _planted(seed=1):
    a = _params(0)
    spec = _spec()
    truth = spec.random_permutations(seed)
    return spec, a, permute_arrays(a, spec, truth)


@pytest.mark.parametrize("solver", ["weight", "sinkhorn", "activation"])
def test_solvers_recover_a_planted_permutation(solver):
    spec, a, b = _planted()
    opts = {"steps": 200, "lr": 0.5} if solver == "sinkhorn" else {}
    res = rebasin.solvers.get(solver)(spec, a, b, **opts)
    aligned = permute_arrays(b, spec, res.perms)
    for k in a:
        np.testing.assert_allclose(aligned[k], a[k], atol=1e-9)


def test_weight_matching_without_the_joint_step(monkeypatch):
    """Experts of expert-sized hidden layers are past the joint step's limit: plain steps from
    the sorted-value start still recover a planted permutation."""
    from rebasin.solvers import _nested
    from rebasin.solvers._layout import Layout

    spec, a, b = _planted()
    view = NestedView.build(spec, _shapes())
    layout = Layout(view.spec, {**_shapes(), **view.shapes})
    assert _nested.find_families(view.spec, layout)  # the experts with their units: one family
    monkeypatch.setattr(_nested, "JOINT_LIMIT", 0)
    assert not _nested.find_families(view.spec, layout)
    res = rebasin.solvers.get("weight")(spec, a, b)
    aligned = permute_arrays(b, spec, res.perms)
    for k in a:
        np.testing.assert_allclose(aligned[k], a[k], atol=1e-9)


def test_ste_loss_sees_the_models_shapes():
    spec, a, b = _planted()
    seen = []

    def loss_fn(params):
        seen.append({k: tuple(v.shape) for k, v in params.items()})
        return sum((v ** 2).sum() for v in params.values())
    res = rebasin.solvers.get("ste")(spec, a, b, loss_fn=loss_fn, steps=3)
    assert seen and all(s == _shapes() for s in seen)
    assert set(res.perms) == {c.name for c in spec.classes}


def test_merge_many_and_canonical_form():
    spec, a, b = _planted()
    res = merge_many(spec, [a, b])
    for k in a:
        np.testing.assert_allclose(res.merged[k], a[k], atol=1e-9)
    ca, cb = canonicalize_arrays(a, spec), canonicalize_arrays(b, spec)
    for k in a:
        assert np.array_equal(ca.arrays[k], cb.arrays[k]), k


def test_whole_axis_formats_leave_nested_classes_out():
    _, skipped = to_gitrebasin(_spec())
    assert set(skipped) == {"H0", "H1", "H2"} and "one slice" in skipped["H0"]


# --------------------------------------------------------------------------- the analysis


class Stacked(nn.Module):
    """Experts stacked on axis 0, every expert on every input, then ``combine`` over the experts:
    "batched" pairs expert e's hidden units with expert e's down weights only, keeping the experts
    axis, or "joint" summing experts and hidden units together, pair by pair (nested); "all_pairs"
    and "outer" pair them with every expert's, "softmax_over_experts" mixes experts first (one
    permutation must serve all experts). In "all_pairs" each hidden unit sums its experts on its
    own, so the experts of ``w1`` permute independently per hidden unit (nested the other way
    round)."""

    def __init__(self, combine: str):
        super().__init__()
        self.inp = nn.Linear(6, D)
        self.w1 = nn.Parameter(torch.randn(E, H, D))
        self.b1 = nn.Parameter(torch.randn(E, H))
        self.w2 = nn.Parameter(torch.randn(E, D, H))
        self.gate = nn.Parameter(torch.randn(E))
        self.out = nn.Linear(D, 3)
        self.combine = combine

    def forward(self, x):
        x = self.inp(x)
        h = torch.tanh(torch.einsum("bd,ehd->beh", x, self.w1) + self.b1)  # [B, E, H]
        g = self.gate * self.w2.sum((1, 2))  # ties w2's experts axis to gate's (and to w1's below)
        if self.combine == "batched":
            y = torch.einsum("beh,edh->bed", h, self.w2).mul(g[:, None]).sum(1)
        elif self.combine == "joint":
            y = torch.einsum("beh,edh->bd", h, self.w2 * g[:, None, None])
        elif self.combine == "all_pairs":  # expert e's units meet every expert f's weights
            y = torch.einsum("beh,fdh->bd", h, self.w2) * g.sum()
        elif self.combine == "outer":  # keeps both experts axes: e x f
            y = torch.einsum("beh,fdh->befd", h, self.w2 * g[:, None, None]).sum((1, 2))
        else:  # mixes experts before the hidden units are contracted
            y = torch.einsum("beh,edh->bd", h.softmax(1), self.w2 * g[:, None, None])
        return self.out(y + x)


@pytest.mark.parametrize("combine", ["batched", "all_pairs", "outer", "softmax_over_experts", "joint"])
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_nested_only_where_each_expert_meets_itself(combine, tracer):
    torch.manual_seed(0)
    model, x = Stacked(combine), (torch.randn(7, 6),)
    spec = rebasin.infer_spec(model, x, tracer=tracer)
    hidden = [c for c in spec.classes if any(m.at and m.tensor == "w1" and m.axis == 1 for m in c.members)]
    assert len(hidden) == (E if combine in ("batched", "joint") else 0), spec.table()
    assert_sound(model, x, spec)


@pytest.mark.parametrize("combine", ["batched", "all_pairs", "outer", "softmax_over_experts", "joint"])
def test_both_tracers_nest_alike(combine):
    """fx (einsum decomposed into sums and batched products) and torch.export (einsum kept)."""
    from tests.test_torch_frontend import signature

    torch.manual_seed(0)
    model, x = Stacked(combine), (torch.randn(7, 6),)
    fx, export = (rebasin.infer_spec(model, x, tracer=t) for t in ("fx", "export"))
    keys = set(model.state_dict())
    assert signature(fx, keys) == signature(export, keys), (fx.table(), export.table())


def test_nesting_can_fail_the_check():
    """The soundness check above can fail: per-expert hidden permutations on the all-pairs model
    (taken from the batched model's spec) change its output."""
    torch.manual_seed(0)
    batched, x = Stacked("batched"), (torch.randn(7, 6),)
    spec = rebasin.infer_spec(batched, x, tracer="fx")
    torch.manual_seed(0)
    pairs = Stacked("all_pairs")
    sd = rebasin.apply_permutation(pairs.state_dict(), spec, spec.random_permutations(0))
    assert not rebasin.verify_torch(pairs, sd, x).equal


class DocExperts(nn.Module):
    """The model of docs/spec-format.md's stacked-experts example."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(2, 8, 16))
        self.w2 = nn.Parameter(torch.randn(2, 16, 8))
        self.router = nn.Linear(16, 2, bias=False)

    def forward(self, x):  # x [T, 16]
        gate = self.router(x).softmax(-1)  # [T, 2]
        h = torch.relu(torch.einsum("td,ehd->eth", x, self.w1))
        y = torch.einsum("eth,edh->etd", h, self.w2)
        return (y * gate.T[:, :, None]).sum(0)


def test_the_documented_example_is_the_analysis_and_sound():
    from pathlib import Path

    text = Path(__file__).parents[1].joinpath("docs/spec-format.md").read_text()
    section = text.split("## Example: experts stacked in one tensor", 1)[1]
    block = section.split("```json", 1)[1].split("```", 1)[0]
    doc = Spec.from_json(block)
    torch.manual_seed(0)
    model, x = DocExperts(), (torch.randn(5, 16),)
    inferred = rebasin.infer_spec(model, x)
    assert sorted((c.size, frozenset(c.members)) for c in doc.classes) == \
        sorted((c.size, frozenset(c.members)) for c in inferred.classes), inferred.table()
    assert_sound(model, x, doc)


def test_unused_weights_do_not_nest():
    """A parameter no op reads (an auxiliary head in eval mode): any permutation of its entries
    keeps the output; it keeps one class per axis rather than one per row."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    model.unused = nn.Parameter(torch.randn(5, 7))
    x = (torch.randn(3, 4),)
    for tracer in ("fx", "export"):
        spec = rebasin.infer_spec(model, x, tracer=tracer)
        assert not any(m.at for c in spec.classes for m in c.members), spec.table()
        assert sorted(c.size for c in spec.classes if any(m.tensor == "unused" for m in c.members)) == [5, 7]


# ------------------------------------------------------------------ grouped convolutions


class GroupedConv(nn.Module):
    """8 channels in 2 groups of 4 read by ``Conv2d(8, 12, groups=2)``: each group's 4 input
    channels move on their own (rows 0-5 of the weight read group 0's, rows 6-11 group 1's), as do
    each group's 6 outputs. ``residual``: ``Conv2d(8, 8, groups=2)`` added to its input, so each
    group's inputs and outputs share one permutation. ``transpose``: ``ConvTranspose2d(8, 12,
    groups=2)``, weight ``[8, 6, k, k]``: each group's 6 outputs move on their own, in the
    weight's columns of that group's rows."""

    def __init__(self, kind="conv"):
        super().__init__()
        out = 8 if kind == "residual" else 12
        layer = nn.ConvTranspose2d if kind == "transpose" else nn.Conv2d
        self.a, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.g = layer(8, out, 3, padding=1, groups=2)
        self.bn2, self.o = nn.BatchNorm2d(out), nn.Conv2d(out, 3, 1)
        self.kind = kind

    def forward(self, x):
        h = torch.relu(self.bn(self.a(x)))
        y = self.g(h) + h if self.kind == "residual" else self.g(h)
        return self.o(torch.relu(self.bn2(y)))


def _grouped(kind):
    torch.manual_seed(0)
    model = GroupedConv(kind).eval()
    with torch.no_grad():  # trained-like: random biases, norm weights and statistics
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for b in (model.bn.running_var, model.bn2.running_var):
            b.copy_(torch.rand_like(b) + 0.5)
        for b in (model.bn.running_mean, model.bn2.running_mean):
            b.copy_(torch.randn_like(b))
    return model, (torch.randn(2, 3, 5, 5),)


# hand counts: the 2 groups swap (2); each group's 4 input channels (2 x 4); without the residual
# each group's 6 outputs (2 x 6), with it the outputs are the inputs
GROUPED = {"conv": {2: 1, 4: 2, 6: 2}, "residual": {2: 1, 4: 2}, "transpose": {2: 1, 4: 2, 6: 2}}


@pytest.mark.parametrize("kind", sorted(GROUPED))
@pytest.mark.parametrize("frontend", ["fx", "export", "onnx"])
def test_grouped_conv_channels_per_group(kind, frontend, tmp_path):
    import collections

    import onnx

    from tests.corpus import export_script
    from tests.test_rules import assert_sound as assert_sound_onnx

    model, x = _grouped(kind)
    if frontend == "onnx":
        export_script(model, x, tmp_path / "m.onnx")
        m = onnx.load(tmp_path / "m.onnx")
        spec = assert_sound_onnx(m)
        weight = next(i.name for i in m.graph.initializer if tuple(i.dims) == tuple(model.g.weight.shape))
    else:
        spec = rebasin.infer_spec(model, x, tracer=frontend)
        assert_sound(model, x, spec)
        weight = "g.weight"
    assert dict(collections.Counter(c.size for c in spec.classes)) == GROUPED[kind], spec.table()
    rows = model.g.weight.shape[0] // 2
    per_group = sorted(tuple(m.at for m in c.members if m.tensor == weight and m.axis == 1)
                       for c in spec.classes if c.size == (6 if kind == "transpose" else 4))
    assert per_group == [tuple(((0, r),) for r in range(g * rows, (g + 1) * rows)) for g in range(2)]


@pytest.mark.parametrize("kind", ["conv", "residual"])
def test_grouped_conv_rows_matter(kind):
    """The check above can fail: group 0's input permutation applied to every row of the grouped
    weight (not only group 0's rows) changes the output."""
    import dataclasses

    model, x = _grouped(kind)
    spec = rebasin.infer_spec(model, x)
    mine = next(c for c in spec.classes if c.size == 4 and any(m.at == ((0, 0),) for m in c.members))
    spread = [m for m in mine.members if not (m.tensor == "g.weight" and m.axis == 1)]
    spread.append(Member("g.weight", 1))
    wrong = Spec((dataclasses.replace(mine, members=tuple(spread)),), shapes=spec.shapes)
    sd = rebasin.apply_permutation(model.state_dict(), wrong, {mine.name: np.array([1, 0, 3, 2])})
    assert not rebasin.verify_torch(model, sd, x).equal
    sd = rebasin.apply_permutation(model.state_dict(), spec, {mine.name: np.array([1, 0, 3, 2])})
    assert rebasin.verify_torch(model, sd, x).equal


@pytest.mark.parametrize("solver", ["weight", "sinkhorn"])
def test_grouped_conv_planted_permutation(solver):
    """A planted permutation of every class, per-group input channels included, is recovered."""
    model, x = _grouped("conv")
    spec = rebasin.infer_spec(model, x)
    a = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()
         if v.dtype.is_floating_point}
    b = permute_arrays(a, spec, spec.random_permutations(3))
    opts = {"steps": 200, "lr": 0.5} if solver == "sinkhorn" else {}
    res = rebasin.solvers.get(solver)(spec, a, b, **opts)
    aligned = permute_arrays(b, spec, res.perms)
    for k in a:
        np.testing.assert_allclose(aligned[k], a[k], atol=1e-9)


class WideGrouped(nn.Module):
    """ResNeXt's bottleneck at small width: 1x1 conv to 16 groups of 4, grouped 3x3 conv (16
    groups, 4 outputs each), 1x1 conv back, in a residual of 32 channels."""

    def __init__(self):
        super().__init__()
        self.a, self.bn1 = nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64)
        self.g, self.bn2 = nn.Conv2d(64, 64, 3, padding=1, groups=16), nn.BatchNorm2d(64)
        self.c, self.head = nn.Conv2d(64, 32, 1), nn.Conv2d(32, 3, 1)
        self.stem = nn.Conv2d(3, 32, 3, padding=1)

    def forward(self, x):
        s = self.stem(x)
        h = torch.relu(self.bn2(self.g(torch.relu(self.bn1(self.a(s))))))
        return self.head(torch.relu(s + self.c(h)))


def test_grouped_family_has_a_grid_and_weight_matching_recovers_it():
    """The groups, each group's input channels and each group's output channels are one nested
    family whose two inner types cross on the grouped weight (rows: outputs, columns: inputs:
    ``_nested.Grid``); its joint step picks both per pair of groups. A planted permutation of
    every class, with noise, is recovered (without the grid, plain steps stall: squared distance
    24.8 against 0.81, the noise's own being about 2.4)."""
    from rebasin.solvers import _nested
    from rebasin.solvers._layout import Layout

    torch.manual_seed(0)
    model, x = WideGrouped().eval(), (torch.randn(2, 3, 6, 6),)
    spec = rebasin.infer_spec(model, x)
    assert sorted(c.size for c in spec.classes).count(4) == 32, spec.table()
    a = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()
         if v.dtype.is_floating_point}
    view = NestedView.build(spec, {k: v.shape for k, v in a.items()})
    fams = _nested.find_families(view.spec, Layout(view.spec, {**{k: v.shape for k, v in a.items()},
                                                               **view.shapes}))
    assert [len(f.grids) for f in fams.values()] == [1], fams
    rng = np.random.default_rng(0)
    b = permute_arrays({k: v + 0.01 * rng.standard_normal(v.shape) for k, v in a.items()}, spec,
                       spec.random_permutations(5))
    res = rebasin.solvers.get("weight")(spec, a, b)
    aligned = permute_arrays(b, spec, res.perms)
    noise = 0.01 ** 2 * sum(v.size for v in a.values())
    assert sum(float(((aligned[k] - a[k]) ** 2).sum()) for k in a) < 3 * noise


def test_a_crossing_that_is_not_a_grid_has_no_family():
    """Two inner types claiming the same positions other than as rows and columns (here the same
    positions twice) leave the classes to plain steps."""
    from rebasin.solvers import _nested

    types = [_nested.InnerType((1, 2), ((0, 0, 1, 1),), 3, True),
             _nested.InnerType((3, 4), ((0, 0, 1, 1),), 3, True)]
    assert _nested._inside(types, [], [Member("w", 0, 0, 3, 3)]) is None
    rows_cols = [_nested.InnerType((1, 2), ((0, 0, 2, 2),), 3, True),
                 _nested.InnerType((3, 4), tuple((0, 2 * r, 1, 1) for r in range(3)), 2, True)]
    grid, = _nested._inside(rows_cols, [], [Member("w", 0, 0, 6, 6)])
    assert grid.positions.tolist() == [[0, 1], [2, 3], [4, 5]]
