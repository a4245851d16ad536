"""Random small architectures for property tests: a hypothesis strategy and a builder.

:func:`architectures` draws an :class:`Arch`, a printable description (domain, input shape, a
tuple of block dicts, a head); :func:`build` turns it into an eval-mode ``torch.nn.Module`` with
random weights and random BatchNorm statistics, plus example inputs. The strategy tracks the
activation shape while it draws blocks, so every block it emits fits its input and exports to
ONNX with the TorchScript exporter (opset 17). Hypothesis shrinks towards fewer blocks, smaller
widths and the first option of every choice (a plain Linear / Conv).

Domains and the layout of their activations (batch axis first):

- ``vec``: ``(N, F)``; ``seq``: ``(N, L, D)`` (features last);
- ``conv1d``: ``(N, C, L)``; ``conv2d``: ``(N, C, H, W)`` (channels first); a ``flatten``
  block turns a conv model into a ``vec`` model for the blocks after it.

Some block families are left out because the TorchScript exporter (opset 17) refuses them:
``nn.RMSNorm`` (``aten::rms_norm``; a hand-written RMSNorm stands in, and the torch-path test adds
``nn.RMSNorm``) and adaptive pooling to sizes that do not divide the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from tests.corpus import randomize_bn

DOMAINS = ("vec", "seq", "conv1d", "conv2d")
ACTS = ("relu", "gelu", "tanh", "sigmoid", "silu")
BATCH = 2
WIDTH = st.integers(2, 24)
SMALL = st.integers(2, 12)  # widths of the inner parts of composite blocks
MAX_BLOCKS = 5


# --------------------------------------------------------------------------- descriptions


@dataclass(frozen=True)
class Arch:
    """A random architecture: ``blocks`` run in order, then ``head`` maps to the outputs."""

    domain: str
    input_shape: tuple[int, ...]  # one example, without the batch axis
    blocks: tuple[dict, ...]
    head: dict

    def summary(self) -> str:
        """One line: domain, input shape, block ops and the head."""
        ops = " ".join(_label(b) for b in self.blocks)
        return f"{self.domain}{list(self.input_shape)}: {ops} | head {_label(self.head)}"

    def ops(self) -> set[str]:
        """The op names of the blocks and the head."""
        return {b["op"] for b in self.blocks} | {self.head["op"]}


def _label(b: dict) -> str:
    extra = b.get("kind") or b.get("norm") or ""
    return f"{b['op']}{'/' + str(extra) if extra else ''}"


@dataclass(frozen=True)
class _State:
    """The activation shape while drawing: channel/feature count and the other non-batch dims."""

    domain: str
    c: int
    spatial: tuple[int, ...]  # (L,) for seq and conv1d, (H, W) for conv2d, () for vec
    # whether the exporter still knows the sizes: a Pad hides them (its pads are computed in the
    # graph when constants are not folded), and adaptive pooling needs them
    sizes_known: bool = True

    @property
    def conv(self) -> bool:
        return self.domain.startswith("conv")


def _divisors(n: int, lo: int = 1) -> list[int]:
    return [d for d in range(lo, n + 1) if n % d == 0]


def _proper_divisors(n: int) -> list[int]:
    """Divisors strictly between 1 and ``n``."""
    return [d for d in range(2, n) if n % d == 0]


# --------------------------------------------------------------------------- block strategies
# each takes the current state and returns (block dict, new state)


@st.composite
def _dense(draw, s: _State):
    """Linear (vec/seq) or Conv (conv domains) with random kernel, padding, stride and groups."""
    if not s.conv:
        cout = draw(WIDTH)
        return {"op": "linear", "cin": s.c, "cout": cout, "bias": draw(st.booleans())}, replace(s, c=cout)
    options = [(k, p, st_) for k in (1, 3) for p in (0, 1) for st_ in (1, 2)
               if all((n + 2 * p - k) // st_ + 1 >= 2 for n in s.spatial)]
    k, pad, stride = draw(st.sampled_from(options))
    groups = draw(st.sampled_from(_divisors(s.c)))  # groups == cin: depthwise
    mult = draw(st.integers(math.ceil(2 / groups), max(1, 24 // groups)))  # >= 2 outputs
    cout = groups * mult
    spatial = tuple((n + 2 * pad - k) // stride + 1 for n in s.spatial)
    block = {"op": "conv", "cin": s.c, "cout": cout, "k": k, "pad": pad, "stride": stride,
             "groups": groups, "bias": draw(st.booleans())}
    return block, replace(s, c=cout, spatial=spatial)


@st.composite
def _act(draw, s: _State):
    """An element-wise activation, or PReLU with a learned slope per channel (not for seq: PReLU
    takes axis 1 as the channel axis)."""
    kind = draw(st.sampled_from(ACTS + (("prelu",) if s.domain != "seq" else ())))
    return ({"op": "act", "kind": kind, "c": s.c} if kind == "prelu" else {"op": "act", "kind": kind}), s


@st.composite
def _matmul(draw, s: _State):
    """vec/seq: ``x @ W`` or ``einsum("...i,io->...o")`` with a raw ``[in, out]`` parameter."""
    cout = draw(WIDTH)
    return {"op": "matmul", "cin": s.c, "cout": cout, "einsum": draw(st.booleans())}, replace(s, c=cout)


@st.composite
def _deconv(draw, s: _State):
    """ConvTranspose (weight ``[in, out/groups, k...]``) with random kernel, stride, padding, groups."""
    options = [(k, p, st_) for k in (1, 2, 3) for p in (0, 1) for st_ in (1, 2)
               if all(2 <= (n - 1) * st_ - 2 * p + k <= 16 for n in s.spatial)]
    k, pad, stride = draw(st.sampled_from(options))
    groups = draw(st.sampled_from(_divisors(s.c)))
    cout = groups * draw(st.integers(math.ceil(2 / groups), max(1, 24 // groups)))
    spatial = tuple((n - 1) * stride - 2 * pad + k for n in s.spatial)
    block = {"op": "deconv", "cin": s.c, "cout": cout, "k": k, "pad": pad, "stride": stride, "groups": groups}
    return block, replace(s, c=cout, spatial=spatial)


@st.composite
def _norm(draw, s: _State):
    """A normalization over the feature/channel axis that fits the domain."""
    if s.conv:
        kinds = ["batchnorm", "groupnorm", "layernorm_cl"]
    else:
        kinds = ["layernorm", "rmsnorm", "batchnorm"]  # not nn.RMSNorm: no aten::rms_norm at opset 17
    kind = draw(st.sampled_from(kinds))
    block = {"op": "norm", "norm": kind, "c": s.c}
    if kind == "groupnorm":
        block["groups"] = draw(st.sampled_from(_divisors(s.c)))
    if kind in ("layernorm", "layernorm_cl"):
        block["bias"] = draw(st.booleans())
    return block, s


@st.composite
def _residual(draw, s: _State):
    """``act(skip(x) + f(x))``: f is dense-act-dense (vec/seq) or conv-bn-act-conv-bn (conv);
    the skip is the identity or a projection (always a projection when the shape changes)."""
    hidden, cout = draw(SMALL), draw(st.sampled_from((s.c, *range(2, 13))))
    stride = 1
    if s.conv and all(n >= 4 for n in s.spatial):
        stride = draw(st.sampled_from((1, 2)))
    proj = cout != s.c or stride != 1 or draw(st.booleans())
    block = {"op": "residual", "cin": s.c, "hidden": hidden, "cout": cout, "proj": proj,
             "kind": draw(st.sampled_from(ACTS))}
    if s.conv:
        block["stride"] = stride
    else:
        block["prenorm"] = draw(st.sampled_from((None, "layernorm", "rmsnorm")))
    spatial = tuple((n - 1) // stride + 1 for n in s.spatial)
    return block, replace(s, c=cout, spatial=spatial)


@st.composite
def _concat(draw, s: _State):
    """``cat([a(x), b(x)])`` on the feature/channel axis; branch a may be the identity."""
    identity = draw(st.booleans())
    a = s.c if identity else draw(SMALL)
    b = draw(SMALL)
    block = {"op": "concat", "cin": s.c, "a": a, "b": b, "identity": identity,
             "kind": draw(st.sampled_from(ACTS))}
    return block, replace(s, c=a + b)


@st.composite
def _split(draw, s: _State):
    """A dense layer whose output is split: GLU (``chunk(2)``, ``a * act(b)``) or an unequal
    ``split`` whose pieces are projected to the same width and summed."""
    if draw(st.booleans()):
        half = draw(SMALL)
        block = {"op": "glu", "cin": s.c, "half": half, "kind": draw(st.sampled_from(ACTS))}
        return block, replace(s, c=half)
    sizes = (draw(SMALL), draw(SMALL))
    cout = draw(SMALL)
    return {"op": "split", "cin": s.c, "sizes": sizes, "cout": cout}, replace(s, c=cout)


@st.composite
def _narrow(draw, s: _State):
    """Keep a contiguous slice of the channels/features (``Tensor.narrow``): the rest are dropped."""
    length = draw(st.integers(2, s.c - 1))
    start = draw(st.integers(0, s.c - length))
    return {"op": "narrow", "start": start, "length": length}, replace(s, c=length)


@st.composite
def _channel_slice(draw, s: _State):
    """Every ``step``-th channel/feature from ``start`` (``x[..., start:stop:step]``)."""
    step = draw(st.integers(2, 3))
    start = draw(st.integers(0, step - 1))
    length = len(range(start, s.c, step))
    return {"op": "slice", "start": start, "step": step}, replace(s, c=length)


@st.composite
def _channel_pad(draw, s: _State):
    """Zero channels/features added before and after (``F.pad``; ResNet option-A shortcuts)."""
    before, after = draw(st.integers(0, 3)), draw(st.integers(1, 3))
    block = {"op": "pad", "before": before, "after": after}
    return block, replace(s, c=s.c + before + after, sizes_known=False)


@st.composite
def _tile(draw, s: _State):
    """The channels/features repeated ``times`` (``Tensor.repeat``)."""
    times = draw(st.integers(2, max(2, 24 // s.c)))
    return {"op": "tile", "times": times}, replace(s, c=s.c * times)


def _spatial_gate(s: _State):
    """CBAM spatial attention: ``x * sigmoid(conv(cat[mean over channels, max over channels]))``."""
    return st.just(({"op": "spatial_gate"}, s))


@st.composite
def _slot_state(draw, s: _State):
    """A recurrent-style state: ``x`` written in place into slot ``slot`` of a filled tensor with
    a new last axis of ``slots``, read back there plus at the next slot (still filled)."""
    slots = draw(st.integers(2, 3))
    return {"op": "state", "slots": slots, "slot": draw(st.integers(0, slots - 1))}, s


@st.composite
def _scale(draw, s: _State):
    """LayerScale: ``x * gamma (+ beta)``, learned per channel/feature, broadcast over the rest."""
    return {"op": "scale", "c": s.c, "shift": draw(st.booleans())}, s


@st.composite
def _squeeze_excite(draw, s: _State):
    """Squeeze-and-excitation: ``x * sigmoid(fc2(act(fc1(mean over positions))))`` (1x1 convs)."""
    return {"op": "se", "c": s.c, "hidden": draw(SMALL), "kind": draw(st.sampled_from(ACTS))}, s


@st.composite
def _pool(draw, s: _State):
    """Max/avg pooling (2/2 halves the size, 3/1/1 keeps it) or adaptive pooling to a divisor
    of the size (the TorchScript exporter refuses other adaptive sizes)."""
    kind = draw(st.sampled_from(("max", "avg")))
    if s.sizes_known and draw(st.booleans()):
        size = tuple(draw(st.sampled_from(_divisors(n))) for n in s.spatial)
        return {"op": "adaptive", "kind": kind, "size": size}, replace(s, spatial=size)
    shapes = [(3, 1, 1)] + ([(2, 2, 0)] if all(n >= 4 for n in s.spatial) else [])
    k, stride, pad = draw(st.sampled_from(shapes))
    spatial = tuple((n + 2 * pad - k) // stride + 1 for n in s.spatial)
    return {"op": "pool", "kind": kind, "k": k, "stride": stride, "pad": pad}, replace(s, spatial=spatial)


@st.composite
def _flatten(draw, s: _State):
    """Flatten channels and positions into features (channels first, or last as after a
    channels-last permute): the rest of the model is a ``vec`` model."""
    c = s.c * math.prod(s.spatial)
    block = {"op": "flatten", "c": c, "channels_last": draw(st.booleans())}
    return block, _State("vec", c, (), s.sizes_known)


@st.composite
def _shuffle(draw, s: _State):
    """ShuffleNet channel shuffle: view into (groups, C/groups), transpose, flatten back."""
    groups = draw(st.sampled_from(_proper_divisors(s.c)))
    return {"op": "shuffle", "groups": groups}, s


@st.composite
def _layout_swap(draw, s: _State):
    """ConvNeXt-style: permute channels last, Linear, permute back (conv domains); for seq, the
    mirror image: transpose to channels first, Conv1d, transpose back."""
    cout = draw(SMALL)
    if s.conv:
        return {"op": "cl_linear", "cin": s.c, "cout": cout}, replace(s, c=cout)
    k = draw(st.sampled_from((1, 3)))
    return {"op": "seq_conv", "cin": s.c, "cout": cout, "k": k}, replace(s, c=cout)


@st.composite
def _heads(draw, s: _State):
    """vec: view features into heads, normalize (layer_norm, no affine) or softmax per head,
    flatten back."""
    heads = draw(st.sampled_from(_proper_divisors(s.c)))
    kind = draw(st.sampled_from(("layernorm", "softmax")))
    return {"op": "heads", "heads": heads, "head_dim": s.c // heads, "kind": kind}, s


@st.composite
def _attention(draw, s: _State):
    """Hand-written multi-head self-attention, optionally grouped-query and/or through
    ``F.scaled_dot_product_attention``; the output projection returns to the model width."""
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 2))
    head_dim = draw(st.integers(2, 6))
    block = {"op": "attention", "d": s.c, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
             "sdpa": draw(st.booleans()), "causal": draw(st.booleans()), "residual": draw(st.booleans()),
             "bias": draw(st.booleans()), "packed": draw(st.sampled_from((False, True, "grouped")))}
    return block, s


@st.composite
def _moe(draw, s: _State):
    """vec/seq: a mixture of experts (``nn.ModuleList`` of dense-act-dense experts, or the experts
    stacked in 3-D tensors and run batched over the experts axis), a linear router, softmax, top-k,
    each expert's output weighted by its renormalized routing weight (zero where the example did
    not pick it); optionally residual. ``routing`` (:data:`ROUTINGS`) picks the k experts another
    way: an unsorted top-k (its weights scattered into the mix), one whose picks are weighted by
    their place along k (the order matters: the experts must stay), k argmax picks each masking
    the last, or the best of two groups of experts first (group-limited routing)."""
    experts = draw(st.integers(2, 4))
    block = {"op": "moe", "d": s.c, "experts": experts, "k": draw(st.integers(1, experts)),
             "hidden": draw(SMALL), "kind": draw(st.sampled_from(ACTS)), "residual": draw(st.booleans()),
             "stacked": draw(st.booleans()), "routing": draw(st.sampled_from(ROUTINGS))}
    return block, s


ROUTINGS = ("sorted", "unsorted", "ranked", "argmax", "grouped")


@st.composite
def _torch_mha(draw, s: _State):
    """``nn.MultiheadAttention(batch_first=True)`` (heads divide the width)."""
    heads = draw(st.sampled_from(_divisors(s.c)))
    return {"op": "mha", "d": s.c, "heads": heads, "residual": draw(st.booleans())}, s


def _block_choices(s: _State) -> list:
    """Block strategies that fit state ``s``; the simplest first (hypothesis shrinks to it)."""
    choices = [_dense(s), _act(s), _norm(s), _residual(s), _concat(s), _split(s), _scale(s),
               _channel_pad(s), _slot_state(s)]
    if s.c >= 3:
        choices += [_narrow(s), _channel_slice(s)]
    if s.c <= 12:
        choices.append(_tile(s))
    if not s.conv:
        choices += [_matmul(s), _moe(s)]
    if s.conv:
        choices += [_pool(s), _layout_swap(s), _flatten(s), _squeeze_excite(s), _deconv(s), _spatial_gate(s)]
        if _proper_divisors(s.c):
            choices.append(_shuffle(s))
    elif s.domain == "seq":
        choices += [_attention(s), _torch_mha(s), _layout_swap(s)]
    elif _proper_divisors(s.c):
        choices.append(_heads(s))
    return choices


@st.composite
def _input_state(draw, domain: str) -> _State:
    if domain == "vec":
        return _State(domain, draw(WIDTH), ())
    if domain == "seq":
        return _State(domain, draw(WIDTH), (draw(st.integers(3, 6)),))
    channels = draw(st.integers(1, 4))
    return _State(domain, channels, tuple(draw(st.integers(4, 8)) for _ in range(int(domain[-2]))))


@st.composite
def _head(draw, s: _State) -> dict:
    """The final layer to a few outputs, with the reduction the domain needs first."""
    pools = {"vec": ("none",), "seq": ("none", "mean"), "conv1d": ("flatten", "gap", "amax"),
             "conv2d": ("flatten", "gap", "amax")}[s.domain]
    pool = draw(st.sampled_from(pools))
    cin = s.c * math.prod(s.spatial) if pool == "flatten" else s.c
    return {"op": "head", "pool": pool, "cin": cin, "cout": draw(st.integers(1, 4))}


@st.composite
def architectures(draw, domains=DOMAINS) -> Arch:
    """A random :class:`Arch` of 1..5 blocks from one of ``domains``, exportable to ONNX."""
    domain = draw(st.sampled_from(domains))
    start = s = draw(_input_state(domain))
    blocks = []
    for _ in range(draw(st.integers(1, MAX_BLOCKS))):
        block, s = draw(st.one_of(_block_choices(s)))
        blocks.append(block)
    shape = (*start.spatial, start.c) if domain == "seq" else (start.c, *start.spatial)  # seq: (L, D)
    return Arch(domain, shape, tuple(blocks), draw(_head(s)))


# --------------------------------------------------------------------------- modules


def _channel_dim(domain: str) -> int:
    return -1 if domain in ("vec", "seq") else 1


def _activation(kind: str, c: int = 1) -> nn.Module:
    if kind == "prelu":
        return nn.PReLU(c)
    return {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}[kind]()


class RMSNorm(nn.Module):
    """RMSNorm written out (``nn.RMSNorm`` has no opset-17 export): ``x / rms(x) * weight``."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Transposed(nn.Module):
    """Run ``inner`` on ``x.permute(perm)`` and permute its result back with ``inverse``."""

    def __init__(self, inner: nn.Module, perm: tuple[int, ...], inverse: tuple[int, ...]):
        super().__init__()
        self.inner, self.perm, self.inverse = inner, perm, inverse

    def forward(self, x):
        return self.inner(x.permute(*self.perm)).permute(*self.inverse)


