"""Vision, audio and multimodal Hugging Face families and diffusers models no test lists, tiny random
configs (hidden ~32, 1-2 layers, 32x32 images, short audio), the sibling of ``family_sweep``:
classes, sum of log(size!), what blocks most, and soundness (every class permuted at random, two
seeds, outputs compared). Trained-like values as there (``family_sweep.perturb``), plus random
statistics for the ``FrozenBatchNorm2d`` buffers of DETR's backbone. Each wrapper returns one
tensor the model outputs (``last_hidden_state``, ``sample``, logits), and each model's output is
checked to vary with its inputs (a constant output would make the soundness check vacuous).

Run (from the repository root; one model at a time, about a minute a mode on 2 cores):
    python -m benchmarks.modality_sweep [name ...]            # torch path
    python -m benchmarks.modality_sweep --onnx [name ...]     # TorchScript ONNX export, onnxruntime
    python -m benchmarks.modality_sweep --dynamo [name ...]   # the dynamo exporter's ONNX (optimized)
    python -m benchmarks.modality_sweep --compare [name ...]  # both paths' specs class by class

``--compare`` restricts both specs to the tensors both know (``tests.test_torch_frontend.signature``)
and lists the classes one path has and the other has not: float constants of the export (timestep
frequencies, position tables) are tensors of the ONNX path that the torch path computes or freezes.
After the table, the blocked axes whose reason names an op no rule reads, counted per model.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import tempfile
import types
import warnings

import torch

import rebasin
from benchmarks.family_sweep import _onnx_check, blocking, perturb, torch_check

IMG = 32


class _Out(torch.nn.Module):
    """``model(**dict(zip(names, inputs)), **const).<out>``: one tensor the model outputs."""

    def __init__(self, model, names, out="last_hidden_state", **const):
        super().__init__()
        self.m, self.names, self.out, self.const = model, tuple(names), out, const

    def forward(self, *xs):
        return getattr(self.m(**dict(zip(self.names, xs)), **self.const), self.out)


class _Clip(torch.nn.Module):
    """CLIP text and vision towers: the text and image embeddings stacked (batch axis)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, pixel_values, input_ids):
        o = self.m(pixel_values=pixel_values, input_ids=input_ids)
        return torch.cat([o.image_embeds, o.text_embeds], 0)


def _g(seed=1):
    return torch.Generator().manual_seed(seed)


def _pixels(c=3, size=IMG):
    return torch.randn(2, c, size, size, generator=_g())


def _ids(n=6, hi=40):
    return torch.randint(3, hi, (2, n), generator=_g(2))


VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=IMG,
           patch_size=8)


# ---------------------------------------------------------------- transformers
def _clip_vision(tf):
    return _Out(tf.CLIPVisionModel(tf.CLIPVisionConfig(**VIT)), ["pixel_values"]), (_pixels(),)


def _clip(tf):
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                vocab_size=99, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = tf.CLIPConfig(text_config=text, vision_config=VIT, projection_dim=16)
    return _Clip(tf.CLIPModel(cfg)), (_pixels(), _ids())


def _siglip(tf):  # the attention-pooling head (nn.MultiheadAttention) in pooler_output
    model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**VIT))
    return _Out(model, ["pixel_values"], "pooler_output"), (_pixels(),)


def _vit_mae(tf):  # no masking, patches kept in order (fixed noise): encoder and decoder
    cfg = tf.ViTMAEConfig(**VIT, mask_ratio=0.0, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=32)
    noise = torch.arange((IMG // 8) ** 2, dtype=torch.float32).expand(2, -1)
    return _Out(tf.ViTMAEForPreTraining(cfg), ["pixel_values"], "logits", noise=noise), (_pixels(),)


def _dinov2(tf):
    cfg = tf.Dinov2Config(**{**VIT, "intermediate_size": None}, mlp_ratio=2)
    return _Out(tf.Dinov2Model(cfg), ["pixel_values"]), (_pixels(),)


def _swin(tf):  # stage 1 has two blocks: the second shifts its windows
    cfg = tf.SwinConfig(image_size=IMG, patch_size=2, embed_dim=16, depths=[2, 1], num_heads=[2, 4],
                        window_size=4, mlp_ratio=2.0)
    return _Out(tf.SwinModel(cfg), ["pixel_values"]), (_pixels(),)


def _convnext(tf):
    cfg = tf.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=IMG)
    return _Out(tf.ConvNextModel(cfg), ["pixel_values"]), (_pixels(),)


def _segformer(tf):  # encoder and the all-MLP decode head (BatchNorm, upsampled stages concatenated)
    cfg = tf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                             mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=5)
    return _Out(tf.SegformerForSemanticSegmentation(cfg), ["pixel_values"], "logits"), (_pixels(),)


