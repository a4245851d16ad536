"""End-to-end demo, driving the CLI the way a user would. Writes into ./out/.

1. Symmetry: export torchvision resnet18 (random init, random BatchNorm statistics) to ONNX,
   infer its spec, permute every class at random, verify.
2. Re-basin: train two MLPs from different seeds on scikit-learn's handwritten digits, export both
   to ONNX, align B to A with weight matching, and compare the loss barrier on held-out digits of
   the straight line A -> B before and after alignment.
3. Hugging Face folders: save two random Llama models (grouped-query attention) with
   ``save_pretrained`` in bf16, sharded; align B to A out of core with the CLI, verify the result
   streamed, and check with ``from_pretrained`` that the aligned folder computes what B computes.
4. Mixture-of-experts folders: two random Mixtral models, whose files hold one tensor per expert
   while the module stacks them (transformers' weight conversions): aligned out of core, each
   expert with its hidden units, written back one tensor per expert."""

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
    r = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = r.stdout.strip().splitlines()
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
    print("part 1 OK: the permuted model computes the same function\n")
    rebasin_demo()


def rebasin_demo():
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from rebasin.execute import run_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from barriers import barrier, load, train

    x, y, xs, ys = load("digits")
    for seed in (0, 1):
        t = time.perf_counter()
        m = train(x, y, seed, epochs=30)
        p = OUT / f"digits_mlp_seed{seed}.onnx"
        torch.onnx.export(m, (torch.from_numpy(x[:2]),), str(p), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        print(f"trained MLP 64-256-256-10 on digits, seed {seed}, in {time.perf_counter() - t:.1f} s -> {p}")
    print()
    a, b = OUT / "digits_mlp_seed0.onnx", OUT / "digits_mlp_seed1.onnx"
    aligned = OUT / "digits_mlp_seed1_aligned.onnx"
    if sh("align", str(a), str(b), "-o", str(aligned), "--save-perms", str(OUT / "perms.json")):
        sys.exit("demo failed")
    ts = np.linspace(0, 1, 21)

    def losses(pa, pb):
        ma, mb = onnx.load(pa), onnx.load(pb)
        wb = {t.name: numpy_helper.to_array(t) for t in mb.graph.initializer}
        out = []
        for t in ts:
            m = onnx.ModelProto()
            m.CopyFrom(ma)
            for init in m.graph.initializer:
                w = numpy_helper.to_array(init)
                init.CopyFrom(numpy_helper.from_array(((1 - t) * w + t * wb[init.name]).astype(w.dtype),
                                                      init.name))
            logits = run_model(m, {"x": xs})["logits"]
            z = logits - logits.max(1, keepdims=True)
            out.append(float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(ys)), ys])))
        return np.array(out)

    naive, after = losses(a, b), losses(a, aligned)
    print(f"test-loss barrier of (1-t) A + t B on {len(ys)} held-out digits (onnxruntime):")
    print(f"  naive:   {barrier(naive, ts):.3f}   (loss at t=0.5: {naive[10]:.3f})")
    print(f"  aligned: {barrier(after, ts):.3f}   (loss at t=0.5: {after[10]:.3f})")
    if not barrier(after, ts) < barrier(naive, ts):
        sys.exit("demo failed: alignment did not lower the barrier")
    print("part 2 OK\n")
    folders_demo()
    moe_folders_demo()
    print("\ndemo OK")


def folders_demo():
    import shutil

    import transformers

    from tests import hf_folders

    transformers.utils.logging.disable_progress_bar()
    print("part 3: Hugging Face folders (bf16, sharded), aligned out of core")
    root = OUT / "hf"
    shutil.rmtree(root, ignore_errors=True)
    for seed, name in ((0, "A"), (1, "B")):
        hf_folders.make_folder("llama", root / name, seed, shard="300KB", hidden=128, layers=2, heads=8,
                               kv_heads=2, inter=256, vocab=256)
    files = sorted(os.listdir(root / "B"))
    print("saved two LlamaForCausalLM (hidden 128, 8 query / 2 key-value heads) with save_pretrained:",
          files)
    if sh("align", str(root / "A"), str(root / "B"), "-o", str(root / "B_aligned")) != 0:
        sys.exit("demo failed: align")
    err, _ = _same_logits(root / "B", root / "B_aligned", vocab=256)
    if err > 1e-4:
        sys.exit("demo failed: the aligned folder computes something else")
    print("part 3 OK")


def _same_logits(b, aligned, vocab: int) -> tuple[float, bool]:
    """``from_pretrained`` of folders ``b`` and ``aligned`` on one batch of token ids: the max
    relative difference of their logits, and whether their files are the same; both printed."""
    import transformers

    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    outs = []
    for folder in (b, aligned):
        m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            outs.append(m(ids).logits)
    err = float((outs[0] - outs[1]).abs().max() / outs[0].abs().max())
    same = sorted(os.listdir(aligned)) == sorted(os.listdir(b))
    print(f"from_pretrained: B and B_aligned give the same logits (max rel error {err:.1e}); "
          f"files {same and 'laid out as B' or 'DIFFER'}")
    return err, same


def moe_folders_demo():
    import shutil

    import transformers

    from tests import hf_folders

    transformers.utils.logging.disable_progress_bar()
    print("\npart 4: mixture-of-experts folders (Mixtral: per-expert files, stacked module tensors)")
    root = OUT / "hf"
    for seed, name in ((0, "mixtral_A"), (1, "mixtral_B")):
        shutil.rmtree(root / name, ignore_errors=True)
        hf_folders.make_folder("mixtral", root / name, seed, shard="200KB", hidden=64, inter=96, experts=4)
    shutil.rmtree(root / "mixtral_B_aligned", ignore_errors=True)
    a, b, out = (str(root / n) for n in ("mixtral_A", "mixtral_B", "mixtral_B_aligned"))
    if sh("align", a, b, "-o", out) != 0:
        sys.exit("demo failed: align (Mixtral)")
    err, same = _same_logits(root / "mixtral_B", root / "mixtral_B_aligned", vocab=96)
    if err > 1e-4 or not same:
        sys.exit("demo failed: the aligned Mixtral folder computes something else or is laid out differently")
    print("part 4 OK")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.simplefilter("ignore")  # exporter deprecation notices are not the demo's subject
    main()
