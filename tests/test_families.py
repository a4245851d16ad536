"""Issue 11 families on the torch frontend: mixtures of experts, GroupNorm, PReLU, einsum, GQA by
hand, packed projections, UNet, T5. Hand-counted maximal symmetry for the small corpus models, the
routing lowerings one op at a time, and the reference outputs depend on the inputs (a constant
model would make every soundness check vacuous). Cross-frontend agreement and ONNX soundness are
in test_torch_frontend.py / test_corpus_soundness.py (the corpus covers these models).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rebasin
from rebasin import Member
from tests.corpus import build
from tests.test_torch_frontend import Ops, assert_sound

NEW = ["moe", "moe_stacked", "einsum_attention", "unet", "gqa", "phi3", "t5", "mixtral",
       "diffusers_unet_cond", "diffusers_unet"]


def _sizes(spec) -> dict:
    return dict(collections.Counter(c.size for c in spec.classes))


def _other_inputs(inputs):
    g = torch.Generator().manual_seed(123)
    return tuple(torch.randn(x.shape, generator=g) if x.is_floating_point()
                 else torch.randint(0, 100, x.shape, generator=g) for x in inputs)


@pytest.mark.parametrize("name", NEW)
def test_outputs_vary_with_inputs(name):
    model, inputs = build(name)
    with torch.no_grad():
        a, b = model(*inputs), model(*_other_inputs(inputs))
    assert a.std() > 1e-3 and not torch.allclose(a, b, rtol=1e-3, atol=1e-4)
    if name.startswith("diffusers"):  # the timesteps alone change the output too
        with torch.no_grad():
            c = model(inputs[0], inputs[1].flip(0), *inputs[2:])
        assert not torch.allclose(a, c, rtol=1e-3, atol=1e-4)


# Counted by hand (classes as {size: count}):
HAND = {
    # residual stream 16; each expert's 8 hidden units (experts are separate tensors: the router
    # rows cannot move, a spec permutes along axes, not among tensors)
    "moe": {16: 1, 8: 4},
    # stream 16; the 4 stacked experts with their router rows; each expert's 8 hidden units on
    # their own (members nested in one index of the experts axis, ``Member.at``)
    "moe_stacked": {16: 1, 4: 1, 8: 4},
    # stream 16; 2 kv heads; the 4 query heads of each kv head (2 classes); q/k dims and v/o dims
    # of each kv head (4 classes of 4)
    "gqa": {16: 1, 2: 1, 4: 6},
    # GroupNorm(2, c): 2 groups and the c/2 channels of each group on their own, for the two
    # streams (8, 16) and the two residual-block insides (8, 16); the upsampled branch (8) and the
    # fused PReLU channels (8) are free
    "unet": {2: 4, 4: 4, 8: 6},
    # per layer: 2 kv heads, 2 query heads per kv head (2 classes), value/output dims per kv head
    # (2 classes of 8; rotary embeddings pin query/key dims), the 4 stacked experts with their
    # router rows (grouped_mm after a sort: rebasin/graph/sort_dispatch.py), each expert's 16
    # hidden units on their own (4 classes); plus the 32-wide stream
    "mixtral": {32: 1, 2: 6, 8: 4, 4: 2, 16: 8},
    # stream 16; 4 heads; per head its 4 query/key dims and its 4 value/output dims (3-D weights
    # [d, heads, head_dim]: the dims nest under the heads axis, 8 classes); the MLP's 32
    "einsum_attention": {16: 1, 4: 9, 32: 1},
    # as Mixtral's attention: 2 kv heads, 2 query heads per kv head (2 classes), value/output dims
    # per kv head (2 classes of 8, query/key dims pinned by rotary embeddings), per layer; the
    # packed gate_up_proj's 16 hidden units (gate and up halves together) per layer; the stream
    "phi3": {32: 1, 2: 6, 8: 4, 16: 2},
    # the shared embedding's 32 (encoder and decoder streams); the 4 heads of the encoder's
    # self-attention and of the decoder's (each one class over both layers: one relative position
    # bias table serves every layer of a stack), of each cross-attention (2 classes); per layer and
    # head its 8 query/key dims and 8 value/output dims (6 attention blocks x 4 heads x 2); the
    # feed-forward's 64 units in each of the 4 layers
    "t5": {32: 1, 4: 4, 8: 48, 64: 4},
}


@pytest.fixture(scope="module")
def specs():
    """Torch-path specs of corpus models, inferred once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = rebasin.infer_spec(*build(name))
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_counted_symmetry(name, specs):
    spec = specs(name)
    assert _sizes(spec) == HAND[name], spec.table()