def _dense_module(domain: str, cin: int, cout: int, k: int = 1, stride: int = 1, pad: int = 0,
                  groups: int = 1, bias: bool = True) -> nn.Module:
    if domain in ("vec", "seq"):
        return nn.Linear(cin, cout, bias=bias)
    conv = nn.Conv1d if domain == "conv1d" else nn.Conv2d
    return conv(cin, cout, k, stride=stride, padding=pad, groups=groups, bias=bias)


def _batchnorm(domain: str, c: int) -> nn.Module:
    if domain == "conv2d":
        return nn.BatchNorm2d(c)
    if domain == "seq":  # BatchNorm1d wants (N, C, L)
        return Transposed(nn.BatchNorm1d(c), (0, 2, 1), (0, 2, 1))
    return nn.BatchNorm1d(c)


def _channels_last(domain: str, inner: nn.Module) -> nn.Module:
    if domain == "conv1d":
        return Transposed(inner, (0, 2, 1), (0, 2, 1))
    return Transposed(inner, (0, 2, 3, 1), (0, 3, 1, 2))


def _norm_module(domain: str, b: dict) -> nn.Module:
    c = b["c"]
    kind = b["norm"]
    if kind == "batchnorm":
        return _batchnorm(domain, c)
    if kind == "groupnorm":
        return nn.GroupNorm(b["groups"], c)
    if kind == "layernorm":
        return nn.LayerNorm(c, bias=b["bias"])
    if kind == "layernorm_cl":
        return _channels_last(domain, nn.LayerNorm(c, bias=b["bias"]))
    if kind == "rmsnorm":
        return RMSNorm(c)
    return nn.RMSNorm(c)  # "nn_rmsnorm": torch path only (see architectures)


