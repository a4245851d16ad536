"""Reproduction 4: what weight matching does to the weights (Ito et al. 2024).

Ito, Yamada and Kumagai find that the permutations weight matching (WM) finds remove little of the
L2 distance between two models, but line up the singular vectors with large singular values of
each layer; activation matching (AM) does the same, while the straight-through estimator (STE)
lowers the barrier without lining them up. Two MLPs (three hidden layers) are trained on digits
from seeds 0 and 1; B is aligned by WM, AM and STE and analysed with :func:`rebasin.landscape.analyze`.

    .venv/bin/python benchmarks/reproductions/singular.py [--width 256] [--out docs]
    .venv/bin/python benchmarks/reproductions/singular.py --fast      # CI: width 48

Prints per layer (permutation class) the L2 distance before / after and the mean alignment
``|<u_i^A, u_i^B>|`` of the top-5 singular vectors, and writes ``repro_singular.png`` (alignment of
singular vector i against i, per layer).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import landscape, load, machine, mlp, path, pyplot, rebasin, savefig, single_thread, trained_mlp

K = 5


def run(width: int, epochs: int, ste_steps: int):
    x, y, xs, ys = load("digits")
    a, b = trained_mlp(x, y, 0, width, epochs), trained_mlp(x, y, 1, width, epochs)
    ex = (torch.from_numpy(x[:4]),)
    template = mlp(x.shape[1], width)
    spec = rebasin.infer_spec(a, ex)
    data = {"x": x[:1000], "labels": y[:1000]}
    out = {}
    methods = (("WM", "weight", {}), ("AM", "activation", {}), ("STE", "ste", {"steps": ste_steps}))
    for label, method, kw in methods:
        res = rebasin.align(a, b, method, example_inputs=ex, data=data, spec=spec, **kw)
        an = landscape.analyze(a, b, res.model, example_inputs=ex, model=template, spec=spec, top_k=K)
        curves = {}
        for c in spec.classes:  # alignment of every singular vector of the class's first member weight
            m = next(m for m in c.members if a.state_dict()[m.tensor].dim() >= 2)
            wa, wb, wc = (np.asarray(s[m.tensor]) for s in (a.state_dict(), b.state_dict(), res.model))
            k = min(wa.shape[m.axis], 30)
            curves[c.name] = (landscape.singular_alignment(wa, wb, m.axis, k)[0],
                              landscape.singular_alignment(wa, wc, m.axis, k)[0], m.tensor)
        out[label] = (an, path(a, res.model, template, xs, ys, 11).barrier, curves)
    naive = path(a, b, template, xs, ys, 11).barrier
    return spec, out, naive


def table(spec, out, naive) -> str:
    lines = [f"naive test-loss barrier {naive:.3f}", "",
             f"| method | layer | L2 before | L2 after | removed | top-{K} sv before | after | barrier |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, (an, bar, _) in out.items():
        for c in an.classes:
            lines.append(f"| {label} | {c.name} | {c.distance_before:.2f} | {c.distance_after:.2f} | "
                         f"{c.removed:.1%} | {c.singular_before:.3f} | {c.singular_after:.3f} | |")
        lines.append(f"| {label} | all weights | {an.distance_before:.2f} | {an.distance_after:.2f} | "
                     f"{an.removed:.1%} | | | {bar:.3f} |")
    return "\n".join(lines)


def plot(spec, out, out_dir: Path) -> Path:
    plt = pyplot()
    names = [c.name for c in spec.classes]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        first = next(iter(out.values()))[2][name]
        ax.plot(np.arange(1, len(first[0]) + 1), first[0], "k--", label="before (naive)")
        for label, (_, _, curves) in out.items():
            ax.plot(np.arange(1, len(curves[name][1]) + 1), curves[name][1], ".-", label=label)
        ax.set_title(f"{name} ({first[2]})", fontsize=9)
        ax.set_xlabel("singular vector i (by decreasing singular value)")
        ax.set_ylabel("|<u_i^A, u_i^B>|")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    return savefig(fig, out_dir, "repro_singular.png")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--fast", action="store_true", help="width 48, few epochs (CI)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "docs"))
    args = p.parse_args(argv)
    width, epochs, ste_steps = (48, 6, 20) if args.fast else (args.width, 30, 200)
    spec, out, naive = run(width, epochs, ste_steps)
    print(f"machine: {machine()}; digits, MLP 3x{width}, seeds 0 and 1, {epochs} epochs")
    print(table(spec, out, naive))
    if not args.fast:
        print(f"wrote {plot(spec, out, Path(args.out))}")
    return {"naive": naive, **{label: {"removed": an.removed, "barrier": bar,
                                      "sv_before": float(np.mean([c.singular_before for c in an.classes])),
                                      "sv_after": float(np.mean([c.singular_after for c in an.classes]))}
                               for label, (an, bar, _) in out.items()}}


if __name__ == "__main__":
    single_thread()
    main()