def test_mixtral_expert_hidden_class_members(specs):
    """Expert e's hidden units: the gate and up halves of gate_up_proj[e] (axis 1, offsets 0 and I)
    move with down_proj[e]'s axis 2, one class per expert."""
    spec = specs("mixtral")
    key = "m.model.layers.0.mlp.experts."
    for e in range(4):
        c = next(c for c in spec.classes
                 if Member(key + "down_proj", 2, at=((0, e),)) in c.members)
        assert c.size == 16
        assert {(m.tensor, m.axis, m.offset, m.at) for m in c.members} == \
            {(key + "gate_up_proj", 1, 0, ((0, e),)), (key + "gate_up_proj", 1, 16, ((0, e),)),
             (key + "down_proj", 2, 0, ((0, e),))}


def test_mixtral_batched_experts_class():
    """transformers' ``batched_mm`` experts pick each token's expert weights by top-k index
    (``gate_up_proj[expert_ids]``): the 4 stacked experts move with their router rows, and each
    expert's hidden units are a class (rebasin/graph/pick_dispatch.py: the dense form)."""
    model, inputs = build("mixtral")
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._experts_implementation = "batched_mm"
    spec = rebasin.infer_spec(model, inputs)
    assert _sizes(spec) == HAND["mixtral"], spec.table()
    key = "m.model.layers.1.mlp."
    c = next(c for c in spec.classes if (key + "gate.weight", 0) in {(m.tensor, m.axis) for m in c.members})
    assert {(m.tensor, m.axis) for m in c.members} == \
        {(key + "gate.weight", 0), (key + "experts.gate_up_proj", 0), (key + "experts.down_proj", 0)}
    assert_sound(model, inputs, spec)


def test_mixtral_experts_class(specs):
    """transformers' default ``grouped_mm`` experts sort the tokens by expert, multiply each group
    by its expert (histc offsets) and unsort: the router rows move with the stacked experts, as
    for ``batched_mm``, and a random permutation of every class keeps the logits."""
    model, inputs = build("mixtral")
    spec = specs("mixtral")
    for layer in range(2):
        key = f"m.model.layers.{layer}.mlp."
        (c,) = [c for c in spec.classes if any(m.tensor == key + "gate.weight" and m.axis == 0
                                               for m in c.members)]
        assert c.size == 4
        assert {(m.tensor, m.axis) for m in c.members} == \
            {(key + "gate.weight", 0), (key + "experts.gate_up_proj", 0), (key + "experts.down_proj", 0)}
    assert_sound(model, inputs, spec)


