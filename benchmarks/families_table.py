"""Per corpus model: classes and sum log(size!) through the torch frontend and the ONNX path, their
ratio, and whether the two agree class for class (issue 11's families by default).

    python benchmarks/families_table.py [model ...]

Models no ONNX exporter reads (``corpus.TORCH_ONLY``) show the torch path only.
"""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rebasin  # noqa: E402
from tests import corpus  # noqa: E402
from tests.test_torch_frontend import signature  # noqa: E402

FAMILIES = ["moe", "mixtral", "gqa", "einsum_attention", "unet", "phi3", "t5", "diffusers_unet_cond",
            "diffusers_unet"]


def onnx_spec(name):
    """The ONNX path's spec of corpus model ``name`` (``corpus.FROZEN`` tensors frozen), or None."""
    if name in corpus.TORCH_ONLY:
        return None
    path = corpus.export(name)
    return rebasin.infer_spec(path, frozen=corpus.frozen_in(path))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", default=FAMILIES)
    args = p.parse_args()
    print("| model | torch classes | torch log-sym | onnx classes | onnx log-sym | torch/onnx | agree |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in args.models:
        model, inputs = corpus.build(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = rebasin.infer_spec(model, inputs)
            other = onnx_spec(name)
        if other is None:
            print(f"| {name} | {len(spec)} | {spec.log_symmetry:.1f} | - | - | - | - |")
            continue
        keep = set(spec.shapes) & set(other.shapes)
        agree = signature(spec, keep) == signature(other, keep)
        ratio = spec.log_symmetry / other.log_symmetry if other.log_symmetry else float("nan")
        print(f"| {name} | {len(spec)} | {spec.log_symmetry:.1f} | {len(other)} | {other.log_symmetry:.1f} | "
              f"{ratio:.2f} | {'yes' if agree else 'no'} |")


if __name__ == "__main__":
    main()
