"""Routers beyond a plain sorted top-k: group-limited routing with unsorted top-ks and scattered
masks (DeepSeek-V3, GLM-4.5), and picks by repeated argmax with the picked expert masked out
(PhiMoE's sparsemixer). The experts move with their router rows, in groups where the routing
reads groups; each expert's hidden units are a class of their own; broken variants (an order that
matters, a pick that is not a choice, weights read across tokens) keep the experts pinned. Both
frontends, hand counts, random permutations of every class."""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rebasin
from tests.corpus import export_script, randomize_bn
from tests.test_torch_frontend import assert_sound


class _Experts(nn.Module):
    """Every expert on every token (``[T, E, H]``), mixed by a dense ``[T, E]`` routing matrix."""

    def __init__(self, d, hidden, experts):
        super().__init__()
        self.embed, self.head = nn.Linear(4, d), nn.Linear(d, 3)
        self.router = nn.Linear(d, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, d, hidden) * 0.3)
        self.up_bias = nn.Parameter(torch.randn(experts, hidden) * 0.3)
        self.down = nn.Parameter(torch.randn(experts, hidden, d) * 0.3)

    def mixed(self, h, mix):
        y = F.silu(torch.einsum("td,edh->teh", h, self.up) + self.up_bias)
        return self.head(h + torch.einsum("te,ted->td", mix, torch.einsum("teh,ehd->ted", y, self.down)))


class GroupRouted(_Experts):
    """Experts in ``groups`` groups of ``per``: each token keeps its best group (by the sum of the
    group's two best scores, an unsorted top-k over groups scattered into a mask), then its k
    experts in it by an unsorted top-k; their sigmoid scores, normalized, are scattered into the
    routing matrix. ``variant``: "first_pick" (the k picks weighted by their place along k: the
    order matters), "across_rows" (each pick's weight also reads the mean over tokens),
    "argsort" (picks by argsort: positions, not a choice), "sorted" (a sorted top-k: the same
    classes)."""

    def __init__(self, variant="sound", d=8, hidden=5, groups=2, per=3, k=2):
        super().__init__(d, hidden, groups * per)
        self.bias = nn.Parameter(torch.randn(groups * per) * 0.1)
        self.variant, self.groups, self.per, self.k = variant, groups, per, k

    def forward(self, x):
        h = self.embed(x)
        s = self.router(h).sigmoid()
        c = s + self.bias
        best = c.view(-1, self.groups, self.per).topk(2, -1)[0].sum(-1)
        keep = torch.zeros_like(best).scatter(1, best.topk(1, -1, sorted=False)[1], 1.0)
        c = c.masked_fill(keep.repeat_interleave(self.per, 1) == 0, float("-inf"))
        idx = c.argsort(-1, descending=True)[:, :self.k] if self.variant == "argsort" else \
            c.topk(self.k, -1, sorted=self.variant == "sorted")[1]
        w = s.gather(1, idx)
        if self.variant == "first_pick":
            w = w * torch.linspace(1.0, 0.5, self.k)
        if self.variant == "across_rows":
            w = w + w.mean(0)
        w = w / w.sum(-1, keepdim=True)
        return self.mixed(h, torch.zeros_like(s).scatter(1, idx, w))


class TwoPicks(_Experts):
    """Two experts per token by repeated argmax, the first pick masked out with ``-inf`` by a
    scatter before the second; each pick weighted by its softmax score. ``variant``:
    "fixed_second" (the second pick is expert 0 for every token: not a choice)."""

    def __init__(self, variant="sound", d=8, hidden=5, experts=4):
        super().__init__(d, hidden, experts)
        self.variant = variant

    def forward(self, x):
        h = self.embed(x)
        s = self.router(h)
        _, first = s.max(-1, keepdim=True)
        masked = s.scatter(-1, first, float("-inf"))
        _, second = masked.max(-1, keepdim=True)
        if self.variant == "fixed_second":
            second = torch.zeros_like(first)
        w = torch.cat([s.softmax(-1).gather(-1, first), masked.softmax(-1).gather(-1, second)], -1)
        return self.mixed(h, torch.zeros_like(s).scatter(1, torch.cat([first, second], -1), w))


def _onnx_spec_sound(model, x):
    """The TorchScript exporter's ONNX (TopK sorted=0, ScatterElements, GatherElements, ArgMax):
    its spec, checked with random permutations on onnxruntime."""
    from tests.test_pick_onnx import _assert_onnx_sound

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/m.onnx"
        export_script(model, x, path)
        spec = rebasin.infer_spec(path)
        _assert_onnx_sound(path, spec, seeds=(0, 1))
    return spec


