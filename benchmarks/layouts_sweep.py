"""Random streams under GroupNorms of several group widths (tests/test_group_streams.py's generators,
many more seeds than its tests run): every spec permuted at random on torch, and through the
TorchScript export on onnxruntime with the class sizes compared to the torch path's. Counts the
specs holding a mirrored period (a class with two members of different layouts on one axis:
infer._mirrors).

The layouts run twice: with GroupNorms, then with S's own GroupNorms written out with a scale and
shift per group (tests.test_group_streams.GroupAffineNorm), which a reflection must move.

Run (from the repository root; about 5 minutes on 2 cores with the defaults):
    python -m benchmarks.layouts_sweep [--layouts 1500] [--programs 400] [--onnx 300]
"""

from __future__ import annotations

import argparse
import collections
import functools
import random
import tempfile

import onnx
import torch

import rebasin
from tests import test_group_streams as streams
from tests.corpus import export_script


def _torch(n: int, make, sound, base: int) -> tuple[int, int]:
    mirrored = failed = 0
    for k in range(n):
        try:
            mirrored += bool(streams._swap(sound(*make(random.Random(base + k)), seed=k)))
        except AssertionError as e:
            failed += 1
            print(f"  NOT SOUND (seed {base + k}): {str(e)[:200]}", flush=True)
    return mirrored, failed


def _onnx(n: int, base: int) -> tuple[int, int, int]:
    mirrored = failed = differ = 0
    for k in range(n):
        width, plan = streams._random_layouts(random.Random(base + k))
        torch.manual_seed(k)
        model = streams.Layouts(width, plan).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape) * 0.5)
        x = (torch.randn(2, 3, 4, 4),)
        tspec = rebasin.infer_spec(model, x)
        with tempfile.TemporaryDirectory() as d:
            export_script(model, x, f"{d}/m.onnx")
            m = onnx.load(f"{d}/m.onnx")
        spec = rebasin.infer_spec(m)
        mirrored += bool(streams._swap(spec))
        if not all(rebasin.verify(m, rebasin.apply_permutation(m, spec, spec.random_permutations(s)),
                                  seeds=(0, 1)).equal for s in range(3)):
            failed += 1
            print(f"  NOT SOUND on onnxruntime (seed {base + k}): {width} {plan}", flush=True)
        sizes = [collections.Counter(c.size for c in sp.classes) for sp in (spec, tspec)]
        if sizes[0] != sizes[1]:
            differ += 1
            print(f"  frontends differ (seed {base + k}): {width} {plan}", flush=True)
    return mirrored, failed, differ


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layouts", type=int, default=1500)
    p.add_argument("--programs", type=int, default=400)
    p.add_argument("--onnx", type=int, default=300)
    a = p.parse_args()
    m, f = _torch(a.layouts, streams._random_layouts, streams._sound_layouts, 90000)
    print(f"layouts (torch): {a.layouts}, with a mirrored period {m}, not sound {f}", flush=True)
    m, f = _torch(a.layouts, streams._random_layouts, functools.partial(streams._sound_layouts, affine=True),
                  90000)
    print(f"layouts with per-group weights (torch): {a.layouts}, with a mirrored period {m}, not sound {f}",
          flush=True)
    m, f = _torch(a.programs, streams._random_program, streams._sound_program, 70000)
    print(f"programs (torch): {a.programs}, with a mirrored period {m}, not sound {f}", flush=True)
    m, f, d = _onnx(a.onnx, 50000)
    print(f"layouts (onnx): {a.onnx}, with a mirrored period {m}, not sound {f}, class sizes differing "
          f"from the torch path {d}")


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    main()
