"""Corpus of real architectures (random init, random BatchNorm statistics) exported to ONNX.

Exports are cached under ``.cache/corpus`` keyed by name and library versions.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE = Path(os.environ.get("REBASIN_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "corpus"))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # no two parameters equal: exporters merge identical initializers
        for prm in model.parameters():
            prm.add_(torch.randn(prm.shape, generator=g) * 0.02)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 + 1)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


class MLP(nn.Module):
    def __init__(self, d_in=16, hidden=(512, 512, 512), d_out=10):
        super().__init__()
        dims = (d_in, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(dims[-1], d_out)

    def forward(self, x):
        for lin in self.layers:
            x = torch.relu(lin(x))
        return self.head(x)


def _tv(name, size=32, **kw):
    def make():
        import torchvision

        n = 2 if size <= 64 else 1
        return getattr(torchvision.models, name)(weights=None, **kw), (torch.randn(n, 3, size, size),)
    return make


def _hf(kind):
    def make():
        import transformers as tf

        if kind == "gpt2":
            cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16)
            m = tf.GPT2LMHeadModel(cfg)
        elif kind == "bert":
            cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, vocab_size=100, max_position_embeddings=16)
            m = tf.BertModel(cfg, add_pooling_layer=False)
        else:
            cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                 max_position_embeddings=16)
            m = tf.LlamaForCausalLM(cfg)
        m.config.use_cache = False
        return _Logits(m), (torch.randint(0, 100, (2, 8)),)
    return make


class _Logits(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        out = self.m(input_ids=ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _vit():
    import torchvision

    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                             hidden_dim=32, mlp_dim=64, num_classes=10)
    return m, (torch.randn(2, 3, 32, 32),)


class AttentionBlock(nn.Module):
    """Pre-norm transformer block on ``nn.MultiheadAttention`` (packed in_proj weight)."""

    def __init__(self, d=32, heads=4, d_out=5):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        h = self.embed(x)
        q = self.norm1(h)
        h = h + self.attn(q, q, q, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h)


def _timm(name, size=32, **kw):
    def make():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw), \
            (torch.randn(2, 3, size, size),)
    return make


class _Seq2Seq(nn.Module):
    """An encoder-decoder's logits for given encoder and decoder token ids (no cache)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids, decoder_ids):
        return self.m(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False).logits


def _hf_new(kind):
    """Tiny Hugging Face models of the newer families: Phi-3 (packed ``qkv_proj`` and
    ``gate_up_proj``), Mixtral (a mixture of 4 experts stacked in 3-D tensors, top-2 routing) and
    T5 (encoder-decoder, relative position buckets)."""
    def make():
        import transformers as tf

        small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=16, vocab_size=100, max_position_embeddings=16)
        if kind == "t5":
            cfg = tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                              num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0)
            return _Seq2Seq(tf.T5ForConditionalGeneration(cfg)), \
                (torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 5)))
        if kind == "phi3":
            m = tf.Phi3ForCausalLM(tf.Phi3Config(**small, pad_token_id=0))
        else:
            m = tf.MixtralForCausalLM(tf.MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2))
        m.config.use_cache = False
        return _Logits(m), (torch.randint(0, 100, (2, 8)),)
    return make


class MoE(nn.Module):
    """A mixture of experts written by hand: ``nn.ModuleList`` experts (Linear-GELU-Linear), a
    linear router, softmax, top-k, and every expert's output weighted by its routing weight (zero
    where the token did not pick it) and added to the residual stream."""

    def __init__(self, d_in=12, d=16, hidden=8, experts=4, k=2, d_out=5):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                                     for _ in range(experts))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, d_out)
        self.k = k

    def forward(self, x):
        h = self.embed(x)
        weights, picked = self.router(h).softmax(-1).topk(self.k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        routed = F.one_hot(picked, len(self.experts)).to(h.dtype)  # [.., k, E]
        gate = (weights.unsqueeze(-1) * routed).sum(-2)  # [.., E]
        out = h
        for e, expert in enumerate(self.experts):
            out = out + gate[..., e:e + 1] * expert(h)
        return self.head(self.norm(out))


class StackedMoE(nn.Module):
    """A mixture of experts whose weights are stacked on axis 0 (``w1 [E, H, D]``, ``b1 [E, H]``,
    ``w2 [E, D, H]``), every expert run on every token (batched ``matmul``) and mixed by the top-k
    routing weights spread with ``one_hot``: the experts axis with the router rows is a class."""

    def __init__(self, d_in=12, d=16, hidden=8, experts=4, k=2, d_out=5):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, hidden, d) / d ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(experts, hidden))
        self.w2 = nn.Parameter(torch.randn(experts, d, hidden) / hidden ** 0.5)
        self.head = nn.Linear(d, d_out)
        self.k = k

    def forward(self, x):
        h = self.embed(x)
        weights, picked = self.router(h).softmax(-1).topk(self.k, dim=-1)
        gate = (weights.unsqueeze(-1) * F.one_hot(picked, self.w1.shape[0]).to(h.dtype)).sum(-2)  # [.., E]
        inner = F.gelu((self.w1 @ h.unsqueeze(-2).unsqueeze(-1)).squeeze(-1) + self.b1)  # [.., E, H]
        out = (self.w2 @ inner.unsqueeze(-1)).squeeze(-1)  # [.., E, D]
        return self.head(h + (gate.unsqueeze(-1) * out).sum(-2))