# hand counts: the stream of 8; each expert's 5 hidden units; the experts: GroupRouted's 2 groups
# of 3 (the groups permute, and the experts inside each group); TwoPicks' 4 experts
CASES = {
    ("group", "sound"): [2, 3, 3, 5, 5, 5, 5, 5, 5, 8],
    ("group", "sorted"): [2, 3, 3, 5, 5, 5, 5, 5, 5, 8],
    ("group", "first_pick"): [5, 8],
    ("group", "across_rows"): [5, 8],
    ("group", "argsort"): [5, 8],
    ("picks", "sound"): [4, 5, 5, 5, 5, 8],
    ("picks", "fixed_second"): [5, 8],
}
MODELS = {"group": GroupRouted, "picks": TwoPicks}


@pytest.mark.parametrize("model_name,variant", list(CASES))
def test_routing_hand_count_both_frontends(model_name, variant):
    """Each frontend finds the hand count; every class permuted at random keeps the outputs."""
    torch.manual_seed(0)
    model = randomize_bn(MODELS[model_name](variant))
    x = (torch.randn(12, 4),)
    for tracer in ("fx", "export"):
        spec = rebasin.infer_spec(model, x, tracer=tracer)
        assert sorted(c.size for c in spec.classes) == CASES[model_name, variant], (tracer, spec.table())
        assert_sound(model, x, spec)
    onnx_spec = _onnx_spec_sound(model, x)
    assert sorted(c.size for c in onnx_spec.classes) == CASES[model_name, variant], onnx_spec.table()
    a, b = model(x[0]), model(torch.randn(12, 4))
    assert not torch.allclose(a, b)


def test_unsorted_order_reason_names_the_reader():
    """An order along k that some reader depends on pins the experts with a reason naming both."""
    torch.manual_seed(0)
    model = randomize_bn(GroupRouted("first_pick"))
    spec = rebasin.infer_spec(model, (torch.randn(12, 4),), tracer="fx")
    why = next(b.reason for b in spec.blocked if b.tensor == "router.weight" and b.axis == 0)
    assert "unsorted top-k" in why and "the order along k" in why, why


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3", "phimoe"])
def test_hf_routers_free_experts(family):
    """Hugging Face families with these routers (tiny random configs of benchmarks/moe_survey.py):
    each layer's experts move with their router rows, each expert's hidden units are a class per
    expert, and random permutations of every class keep the logits."""
    from benchmarks.moe_survey import build, routers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = build(family)
        spec = rebasin.infer_spec(model, inputs)
    held = {m.tensor for c in spec.classes for m in c.members if m.axis == 0}
    assert routers(model) <= held, spec.table()
    per_expert = [c for c in spec.classes if any(m.at for m in c.members)]
    assert len(per_expert) == 8  # 4 experts x 2 layers
    assert_sound(model, inputs, spec, seeds=(0, 1), rtol=1e-4)


def test_dead_ops_constrain_nothing():
    """A slice whose result only gives ``zeros_like`` its shape (lowered without reading it) is
    dead in the graph: it must not cut the hidden axis into pieces (one class of 8, on both
    tracers), and the spec stays sound."""
    from tests.test_torch_frontend import Ops

    def body(m, h):
        return h + torch.zeros_like(h[:, :3]).sum(-1, keepdim=True)

    torch.manual_seed(0)
    model, x = randomize_bn(Ops(body)), (torch.randn(4, 6),)
    for tracer in ("fx", "export"):
        spec = rebasin.infer_spec(model, x, tracer=tracer)
        assert sorted(c.size for c in spec.classes) == [8], spec.table()
        assert_sound(model, x, spec)


def _batched_mm_export(family):
    """A survey family with transformers' ``batched_mm`` experts and its dynamo export (cached)."""
    from benchmarks.moe_survey import build
    from tests.test_pick_onnx import batched_mm_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return batched_mm_export(family, *build(family))


@pytest.mark.parametrize("family", ["glm4_moe", "phimoe"])
def test_hf_routers_onnx_path_agrees(family):
    """The same routers with ``batched_mm`` experts, exported by the dynamo exporter: the ONNX path
    finds the torch path's classes on every tensor the export keeps as it is (mapped by value),
    each layer's experts with their router rows and each expert's hidden units among them, and
    random permutations of every class keep onnxruntime's outputs."""
    from tests.test_pick_onnx import _assert_onnx_sound, _renamed, _torch_names
    from tests.test_torch_frontend import signature

    model, inputs, path = _batched_mm_export(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_spec = rebasin.infer_spec(model, inputs)
        onnx_spec = rebasin.infer_spec(path)
    names = _torch_names(path, model)
    keep = set(names.values())
    stacked = {k for k in model.state_dict() if ".experts." in k}
    assert stacked and stacked <= keep
    assert signature(_renamed(onnx_spec, names), keep) == signature(torch_spec, keep)
    assert len([c for c in onnx_spec.classes if any(m.at for m in c.members)]) == 8
    _assert_onnx_sound(path, onnx_spec, seeds=(0,))
