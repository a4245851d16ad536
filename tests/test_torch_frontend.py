"""Torch frontend: specs of nn.Modules are sound through the state_dict and equal the ONNX-path specs."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rebasin
from rebasin.errors import UnsupportedModelError
from tests.corpus import AGREEMENT_GAPS, BUILDERS, FAST, TORCH_ONLY, build, export, export_script, frozen_in

SLOW_TORCH = [n for n in BUILDERS if n not in FAST]


def assert_sound(model, inputs, spec, seeds=(0, 1, 2), rtol=1e-5):
    for seed in seeds:
        sd = rebasin.apply_permutation(model.state_dict(), spec, spec.random_permutations(seed))
        res = rebasin.verify_torch(model, sd, inputs, rtol=rtol)
        assert res.equal, f"seed {seed}: {res}"


def signature(spec, keep):
    """Classes as (size, member set) restricted to tensors both specs know, as a multiset."""
    out = collections.Counter()
    for c in spec.classes:
        mem = frozenset((m.tensor, m.axis, m.offset, m.block, m.stride, m.at)
                        for m in c.members if m.tensor in keep)
        if mem:
            out[(c.size, mem)] += 1
    return out


def _check_corpus(name):
    model, inputs = build(name)
    spec = rebasin.infer_spec(model, inputs)
    assert spec.source in ("torch.fx", "torch.export")
    assert spec.classes, "no symmetry found"
    keys = set(model.state_dict())
    # both tracers give the same classes (auto takes fx where it traces, export otherwise)
    other = rebasin.infer_spec(model, inputs, tracer="export" if spec.source == "torch.fx" else "fx") \
        if spec.source == "torch.fx" else spec
    assert signature(other, keys) == signature(spec, keys)
    assert {m.tensor for c in spec.classes for m in c.members} <= keys
    assert_sound(model, inputs, spec)
    if name in TORCH_ONLY:
        return
    # the same classes as the ONNX path (rotary inv_freq is a non-persistent buffer: frozen there too)
    path = export(name)
    onnx_spec = rebasin.infer_spec(path, frozen=frozen_in(path))
    keep = set(spec.shapes) & set(onnx_spec.shapes)
    assert len(keep) >= 0.9 * len([k for k in spec.shapes if k in keys])
    assert signature(spec, keep) == signature(onnx_spec, keep)


def _agreement(names):
    """Corpus models, with a strict xfail where the frontends differ by a known ONNX-rule gap."""
    def gap(n):
        return pytest.mark.xfail(strict=True, raises=AssertionError, reason=AGREEMENT_GAPS[n])
    return [pytest.param(n, marks=gap(n)) if n in AGREEMENT_GAPS else n for n in names]


@pytest.mark.parametrize("name", _agreement(FAST))
def test_corpus_torch_sound_and_equal_to_onnx(name):
    """The frontend-agreement test: on every corpus model both frontends read, the torch path is
    sound and finds the ONNX path's classes (tensor, axis, offset, block, stride and size)."""
    _check_corpus(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", _agreement(SLOW_TORCH))
def test_corpus_torch_sound_and_equal_to_onnx_slow(name):
    _check_corpus(name)


def test_wrong_spec_is_caught():
    """The soundness check can fail: leave BatchNorm running statistics out of their class."""
    model, inputs = build("resnet18")
    spec = rebasin.infer_spec(model, inputs)
    c = next(c for c in spec.classes if any("running_mean" in m.tensor for m in c.members))
    bad = rebasin.Spec((rebasin.PermutationClass(
        c.name, c.size, tuple(m for m in c.members if "running" not in m.tensor)),))
    sd = rebasin.apply_permutation(model.state_dict(), bad, {c.name: torch.randperm(c.size).numpy()})
    assert not rebasin.verify_torch(model, sd, inputs).equal


# --------------------------------------------------------------------------- named structures


def _members(spec, tensor, axis):
    return [(c, m) for c in spec.classes for m in c.members if m.tensor == tensor and m.axis == axis]


def test_multihead_attention_packed_in_proj():
    model, inputs = build("mha")
    spec = rebasin.infer_spec(model, inputs)
    blocks = {m.block for _, m in _members(spec, "attn.in_proj_weight", 0)}
    heads = [c for c, m in _members(spec, "attn.in_proj_weight", 0) if m.block == 8]
    assert blocks == {1, 8} and heads and heads[0].size == 4
    # q, k and v pieces of the packed weight all move with the head permutation
    assert {m.offset for m in heads[0].members if m.tensor == "attn.in_proj_weight"} == {0, 32, 64}
    per_head = [(c, m) for c, m in _members(spec, "attn.in_proj_weight", 0) if m.block == 1]
    # an independent head-dim class per head for q/k (offsets in [0, 64)) and another for v
    assert len({c.name for c, _ in per_head}) == 8
    qk = {c.name for c, m in per_head if m.offset < 64}
    v = {c.name for c, m in per_head if m.offset >= 64}
    assert len(qk) == len(v) == 4 and not qk & v


def test_gpt2_conv1d_and_tied_embeddings():
    model, inputs = build("gpt2")
    spec = rebasin.infer_spec(model, inputs)
    wte = {c.name for c, _ in _members(spec, "m.transformer.wte.weight", 1)}
    head = {c.name for c, _ in _members(spec, "m.lm_head.weight", 1)}
    resid = {c.name for c, _ in _members(spec, "m.transformer.h.0.attn.c_attn.weight", 0)}
    assert wte == head == resid and len(wte) == 1  # tied, and the residual stream
    # Conv1D stores [in, out]: c_fc's hidden units are axis 1
    assert _members(spec, "m.transformer.h.0.mlp.c_fc.weight", 1)
    assert_sound(model, inputs, spec)


def test_llama_rope_gqa_swiglu():
    model, inputs = build("llama")
    spec = rebasin.infer_spec(model, inputs)
    q = "m.model.layers.0.self_attn.q_proj.weight"
    # RoPE (inv_freq is a non-persistent buffer): query dims inside a head cannot move
    assert all(m.block > 1 for _, m in _members(spec, q, 0))
    kv_groups = [c for c, m in _members(spec, "m.model.layers.0.self_attn.k_proj.weight", 0)]
    assert kv_groups and kv_groups[0].size == 2  # 2 key/value heads
    v = _members(spec, "m.model.layers.0.self_attn.v_proj.weight", 0)
    assert any(m.block == 1 for _, m in v)  # value dims permute
    gate = {c.name for c, _ in _members(spec, "m.model.layers.0.mlp.gate_proj.weight", 0)}
    up = {c.name for c, _ in _members(spec, "m.model.layers.0.mlp.up_proj.weight", 0)}
    assert gate == up and len(gate) == 1  # SwiGLU: gate and up tied


# --------------------------------------------------------------------------- one tiny model per op family


class Ops(nn.Module):
    """A few ops between two Linear layers; ``fn(self, h)`` is the body."""

    def __init__(self, fn, d_in=6, hidden=8, d_out=3, extra=None):
        super().__init__()
        self.fn = fn
        self.a = nn.Linear(d_in, hidden)
        self.b = nn.Linear(hidden, d_out)
        self.extra = nn.ModuleDict(extra or {})

    def forward(self, x):
        return self.b(self.fn(self, self.a(x)))


def _conv_body(m, x):
    h = m.extra["bn"](m.extra["conv"](x))
    return torch.flatten(F.adaptive_avg_pool2d(h, 2), 1)


OP_CASES = {
    "chunk_cat": (lambda m, h: torch.cat(list(reversed(h.chunk(2, -1))), -1), {}),
    "split_stack_repeat": (lambda m, h: torch.stack(h.split([4, 4], -1)[::-1], 0).sum(0).repeat(1, 2)
                           * h.mean(0, keepdim=True).expand(4, 8).sum(-1, keepdim=True), {}),
    "unbind_permute": (lambda m, h: torch.stack(h.reshape(4, 2, 4).permute(1, 0, 2).unbind(0), -1)
                       .flatten(1), {}),
    "softmax_max": (lambda m, h: torch.softmax(h, -1) * h.max(-1, keepdim=True).values, {}),
    "rmsnorm_groupnorm": (lambda m, h: m.extra["gn"](m.extra["rms"](h).unsqueeze(-1)).squeeze(-1),
                          {"rms": nn.RMSNorm(8), "gn": nn.GroupNorm(2, 8)}),
    "where_clamp": (lambda m, h: torch.where(h > 0, h, -h).clamp(min=-h.abs().mean(), max=m.b.weight[0].abs()
                                                                  .mean()) + F.pad(h, (0, 0)), {}),
    "cumsum_pinned": (lambda m, h: torch.cumsum(h, -1), {}),
    "gather_index": (lambda m, h: torch.gather(h, 0, torch.zeros_like(h, dtype=torch.long))
                     + h.index_select(0, torch.tensor([3, 2, 1, 0])), {}),
    "masked_fill_tril": (lambda m, h: h.masked_fill(h < -1, 0.0) + torch.tril(h @ h.T) @ h, {}),
}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_family_sound(case):
    fn, extra = OP_CASES[case]
    torch.manual_seed(0)
    model = Ops(fn, extra=extra).eval()
    x = (torch.randn(4, 6),)
    spec = rebasin.infer_spec(model, x)
    assert_sound(model, x, spec)
    if case == "cumsum_pinned":
        assert not _members(spec, "a.weight", 0)
        assert any("cumulative" in b.reason for b in spec.blocked if b.tensor == "a.weight")
    else:
        assert _members(spec, "a.weight", 0), spec.table()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        h = F.interpolate(self.dw(h), scale_factor=0.5)
        h = self.inorm(self.up(h))
        return self.fc(F.adaptive_avg_pool2d(h, 4).flatten(1))


def test_convnet_flatten_depthwise_transpose():
    from tests.corpus import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(ConvNet())
    x = (torch.randn(2, 3, 16, 16),)
    spec = rebasin.infer_spec(model, x)
    assert_sound(model, x, spec)
    fc_in = _members(spec, "fc.weight", 1)
    assert fc_in and fc_in[0][1].block == 16  # a flattened channel is a block of 4x4 positions
    bn = {c.name for c, _ in _members(spec, "bn.running_var", 0)}
    assert bn == {c.name for c, _ in _members(spec, "dw.weight", 0)}  # depthwise keeps the class


class GQA(nn.Module):
    def __init__(self, d=16, hq=4, hkv=2):
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, d // hq
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * hkv * self.hd)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.hq, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2 * self.hkv, self.hd).transpose(1, 2).chunk(2, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def test_sdpa_grouped_query_attention():
    torch.manual_seed(0)
    model = GQA().eval()
    x = (torch.randn(2, 5, 16),)
    spec = rebasin.infer_spec(model, x)
    assert_sound(model, x, spec)
    groups = [c for c, m in _members(spec, "kv.weight", 0) if m.block > 1 and c.size == 2]
    assert groups, spec.table()


# --------------------------------------------------------------------------- tracing: fallback, failures


def test_fx_tracer_gives_the_same_spec():
    for name in ("mlp", "mha"):
        model, inputs = build(name)
        a = rebasin.infer_spec(model, inputs, tracer="export")
        b = rebasin.infer_spec(model, inputs, tracer="fx")
        assert b.source == "torch.fx"
        keep = set(a.shapes)
        assert signature(a, keep) == signature(b, keep)
        assert_sound(model, inputs, b)


def test_auto_falls_back_to_fx(monkeypatch):
    from rebasin.graph import torch_frontend

    def broken(model, inputs):
        raise RuntimeError("export is unavailable")

    monkeypatch.setattr(torch_frontend, "_trace_export", broken)
    model, inputs = build("mlp")
    assert rebasin.infer_spec(model, inputs).source == "torch.fx"


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow
            return self.b(h)
        return self.c(h)


def test_data_dependent_control_flow_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match=r"cannot trace.*torch\.fx.*torch\.export"):
        rebasin.infer_spec(Branchy(), (torch.randn(3, 4),))