class Residual(nn.Module):
    """``act(skip(x) + f(x))``."""

    def __init__(self, domain: str, b: dict):
        super().__init__()
        cin, hidden, cout, stride = b["cin"], b["hidden"], b["cout"], b.get("stride", 1)
        conv = domain.startswith("conv")
        k, pad = (3, 1) if conv else (1, 0)
        first = _dense_module(domain, cin, hidden, k, stride, pad)
        second = _dense_module(domain, hidden, cout, k, 1, pad)
        if conv:
            layers = [first, _batchnorm(domain, hidden), _activation(b["kind"]), second,
                      _batchnorm(domain, cout)]
        else:
            layers = [first, _activation(b["kind"]), second]
        if b.get("prenorm"):
            layers.insert(0, _norm_module(domain, {"norm": b["prenorm"], "c": cin, "bias": True}))
        self.f = nn.Sequential(*layers)
        self.skip = nn.Identity()
        if b["proj"]:
            proj = _dense_module(domain, cin, cout, 1, stride, 0)
            self.skip = nn.Sequential(proj, _batchnorm(domain, cout)) if conv else proj
        self.act = _activation(b["kind"])

    def forward(self, x):
        return self.act(self.skip(x) + self.f(x))


class Concat(nn.Module):
    """``cat([a(x), act(b(x))], channel axis)``; ``a`` may be the identity (DenseNet)."""

    def __init__(self, domain: str, b: dict):
        super().__init__()
        k, pad = (3, 1) if domain.startswith("conv") else (1, 0)
        self.a = nn.Identity() if b["identity"] else _dense_module(domain, b["cin"], b["a"])
        self.b = nn.Sequential(_dense_module(domain, b["cin"], b["b"], k, 1, pad), _activation(b["kind"]))
        self.dim = _channel_dim(domain)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=self.dim)


