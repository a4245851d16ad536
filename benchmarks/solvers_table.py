"""Every method on corpus models, ONNX and torch: B = A with every class permuted at random plus
weight noise (relative scale ``--noise``), then align B back to A. Prints method x model -> time,
first/last objective, the relative distance of the aligned B to A over the spec's tensors (the
noise level when the planted permutation is undone; before alignment in brackets), and whether
the aligned B verified equal to B (it always must).

    .venv/bin/python benchmarks/solvers_table.py [--models mlp resnet18 vit gpt2] [--noise 0.1]
        [--methods weight activation]

Sinkhorn (mid) and STE need a differentiable model and labels: the torch model, or the ONNX model
converted by onnx2torch; labels are random (the point here is that they run and what they cost,
not the barrier; see benchmarks/barriers.py for barriers on trained models).
"""

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rebasin  # noqa: E402
from tests import corpus  # noqa: E402

METHODS = [("weight", {}), ("activation", {}), ("sinkhorn", {"cost": "l2", "steps": 100}),
           ("sinkhorn", {"cost": "mid", "steps": 30}), ("ste", {"steps": 10})]


def planted(a, spec, noise, seed=1):
    perms = spec.random_permutations(seed)
    sd = rebasin.apply_permutation(a.state_dict(), spec, perms)
    g = torch.Generator().manual_seed(seed)
    noisy = {k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1}
    sd = {k: v + noise * v.std() * torch.randn(v.shape, generator=g) if k in noisy else v
          for k, v in sd.items()}
    b = copy.deepcopy(a)
    b.load_state_dict(sd)
    return b, perms


def _params(model):
    import onnx
    from onnx import numpy_helper

    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _batch(x, n, seed=0):
    """``n`` inputs like the example ``x`` (token ids stay within the ids seen in ``x``)."""
    g = torch.Generator().manual_seed(seed)
    if x.is_floating_point():
        return torch.randn((n, *x.shape[1:]), generator=g)
    return torch.randint(0, int(x.max()) + 1, (n, *x.shape[1:]), generator=g)


def distance(spec, a_sd, b_sd):
    """||A - B|| / ||A|| over the spec's member tensors (nested classes have several equivalent
    permutation tuples, so compare weights, not permutations)."""
    names = {m.tensor for c in spec.classes for m in c.members}
    num = sum(float(((torch.as_tensor(a_sd[k]).float() - torch.as_tensor(b_sd[k]).float()) ** 2).sum())
              for k in names)
    return (num / sum(float((torch.as_tensor(a_sd[k]).float() ** 2).sum()) for k in names)) ** 0.5


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=["mlp", "resnet18", "vit", "gpt2"])
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=32, help="data batch for activation / loss methods")
    p.add_argument("--methods", nargs="*", default=None,
                   help="only these solvers (weight, activation, sinkhorn, ste)")
    args = p.parse_args()
    methods = [(m, o) for m, o in METHODS if args.methods is None or m in args.methods]
    print("| model | frontend | method | s | objective first -> last | rel. distance B'-A (B-A before) "
          "| verified |")
    print("|---|---|---|---:|---|---:|---|")
    for name in args.models:
        a, x = corpus.build(name)
        spec = rebasin.infer_spec(a, x)
        b, perms = planted(a, spec, args.noise)
        before = distance(spec, a.state_dict(), b.state_dict())
        batch = _batch(x[0], args.samples)
        with torch.no_grad():
            out = a(batch)
        labels = torch.randint(0, out.shape[-1], out.shape[:-1]).numpy()
        data = {"x": batch.numpy(), "labels": labels}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pa, pb = corpus.CACHE / f"{name}-A.onnx", corpus.CACHE / f"{name}-B.onnx"
            for m, path in ((a, pa), (b, pb)):
                torch.onnx.export(m, (batch,), str(path), dynamo=name in ("gpt2", "bert", "llama"),
                                  opset_version=18 if name in ("gpt2", "bert", "llama") else 17,
                                  input_names=["input"], output_names=["output"],
                                  **({"optimize": False} if name in ("gpt2", "bert", "llama") else
                                     {"do_constant_folding": False}))
        onnx_spec = rebasin.infer_spec(pa)
        for frontend in ("torch", "onnx"):
            for method, opts in methods:
                label = method + (f" ({opts['cost']})" if "cost" in opts else "")
                t0 = time.perf_counter()
                try:
                    if frontend == "torch":
                        res = rebasin.align(a, b, method, example_inputs=x, data=data, spec=spec, **opts)
                        rec = f"{distance(spec, a.state_dict(), res.model):.3f} ({before:.3f})"
                    else:
                        res = rebasin.align(pa, pb, method, data={"input": batch.numpy(), "labels": labels},
                                            spec=onnx_spec, **opts)
                        rec = f"{distance(onnx_spec, _params(pa), _params(res.model)):.3f} ({before:.3f})"
                except rebasin.RebasinError as e:
                    print(f"| {name} | {frontend} | {label} | - | error: {e} | - | - |")
                    continue
                dt = time.perf_counter() - t0
                obj = res.solve.objective
                print(f"| {name} | {frontend} | {label} | {dt:.2f} | {obj[0]:.4g} -> {obj[-1]:.4g} | {rec} | "
                      f"{'yes' if res.verification.equal else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