def test_missing_example_inputs():
    with pytest.raises(UnsupportedModelError, match="example_inputs"):
        rebasin.infer_spec(Branchy())


@torch.library.custom_op("rebasin_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).contiguous()  # not element-wise: an analyzer must not assume it is


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.mid(mystery(torch.relu(self.a(x))))))


def test_unknown_custom_op_blocks_with_reason():
    model = Custom().eval()
    x = (torch.randn(3, 4),)
    spec = rebasin.infer_spec(model, x)
    reasons = [b.reason for b in spec.blocked if b.tensor == "a.weight" and b.axis == 0]
    assert reasons and "mystery" in reasons[0] and "no rule" in reasons[0]
    assert _members(spec, "mid.weight", 0)  # symmetry after the op survives
    assert_sound(model, x, spec)
    with pytest.raises(UnsupportedModelError, match="mystery"):
        rebasin.infer_spec(model, x, strict=True)


def test_bfloat16_state_dict_permutes_exactly():
    model, inputs = build("mlp")
    spec = rebasin.infer_spec(model, inputs)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    perms = spec.random_permutations(0)
    out = rebasin.apply_permutation(sd, spec, perms)
    ref = rebasin.apply_permutation(model.state_dict(), spec, perms)
    assert all(out[k].dtype == torch.bfloat16 for k in out)
    assert all(torch.equal(out[k], ref[k].to(torch.bfloat16)) for k in out)