class SparseMoE(nn.Module):
    """Mixture of experts routed sparsely: each expert runs on the tokens that picked it
    (``torch.where`` on the top-k indices, gathered rows) and ``index_add`` writes its weighted
    output back; no ONNX rule reads ScatterND, so this one is checked on the torch path."""

    def __init__(self, d=8, hidden=6, experts=4, k=2):
        super().__init__()
        self.embed, self.head = nn.Linear(5, d), nn.Linear(d, 3)
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
                                     for _ in range(experts))
        self.k = k

    def forward(self, x):
        h = self.embed(x)
        weights, picked = self.router(h).softmax(-1).topk(self.k, -1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(picked == e)
            out = out.index_add(0, token, expert(h[token]) * weights[token, slot, None])
        return self.head(h + out)


def test_sparse_moe_expert_classes():
    """Stream (8) and each expert's hidden units (4 classes of 6); the router rows stay."""
    from tests.corpus import randomize_bn

    torch.manual_seed(0)
    model, x = randomize_bn(SparseMoE()), (torch.randn(14, 5),)
    spec = rebasin.infer_spec(model, x)
    assert_sound(model, x, spec)
    assert _sizes(spec) == {8: 1, 6: 4}, spec.table()
    assert any(b.tensor == "router.weight" and b.axis == 0 for b in spec.blocked)


# --------------------------------------------------------------------------- GroupNorm over a concatenation


class ConcatGroupNorm(nn.Module):
    """Two branches concatenated on channels under one GroupNorm (a UNet's skip concatenation)."""

    def __init__(self, c1, c2, groups):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, c1, 1), nn.Conv2d(3, c2, 1)
        self.norm = nn.GroupNorm(groups, c1 + c2)
        self.out = nn.Conv2d(c1 + c2, 2, 1)

    def forward(self, x):
        return self.out(F.silu(self.norm(torch.cat([self.a(x), self.b(x)], 1))))


@pytest.mark.parametrize("c1,c2,groups,sizes", [
    # groups of 4: 2 in each branch, moving within it, and each group's 4 channels on their own
    (8, 8, 4, {2: 2, 4: 4}),
    # groups of 6: group 1 holds 2 channels of a and 4 of b, so it stays, its channels moving
    # within each branch (2, 4); group 0's 6 channels
    (8, 4, 2, {6: 1, 2: 1, 4: 1}),
    # groups of 4, group 1 cut 2 + 2 (two classes of 2): b's two whole groups move (2); the 4
    # channels of each whole group (a's group 0, b's groups 2 and 3)
    (6, 10, 4, {2: 3, 4: 3}),
])
def test_group_norm_over_concatenation(c1, c2, groups, sizes):
    torch.manual_seed(0)
    from tests.corpus import randomize_bn

    model, x = randomize_bn(ConcatGroupNorm(c1, c2, groups)), (torch.randn(2, 3, 4, 4),)
    spec = rebasin.infer_spec(model, x)
    assert_sound(model, x, spec)
    assert _sizes(spec) == sizes, spec.table()
    assert not {(b.tensor, b.axis) for b in spec.blocked} & {("a.weight", 0), ("b.weight", 0)}


class NormedPiecesGroupNorm(nn.Module):
    """Three branches, each under its own GroupNorm, concatenated under another GroupNorm and
    added to a projection of the input (so the concatenation's channels meet a residual)."""

    def __init__(self, widths, own, groups):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(3, w, 1) for w in widths)
        self.own = nn.ModuleList(nn.GroupNorm(g, w) for g, w in zip(own, widths))
        self.skip = nn.Conv2d(3, sum(widths), 1)
        self.norm = nn.GroupNorm(groups, sum(widths))
        self.out = nn.Conv2d(sum(widths), 2, 1)

    def forward(self, x):
        h = torch.cat([F.silu(n(b(x))) for b, n in zip(self.branches, self.own)], 1)
        return self.out(F.silu(self.norm(h + self.skip(x))))


@pytest.mark.parametrize("widths,own,groups", [
    ((4, 8, 12), (2, 4, 3), 6),  # groups of 4: a piece boundary inside a group
    ((6, 6, 12), (3, 2, 4), 4),  # groups of 6: whole groups, pieces' own groups of 2, 3, 3
    ((6, 10, 8), (3, 5, 4), 3),  # groups of 8 cut at 6: the pieces' pairs share the cut layout
    ((12, 12), (6, 2), 3),  # groups of 8 cut at 12, pieces with groups of 2 and of 6
    ((8, 8, 8), (4, 2, 8), 3),  # groups of 8, one per piece
])
def test_group_norm_over_normed_pieces_is_sound(widths, own, groups):
    """Random permutations of every class leave the outputs unchanged, whatever the layouts."""
    from tests.corpus import randomize_bn

    torch.manual_seed(0)
    model, x = randomize_bn(NormedPiecesGroupNorm(widths, own, groups)), (torch.randn(2, 3, 4, 4),)
    spec = rebasin.infer_spec(model, x)
    assert spec.classes, spec.table()
    assert_sound(model, x, spec)