class PickedMoE(nn.Module):
    """Each token's k experts' weights picked by top-k index (``up[labels]``, as transformers'
    ``batched_mm`` experts), row products with ``bmm``, weighted and summed over the k picks.
    ``variant``: "sound"; "row_cumsum" (an op across rows inside the region: it ends there);
    "labels_argsort" (labels that are not top-k indices: no proof, the experts stay pinned)."""

    def __init__(self, variant="sound", d=8, hidden=6, experts=4, k=2):
        super().__init__()
        self.embed, self.head = nn.Linear(4, d), nn.Linear(d, 3)
        self.router = nn.Linear(d, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, d, 2 * hidden) * 0.3)
        self.bias = nn.Parameter(torch.randn(experts, 2 * hidden) * 0.3)
        self.down = nn.Parameter(torch.randn(experts, hidden, d) * 0.3)
        self.k, self.variant = k, variant

    def forward(self, x):
        h = self.embed(x)
        w, idx = self.router(h).softmax(-1).topk(self.k, -1)
        labels = idx.reshape(-1)
        if self.variant == "labels_argsort":
            labels = self.router(h).argsort(-1)[:, :self.k].reshape(-1)
        rows = h.repeat_interleave(self.k, 0)
        g = torch.bmm(rows[:, None], self.up[labels]).squeeze(1) + self.bias[labels]
        gate, up = g.chunk(2, -1)
        y = torch.bmm((F.silu(gate) * up)[:, None], self.down[labels]).squeeze(1)
        if self.variant == "row_cumsum":
            y = y.cumsum(0)
        y = y * w.reshape(-1, 1)
        return self.head(h + y.view(-1, self.k, y.shape[-1]).sum(1))


class EinsumAttention(nn.Module):
    """Multi-head self-attention written with einsum (per-head projections as 3-D weights), then
    an MLP block."""

    def __init__(self, d_in=8, d=16, heads=4, d_out=5):
        super().__init__()
        hd = d // heads
        self.embed = nn.Linear(d_in, d)
        self.q, self.k, self.v = (nn.Parameter(torch.randn(d, heads, hd) / d ** 0.5) for _ in range(3))
        self.o = nn.Parameter(torch.randn(heads, hd, d) / d ** 0.5)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = (torch.einsum("bld,dhe->bhle", h, w) for w in (self.q, self.k, self.v))
        att = torch.einsum("bhle,bhme->bhlm", q, k).softmax(-1)
        y = torch.einsum("bhlm,bhme->bhle", att, v)
        h = h + torch.einsum("bhle,hed->bld", y, self.o)
        return self.head(h + self.mlp(h))


class UNetBlock(nn.Module):
    """A small UNet: GroupNorm-SiLU-conv residual blocks, a strided-conv down path, a nearest
    upsample and a skip concatenation, PReLU before the output conv."""

    def __init__(self, c=8, groups=2):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.res1 = self._res(c, groups)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.res2 = self._res(2 * c, groups)
        self.up = nn.Conv2d(2 * c, c, 3, padding=1)
        self.fuse = nn.Conv2d(2 * c, c, 1)
        self.act = nn.PReLU(c)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    @staticmethod
    def _res(c, groups):
        return nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                             nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        h1 = self.stem(x)
        h1 = h1 + self.res1(h1)
        h2 = self.down(h1)
        h2 = h2 + self.res2(h2)
        u = self.up(F.interpolate(h2, scale_factor=2.0, mode="nearest"))
        return self.out(self.act(self.fuse(torch.cat([u, h1], 1))))