# --------------------------------------------------------------------------- the dispatch-mode recorder


def test_fx_trace_does_not_import_dynamo():
    """The fx path records ops with its own dispatch mode: a fresh process that infers an MLP's
    spec never imports ``torch._dynamo`` (make_fx's first call did, about 1 s)."""
    import subprocess
    import sys

    code = ("import sys, torch, torch.nn as nn, rebasin\n"
            "m = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))\n"
            "s = rebasin.infer_spec(m, (torch.randn(2, 3, 4),))\n"
            "print(s.source, len(s.classes), 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch.fx", "1", "False"], out.stdout + out.stderr


def test_recorder_graph_computes_the_call():
    """In-place writes, captured constants and multi-output ops: the recorded graph, run on the
    same values, gives what the call gave."""
    from rebasin.graph.record import record

    torch.manual_seed(0)
    w, x = torch.randn(6, 4), torch.randn(3, 4)

    def fn():
        h = x @ w.T
        h.relu_()
        vals, idx = h.sort(-1)
        return [vals * torch.tensor([1.0, -2.0, 3.0, 0.5, 1.5, 2.0]) + idx.float()]

    gm, out = record(fn, [w, x], ["w", "x"])
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["w", "x"]
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    assert torch.allclose(gm(w, x)[0], out[0])
    w2, x2 = torch.randn(6, 4), torch.randn(3, 4)  # the graph is a function of its placeholders
    assert torch.allclose(gm(w2, x2)[0], (lambda h: h.sort(-1).values * torch.tensor(
        [1.0, -2.0, 3.0, 0.5, 1.5, 2.0]) + h.sort(-1).indices.float())((x2 @ w2.T).relu()))