def _mobilevit(tf):
    """64x64: the last stage's 2x2 map unfolds into one 2x2 patch. Convolutions He-initialized: the
    config's N(0, 0.02) under random BatchNorm statistics leaves an output that ignores the input."""
    cfg = tf.MobileViTConfig(image_size=64, patch_size=2, hidden_sizes=[16, 24, 32],
                             neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=2,
                             mlp_ratio=2.0, expand_ratio=2.0)
    model = tf.MobileViTModel(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    return _Out(model, ["pixel_values"]), (_pixels(size=64),)


def _resnet(tf):
    cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck")
    return _Out(tf.ResNetModel(cfg), ["pixel_values"]), (_pixels(),)


WHISPER = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
               max_source_positions=16, max_target_positions=16, vocab_size=99, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def _mel():
    return torch.randn(2, WHISPER["num_mel_bins"], 2 * WHISPER["max_source_positions"], generator=_g())


def _whisper_encoder(tf):
    model = tf.WhisperModel(tf.WhisperConfig(**WHISPER))
    return _Out(model.get_encoder(), ["input_features"]), (_mel(),)


def _whisper(tf):
    model = tf.WhisperModel(tf.WhisperConfig(**WHISPER))
    return _Out(model, ["input_features", "decoder_input_ids"]), (_mel(), _ids(5))


def _wav2vec2(tf):
    """GroupNorm feature extractor, grouped positional conv with weight norm; the CTC head's logits,
    so that the residual stream (which the positional conv adds to) is not a model output."""
    cfg = tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                            feat_extract_norm="group", vocab_size=20)
    return _Out(tf.Wav2Vec2ForCTC(cfg), ["input_values"], "logits"), (torch.randn(2, 400, generator=_g()),)


def _detr_config(tf, cls):
    backbone = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                               out_features=["stage2"])
    return cls(backbone_config=backbone, use_pretrained_backbone=False, d_model=32, encoder_layers=1,
               decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
               decoder_ffn_dim=64, num_queries=5)


def _detr(tf):
    return _Out(tf.DetrModel(_detr_config(tf, tf.DetrConfig)), ["pixel_values"]), (_pixels(),)


def _conditional_detr(tf):
    cfg = _detr_config(tf, tf.ConditionalDetrConfig)
    return _Out(tf.ConditionalDetrModel(cfg), ["pixel_values"]), (_pixels(),)


def _perceiver(tf):  # no pre/postprocessor: inputs are embeddings (2, 12, d_model), latents out
    cfg = tf.PerceiverConfig(num_latents=8, d_latents=32, d_model=16, num_blocks=1,
                             num_self_attends_per_block=2, num_self_attention_heads=4,
                             num_cross_attention_heads=2)
    return _Out(tf.PerceiverModel(cfg), ["inputs"]), (torch.randn(2, 12, 16, generator=_g()),)


# ---------------------------------------------------------------- diffusers
def _t():
    return torch.tensor([3.0, 500.0])


def _vae(d):
    m = d.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=IMG)
    return _Out(m, ["sample"], "sample"), (_pixels(),)


def _transformer2d(d):  # continuous input: GroupNorm, proj_in, self- and cross-attention, GEGLU
    m = d.Transformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=32, norm_num_groups=8,
                             num_layers=1, cross_attention_dim=16)
    return (_Out(m, ["hidden_states", "encoder_hidden_states"], "sample"),
            (torch.randn(2, 32, 8, 8, generator=_g()), torch.randn(2, 5, 16, generator=_g(3))))


def _dit(d):
    m = d.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return (_Out(m, ["hidden_states", "timestep", "class_labels"], "sample"),
            (_pixels(4, 8), _t(), torch.tensor([1, 7])))