class GLU(nn.Module):
    """``a * act(b)`` where ``a, b = dense(x).chunk(2)``."""

    def __init__(self, domain: str, b: dict):
        super().__init__()
        self.dense = _dense_module(domain, b["cin"], 2 * b["half"])
        self.act = _activation(b["kind"])
        self.dim = _channel_dim(domain)

    def forward(self, x):
        a, g = self.dense(x).chunk(2, dim=self.dim)
        return a * self.act(g)


class Split(nn.Module):
    """``pa(a) + pb(b)`` where ``a, b = dense(x).split(sizes)``."""

    def __init__(self, domain: str, b: dict):
        super().__init__()
        (sa, sb), cout = b["sizes"], b["cout"]
        self.sizes = [sa, sb]
        self.dense = _dense_module(domain, b["cin"], sa + sb)
        self.pa, self.pb = _dense_module(domain, sa, cout), _dense_module(domain, sb, cout)
        self.dim = _channel_dim(domain)

    def forward(self, x):
        a, b = self.dense(x).split(self.sizes, dim=self.dim)
        return self.pa(a) + self.pb(b)


class SlotState(nn.Module):
    """``state = zeros(*x.shape, slots) - 1; state[..., slot] = x``, then ``state[..., slot] +
    state[..., slot + 1]`` (the torch frontend lowers the write to a concatenation of pieces, the
    TorchScript exporter writes a ScatterND)."""

    def __init__(self, slots: int, slot: int):
        super().__init__()
        self.slots, self.slot = slots, slot

    def forward(self, x):
        state = torch.stack([torch.zeros_like(x)] * self.slots, -1) - 1.0
        state[..., self.slot] = x
        return state[..., self.slot] + state[..., (self.slot + 1) % self.slots]


