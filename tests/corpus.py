"""Corpus of real architectures (random init, random BatchNorm statistics) exported to ONNX.

Exports are cached under ``.cache/corpus`` keyed by name and library versions.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

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
}
FAST = ["mlp", "resnet18", "mobilenet_v2", "squeezenet1_1", "vit", "gpt2", "bert", "llama", "mha"]
SLOW = [n for n in BUILDERS if n not in FAST]


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
        if name in ("gpt2", "bert", "llama"):  # the TorchScript exporter lacks aten::diff
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
