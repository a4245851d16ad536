"""Audit of the torch frontend's lowerings: ATen arguments that change what an op computes (pad
mode, resize scales, pooling indices, unbatched inputs, which axes a product contracts, sort and
reduction flags ...) must be honoured or block. Each case is a Linear feeding the op and a head
after it, with trained-like values; every class is permuted at random (3 seeds) on both tracers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rebasin
from tests.test_torch_frontend import Ops, assert_sound


def _rows(h):
    """A row index per example computed from ``h``, ``[N, 1]``."""
    return (h.sum(-1, keepdim=True) > 0).long() + torch.arange(h.shape[0]).unsqueeze(-1) // 2


def _interp(h, **kw):
    """``h [4, 8]`` resized along its hidden units (one channel, the units as the spatial axis)."""
    return F.interpolate(h.unsqueeze(1), **kw)[:, 0]


# name -> (body, whether the hidden units of ``a`` keep a class)
AUDIT = {
    # pad modes: reflected / replicated / wrapped values copy the edge items: the axis is pinned
    # (the lowering ignored the mode: a constant pad lets the padded axis move; all three were unsound)
    "pad_reflect": (lambda m, h: F.pad(h.unsqueeze(1), (2, 2), mode="reflect")[:, 0, :8], False),
    "pad_replicate": (lambda m, h: F.pad(h.unsqueeze(1), (0, 2), mode="replicate")[:, 0, 2:], False),
    "pad_circular": (lambda m, h: F.pad(h.unsqueeze(1), (2, 0), mode="circular")[:, 0, :8], False),
    "pad_constant_value": (lambda m, h: F.pad(h, (1, 1), value=2.0)[:, 1:9] * F.pad(h, (1, 1), value=2.0)
                           [:, :8], False),
    "pad_crop": (lambda m, h: F.pad(h, (-1, 1)), True),
    # resize: a scale other than 1 samples other positions even where the size stays (was unsound)
    "resize_nearest_scale": (lambda m, h: _interp(h, scale_factor=1.1, mode="nearest"), False),
    "resize_nearest_exact_scale": (lambda m, h: _interp(h, scale_factor=1.1, mode="nearest-exact"), False),
    "resize_bicubic_scale": (lambda m, h: F.interpolate(h.view(4, 1, 2, 4), scale_factor=(1.0, 1.1),
                                                        mode="bicubic").reshape(4, 8), True),
    "resize_linear_corners": (lambda m, h: _interp(h, size=8, mode="linear", align_corners=True), True),
    "resize_channels": (lambda m, h: F.interpolate(h.unsqueeze(-1), scale_factor=2).sum(-1), True),
    "resize_recomputed_scale": (lambda m, h: _interp(h, scale_factor=1.1, recompute_scale_factor=True), True),
    # global max pooling is order free, its indices are not (were unsound)
    "adaptive_max_indices": (lambda m, h: h * F.adaptive_max_pool1d(h.unsqueeze(1), 1, return_indices=True)[1]
                             [:, 0].to(h.dtype), False),
    "adaptive_max_values": (lambda m, h: h * F.adaptive_max_pool1d(h.unsqueeze(1), 1)[:, 0], True),
    "max_pool_indices": (lambda m, h: h + F.max_pool1d(h.unsqueeze(1), 2, return_indices=True)[1][:, 0]
                         .repeat(1, 2).to(h.dtype), False),
    "max_pool_ceil": (lambda m, h: F.max_pool1d(h.unsqueeze(1), 3, 2, ceil_mode=True)[:, 0]
                      .repeat(1, 2)[:, :8], False),
    # an unbatched conv input [C, L] has its channels on axis 0 (export path was unsound)
    "conv_unbatched": (lambda m, h: m.extra["c1"](h.t()).t(), True),
    "conv_padding_mode_reflect": (lambda m, h: m.extra["cr"](h.unsqueeze(-1).repeat(1, 1, 4)).sum(-1), True),
    "conv_groups": (lambda m, h: m.extra["cg"](h.unsqueeze(-1)).squeeze(-1), True),
    "conv_transpose_groups": (lambda m, h: m.extra["ct"](h.unsqueeze(-1)).sum(-1), True),
    # inner contracts the last axes of both: a @ b.T (export path lowered a @ b: unsound)
    "inner_matrix": (lambda m, h: torch.inner(h, m.extra["sq"].weight), True),
    "inner_vector": (lambda m, h: h * torch.inner(m.extra["sq"].bias, h).unsqueeze(-1), True),
    # flags checked sound as they were
    "topk_smallest_unsorted": (lambda m, h: h * h.topk(3, largest=False, sorted=False).values[:, :1], False),
    "sort_stable_indices": (lambda m, h: h * torch.sort(h, dim=1, stable=True).indices[:, :1].to(h.dtype),
                            False),
    "max_dim_indices": (lambda m, h: h * torch.max(h, dim=1, keepdim=True).indices.to(h.dtype), False),
    "cummax_indices": (lambda m, h: h * h.cummax(1).indices.to(h.dtype), False),
    "var_correction": (lambda m, h: h * h.var(1, correction=0, keepdim=True), True),
    "tril_diagonal": (lambda m, h: torch.tril(h.view(4, 2, 4), diagonal=1).view(4, 8), False),
    "gather_prefix": (lambda m, h: h + torch.gather(h, 1, torch.zeros(4, 5, dtype=torch.long)).sum(-1,
                                                                                                   keepdim=True),
                      False),
    "scatter_reduce_no_self": (lambda m, h: h.scatter_reduce(0, _rows(h).expand(4, 8), h * 2, "amax",
                                                             include_self=False), True),
    "index_put_accumulate": (lambda m, h: h.index_put((torch.tensor([1, 1]),), h[:2] * 3, accumulate=True),
                             True),
    "diff_prepend": (lambda m, h: torch.diff(h, n=2, dim=1, prepend=h[:, :2]), False),
    "baddbmm_beta": (lambda m, h: torch.baddbmm(h.unsqueeze(0), h.unsqueeze(0),
                                                m.extra["sq"].weight.unsqueeze(0), beta=0.5)[0], True),
    "narrow_negative": (lambda m, h: h.narrow(1, -3, 3).repeat(1, 3)[:, :8], True),
}


def _extra():
    return {"c1": nn.Conv1d(8, 8, 1), "cg": nn.Conv1d(8, 8, 1, groups=2),
            "ct": nn.ConvTranspose1d(8, 8, 2, groups=4, output_padding=1, stride=2), "sq": nn.Linear(8, 8),
            "cr": nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")}


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(AUDIT))
def test_lowering_flag_sound(case, tracer):
    fn, kept = AUDIT[case]
    torch.manual_seed(0)
    model = Ops(fn, extra=_extra()).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn(prm.shape) * 0.1)
    x = (torch.randn(4, 6),)
    with torch.no_grad():
        assert not torch.allclose(model(*x), model(torch.randn(4, 6))), "output does not vary with the input"
    spec = rebasin.infer_spec(model, x, tracer=tracer)
    assert_sound(model, x, spec)
    members = [m for c in spec.classes for m in c.members if m.tensor == "a.weight" and m.axis == 0]
    assert bool(members) == kept, spec.table()


@pytest.mark.parametrize("scale,kept", [(1.1, False), (1.0, True)])
def test_onnx_resize_scale_other_than_one_pins_a_same_size_axis(scale, kept):
    """ONNX ``Resize`` (nearest, asymmetric, floor) of 6 items at scale 1.1: by the ONNX spec it
    samples ``floor(i / 1.1)``, not the identity (torch does too; onnxruntime recomputes the scale
    from the sizes and returns the input), so the axis is pinned, sound under both readings; at
    scale 1 it is the identity and the axis moves."""
    from tests.test_fused_rules import I, W, mlp_around, node
    from tests.test_fused_rules import assert_sound as assert_onnx_sound

    nodes = [node("Resize", ["h", "", "sc"], ["o"], mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")]
    m = mlp_around(nodes, [I("sc", [1.0, 1.0, scale], dtype="float32")], d=6)
    m.graph.initializer[1].CopyFrom(W("w_out", 6, 3))
    spec = assert_onnx_sound(m)
    assert any(mm.tensor == "w_in" and mm.axis == 1 for c in spec.classes for mm in c.members) == kept