class Narrow(nn.Module):
    """``x.narrow(dim, start, length)``."""

    def __init__(self, start: int, length: int, dim: int):
        super().__init__()
        self.start, self.length, self.dim = start, length, dim

    def forward(self, x):
        return x.narrow(self.dim, self.start, self.length)


class FlattenChannelsLast(nn.Module):
    """Move channels last, then flatten: feature ``p * C + c`` is channel ``c`` at position ``p``."""

    def forward(self, x):
        return x.movedim(1, -1).flatten(1)


class ChannelSlice(nn.Module):
    """``x[..., start::step]`` on the channel/feature axis."""

    def __init__(self, start: int, step: int, domain: str):
        super().__init__()
        self.start, self.step, self.last = start, step, _channel_dim(domain) == -1

    def forward(self, x):
        return x[..., self.start::self.step] if self.last else x[:, self.start::self.step]


class ChannelPad(nn.Module):
    """``before`` and ``after`` zero channels/features."""

    def __init__(self, before: int, after: int, domain: str):
        super().__init__()
        inner = {"vec": 0, "seq": 0, "conv1d": 1, "conv2d": 2}[domain]  # axes after the channel axis
        self.pad = (0, 0) * inner + (before, after)

    def forward(self, x):
        return F.pad(x, self.pad)


class Tile(nn.Module):
    """The channels/features repeated ``times`` times, one copy after the other."""

    def __init__(self, times: int, domain: str):
        super().__init__()
        rank = {"vec": 2, "seq": 3, "conv1d": 3, "conv2d": 4}[domain]
        reps = [1] * rank
        reps[_channel_dim(domain)] = times
        self.reps = tuple(reps)

    def forward(self, x):
        return x.repeat(*self.reps)