def test_group_norm_over_normed_pieces_sweep():
    """60 random layouts (2 or 3 pieces of 2-12 channels, each under its own GroupNorm, under
    one GroupNorm of any group count): every spec is sound (about 5 s). It fails on the unsound
    index lifting the nesting once had (commit 33c507d)."""
    import random

    from tests.corpus import randomize_bn

    rng = random.Random(1)
    for k in range(60):
        widths = tuple(rng.choice([2, 3, 4, 5, 6, 8, 10, 12]) for _ in range(rng.choice([2, 3])))
        own = tuple(rng.choice([d for d in range(1, w + 1) if w % d == 0]) for w in widths)
        total = sum(widths)
        groups = rng.choice([d for d in range(1, total) if total % d == 0])
        torch.manual_seed(k)
        model, x = randomize_bn(NormedPiecesGroupNorm(widths, own, groups)), (torch.randn(2, 3, 4, 4),)
        assert_sound(model, x, rebasin.infer_spec(model, x))


class NestedGroupNorms(nn.Module):
    """GroupNorm(8, 16) then GroupNorm(4, 16): pairs of channels inside groups of 4."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 2, 1)
        self.n1, self.n2 = nn.GroupNorm(8, 16), nn.GroupNorm(4, 16)

    def forward(self, x):
        return self.out(self.n2(torch.relu(self.n1(self.a(x)))))


def test_nested_group_norms_are_independent_per_block():
    """The 4 groups, the 2 pairs of each group (4 x 2) and the 2 channels of each pair (8 x 2):
    normalizing over a whole group (both pairs at once) does not tie the pairs' permutations."""
    from tests.corpus import randomize_bn

    torch.manual_seed(0)
    model, x = randomize_bn(NestedGroupNorms()), (torch.randn(2, 3, 4, 4),)
    spec = rebasin.infer_spec(model, x)
    assert_sound(model, x, spec)
    assert _sizes(spec) == {4: 1, 2: 12}, spec.table()


# --------------------------------------------------------------------------- diffusers UNet

def _diffusers_inside(m) -> bool:
    """A member inside a block of the conditional UNet: the time embedding, a transformer block
    (with its proj_in outputs and proj_out inputs) or a resnet's conv1 output."""
    t = m.tensor
    if "time_embedding" in t or "time_emb_proj" in t or "transformer_blocks" in t:
        return True
    if (".proj_in." in t or re.search(r"resnets\.\d\.(conv1|norm2)\.", t)) and m.axis == 0:
        return True
    return (".proj_out." in t or re.search(r"resnets\.\d\.conv2\.", t)) and m.axis == 1


def _add(*counts) -> dict:
    out: collections.Counter = collections.Counter()
    for c in counts:
        out.update(c)
    return dict(out)