class _Sample(nn.Module):
    """A diffusers UNet's denoised ``sample`` for a noisy sample, timesteps and (conditional) text states."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, sample, timestep, *context):
        return self.m(sample, timestep, *context).sample


def _diffusers(kind):
    """Tiny diffusers UNets (random init, no weights): ``UNet2DConditionModel`` (Stable Diffusion's
    layout: cross-attention transformer blocks with GEGLU, time embedding, skip concatenations)
    and ``UNet2DModel`` (DDPM's: self-attention blocks, resnet shortcuts)."""
    def make():
        import diffusers

        small = dict(sample_size=16, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
                     attention_head_dim=8)
        timesteps = torch.tensor([3.0, 500.0])
        if kind == "cond":
            m = diffusers.UNet2DConditionModel(
                **small, in_channels=4, out_channels=4, cross_attention_dim=16,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
            return _Sample(m), (torch.randn(2, 4, 16, 16), timesteps, torch.randn(2, 5, 16))
        m = diffusers.UNet2DModel(**small, in_channels=3, out_channels=3,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        return _Sample(m), (torch.randn(2, 3, 16, 16), timesteps)
    return make


def _gqa():
    """Hand-written grouped-query attention (8 query heads, 2 key/value heads, repeat_interleave)."""
    from tests.archgen import Attention

    blk = Attention({"d": 16, "heads": 8, "kv_heads": 2, "head_dim": 4, "sdpa": False, "causal": True,
                     "residual": True, "bias": True})
    return nn.Sequential(nn.Linear(6, 16), blk, nn.Linear(16, 5)), (torch.randn(2, 7, 6),)


BUILDERS = {
    "mlp": lambda: (MLP(), (torch.randn(2, 16),)),
    "resnet18": _tv("resnet18", num_classes=10),
    "vgg11_bn": _tv("vgg11_bn", size=224, num_classes=10),  # adaptive pool: 7 divides H
    "mobilenet_v2": _tv("mobilenet_v2", num_classes=10),
    "mobilenet_v3_small": _tv("mobilenet_v3_small", num_classes=10),
    "efficientnet_b0": _tv("efficientnet_b0", num_classes=10),
    "squeezenet1_1": _tv("squeezenet1_1", num_classes=10),
    "resnet50": _tv("resnet50", num_classes=10),
    "densenet121": _tv("densenet121", num_classes=10),
    "convnext_tiny": _tv("convnext_tiny", num_classes=10),
    "resnext50_32x4d": _tv("resnext50_32x4d", num_classes=10),
    "vit": _vit,
    "gpt2": _hf("gpt2"),
    "bert": _hf("bert"),
    "llama": _hf("llama"),
    "mha": lambda: (AttentionBlock(), (torch.randn(2, 6, 8),)),
    "timm_vit": _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
    "timm_resnet10t": _timm("resnet10t"),
    "moe": lambda: (MoE(), (torch.randn(2, 6, 12),)),
    "moe_stacked": lambda: (StackedMoE(), (torch.randn(2, 6, 12),)),
    "moe_picked": lambda: (PickedMoE(), (torch.randn(6, 4),)),
    "einsum_attention": lambda: (EinsumAttention(), (torch.randn(2, 6, 8),)),
    "unet": lambda: (UNetBlock(), (torch.randn(2, 3, 8, 8),)),
    "gqa": _gqa,
    "phi3": _hf_new("phi3"),
    "t5": _hf_new("t5"),
    "mixtral": _hf_new("mixtral"),
    "diffusers_unet_cond": _diffusers("cond"),
    "diffusers_unet": _diffusers("plain"),
}
# models no ONNX exporter reads (the reason): the torch frontend alone is checked
TORCH_ONLY = {"mixtral": "transformers::grouped_mm_fallback has no ONNX export"}
FAST = ["mlp", "resnet18", "mobilenet_v2", "squeezenet1_1", "vit", "gpt2", "bert", "llama", "mha", "moe",
        "moe_stacked", "moe_picked", "einsum_attention", "unet", "gqa", "phi3", "t5", "mixtral",
        "diffusers_unet_cond", "diffusers_unet"]
SLOW = [n for n in BUILDERS if n not in FAST]
# where the frontends' classes differ by a known gap on the ONNX-rule side (the reason)
AGREEMENT_GAPS: dict[str, str] = {}
# non-persistent buffers and values computed from constants that the ONNX export stores as float
# tensors (initializers, Constant nodes): fixed on both paths. The diffusers timestep embedding's
# frequencies exp(-log(10000) * arange(16) / 16) are traced into a Constant: the ONNX path could
# permute them with linear_1's sin and cos columns, the torch path computes them from a Range.
FROZEN = ("m.model.rotary_emb.inv_freq", "/m/time_proj/Constant_3_output_0")


def frozen_in(path) -> list[str]:
    """The names of ``FROZEN`` that are float tensors (initializers or Constant nodes) of the ONNX
    model at ``path``: its ``infer_spec(path, frozen=...)`` for comparing with the torch path."""
    import onnx

    from rebasin.sources.onnx import FLOAT_TYPES

    graph = onnx.load(str(path), load_external_data=False).graph
    held = {t.name for t in graph.initializer if t.data_type in FLOAT_TYPES}
    held |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output
             and any(a.name == "value" and a.t.data_type in FLOAT_TYPES for a in n.attribute)}
    return [k for k in FROZEN if k in held]


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model, inputs = BUILDERS[name]()
    return randomize_bn(model, seed), inputs


def export(name: str) -> Path:
    """Export corpus model ``name`` to ONNX (cached) and return the path."""
    import transformers

    tag = f"{torch.__version__}-{transformers.__version__}".replace("+", "_")
    path = CACHE / f"{name}-{tag}.onnx"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    model, inputs = build(name)
    tmp = path.with_suffix(".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in TORCH_ONLY:
            raise ValueError(f"{name}: {TORCH_ONLY[name]}")
        if name in ("gpt2", "bert", "llama", "phi3"):  # the TorchScript exporter lacks aten::diff
            torch.onnx.export(model, inputs, str(tmp), dynamo=True, opset_version=18,
                              optimize=False, verbose=False,
                              input_names=["input"], output_names=["output"])
        else:
            torch.onnx.export(model, inputs, str(tmp), dynamo=False, opset_version=17,
                              do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE,
                              input_names=["input"], output_names=["output"])
    os.replace(tmp, path)
    return path


def export_script(model, inputs, path) -> None:
    """``model`` exported to ``path`` by the TorchScript exporter (opset 17, no constant folding),
    as the small hand-built models of the tests are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=["input"], output_names=["output"])


def export_fresh_bert_dynamo(path) -> tuple:
    """A freshly initialized BERT (zero biases, unit LayerNorm weights: equal initializers) exported
    to ``path`` by the dynamo exporter with its optimizer, which merges equal initializers into
    shared tensors. Returns ``(module, ids)``; the export takes about 20 s on 2 cores."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=16)
    module = _Logits(tf.BertModel(cfg, add_pooling_layer=False)).eval()
    ids = torch.randint(0, 100, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids,), str(path), dynamo=True, opset_version=18, optimize=True,
                          verbose=False, input_names=["input"], output_names=["output"])
    return module, ids


def member_classes(spec):
    """The classes of ``spec`` as a multiset of ``(size, members)``: what a spec says, names aside
    (to compare the specs of one graph written in two node orders)."""
    import collections

    return collections.Counter((c.size, frozenset(c.members)) for c in spec.classes)


def shuffled_nodes(model, seed: int):
    """A copy of ONNX ``model`` with its nodes in another topological order (random, seeded): the
    same graph as a tool that re-sorts nodes would write it."""
    import random

    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    made = {y: i for i, n in enumerate(nodes) for y in n.output if y}
    needs = [{made[x] for x in n.input if x in made} for n in nodes]
    users: dict[int, list[int]] = {}
    for i, ns in enumerate(needs):
        for j in ns:
            users.setdefault(j, []).append(i)
    rng, left = random.Random(seed), [len(ns) for ns in needs]
    ready, order = [i for i, n in enumerate(left) if n == 0], []
    while ready:
        i = ready.pop(rng.randrange(len(ready)))
        order.append(i)
        for u in users.get(i, ()):
            left[u] -= 1
            if left[u] == 0:
                ready.append(u)
    del out.graph.node[:]
    out.graph.node.extend(nodes[i] for i in order)
    return out
