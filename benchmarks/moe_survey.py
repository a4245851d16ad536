"""Hugging Face mixture-of-experts families beyond the corpus, tiny random configs: the torch
path's classes, whether every layer's experts class (router rows with the stacked experts) is
found, and a soundness check (every class permuted at random, outputs compared).

    python benchmarks/moe_survey.py [family ...]

Each family gets hidden size 32, 2 layers, 4 heads (2 key/value), 4 experts with top-2 routing,
expert width 16, vocabulary 100, trained-like values (every parameter moved by noise, so no two
are equal), input ids of shape 2 x 8. ``experts`` counts the classes holding a router's rows,
``per expert`` the classes of one expert's hidden units (members nested in one index of the
experts axis, ``Member.at``; 8 = 4 experts x 2 layers).
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import rebasin  # noqa: E402
from benchmarks.tracer_agreement import sound_under  # noqa: E402
from tests.corpus import _Logits, randomize_bn  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=16, moe_intermediate_size=16, vocab_size=100, max_position_embeddings=32,
             num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             head_dim=8, pad_token_id=0, decoder_sparse_step=1, mlp_only_layers=[],
             first_k_dense_replace=0, n_group=2, topk_group=1, n_shared_experts=1,
             shared_expert_intermediate_size=16,
             kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
FAMILIES = {  # model class, and keywords its config needs besides SMALL
    "qwen2_moe": ("Qwen2MoeForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {}),
    "olmoe": ("OlmoeForCausalLM", {}),
    "gpt_oss": ("GptOssForCausalLM", {"sliding_window": 4}),
    # rotary dims: qk_rope_head_dim; multi-head latent attention has as many key/value heads as heads
    "deepseek_v3": ("DeepseekV3ForCausalLM", {"head_dim": 4, "num_key_value_heads": 4}),
    "granitemoe": ("GraniteMoeForCausalLM", {}),
    "phimoe": ("PhimoeForCausalLM", {}),
    "glm4_moe": ("Glm4MoeForCausalLM", {}),
    "mixtral": ("MixtralForCausalLM", {}),
}


def build(family):
    import transformers

    cls_name, extra = FAMILIES[family]
    cls = getattr(transformers, cls_name)
    cfg = cls.config_class(**{**SMALL, **extra})
    cfg.use_cache = False
    torch.manual_seed(0)
    model = randomize_bn(_Logits(cls(cfg)))
    return model, (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1)),)


def routers(model) -> set:
    """Parameters read as a router: 2-D weights with as many rows as there are experts, in a module
    whose name says gate or router."""
    return {k for k, v in model.state_dict().items() if v.dim() == 2 and v.shape[0] == 4
            and any(w in k for w in ("gate.weight", "router.weight", "gate.wg", "router.layer"))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("families", nargs="*", default=list(FAMILIES))
    args = p.parse_args()
    print("| family | classes | log-sym | experts classes / routers | per expert | sound | spec s |")
    print("|---|---:|---:|---|---:|---|---:|")
    for fam in args.families:
        try:
            model, inputs = build(fam)
        except Exception as e:  # a family whose config these sizes do not fit
            print(f"| {fam} | not built: {type(e).__name__}: {str(e)[:80]} | | | | | |", flush=True)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            try:
                spec = rebasin.infer_spec(model, inputs)
            except rebasin.RebasinError as e:
                print(f"| {fam} | refused: {str(e)[:90]} | | | | | |", flush=True)
                continue
            took = time.perf_counter() - t0
            sound = sound_under(model, inputs, spec, seeds=range(3))
        with torch.no_grad():
            varies = not torch.allclose(model(*inputs), model(torch.randint(0, 100, (2, 8))))
        keys = routers(model)
        experts = sum(1 for c in spec.classes if any(m.tensor in keys and m.axis == 0 for m in c.members))
        per_expert = sum(1 for c in spec.classes if any(m.at for m in c.members))
        verdict = "yes" if sound and varies else ("**NO**" if not sound else "vacuous")
        print(f"| {fam} | {len(spec.classes)} | {spec.log_symmetry:.1f} | {experts} / {len(keys)} | "
              f"{per_expert} | {verdict} | {took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
