"""Reproduction 5: a small ResNet with BatchNorm on digits images; BatchNorm re-estimation; MergeMany.

Git Re-Basin (Ainsworth et al. 2023) aligns ResNets and re-estimates the BatchNorm statistics of
interpolated models ("reset BN"), since interpolated running statistics are not those of the
interpolated network; Jordan et al. (REPAIR, 2022) show the same variance collapse. Ito et al. (2024)
find weight matching better than STE when merging three or more models.

The model: a 3x3 conv stem (``width`` channels) + BatchNorm, two residual blocks (conv-BN-ReLU-conv-BN
+ identity), global average pooling, a linear head; input the 8x8 digits images (1 channel).

    .venv/bin/python benchmarks/reproductions/conv.py [--width 32] [--models 3] [--out docs]
    .venv/bin/python benchmarks/reproductions/conv.py --fast      # CI: width 16, one block

1. Barrier between seeds 0 and 1 along ``(1-t) A + t B`` (11 values of t): naive and weight
   matching, each with the interpolated statistics and with statistics re-estimated on the
   evaluation inputs (test images; labels are not used to re-estimate).
2. Merging models of seeds 0..n-1: MergeMany against aligning every model to the first by weight
   matching (pairwise) or STE and averaging; test loss / accuracy of the merged model, with and
   without re-estimated statistics.

Prints markdown tables and writes ``repro_conv.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import landscape, load, machine, pyplot, rebasin, savefig, single_thread, train


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, c: int = 32, blocks: int = 2):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.blocks(F.relu(self.bn(self.stem(x)))).mean((2, 3)))


def images():
    x, y, xs, ys = load("digits")
    return x.reshape(-1, 1, 8, 8), y, xs.reshape(-1, 1, 8, 8), ys


def trained(seed, width, blocks, epochs, x, y):
    torch.manual_seed(seed)
    return train(ResNet(width, blocks), x, y, seed, epochs, lr=3e-3)


def merged(models, perms_of, spec):
    """The mean of the models, each permuted by its permutations (None: as is)."""
    sds = [rebasin.apply_permutation(m.state_dict(), spec, p) if p else m.state_dict()
           for m, p in zip(models, perms_of)]
    return {k: (sum(sd[k].double() for sd in sds) / len(sds)).to(sds[0][k].dtype) for k in sds[0]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--models", type=int, default=3, help="models to merge (3 or more)")
    p.add_argument("--fast", action="store_true", help="width 16, one block, few epochs (CI)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "docs"))
    args = p.parse_args(argv)
    width, blocks, epochs, ste_steps = (16, 1, 10, 10) if args.fast else (args.width, 2, 30, 100)
    x, y, xs, ys = images()
    models = [trained(s, width, blocks, epochs, x, y) for s in range(max(3, args.models))]
    template = ResNet(width, blocks)
    ex = (torch.from_numpy(x[:4]),)
    spec = rebasin.infer_spec(models[0], ex)
    test = {"x": xs, "labels": ys}
    a, b = models[0], models[1]
    wm = rebasin.align(a, b, "weight", example_inputs=ex, spec=spec)
    paths = {}
    for label, bm in (("naive", b), ("weight matching", wm.model)):
        for reset in (False, True):
            paths[(label, reset)] = landscape.loss_path(a, bm, test, steps=11, model=template, reset_bn=reset)
    print(f"machine: {machine()}; digits 8x8, ResNet width {width}, {blocks} blocks, {len(spec.classes)} "
          f"permutation classes, seeds 0..{len(models) - 1}, {epochs} epochs")
    print("| path | BatchNorm statistics | test-loss barrier | acc at t=0.5 | acc A / B |\n"
          "|---|---|---:|---:|---|")
    for (label, reset), pth in paths.items():
        print(f"| {label} | {'re-estimated' if reset else 'interpolated'} | {pth.barrier:.3f} | "
              f"{pth.accuracy[5]:.3f} | {pth.accuracy[0]:.3f} / {pth.accuracy[-1]:.3f} |")
    # merging
    data = {"x": x[:1000], "labels": y[:1000]}
    mm = rebasin.merge(models, example_inputs=ex)
    pair = [None] + [rebasin.align(a, m, "weight", example_inputs=ex, spec=spec).perms for m in models[1:]]
    ste = [None] + [rebasin.align(a, m, "ste", example_inputs=ex, spec=spec, data=data, steps=ste_steps).perms
                    for m in models[1:]]
    merges = {"naive average": merged(models, [None] * len(models), spec),
              "MergeMany": merged(models, mm.perms, spec),
              "pairwise weight matching": merged(models, pair, spec),
              "pairwise STE": merged(models, ste, spec)}
    singles = [landscape.evaluate(m, test) for m in models]
    print(f"\nmerging {len(models)} models; each alone: test acc "
          f"{', '.join(f'{acc:.3f}' for _, acc in singles)}\n")
    print("| merge | test loss (interpolated BN) | acc | test loss (re-estimated BN) | acc |\n"
          "|---|---:|---:|---:|---:|")
    scores = {}
    for label, sd in merges.items():
        kept = landscape.evaluate(sd, test, state_model=template)
        reset = landscape.evaluate(sd, test, state_model=template, reset_bn=True)
        scores[label] = (kept, reset)
        print(f"| {label} | {kept[0]:.3f} | {kept[1]:.3f} | {reset[0]:.3f} | {reset[1]:.3f} |")
    if not args.fast:
        plt = pyplot()
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
        for (label, reset), pth in paths.items():
            style = "--" if label == "naive" else "-"
            name = f"{label}, {'re-estimated' if reset else 'interpolated'} BN ({pth.barrier:.2f})"
            ax[0].plot(pth.t, pth.loss, style, marker=".", label=name)
            ax[1].plot(pth.t, pth.accuracy, style, marker=".", label=name)
        ax[0].set_ylabel("test cross-entropy")
        ax[1].set_ylabel("test accuracy")
        for axis in ax:
            axis.set_xlabel("t")
            axis.legend(fontsize=7)
        ax[0].set_title(f"digits ResNet (width {width}): (1-t) A + t B")
        print(f"wrote {savefig(fig, Path(args.out), 'repro_conv.png')}")
    return {"paths": {f"{k[0]}|{'reset' if k[1] else 'kept'}": v.barrier for k, v in paths.items()},
            "merge": {k: {"kept": v[0], "reset": v[1]} for k, v in scores.items()},
            "singles": singles}


if __name__ == "__main__":
    single_thread()
    main()