def _pixart(d):
    m = d.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                   out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                   cross_attention_dim=32, caption_channels=16)
    return (_Out(m, ["hidden_states", "encoder_hidden_states", "timestep"], "sample",
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
            (_pixels(4, 8), torch.randn(2, 5, 16, generator=_g(3)), _t()))


def _unet1d(d):  # Dance Diffusion's layout: Fourier time features as extra channels
    m = d.UNet1DModel(sample_size=64, in_channels=2, out_channels=2, extra_in_channels=64,
                      block_out_channels=(32, 32, 64), norm_num_groups=8)
    return _Out(m, ["sample", "timestep"], "sample"), (torch.randn(2, 2, 64, generator=_g()), _t())


def _sd3(d):
    m = d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=16,
                                caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                                pos_embed_max_size=16)
    return (_Out(m, ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"], "sample"),
            (_pixels(4, 8), torch.randn(2, 5, 16, generator=_g(3)), torch.randn(2, 16, generator=_g(4)),
             _t()))


def _unet_st(d):  # Stable Video Diffusion's UNet: 2 frames of 8x8 latents
    m = d.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24, cross_attention_dim=16, num_attention_heads=(2, 4),
        num_frames=2)
    return (_Out(m, ["sample", "timestep", "encoder_hidden_states", "added_time_ids"], "sample"),
            (torch.randn(2, 2, 4, 8, 8, generator=_g()), _t(), torch.randn(2, 1, 16, generator=_g(3)),
             torch.randn(2, 3, generator=_g(4))))


TRANSFORMERS = {"clip_vision": _clip_vision, "clip": _clip, "siglip_vision": _siglip, "vit_mae": _vit_mae,
                "dinov2": _dinov2, "swin": _swin, "convnext": _convnext, "segformer": _segformer,
                "mobilevit": _mobilevit, "resnet": _resnet, "whisper_encoder": _whisper_encoder,
                "whisper": _whisper, "wav2vec2": _wav2vec2, "detr": _detr,
                "conditional_detr": _conditional_detr, "perceiver": _perceiver}
DIFFUSERS = {"autoencoder_kl": _vae, "transformer2d": _transformer2d, "dit": _dit, "pixart": _pixart,
             "unet1d": _unet1d, "sd3": _sd3, "unet_spatio_temporal": _unet_st}
BUILDERS = {**TRANSFORMERS, **DIFFUSERS}


def _frozen_bn(model, seed: int = 0):
    """Random statistics and affine values for the ``FrozenBatchNorm2d`` buffers (DETR's backbone),
    which ``randomize_bn`` (``nn.BatchNorm`` modules) does not reach."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if "FrozenBatchNorm" in type(m).__name__:
            n = m.weight.shape
            m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)


def build(name: str):
    """``(wrapper, inputs)`` for model ``name``: random init (seed 0), trained-like values."""
    if name in TRANSFORMERS:
        import transformers as lib
    else:
        import diffusers as lib
    torch.manual_seed(0)
    model, x = BUILDERS[name](lib)
    model = perturb(model.eval())
    with torch.no_grad():
        _frozen_bn(model)
    return model, x


def _moved(x, k):
    """Input ``x`` changed: floats shifted by noise, integers reversed along their last axis."""
    if x.is_floating_point():
        return x + torch.randn(x.shape, generator=_g(10 + k))
    return x.flip(-1)


def check_varies(model, x):
    """Assert ``model``'s output is finite and changes when its inputs do (not a constant)."""
    with torch.no_grad():
        a = model(*x)
        b = model(*(_moved(t, k) for k, t in enumerate(x)))
    assert torch.isfinite(a).all(), "output not finite"
    gap = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
    assert gap > 1e-3, f"output does not vary with the input (relative change {gap:.1e})"


def no_rule(spec) -> collections.Counter:
    """Blocked axes whose reason names an op without a rule, counted by op."""
    return collections.Counter(b.reason.split("no rule for op ")[-1].split()[0].rstrip(",;:)")
                               for b in spec.blocked if "no rule for op" in b.reason)


def _only(spec, keep, diff: collections.Counter) -> list:
    """The classes of ``spec`` that ``diff`` (a signature difference) counts, each taken once."""
    from tests.test_torch_frontend import signature

    left, out = collections.Counter(diff), []
    for c in spec.classes:
        (key,) = signature(types.SimpleNamespace(classes=[c]), keep) or [None]
        if left[key] > 0:
            left[key] -= 1
            out.append(c)
    return out