class SpatialGate(nn.Module):
    """CBAM spatial attention: a gate per position from the mean and max over the channels."""

    def __init__(self, domain: str):
        super().__init__()
        self.conv = _dense_module(domain, 2, 1, k=3, pad=1)

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class MatMul(nn.Module):
    """``x @ W`` (or the same as an einsum) with a raw ``[in, out]`` weight and no bias."""

    def __init__(self, domain: str, b: dict):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(b["cin"], b["cout"]) / math.sqrt(b["cin"]))
        self.einsum = b["einsum"]

    def forward(self, x):
        return torch.einsum("...i,io->...o", x, self.weight) if self.einsum else x @ self.weight


class Scale(nn.Module):
    """LayerScale ``x * gamma (+ beta)``, the parameters shaped to broadcast over the positions."""

    def __init__(self, domain: str, b: dict):
        super().__init__()
        shape = (b["c"],) + (1,) * {"vec": 0, "seq": 0, "conv1d": 1, "conv2d": 2}[domain]
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape)) if b["shift"] else None

    def forward(self, x):
        return x * self.gamma + self.beta if self.beta is not None else x * self.gamma


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (MobileNetV3 / EfficientNet): channel gates from pooled features."""

    def __init__(self, domain: str, b: dict):
        super().__init__()
        self.fc1 = _dense_module(domain, b["c"], b["hidden"])
        self.fc2 = _dense_module(domain, b["hidden"], b["c"])
        self.act = _activation(b["kind"])

    def forward(self, x):
        s = x.mean(tuple(range(2, x.dim())), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class Shuffle(nn.Module):
    """Channel shuffle over ``groups`` groups (ShuffleNet)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, *rest = x.shape
        return x.view(n, self.groups, c // self.groups, *rest).transpose(1, 2).reshape(n, c, *rest)


class Heads(nn.Module):
    """View ``(N, F)`` as ``(N, heads, F/heads)``, normalize or softmax per head, flatten back."""

    def __init__(self, heads: int, head_dim: int, kind: str):
        super().__init__()
        self.heads, self.head_dim, self.kind = heads, head_dim, kind

    def forward(self, x):
        h = x.view(x.shape[0], self.heads, self.head_dim)
        h = F.layer_norm(h, (self.head_dim,)) if self.kind == "layernorm" else h.softmax(-1)
        return h.flatten(1)


class Attention(nn.Module):
    """Multi-head self-attention on ``(N, L, D)`` with ``kv_heads`` key/value heads (GQA when
    fewer than ``heads``: ``repeat_interleave`` over the head axis)."""

    def __init__(self, b: dict):
        super().__init__()
        d, self.h, self.kv, self.hd = b["d"], b["heads"], b["kv_heads"], b["head_dim"]
        self.sdpa, self.causal, self.residual = b["sdpa"], b["causal"], b["residual"]
        # one qkv projection: True splits it (Phi-3's qkv_proj); "grouped" views it as (kv heads,
        # query heads per kv head + 2, head dim) and slices the middle axis (Falcon's query_key_value)
        self.packed = b.get("packed", False)
        self.rope = bool(b.get("rope"))  # rotary embedding of the query/key dims
        if self.packed:
            self.qkv = nn.Linear(d, (self.h + 2 * self.kv) * self.hd, bias=b["bias"])
        else:
            self.q = nn.Linear(d, self.h * self.hd, bias=b["bias"])
            self.k = nn.Linear(d, self.kv * self.hd, bias=b["bias"])
            self.v = nn.Linear(d, self.kv * self.hd, bias=b["bias"])
        self.o = nn.Linear(self.h * self.hd, d)

    def _split_heads(self, t, heads):
        n, seq = t.shape[:2]
        return t.view(n, seq, heads, self.hd).transpose(1, 2)

    @staticmethod
    def _rotate(t):
        """Dim pairs ``(i, i + hd/2)`` turned by position x frequency ``10000 ** (-i / (hd/2))``
        (tables computed from ``arange``, as no exporter stores them as weights)."""
        half, seq = t.shape[-1] // 2, t.shape[-2]
        freq = 10000.0 ** (-torch.arange(half, dtype=t.dtype) / half)
        angle = torch.outer(torch.arange(seq, dtype=t.dtype) + 1.0, freq).repeat(1, 2)
        return t * angle.cos() + torch.cat([-t[..., half:], t[..., :half]], -1) * angle.sin()

    def _attend(self, q, k, v):
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
        if self.causal:
            seq = q.shape[-2]
            mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return scores.softmax(-1) @ v

    def forward(self, x):
        if self.packed == "grouped":
            n, seq = x.shape[:2]
            t = self.qkv(x).view(n, seq, self.kv, self.h // self.kv + 2, self.hd)
            q, k, v = t[:, :, :, :-2], t[:, :, :, [-2]], t[:, :, :, [-1]]
            q = q.flatten(2, 3).transpose(1, 2)
            k, v = k.flatten(2, 3).transpose(1, 2), v.flatten(2, 3).transpose(1, 2)
        else:
            if self.packed:
                q, k, v = self.qkv(x).split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], -1)
            else:
                q, k, v = self.q(x), self.k(x), self.v(x)
            q, k, v = (self._split_heads(q, self.h), self._split_heads(k, self.kv),
                       self._split_heads(v, self.kv))
        if self.rope:
            q, k = self._rotate(q), self._rotate(k)
        if self.kv < self.h:
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        y = self._attend(q, k, v).transpose(1, 2).flatten(2)
        y = self.o(y)
        return x + y if self.residual else y


