"""Sort-dispatched grouped products (rebasin/graph/sort_dispatch.py) on a hand-written mixture of
experts: the proven idiom frees the stacked experts with their router rows (both tracers), and
every broken variant keeps them pinned and stays sound."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rebasin
from rebasin.graph.sort_dispatch import normalize_sort_dispatch
from tests.corpus import PickedMoE, randomize_bn
from tests.test_torch_frontend import assert_sound


def _grouped_mm(tracer):
    """ATen's grouped product (its fake kernel wants bfloat16 under torch.export, so the export
    tests use the float32 kernel transformers registers, as Mixtral does)."""
    if tracer == "fx":
        return lambda x, w, offs: F.grouped_mm(x, w, offs=offs)
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers)

    return lambda x, w, offs: torch.ops.transformers.grouped_mm_fallback(x, w, offs=offs)


class SortDispatchMoE(nn.Module):
    """Top-k routing, tokens sorted by expert, ``grouped_mm`` on histc offsets, unsorted back.

    ``variant`` breaks one step of the proof (BROKEN) or follows it another way ("argsort",
    "bincount", "in_place" inverses and counts)."""

    def __init__(self, variant="sound", tracer="fx", d=8, hidden=8, experts=4, k=2):
        super().__init__()
        self.embed, self.head = nn.Linear(4, d), nn.Linear(d, 3)
        self.router = nn.Linear(d, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, d, 2 * hidden) * 0.3)
        self.down = nn.Parameter(torch.randn(experts, hidden, d) * 0.3)
        self.mix = nn.Linear(d, d) if variant == "region_linear" else None  # runs on the sorted rows
        self.k, self.e, self.variant, self.gmm = k, experts, variant, _grouped_mm(tracer)

    def forward(self, x):
        h = self.embed(x)
        w, idx = self.router(h).softmax(-1).topk(self.k, -1)
        labels = idx.reshape(-1)
        if self.variant == "labels_not_in_range":
            labels = (labels + 1) % self.e  # in range, but not indices of the scores
        labels_g, perm = torch.sort(labels, descending=self.variant == "descending")
        x_g, w_g = h[perm // self.k], w.reshape(-1)[perm]
        top = self.e + 1 if self.variant == "histc_misplaced" else self.e - 1
        counts = torch.bincount(labels_g, minlength=self.e) if self.variant == "bincount" else \
            torch.histc(labels_g.float(), bins=self.e, min=0, max=top)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        if self.variant == "row_cumsum":
            x_g = x_g.cumsum(0)
        gate, up = self.gmm(x_g, self.up, offs).chunk(2, -1)
        y = self.gmm(F.silu(gate) * up, self.down, offs)
        if self.variant == "row_softmax":  # equivariant along the rows: pinned only for want of a proof
            y = y.softmax(0)
        if self.variant == "row_roll":
            y = y.roll(1, 0)
        if self.mix is not None:
            y = self.mix(y)
        y = y * w_g[:, None]
        if self.variant == "argsort":
            inv = perm.argsort()
        elif self.variant == "unsort_by_perm":
            inv = perm
        elif self.variant == "in_place":  # as transformers writes it (symbolic_trace cannot trace it)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.shape[0])
        else:
            inv = torch.empty_like(perm).index_put((perm,), torch.arange(perm.shape[0]))
        return self.head(h + y[inv].view(-1, self.k, y.shape[-1]).sum(1))


BROKEN = ["descending", "histc_misplaced", "row_cumsum", "row_softmax", "row_roll", "unsort_by_perm",
          "labels_not_in_range"]


def _model(variant, tracer):
    torch.manual_seed(0)
    return randomize_bn(SortDispatchMoE(variant, tracer)), (torch.randn(6, 4),)


def _experts_class(spec):
    return [c for c in spec.classes if any(m.tensor == "router.weight" and m.axis == 0 for m in c.members)]


@pytest.mark.parametrize("variant,tracer", [("sound", "fx"), ("sound", "export"), ("argsort", "fx"),
                                            ("bincount", "fx"), ("region_linear", "fx")])
def test_sort_dispatch_frees_the_experts(variant, tracer):
    """Classes: the 4 experts with their router rows, each expert's 8 hidden units (the dense form
    keeps the experts axis through the region), the stream of 8 (and the 8 units between ``down``
    and ``mix`` where ``mix`` runs on the sorted rows)."""
    model, x = _model(variant, tracer)
    spec = rebasin.infer_spec(model, x, tracer=tracer)
    assert spec.source == f"torch.{tracer}"
    (c,) = _experts_class(spec)
    assert {(m.tensor, m.axis) for m in c.members} == {("router.weight", 0), ("up", 0), ("down", 0)}
    extra = [8] if variant == "region_linear" else []
    assert sorted(c.size for c in spec.classes) == [4] + [8] * 5 + extra, spec.table()
    hidden = [c for c in spec.classes if any(m.tensor == "down" and m.axis == 1 for m in c.members)]
    at = sorted(m.at for c in hidden for m in c.members if m.tensor == "down")
    assert at == [((0, e),) for e in range(4)]
    assert_sound(model, x, spec)


def test_experts_without_router_rows_change_the_output():
    """The check above can fail: moving the experts but not their router rows changes the output."""
    model, x = _model("sound", "fx")
    sd = dict(model.state_dict())
    swap = torch.tensor([1, 0, 3, 2])
    sd["up"], sd["down"] = sd["up"][swap], sd["down"][swap]
    assert not rebasin.verify_torch(model, sd, x).equal


def test_reference_output_varies_with_input():
    model, x = _model("sound", "fx")
    with torch.no_grad():
        a, b = model(*x), model(torch.randn(6, 4))
    assert a.std() > 1e-3 and not torch.allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("variant", BROKEN)
def test_broken_dispatch_keeps_the_experts_pinned(variant):
    model, x = _model(variant, "fx")
    spec = rebasin.infer_spec(model, x, tracer="fx")
    assert not _experts_class(spec), spec.table()
    assert not any(m.tensor == "up" and m.axis == 0 for c in spec.classes for m in c.members)
    assert_sound(model, x, spec)


@pytest.mark.parametrize("variant,pre_dispatch", [("sound", True), ("argsort", True), ("in_place", True),
                                                  ("region_linear", False)])
def test_normalized_graph_computes_the_same(variant, pre_dispatch):
    """The rewritten ATen graph (no sort, histc or grouped product left) gives the model's output;
    also on the graph dispatch records (``linear`` as ``t`` + ``addmm``)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model, (x,) = _model(variant, "fx")
    params = dict(model.named_parameters())
    traced = make_fx(lambda p, x: torch.func.functional_call(model, p, (x,)),
                     pre_dispatch=pre_dispatch)(params, x)
    graph, reordered = normalize_sort_dispatch(traced.graph)
    ops = {str(n.target) for n in graph.nodes}
    assert reordered and not any(op in ops for op in ("aten.sort.default", "aten.histc.default",
                                                      "aten._grouped_mm.default")), ops
    with torch.no_grad():
        out = torch.fx.GraphModule(traced, graph)(*torch.utils._pytree.tree_leaves((params, x)))
        (out,) = out if isinstance(out, (list, tuple)) else (out,)
        assert torch.allclose(out, model(x), rtol=1e-5, atol=1e-6)