class AttentionStats(nn.Module):
    """Attention through ``F.scaled_dot_product_attention``, or (``stats``) through the fused CPU
    kernel, whose log-sum-exp (a backward-pass statistic) it also reads."""

    def __init__(self, stats):
        super().__init__()
        self.q, self.o, self.stats = nn.Linear(8, 8), nn.Linear(8, 3), stats

    def forward(self, x):
        q = self.q(x).view(2, 5, 2, 4).transpose(1, 2)
        if not self.stats:
            return self.o(F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 5, 8))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)
        return self.o(out.transpose(1, 2).reshape(2, 5, 8)) + lse.sum()


def test_fused_attention_kernel_lowered_unless_its_statistics_are_read():
    """sdpa traced below autograd is its CPU kernel: lowered as attention (heads and head dims
    found), but reading its log-sum-exp blocks it."""
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 8),)
    plain, stats = AttentionStats(False).eval(), AttentionStats(True).eval()
    spec = rebasin.infer_spec(plain, x, tracer="fx")
    # q = k = v: 2 heads, and the 4 dims within each head on their own (the export path agrees)
    assert sorted(c.size for c in spec.classes) == [2, 4, 4], spec.table()
    assert signature(spec, set(spec.shapes)) == signature(rebasin.infer_spec(plain, x, tracer="export"),
                                                          set(spec.shapes))
    assert_sound(plain, x, spec)
    blocked = rebasin.infer_spec(stats, x, tracer="fx")
    assert any("statistics" in b.reason for b in blocked.blocked), blocked.table()
    assert_sound(stats, x, blocked)