class MoE(nn.Module):
    """A mixture of ``experts`` dense-act-dense experts on the last axis: router, softmax, top-k,
    routing weights renormalized over the k picked experts and spread back with ``one_hot``."""

    def __init__(self, b: dict):
        super().__init__()
        d, self.k, self.residual, e, h = b["d"], b["k"], b["residual"], b["experts"], b["hidden"]
        # a router bias: no exact ties among the scores where the input is zero (after a ReLU);
        # top-k breaks ties by position, which no permutation of the experts keeps (rules.top_k)
        self.router = nn.Linear(d, e)
        self.stacked = b.get("stacked", False)
        self.routing = b.get("routing", "sorted")
        if self.stacked:  # [E, H, D], [E, H], [E, D, H], [E, D]
            self.w1, self.b1 = nn.Parameter(torch.randn(e, h, d) / d ** 0.5), nn.Parameter(torch.randn(e, h))
            self.w2, self.b2 = nn.Parameter(torch.randn(e, d, h) / h ** 0.5), nn.Parameter(torch.randn(e, d))
            self.act = _activation(b["kind"])
        else:
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(d, h), _activation(b["kind"]), nn.Linear(h, d)) for _ in range(e))

    def forward(self, x):
        gate = self._gate(self.router(x).softmax(-1))
        if self.stacked:
            inner = self.act(torch.einsum("...d,ehd->...eh", x, self.w1) + self.b1)
            y = ((torch.einsum("...eh,edh->...ed", inner, self.w2) + self.b2) * gate.unsqueeze(-1)).sum(-2)
        else:
            y = sum(gate[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))
        return x + y if self.residual else y


    def _gate(self, scores):
        """The ``[.., E]`` mix: each picked expert's renormalized score, zero elsewhere."""
        e, k = scores.shape[-1], self.k
        if self.routing == "sorted":
            weights, picked = scores.topk(k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
            return (weights.unsqueeze(-1) * F.one_hot(picked, e).to(scores.dtype)).sum(-2)
        if self.routing == "argmax":  # k picks, each masking the last (softmax scores are > -1)
            picks, masked = [], scores
            for _ in range(k):
                picks.append(masked.argmax(-1, keepdim=True))
                masked = masked.scatter(-1, picks[-1], torch.full_like(picks[-1], -1, dtype=scores.dtype))
            picked = torch.cat(picks, -1)
        elif self.routing == "grouped" and e % 2 == 0:  # the best of 2 groups, then k inside it
            best = scores.unflatten(-1, (2, e // 2)).amax(-1).topk(1, -1, sorted=False)[1]
            keep = torch.zeros_like(scores[..., :2]).scatter(-1, best, 1.0)
            keep = keep.unsqueeze(-1).expand(*keep.shape, e // 2).flatten(-2)
            picked = scores.masked_fill(keep == 0, -1.0).topk(min(k, e // 2), -1, sorted=False)[1]
        else:  # unsorted, ranked (and grouped with an odd number of experts)
            picked = scores.topk(k, -1, sorted=False)[1]
        weights = scores.gather(-1, picked)
        if self.routing == "ranked":  # the first pick along k weighted twice
            weights = torch.cat([2 * weights[..., :1], weights[..., 1:]], -1)
        weights = weights / weights.sum(-1, keepdim=True)
        return torch.zeros_like(scores).scatter(-1, picked, weights)


class TorchMHA(nn.Module):
    """``nn.MultiheadAttention(batch_first=True)`` as self-attention, optionally residual."""

    def __init__(self, b: dict):
        super().__init__()
        self.attn = nn.MultiheadAttention(b["d"], b["heads"], batch_first=True)
        self.residual = b["residual"]

    def forward(self, x):
        y = self.attn(x, x, x, need_weights=False)[0]
        return x + y if self.residual else y


class Head(nn.Module):
    """Reduce (flatten / global average / global max over the non-channel axes) then Linear."""

    def __init__(self, domain: str, b: dict):
        super().__init__()
        self.domain, self.pool = domain, b["pool"]
        self.linear = nn.Linear(b["cin"], b["cout"])

    def forward(self, x):
        if self.pool == "flatten":
            x = x.flatten(1)
        elif self.pool == "mean":
            x = x.mean(1)
        elif self.pool in ("gap", "amax"):
            dims = tuple(range(2, x.dim()))
            x = x.mean(dims) if self.pool == "gap" else x.amax(dims)
        return self.linear(x)


def _pool_module(domain: str, b: dict) -> nn.Module:
    two = domain == "conv2d"
    if b["op"] == "adaptive":
        size = b["size"] if two else b["size"][0]
        cls = {"max": (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d),
               "avg": (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)}[b["kind"]][two]
        return cls(size)
    cls = {"max": (nn.MaxPool1d, nn.MaxPool2d), "avg": (nn.AvgPool1d, nn.AvgPool2d)}[b["kind"]][two]
    return cls(b["k"], stride=b["stride"], padding=b["pad"])


def _block_module(domain: str, b: dict) -> nn.Module:
    """The module of one block dict."""
    op = b["op"]
    if op in ("linear", "conv"):
        return _dense_module(domain, b["cin"], b["cout"], b.get("k", 1), b.get("stride", 1),
                             b.get("pad", 0), b.get("groups", 1), b["bias"])
    if op == "act":
        return _activation(b["kind"], b.get("c", 1))
    if op == "deconv":
        conv = nn.ConvTranspose1d if domain == "conv1d" else nn.ConvTranspose2d
        return conv(b["cin"], b["cout"], b["k"], stride=b["stride"], padding=b["pad"], groups=b["groups"])
    if op == "norm":
        return _norm_module(domain, b)
    if op == "flatten":
        return FlattenChannelsLast() if b["channels_last"] else nn.Flatten()
    if op in ("pool", "adaptive"):
        return _pool_module(domain, b)
    if op == "cl_linear":
        return _channels_last(domain, nn.Linear(b["cin"], b["cout"]))
    if op == "seq_conv":
        conv = nn.Conv1d(b["cin"], b["cout"], b["k"], padding=b["k"] // 2)
        return Transposed(conv, (0, 2, 1), (0, 2, 1))
    simple = {"shuffle": lambda: Shuffle(b["groups"]),
              "heads": lambda: Heads(b["heads"], b["head_dim"], b["kind"]),
              "attention": lambda: Attention(b), "mha": lambda: TorchMHA(b), "moe": lambda: MoE(b),
              "narrow": lambda: Narrow(b["start"], b["length"], _channel_dim(domain)),
              "state": lambda: SlotState(b["slots"], b["slot"]),
              "slice": lambda: ChannelSlice(b["start"], b["step"], domain),
              "pad": lambda: ChannelPad(b["before"], b["after"], domain),
              "tile": lambda: Tile(b["times"], domain), "spatial_gate": lambda: SpatialGate(domain)}
    if op in simple:
        return simple[op]()
    return {"residual": Residual, "concat": Concat, "glu": GLU, "split": Split, "head": Head,
            "scale": Scale, "se": SqueezeExcite, "matmul": MatMul}[op](domain, b)


def build(arch: Arch, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Instantiate ``arch``: random init, random BatchNorm statistics and affine parameters (every
    parameter perturbed, so no two are equal), eval mode; plus a random example input."""
    torch.manual_seed(seed)
    domain, layers = arch.domain, []
    for b in (*arch.blocks, arch.head):
        layers.append(_block_module(domain, b))
        domain = "vec" if b["op"] == "flatten" else domain
    model = randomize_bn(nn.Sequential(*layers), seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((BATCH, *arch.input_shape), generator=g)
    with torch.no_grad():  # a head whose terms nearly cancel: the outputs' relative error would
        top = float(model(x).abs().max())  # measure float rounding of the terms, not the spec
        if 0 < top < 0.1:
            model[-1].linear.weight.div_(top)
            model[-1].linear.bias.div_(top)
    return model, (x,)


_LAYERS = {"linear", "conv", "residual", "concat", "glu", "split", "se", "attention", "mha", "cl_linear",
           "seq_conv", "matmul", "deconv", "moe"}  # blocks with a weight matrix / kernel of a free width
# blocks that keep every channel/feature where it is
_CHANNELWISE = {"act", "pool", "adaptive", "scale", "spatial_gate"}
_CHANNELWISE_NORMS = {"batchnorm", "layernorm", "layernorm_cl", "rmsnorm", "nn_rmsnorm"}
# blocks with a width that only the block itself reads
_INNER_HIDDEN = {"residual", "split", "attention", "mha", "se", "moe"}


def _plain_dense(b: dict) -> bool:
    """A Linear/Conv (groups 1) that a spec can see through; not an einsum (no rule for Einsum in
    either frontend: its axes are blocked, soundly)."""
    return b["op"] in ("linear", "cl_linear", "seq_conv") or (b["op"] == "matmul" and not b["einsum"]) or \
        (b["op"] in ("conv", "deconv") and b["groups"] == 1)


def _channelwise(b: dict) -> bool:
    return b["op"] in _CHANNELWISE or (b["op"] == "norm" and b["norm"] in _CHANNELWISE_NORMS)


def has_layers(arch: Arch) -> bool:
    """Whether some block (not only the head) holds a Linear or Conv layer."""
    return any(b["op"] in _LAYERS for b in arch.blocks)


def has_hidden_units(arch: Arch) -> bool:
    """Whether the model surely has hidden units that a spec can permute: a block with an inner
    width (residual, split, attention), or a Linear/Conv (groups 1) whose outputs reach another
    one, or the head, through channel-wise layers only.

    Not claimed past grouped convolutions, channel shuffles or views into heads: two unaligned
    partitions of one axis (groups of 7 read in groups of 3) leave no permutation that a spec member
    (offset/block/stride) can express, an incompleteness of the spec format, not unsoundness.
    """
    blocks = arch.blocks
    if any(b["op"] in _INNER_HIDDEN and not (b["op"] == "mha" and b["d"] < 2) for b in blocks):
        return True  # (attention of width 1: one head of one dim, nothing to permute)
    for i, b in enumerate(blocks):
        rest = [r for r in blocks[i + 1:] if not _channelwise(r)]
        if _plain_dense(b) and b["cout"] >= 2 and (not rest or _plain_dense(rest[0])):
            return True
    return False