def test_broken_dispatch_is_left_as_traced():
    from torch.fx.experimental.proxy_tensor import make_fx

    model, (x,) = _model("row_cumsum", "fx")
    traced = make_fx(lambda x: model(x), pre_dispatch=True)(x)
    assert normalize_sort_dispatch(traced.graph) == (traced.graph, set())


# --------------------------------------------------------------------------- weights picked by top-k index


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("variant", ["sound", "row_cumsum", "labels_argsort"])
def test_picked_experts_in_dense_form(variant, tracer):
    """Classes: the 4 experts with their router rows, each expert's 6 hidden units (4 classes), the
    stream of 8. The cumsum across rows is outside the region (it reads the rows' own experts'
    results): the same classes. Labels not from a top-k keep everything about the experts pinned."""
    torch.manual_seed(0)
    model, x = randomize_bn(PickedMoE(variant)), (torch.randn(6, 4),)
    spec = rebasin.infer_spec(model, x, tracer=tracer)
    assert_sound(model, x, spec)
    sizes = sorted(c.size for c in spec.classes)
    if variant == "labels_argsort":
        assert not _experts_class(spec) and not any(m.at for c in spec.classes for m in c.members)
        return
    assert sizes == [4, 6, 6, 6, 6, 8], spec.table()
    hidden = [c for c in spec.classes if any(m.tensor == "down" and m.axis == 1 for m in c.members)]
    at = sorted(m.at for c in hidden for m in c.members if m.tensor == "down")
    assert at == [((0, e),) for e in range(4)]
