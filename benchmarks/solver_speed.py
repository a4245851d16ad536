"""Time spec inference and weight matching of two independently initialised models.

``--inits greedy sorted identity`` adds one row per start of the descent (the default is ``greedy``).

Per model: A is built after ``torch.manual_seed(seed)``, B after ``torch.manual_seed(seed + 1)``
(random init, no training); the spec comes from the torch frontend
(``rebasin.infer_spec(model, example_inputs=(x,))``); B is aligned to A by weight matching.
Prints a markdown table: classes, spec seconds, solve seconds, sweeps, final objective
``sum_t <A_t, P(B)_t>`` and the distance ``||A - P(B)||`` over member tensors (before -> after).

    python benchmarks/solver_speed.py [--models resnet18 mobilenet_v3_small vgg11 mlp]
                                      [--device auto|cpu|cuda] [--seed 0] [--cache-gib 2] [--threads N]
                                      [--inits greedy sorted identity]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import rebasin  # noqa: E402
from rebasin import solvers  # noqa: E402
from rebasin.graph.rewrite import permute_arrays  # noqa: E402
from rebasin.solvers.base import member_tensors  # noqa: E402


def _torchvision(name, size):
    def make():
        import torchvision

        return getattr(torchvision.models, name)(weights=None), torch.randn(1, 3, size, size)
    return make


def _mlp():
    from tests.corpus import MLP

    return MLP(d_in=16, hidden=(512, 512, 512), d_out=10), torch.randn(2, 16)


def _transformer(kind):
    def make():
        import transformers as tf

        small = dict(vocab_size=300)
        if kind == "llama":
            cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, **small)
            model = tf.LlamaForCausalLM(cfg)
        else:
            cfg = tf.GPT2Config(n_embd=128, n_layer=3, n_head=4, n_positions=64, **small)
            model = tf.GPT2LMHeadModel(cfg)
        with torch.no_grad():  # trained-like: norm gains and biases away from their 1 / 0 start
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        return model, torch.randint(0, 300, (1, 8))
    return make


MODELS = {
    "resnet18": _torchvision("resnet18", 224),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small", 224),
    "vgg11": _torchvision("vgg11", 224),  # 224 px: 25088 x 4096 and 4096 x 4096 classifier
    "mlp": _mlp,
    "llama-tiny": _transformer("llama"),  # hidden 128, 3 layers, 4 query / 2 key-value heads
    "gpt2-tiny": _transformer("gpt2"),  # hidden 128, 3 layers, 4 heads
}


def build(name, seed):
    torch.manual_seed(seed)
    model, x = MODELS[name]()
    return model.eval(), x


def distance(spec, a, b, perms):
    names = member_tensors(spec)
    pb = permute_arrays({k: b[k] for k in names}, spec, perms)
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - pb[k]) ** 2) for k in names)))


def sweep_flops(spec, params) -> float:
    """Floating-point operations of one sweep's cost matrices: 2 x sum over members of numel x class size
    (each member contributes an ``(n, rest) @ (rest, n)`` product)."""
    return 2.0 * sum(params[m.tensor].numel() * c.size for c in spec.classes for m in c.members)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-gib", type=float, default=None, help="weight matching cache_bytes in GiB")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--inits", nargs="*", default=["greedy"], help="starts of the descent, one row each")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = {} if args.device == "auto" else {"device": args.device}
    if args.cache_gib is not None:
        opts["cache_bytes"] = int(args.cache_gib * 2**30)
    print("| model | start | classes | spec s | solve s | sweeps | GFLOP / sweep | objective "
          "| distance before -> after | device |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name in args.models:
        model_a, x = build(name, args.seed)
        model_b, _ = build(name, args.seed + 1)
        t = time.perf_counter()
        spec = rebasin.infer_spec(model_a, example_inputs=(x,))
        t_spec = time.perf_counter() - t
        sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
        a = {k: v.detach().float().numpy() for k, v in sd_a.items()}
        b = {k: v.detach().float().numpy() for k, v in sd_b.items()}
        ident = {c.name: np.arange(c.size) for c in spec.classes}
        d0 = distance(spec, a, b, ident)
        gflop = sweep_flops(spec, sd_a) / 1e9
        for init in args.inits:
            t = time.perf_counter()
            res = solvers.weight_matching(spec, sd_a, sd_b, seed=args.seed, init=init, **opts)
            t_solve = time.perf_counter() - t
            d1 = distance(spec, a, b, res.perms)
            print(f"| {name} | {init} | {len(spec)} | {t_spec:.2f} | {t_solve:.2f} | "
                  f"{len(res.objective) - 1} | {gflop:.1f} | {res.objective[-1]:.6g} | "
                  f"{d0:.4g} -> {d1:.4g} | {res.info['device']} |",
                  flush=True)


if __name__ == "__main__":
    main()