def _transformer(c, heads=8, ff=4):
    """Transformer2DModel of width ``c``: proj_in/out stream, self- and cross-attention (heads,
    then per head the q/k dims and the v/o dims), GEGLU's hidden units (value and gate halves)."""
    return _add({c: 1}, {heads: 2}, {c // heads: 4 * heads}, {ff * c: 1})


def _groups(c, g=8):
    """GroupNorm(g, c) alone: its groups, and each group's channels on their own."""
    return _add({g: 1}, {c // g: g})


# The conditional UNet (block_out_channels (32, 64), 8 groups, 8 heads, one resnet per down block,
# two per up block), counted by hand. Inside blocks: the time embedding's two 128-wide layers, the
# four transformers (three of width 32, the mid block's of width 64) and the eight resnets' conv1
# outputs (three of 32 channels, five of 64) under GroupNorm(8, .).
DIFFUSERS_INSIDE = _add({128: 2}, *[_transformer(32)] * 3, _transformer(64),
                        *[_groups(32)] * 3, *[_groups(64)] * 5)
# The streams between blocks, each constrained by every GroupNorm it meets, on its own or as a
# piece of a skip concatenation (maximum the spec format can state):
DIFFUSERS_STREAMS = _add(
    # A: conv_in .. down 0 (32): GroupNorm(8, 32) blocks of 4; in cat(up-sampled 64, A) under
    # GroupNorm(8, 96) it holds 8 channels of group 5 and groups 6, 7 (12 each); in cat(., A) under
    # GroupNorm(8, 64) blocks of 8. The 4-blocks' channels (8 x 4), swaps of blocks 0/1, 2/3, 6/7
    # and the swap of groups 6 and 7 that keeps the 8-blocks: blocks 2,3 <-> 6,7 with 4 <-> 5 (one
    # class of 2 with two members per axis) (4 x 2)
    {4: 8}, {2: 4},
    # B: after the down-sampler (32): blocks of 4; under GroupNorm(8, 96) 8 channels of group 5
    # and groups 6, 7: the 4-blocks' channels, blocks 0/1, groups 6/7, each group's 3 blocks
    {4: 8}, {2: 2}, {3: 2},
    # C: the 64-wide stream through down 1 and the mid block: blocks of 8 inside the 16-channel
    # groups of cat(C, C) under GroupNorm(8, 128): groups (4), halves (4 x 2), channels (8 x 8)
    {4: 1}, {2: 4}, {8: 8},
    # D: up 0 resnet 0 output and F: the up-sampler's output (64 each): in cat(., 32) under
    # GroupNorm(8, 96) five whole groups of 12 and 4 channels of group 5
    *[{5: 1, 12: 5, 4: 1}] * 2,
    # E: up 0 resnet 1 output (64), read only by the up-sampler's conv: free
    {64: 1},
    # G: up 1 resnet 0 output (32): GroupNorm(8, 32) blocks of 4 inside blocks of 8 of cat(G, A)
    {4: 1}, {2: 4}, {4: 8},
    # H: up 1 resnet 1 output (32): GroupNorm(8, 32) (attention and conv_norm_out)
    _groups(32),
)


def _log_symmetry(sizes: dict) -> float:
    return sum(n * math.lgamma(s + 1) for s, n in sizes.items())


def test_diffusers_unet_inside_blocks_is_maximal(specs):
    """Inside blocks the analysis finds exactly the hand count."""
    spec = specs("diffusers_unet_cond")
    inside = [c for c in spec.classes if all(_diffusers_inside(m) for m in c.members)]
    assert dict(collections.Counter(c.size for c in inside)) == DIFFUSERS_INSIDE, spec.table()


def test_diffusers_unet_below_hand_count(specs):
    """All of it: never more than the hand count (more would be unsound or a miscount)."""
    spec = specs("diffusers_unet_cond")
    assert spec.log_symmetry <= _log_symmetry(_add(DIFFUSERS_INSIDE, DIFFUSERS_STREAMS)) + 1e-6


def test_diffusers_unet_reaches_hand_count(specs):
    """Every stream at its hand count (each group of a concatenation with its own channel layout:
    rebasin/graph/axes.py's families); A's eight 4-blocks each with its own channel permutation
    (blocks 2 to 7 nest under the cells the 8- and 12-wide layouts cut them into:
    infer._cell_names), and the swap of groups 6 and 7 as the reflection of their period
    (infer._mirrors)."""
    spec = specs("diffusers_unet_cond")
    assert _sizes(spec) == _add(DIFFUSERS_INSIDE, DIFFUSERS_STREAMS), spec.table()


def test_diffusers_unet_swap_of_groups_6_and_7(specs):
    """The swap class alone keeps the output (blocks 2, 3 <-> 6, 7 and 4 <-> 5 of A); moving the
    two 12-groups position for position instead cuts the 8-groups and changes it: the check can
    fail, and the swap is the one that maps every group of both layouts onto a group."""
    model, x = build("diffusers_unet_cond")
    spec = specs("diffusers_unet_cond")
    swap, = [c for c in spec.classes if c.size == 2 and  # two layouts on conv_in's rows
             len({m.block for m in c.members if m.tensor == "m.conv_in.weight"}) > 1]
    assert {(m.offset, m.block, m.stride) for m in swap.members if m.tensor == "m.conv_in.weight"} == \
        {(8, 8, 16), (16, 4, 4)}  # conv_in's 32 rows: cells 8:16 <-> 24:32, 16:20 <-> 20:24
    perms = {c.name: np.arange(c.size) for c in spec.classes}
    perms[swap.name] = np.array([1, 0])
    assert rebasin.verify_torch(model, rebasin.apply_permutation(model.state_dict(), spec, perms), x).equal
    cells = [m for m in swap.members if (m.block, m.stride) == (8, 16)]  # the 8-cells' members of unit 1
    shifted = dataclasses.replace(swap, members=tuple(  # moved as 12-groups, position for position
        dataclasses.replace(m, block=12, stride=12) for m in cells))
    wrong = rebasin.Spec((shifted,), (), shapes=spec.shapes)
    sd = rebasin.apply_permutation(model.state_dict(), wrong, {shifted.name: [1, 0]})
    res = rebasin.verify_torch(model, sd, x)
    assert not res.equal, res


# --------------------------------------------------------------------------- routing ops, one at a time

def _rows(h):
    """A row index per example computed from ``h`` (a traced tensor, not a constant), ``[N, 1]``."""
    return (h.sum(-1, keepdim=True) > 0).long() + torch.arange(h.shape[0]).unsqueeze(-1) // 2


def _mask_times_first_index(idx, h):
    """One top-k's indices read by ``one_hot`` and as numbers: the axis stays pinned."""
    return h + F.one_hot(idx, 8).sum(1).to(h.dtype) * idx[:, :1].to(h.dtype)


def _against_mean(v):
    """Each row's picks times the picks' mean over rows: the order along k is read across rows."""
    return (v * v.mean(0)).sum(-1, keepdim=True)


ROUTING = {
    # values of a top-k / sort are invariant to a permutation of the selected axis: class kept
    "topk_values": (lambda m, h: h * h.topk(3, -1).values.sum(-1, keepdim=True), True),
    "sort_values": (lambda m, h: h * h.sort(-1, descending=True).values[:, :1], True),
    "histc": (lambda m, h: h * torch.histc(h, bins=4, min=-3, max=3)[1], True),
    # indices are positions along the axis: it is pinned, unless they only make a top-k mask
    "topk_indices": (lambda m, h: h * h.topk(2, -1).indices.sum(-1, keepdim=True).to(h.dtype), False),
    "topk_mask": (lambda m, h: h + F.one_hot(h.topk(2, -1).indices, 8).sum(1).to(h.dtype), True),
    "topk_mask_and_indices": (lambda m, h: _mask_times_first_index(h.topk(2, -1).indices, h), False),
    # rows picked by top-k indices move with the scores' axis (here the hidden units themselves)
    "topk_pick_rows": (lambda m, h: h + m.extra["e"](h.topk(2, -1).indices.flatten()).view(4, 2, 8).sum(1),
                       True),
    "argsort": (lambda m, h: h * h.argsort(-1).to(h.dtype), False),
    # an unsorted top-k returns its k in an order that follows positions (on the CPU): pinned
    "topk_unsorted_first": (lambda m, h: h * h.topk(3, -1, sorted=False).values[:, :1], False),
    "topk_unsorted_mask": (lambda m, h: h + F.one_hot(h.topk(2, -1, sorted=False).indices, 8)[:, 0]
                           .to(h.dtype), False),
    # ... unless nothing reads that order: summed per row, or a mask of all k picks (kept)
    "topk_unsorted_sum": (lambda m, h: h * h.topk(3, -1, sorted=False).values.sum(-1, keepdim=True), True),
    "topk_unsorted_all": (lambda m, h: h + F.one_hot(h.topk(2, -1, sorted=False).indices, 8).sum(1)
                          .to(h.dtype), True),
    # two unsorted orders meet (each reorders its own picks), or one is read across rows: pinned
    "topk_unsorted_two": (lambda m, h: h * (h.topk(3, -1, sorted=False).values
                                            * (-h).topk(3, -1, sorted=False).values).sum(-1, keepdim=True),
                          False),
    "topk_unsorted_across": (lambda m, h: h * _against_mean(h.topk(3, -1, sorted=False).values), False),
    # scatters along the batch axis keep the features' class
    "index_add": (lambda m, h: h.index_add(0, torch.tensor([1, 0, 1, 2]), 2 * h), True),
    "index_put": (lambda m, h: h.index_put((torch.tensor([2, 0]),), h[:2] * 3), True),
    "index_fill": (lambda m, h: h.index_fill(0, torch.tensor([1]), 0.5), True),
    # an index expanded along the features ties nothing there; one that varies along them pins them
    "scatter_add_rows": (lambda m, h: h.scatter_add(0, _rows(h).expand(4, 8), h * 2), True),
    "scatter_by_rank": (lambda m, h: h.scatter(0, h.argsort(0), h * 2), True),  # moves with h
    "scatter_by_column": (lambda m, h: h.scatter(0, torch.arange(8).repeat(4, 1) % 4, h * 2), False),
    "nonzero_gather": (lambda m, h: h.index_select(0, torch.nonzero((h > -9).all(-1))[:, 0]), True),
    "repeat_interleave": (lambda m, h: h.repeat_interleave(2, dim=-1).view(4, 8, 2).sum(-1), True),
    "prelu": (lambda m, h: m.extra["p"](h), True),
    "group_norm_rank2": (lambda m, h: m.extra["gn"](h), True),
}


@pytest.mark.parametrize("case", sorted(ROUTING))
def test_routing_op_sound(case):
    fn, kept = ROUTING[case]
    torch.manual_seed(0)
    extra = {"p": nn.PReLU(8), "gn": nn.GroupNorm(2, 8), "e": nn.Embedding(8, 8)}
    model = Ops(fn, extra=extra).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn(prm.shape) * 0.1)
    x = (torch.randn(4, 6),)
    spec = rebasin.infer_spec(model, x)
    assert_sound(model, x, spec)
    members = [m for c in spec.classes for m in c.members if m.tensor == "a.weight" and m.axis == 0]
    assert bool(members) == kept, spec.table()


# --------------------------------------------------------------------------- filled tensors


class SharedZeros(nn.Module):
    """One zero tensor added to two independent hidden layers (T5's shared position bias)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
        self.c, self.d = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        zero = torch.zeros(x.shape[0], 6)
        return self.c(torch.relu(self.a(x) + zero)) + self.d(torch.relu(self.b(x) + zero))


class WrittenZeros(nn.Module):
    """Views of a zero tensor taken before an in-place write see the written values."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        y = torch.zeros_like(h)
        v, w = y.view(2, 6), y.view(2, 6)
        y.add_(h)
        return self.c(v) + self.d(w)


def test_filled_tensor_ties_nothing_between_readers():
    torch.manual_seed(0)
    model, x = SharedZeros().eval(), (torch.randn(2, 4),)
    spec = rebasin.infer_spec(model, x, tracer="export")
    assert_sound(model, x, spec)
    assert _sizes(spec) == {6: 2}, spec.table()


def test_filled_tensor_written_in_place_keeps_its_readers_tied():
    """make_fx keeps ``add_``: giving each view its own zero copy would free ``c`` and ``d``."""
    torch.manual_seed(0)
    model, x = WrittenZeros().eval(), (torch.randn(2, 4),)
    spec = rebasin.infer_spec(model, x)
    assert spec.source == "torch.fx"
    assert_sound(model, x, spec)
    assert _sizes(spec) == {6: 1}, spec.table()