def compare(model, x, workdir):
    """Torch and ONNX specs of ``model``: ``(torch spec, onnx spec, agree, note)``, the classes of
    each compared on the tensors both know (``tests.test_torch_frontend.signature``). ``agree``:
    'yes', 'export constants' when the only differences are ONNX classes that permute a float
    constant of the export with the weights, else 'NO'. The note says which classes one side has
    alone (size and first members), and the torch classes on parameters the export dropped (those
    the output never reads)."""
    from tests.corpus import export_script
    from tests.test_torch_frontend import signature

    spec = rebasin.infer_spec(model, x)
    path = f"{workdir}/model.onnx"
    export_script(model, x, path)
    other = rebasin.infer_spec(path)
    keep = set(spec.shapes) & set(other.shapes)
    a, b = signature(spec, keep), signature(other, keep)
    held = set(model.state_dict())
    mine, theirs = _only(spec, keep, a - b), _only(other, keep, b - a)
    constant = [c for c in theirs if any(m.tensor not in held for m in c.members)]
    agree = "yes" if a == b else "export constants" if not mine and len(constant) == len(theirs) else "NO"

    def show(cs):
        return ", ".join(f"{c.size} ({', '.join(m.label() for m in c.members[:2])}"
                         f"{'; + export constant' if c in constant else ''})" for c in cs)
    note = [f"{side} only: {show(cs)}" for side, cs in (("torch", mine), ("onnx", theirs)) if cs]
    dead = [c for c in spec.classes if not any(m.tensor in keep for m in c.members)]
    if dead:
        names = sorted({m.tensor for c in dead for m in c.members})
        note.append(f"torch: {len(dead)} classes on {len(names)} parameters the export drops "
                    f"({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})")
    return spec, other, agree, "; ".join(note) or "-"


@contextlib.contextmanager
def _quiet():
    """File descriptor 1 to /dev/null: the TorchScript exporter prints the whole graph there (from
    C++) when an export fails, whatever its logging setting."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _error(e: BaseException) -> str:
    """One table cell for exception ``e``: its type and first line, and the innermost frame inside
    rebasin when it was raised there (else it is the model's library or the exporter)."""
    import traceback

    first = str(e).splitlines()[0][:100] if str(e) else ""
    ours = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}rebasin{os.sep}" in f.filename]
    at = ""
    if ours:
        at = f" (in rebasin: {os.path.basename(ours[-1].filename)}:{ours[-1].lineno} {ours[-1].name})"
    return f"{type(e).__name__}: {first}{at}".replace("|", "/")


def main(names, mode: str = "torch"):
    unknown = {}
    if mode == "compare":
        print("| model | torch classes | torch log-sym | onnx classes | onnx log-sym | agree "
              "| classes one side has |")
        print("|---|---:|---:|---:|---:|---|---|")
    else:
        print("| model | classes | log-sym | most blocked by (besides inputs and outputs) | sound |")
        print("|---|---:|---:|---|---|")
    for name in names:
        try:
            model, x = build(name)
            check_varies(model, x)
            with tempfile.TemporaryDirectory() as d, _quiet():
                if mode == "compare":
                    spec, other, agree, note = compare(model, x, d)
                else:
                    spec, sound = (_onnx_check(model, x, d, "script" if mode == "onnx" else "dynamo")
                                   if mode in ("onnx", "dynamo") else torch_check(model, x))
            if mode == "compare":
                print(f"| {name} | {len(spec)} | {spec.log_symmetry:.1f} | {len(other)} | "
                      f"{other.log_symmetry:.1f} | {agree} | {note} |", flush=True)
                continue
            unknown[name] = no_rule(spec)
            print(f"| {name} | {len(spec)} | {spec.log_symmetry:.1f} | {blocking(spec)} | "
                  f"{'yes' if sound else 'NO'} |", flush=True)
        except Exception as e:  # a model this version cannot build or export: say so, go on
            print(f"| {name} | {_error(e)} | | | |", flush=True)
    ops = {n: c for n, c in unknown.items() if c}
    if ops:
        print("\nBlocked axes whose reason names an op without a rule:\n")
        for n, c in ops.items():
            print(f"- {n}: " + ", ".join(f"{op} ({k})" for op, k in c.most_common()))


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    flags = {"--onnx": "onnx", "--dynamo": "dynamo", "--compare": "compare"}
    args = [a for a in sys.argv[1:] if a not in flags]
    mode = next((flags[a] for a in sys.argv[1:] if a in flags), "torch")
    main(args or list(BUILDERS), mode)