class ChannelsLastPool(nn.Module):
    """A ConvNeXt-style block ending in adaptive pooling to 1 x 1: below autograd the pooling is
    ``mean`` then ``as_strided_`` back to the channels-last strides (the same elements); with
    ``transposed``, an ``as_strided`` that reads the storage in another order; ``aux`` is a head
    the forward never runs."""

    def __init__(self, transposed=False):
        super().__init__()
        self.conv, self.mlp, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 8), nn.Linear(8, 3)
        self.pool, self.aux, self.transposed = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 2), transposed

    def forward(self, x):
        h = self.mlp(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.transposed:
            h = h.contiguous().as_strided((2, 8, 4, 4), (128, 1, 32, 8))
        return self.head(self.pool(h).flatten(1))


@pytest.mark.parametrize("transposed", [False, True])
def test_as_strided_is_identity_only_when_it_reads_the_same_elements(transposed):
    """The restride after pooling ties the channels through (as the export path, which keeps
    ``adaptive_avg_pool2d``, finds); a reordering view blocks them. A head the forward never runs
    is listed by both tracers."""
    torch.manual_seed(0)
    model, x = ChannelsLastPool(transposed).eval(), (torch.randn(2, 3, 6, 6),)
    spec = rebasin.infer_spec(model, x, tracer="fx")
    tr = __import__("rebasin.graph.torch_frontend", fromlist=["trace"]).trace(model, x, "fx")
    assert any("as_strided" in str(n.target) for n in tr.graph.nodes)
    assert any(m.tensor == "aux.weight" for c in spec.classes for m in c.members)
    stream = [c for c in spec.classes if any(m.tensor == "head.weight" and m.axis == 1 for m in c.members)]
    if transposed:
        assert not stream and any("as_strided" in b.reason for b in spec.blocked), spec.table()
    else:
        assert len(stream) == 1 and stream[0].size == 8, spec.table()
        keep = set(spec.shapes)
        assert signature(spec, keep) == signature(rebasin.infer_spec(model, x, tracer="export"), keep)
    assert_sound(model, x, spec)


def _slice_scaled(h):
    h[:, :4].mul_(2.0)  # the two halves of the feature axis are told apart: a class of 4 each
    return h


def _transposed_write(h):
    h.t()[0].add_(1.0)
    return h


def _view_taken_before(h):
    v = h[:, 2:6]
    h.add_(torch.arange(8.0))
    return h + v.sum(-1, keepdim=True)


IN_PLACE = {"slice_scaled": _slice_scaled, "transposed_write": _transposed_write,
            "view_taken_before": _view_taken_before,
            "copy_flipped": lambda h: h.copy_(h.flip(-1)),
            "masked_fill_by_position": lambda h: h.masked_fill_(torch.arange(8) > 4, 1.0),
            "index_fill": lambda h: h.index_fill_(1, torch.tensor([1, 5]), 0.0)}


class InPlace(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b, self.fn = nn.Linear(6, 8), nn.Linear(8, 3), fn

    def forward(self, x):
        return self.b(self.fn(torch.relu(self.a(x))))


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(IN_PLACE))
def test_in_place_writes_through_views_stay_sound(case, tracer):
    """Writes in place, through slices and transposes of the hidden features or to a tensor a
    view was taken from: whatever classes either tracer finds, permuting them keeps the outputs."""
    torch.manual_seed(0)
    model, x = InPlace(IN_PLACE[case]).eval(), (torch.randn(5, 6),)
    spec = rebasin.infer_spec(model, x, tracer=tracer)
    assert_sound(model, x, spec)
    if case == "slice_scaled" and tracer == "fx":
        assert sorted(c.size for c in spec.classes) == [4, 4], spec.table()


class _Blur(nn.Module):
    """conv -> a fixed 3x3 blur per channel (a non-persistent buffer, depthwise) -> relu -> conv:
    anti-aliased downsampling as TResNet writes it. ``same``: one filter repeated for every
    channel; else each channel has its own filter."""

    def __init__(self, same: bool):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 2, 1)
        filt = torch.tensor([1.0, 2.0, 1.0])
        filt = (filt[:, None] * filt[None, :]) / 16
        filt = filt.expand(6, 1, 3, 3) if same else filt * torch.arange(1.0, 7.0).view(6, 1, 1, 1)
        self.register_buffer("filt", filt.contiguous(), persistent=False)

    def forward(self, x):
        h = F.conv2d(self.a(x), self.filt, stride=2, padding=1, groups=6)
        return self.b(torch.relu(h))


