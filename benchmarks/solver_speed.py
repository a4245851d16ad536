"""Time spec inference and weight matching of two independently initialised models.

Per model: A is built after ``torch.manual_seed(seed)``, B after ``torch.manual_seed(seed + 1)``
(random init, no training); the spec comes from the torch frontend
(``rebasin.infer_spec(model, example_inputs=(x,))``); B is aligned to A by weight matching.
Prints a markdown table: classes, spec seconds, solve seconds, sweeps, final objective
``sum_t <A_t, P(B)_t>`` and the distance ``||A - P(B)||`` over member tensors (before -> after).

    python benchmarks/solver_speed.py [--models resnet18 mobilenet_v3_small vgg11 mlp]
                                      [--device auto|cpu|cuda] [--seed 0] [--cache-gib 2] [--threads N]
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


MODELS = {
    "resnet18": _torchvision("resnet18", 224),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small", 224),
    "vgg11": _torchvision("vgg11", 224),  # 224 px: 25088 x 4096 and 4096 x 4096 classifier
    "mlp": _mlp,
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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = {} if args.device == "auto" else {"device": args.device}
    if args.cache_gib is not None:
        opts["cache_bytes"] = int(args.cache_gib * 2**30)
    print("| model | classes | spec s | solve s | sweeps | GFLOP / sweep | objective "
          "| distance before -> after | device |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name in args.models:
        model_a, x = build(name, args.seed)
        model_b, _ = build(name, args.seed + 1)
        t = time.perf_counter()
        spec = rebasin.infer_spec(model_a, example_inputs=(x,))
        t_spec = time.perf_counter() - t
        sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
        t = time.perf_counter()
        try:
            res = solvers.weight_matching(spec, sd_a, sd_b, seed=args.seed, **opts)
        except TypeError:  # an older weight_matching that takes numpy arrays only
            a = {k: v.numpy() for k, v in sd_a.items()}
            b = {k: v.numpy() for k, v in sd_b.items()}
            res = solvers.weight_matching(spec, a, b, seed=args.seed)
        t_solve = time.perf_counter() - t
        a = {k: v.detach().float().numpy() for k, v in sd_a.items()}
        b = {k: v.detach().float().numpy() for k, v in sd_b.items()}
        ident = {c.name: np.arange(c.size) for c in spec.classes}
        d0, d1 = distance(spec, a, b, ident), distance(spec, a, b, res.perms)
        device = res.info.get("device", "cpu (numpy)")
        gflop = sweep_flops(spec, sd_a) / 1e9
        print(f"| {name} | {len(spec)} | {t_spec:.2f} | {t_solve:.2f} | {len(res.objective) - 1} | "
              f"{gflop:.1f} | {res.objective[-1]:.6g} | {d0:.4g} -> {d1:.4g} | {device} |", flush=True)


if __name__ == "__main__":
    main()
