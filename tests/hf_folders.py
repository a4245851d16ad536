"""Tiny Hugging Face folders for the checkpoint tests: random-init Llama (grouped-query attention),
GPT-2 (tied embeddings, Conv1D), BERT, Mixtral and Qwen2-MoE (stacked experts), saved by ``save_pretrained``
in bf16 and sharded.

Every parameter gets trained-like values (random, non-zero biases and norm weights), so that no
two tensors are equal and a wrong permutation shows in the outputs.
"""

from __future__ import annotations

import torch


def llama_config(hidden=64, layers=2, heads=4, kv_heads=2, inter=96, vocab=128):
    import transformers

    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                    max_position_embeddings=64, architectures=["LlamaForCausalLM"])


def gpt2_config():
    import transformers

    return transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=96, n_positions=32,
                                   bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"])


def bert_config():
    import transformers

    return transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=80, vocab_size=96, max_position_embeddings=32,
                                   architectures=["BertModel"])


def mixtral_config(hidden=32, layers=2, heads=4, kv_heads=2, inter=24, vocab=96, experts=4, top_k=2):
    import transformers

    return transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      vocab_size=vocab, num_local_experts=experts, num_experts_per_tok=top_k,
                                      max_position_embeddings=64, architectures=["MixtralForCausalLM"])


def qwen2_moe_config(hidden=32, layers=2, heads=4, kv_heads=2, inter=40, moe_inter=16, shared_inter=24,
                     vocab=96, experts=4, top_k=2):
    """Qwen2-MoE: per-expert files stacked by the module as Mixtral's are, plus a shared expert
    and its sigmoid gate, and biased q / k / v projections."""
    import transformers

    return transformers.Qwen2MoeConfig(
        hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared_inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, num_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=64, architectures=["Qwen2MoeForCausalLM"])


CONFIGS = {"llama": llama_config, "gpt2": gpt2_config, "bert": bert_config}
MORE_CONFIGS = {"mixtral": mixtral_config, "qwen2_moe": qwen2_moe_config}  # not in every checkpoint test


def build(config, seed: int):
    """The transformers model of ``config`` with random trained-like values (float32)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name.lower() and p.ndim == 1 else 0.0, 0.3)
    return model


def save(model, path, dtype=torch.bfloat16, shard: str = "40KB") -> None:
    """``save_pretrained`` in ``dtype`` with small shards (several files and an index)."""
    model.to(dtype).save_pretrained(path, max_shard_size=shard)
    model.float()


def make_folder(kind: str, path, seed: int, dtype=torch.bfloat16, shard: str = "40KB", **cfg):
    config = {**CONFIGS, **MORE_CONFIGS}[kind](**cfg)
    model = build(config, seed)
    save(model, path, dtype, shard)
    return model