@pytest.mark.parametrize("tracer", ["export", "fx"])
def test_fixed_buffer_constant_across_channels_ties_nothing(tracer):
    """A non-persistent buffer equal along an axis (one blur filter for every channel) is
    unchanged by any permutation of that axis: the channels stay a class (6), as on the ONNX path,
    where the exporter makes the buffer a weight that moves with them. A filter per channel fixes
    them (the buffer is not permuted: nothing may move them)."""
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 8, 8),)
    for same, sizes in ((True, [6]), (False, [])):
        model = _Blur(same).eval()
        spec = rebasin.infer_spec(model, x, tracer=tracer)
        assert sorted(c.size for c in spec.classes) == sizes, spec.table()
        if sizes:
            assert_sound(model, x, spec)
        else:
            assert any("filt" in b.reason for b in spec.blocked), spec.table()


class _ReadAt(nn.Module):
    """h = Linear(3, 6)(x), read whole by one head and at fixed positions (``h[:, index]``, an
    index tensor traced into the graph) by another."""

    def __init__(self, index):
        super().__init__()
        self.index = index
        width = 1 if isinstance(index, int) else len(index)
        self.a, self.whole, self.part = nn.Linear(3, 6), nn.Linear(6, 2), nn.Linear(width, 2)

    def forward(self, x):
        h = self.a(x)
        part = h[:, self.index]
        return self.whole(torch.tanh(h)) + self.part(torch.relu(part.reshape(x.shape[0], -1)))


# index -> classes ({size: count}): the pieces between the ends of the runs read
READ_AT = {
    (4, 5, 0): {3: 1, 2: 1},  # runs 4:6 and 0:1: pieces 0:1, 1:4, 4:6
    (2, 3, 2, 3): {2: 3},  # one run read twice: 0:2, 2:4 (both copies move with it), 4:6
    (3, 2, 1): {2: 1},  # items read in descending order stay; 4:6 moves
    4: {4: 1},  # one item: 0:4 moves, 4 and 5 stay
}


