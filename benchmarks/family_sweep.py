"""Hugging Face model families no test lists, tiny random configs, through the torch frontend:
classes, sum of log(size!), what blocks most, and soundness (every class permuted at random, two
seeds, outputs compared on torch). Trained-like values: every parameter perturbed, BatchNorm
statistics randomized; the wrapper returns ``last_hidden_state`` (a model output, so the residual
stream stays in place).

Run (from the repository root; a few minutes on 2 cores):
    python -m benchmarks.family_sweep [model_type ...]

``--onnx`` takes the same models through the TorchScript ONNX export instead (the corpus's
exporter; verified on onnxruntime), ``--dynamo`` through the dynamo exporter with its optimizer
(the default of ``torch.onnx.export``). Float constants of the export (rotary frequencies) are
initializers there, so they may form classes the torch path, which freezes buffers, has not; the
dynamo exporter drops weights no output reads (BERT's pooler), which the torch path lists as
classes of their own.
"""

from __future__ import annotations

import collections
import sys
import warnings

import torch

import rebasin
from tests.corpus import randomize_bn

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             vocab_size=99, max_position_embeddings=64)
CONFIGS = {
    "bert": {}, "roberta": {}, "electra": dict(embedding_size=16), "albert": dict(embedding_size=16),
    "deberta-v2": {}, "mobilebert": dict(embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                                         num_feedforward_networks=2),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "gpt_neox": dict(rotary_pct=0.5), "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
    "codegen": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4), "bloom": dict(n_head=4, n_layer=2),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
    "mpt": dict(d_model=32, n_heads=4, n_layers=2),
    "mistral": dict(num_key_value_heads=2), "qwen2": dict(num_key_value_heads=2),
    "gemma": dict(num_key_value_heads=2, head_dim=8), "gemma2": dict(num_key_value_heads=2, head_dim=8),
    "stablelm": dict(num_key_value_heads=2), "olmo": dict(num_key_value_heads=2),
    "starcoder2": dict(num_key_value_heads=2), "granite": dict(num_key_value_heads=2),
    "cohere": dict(num_key_value_heads=2), "phi": dict(partial_rotary_factor=0.5),
    "bart": dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64),
    "mamba": dict(hidden_size=16, state_size=4, expand=2, conv_kernel=3, vocab_size=50, time_step_rank=2),
    "mamba2": dict(hidden_size=16, state_size=4, expand=2, conv_kernel=3, vocab_size=50, num_heads=4,
                   head_dim=8, n_groups=1, chunk_size=8),
    "rwkv": dict(hidden_size=16, attention_hidden_size=16, intermediate_size=32, vocab_size=50,
                 context_length=16),
    "recurrent_gemma": dict(hidden_size=16, intermediate_size=32, vocab_size=50, num_attention_heads=2,
                            num_key_value_heads=1, lru_width=16, attention_window_size=8, conv1d_width=3,
                            block_types=["recurrent", "attention"]),
}


class _Hidden(torch.nn.Module):
    def __init__(self, model, decoder: bool):
        super().__init__()
        self.m, self.decoder = model, decoder

    def forward(self, ids):
        kw = {"decoder_input_ids": ids[:, :5]} if self.decoder else {}
        return self.m(input_ids=ids, **kw).last_hidden_state


def perturb(model):
    """``model`` with trained-like values: every parameter perturbed (biases and norm weights by
    0.3), BatchNorm statistics randomized (``tests.corpus.randomize_bn``). Seeds torch's generator."""
    randomize_bn(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def blocking(spec, n: int = 2) -> str:
    """The ``n`` most frequent reasons of ``spec``'s blocked axes, model inputs and outputs left out."""
    why = collections.Counter(b.reason.split("': ")[-1].split(" (")[0][:60] for b in spec.blocked
                              if not b.reason.startswith(("model output", "model input")))
    return "; ".join(f"{k} ({c})" for k, c in why.most_common(n)) or "-"


def torch_check(model, x):
    """The torch path's spec of ``model`` and whether every class permuted at random (seeds 0 and 1)
    leaves its output on ``x`` unchanged."""
    spec = rebasin.infer_spec(model, x)
    sound = all(rebasin.verify_torch(model, rebasin.apply_permutation(
        model.state_dict(), spec, spec.random_permutations(s)), x).equal for s in (0, 1))
    return spec, sound


def build(model_type: str):
    import transformers as tf

    kw = {**SMALL, **CONFIGS[model_type]}
    if model_type in ("mamba", "mamba2", "rwkv", "recurrent_gemma"):
        kw = {k: v for k, v in kw.items() if k not in ("num_attention_heads", "max_position_embeddings")
              or k in CONFIGS[model_type]}
    cfg = tf.AutoConfig.for_model(model_type, **kw)
    if getattr(cfg, "pad_token_id", 0) is None:
        cfg.pad_token_id = 0
    torch.manual_seed(0)
    model = perturb(tf.AutoModel.from_config(cfg).eval())
    ids = torch.randint(3, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    return _Hidden(model, bool(getattr(cfg, "is_encoder_decoder", False))).eval(), (ids,)


def _onnx_check(model, x, workdir, exporter: str = "script"):
    from tests.corpus import export_script

    path = f"{workdir}/model.onnx"
    if exporter == "script":
        export_script(model, x, path)
    else:
        torch.onnx.export(model, x, path, dynamo=True, opset_version=18, optimize=True, verbose=False,
                          input_names=["input"], output_names=["output"])
    spec = rebasin.infer_spec(path)
    sound = all(rebasin.verify(path, rebasin.apply_permutation(path, spec, spec.random_permutations(s))).equal
                for s in (0, 1))
    return spec, sound


def main(types, onnx: str | None = None):
    import tempfile

    print("| family | classes | log-sym | most blocked by (besides inputs and outputs) | sound |")
    print("|---|---:|---:|---|---|")
    for name in types:
        try:
            model, x = build(name)
            if onnx:
                with tempfile.TemporaryDirectory() as d:
                    spec, sound = _onnx_check(model, x, d, onnx)
            else:
                spec, sound = torch_check(model, x)
            print(f"| {name} | {len(spec)} | {spec.log_symmetry:.1f} | {blocking(spec)} | "
                  f"{'yes' if sound else 'NO'} |", flush=True)
        except Exception as e:  # a family this transformers version cannot build: say so, go on
            print(f"| {name} | {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | |", flush=True)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    args = [a for a in sys.argv[1:] if a not in ("--onnx", "--dynamo")]
    main(args or list(CONFIGS), onnx="script" if "--onnx" in sys.argv[1:] else
         "dynamo" if "--dynamo" in sys.argv[1:] else None)
