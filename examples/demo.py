"""End-to-end demo: export a real architecture (torchvision resnet18, random init, random
BatchNorm statistics) to ONNX, infer its spec, permute every class at random, verify, and
drive the CLI the same way a user would. Writes into ./out/."""

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rebasin  # noqa: E402
from tests.corpus import build  # noqa: E402

OUT = Path("out")


def sh(*args):
    cmd = [sys.executable, "-m", "rebasin.cli", *args]
    print("$ rebasin " + " ".join(args), flush=True)
    r = subprocess.run(cmd, text=True, capture_output=True)
    text = (r.stdout + r.stderr).strip().splitlines()
    print("\n".join(text[:20] + (["..."] if len(text) > 20 else [])))
    print(f"(exit {r.returncode})\n")
    return r.returncode


def main():
    OUT.mkdir(exist_ok=True)
    model, inputs = build("resnet18")
    path = OUT / "resnet18.onnx"
    t = time.perf_counter()
    torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=17,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
                      input_names=["input"], output_names=["logits"])
    print(f"exported torchvision resnet18 (random init, random BN stats) in "
          f"{time.perf_counter() - t:.1f} s -> {path}\n")
    t = time.perf_counter()
    spec = rebasin.infer_spec(path)
    print(f"Python API: {len(spec)} classes, sizes {sorted(c.size for c in spec.classes)}, "
          f"analysis {time.perf_counter() - t:.2f} s\n")
    codes = [
        sh("infer-spec", str(path)),
        sh("infer-spec", str(path), "--json", "-o", str(OUT / "spec.json")),
        sh("permute", str(path), "--random", "--seed", "3", "-o", str(OUT / "shuffled.onnx")),
        sh("verify", str(path), str(OUT / "shuffled.onnx")),
    ]
    if any(codes):
        sys.exit("demo failed")
    print("demo OK: the permuted model computes the same function")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