@pytest.mark.parametrize("index", list(READ_AT), ids=str)
def test_gather_at_fixed_positions_reads_pieces(index, tmp_path):
    """Gather at fixed indices is a concatenation of the runs it reads (Falcon's ``qkv[..., [-2]]``);
    both frontends find the pieces, and every class permuted at random keeps the outputs."""
    import onnx


    torch.manual_seed(0)
    idx = list(index) if isinstance(index, tuple) else index
    model, x = _ReadAt(idx).eval(), (torch.randn(4, 3),)
    export_script(model, x, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    for spec in (rebasin.infer_spec(model, x), rebasin.infer_spec(m)):
        assert dict(collections.Counter(c.size for c in spec.classes)) == READ_AT[index], spec.table()
    assert_sound(model, x, rebasin.infer_spec(model, x))
    spec = rebasin.infer_spec(m)
    for seed in (0, 1):
        res = rebasin.verify(m, rebasin.apply_permutation(m, spec, spec.random_permutations(seed)))
        assert res.equal, res


class _SliceWrites(nn.Module):
    """A recurrent state written slice by slice (``buf[..., 0] = f(h)``, ``buf[:, 2:8] = h``), as
    RWKV and RecurrentGemma write theirs: functionalized to select_scatter / slice_scatter / copy."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 2), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        state = torch.zeros(4, 6, 3)  # a batch of 4 (fx traces no shape arithmetic)
        state[:, :, 0] = torch.tanh(h)
        state[:, :, 1:] = torch.relu(h).unsqueeze(-1).expand(-1, -1, 2)
        wide = torch.zeros(4, 8)
        wide[:, 2:] = h
        return self.b(state.sum(-1)) + self.c(wide)


@pytest.mark.parametrize("tracer", ["export", "auto"])
def test_slice_writes_keep_the_channels(tracer):
    """Writing h into one index, a run of a state's last axis, and into a run of the feature axis:
    h's 6 units stay a class with the columns of b and c that read them (torch.export's functional
    select_scatter / slice_scatter)."""
    torch.manual_seed(0)
    model, x = _SliceWrites().eval(), (torch.randn(4, 3),)
    spec = rebasin.infer_spec(model, x, tracer=tracer)
    assert spec.source == "torch.export", spec.source
    assert_sound(model, x, spec)
    six = [c for c in spec.classes if c.size == 6]
    assert len(six) == 1, spec.table()
    labels = {m.label() for m in six[0].members}
    assert {"a.weight[0]", "b.weight[1]", "c.weight[1]@2"} <= labels, spec.table()
    assert_sound(model, x, spec)


def test_fx_trace_that_writes_into_a_captured_constant_is_refused():
    """fx evaluates ``torch.zeros(4, 6, 3)`` at trace time and captures it; the writes into it then
    run in the graph, but ``state.sum(-1)`` (of a real tensor) was computed eagerly before them and
    captured as stale zeros: the fx graph does not compute the module (a spec from it let b's
    columns move alone). Such a trace is refused, and ``auto`` takes torch.export (above)."""
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match="captured as a constant"):
        rebasin.infer_spec(_SliceWrites().eval(), (torch.randn(4, 3),), tracer="fx")


# ------------------------------------------------------------------ lowerings the modality sweep asked for


def _rows_picked(m, h):
    """``h[arange(2), i]`` with ``i`` computed from ``h``: a row of each pair, picked per example."""
    pairs = h.reshape(2, 2, 8)
    return pairs[torch.arange(2), pairs.sum(-1).argmax(-1)]


LOWERED = {  # body, extra modules, sizes of the classes holding a.weight's rows
    # roll of the hidden axis: the two pieces it cuts move on their own
    "roll": (lambda m, h: torch.roll(h, shifts=(-3, 1), dims=(1, 0)), {}, [3, 5]),
    # weight-normed grouped conv in a residual (Wav2Vec2's positional conv): groups, and each
    # group's channels
    "weight_norm": (lambda m, h: h + m.extra["conv"](h.unsqueeze(-1)).squeeze(-1),
                    {"conv": nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 1, groups=2))}, [2, 4, 4]),
    # several index tensors (CLIP's pooled token): the hidden axis carries through
    "index_tuples": (_rows_picked, {}, [8]),
}


@pytest.mark.parametrize("case", sorted(LOWERED))
def test_lowerings_agree_with_the_onnx_export(case, tmp_path):
    """``aten::roll``, ``aten::_weight_norm`` and indexing with several index tensors are lowered as
    the ONNX exporters write them: the torch path finds what the export's does, class for class."""
    fn, extra, sizes = LOWERED[case]
    torch.manual_seed(0)
    model = Ops(fn, extra=extra).eval()
    with torch.no_grad():
        for q in model.parameters():
            q.add_(torch.randn_like(q) * 0.3)
    x = (torch.randn(4, 6),)
    spec = rebasin.infer_spec(model, x)
    assert_sound(model, x, spec)
    assert sorted(c.size for c in spec.classes if _members_of(c, "a.weight")) == sizes, spec.table()
    path = tmp_path / "m.onnx"
    export_script(model, x, path)
    ospec = rebasin.infer_spec(str(path))
    keys = set(model.state_dict())
    assert signature(spec, keys) == signature(ospec, keys)


def _members_of(c, tensor):
    return [m for m in c.members if m.tensor == tensor]
