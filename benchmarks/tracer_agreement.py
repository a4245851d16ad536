"""The torch frontend's two tracers on architectures outside the test corpus: classes and
sum log(size!) from the fx path (``torch.fx.symbolic_trace`` + the dispatch-mode recorder) and
from ``torch.export``, whether they agree class for class, each one's time, and whether the spec is
sound here (every class permuted at random, two seeds, the outputs compared).

    python benchmarks/tracer_agreement.py [model ...]

Models are torchvision names or ``timm:<name>``, random init with trained-like BatchNorm
statistics and biases (``tests.corpus.randomize_bn``), 10 classes, input 1 x 3 x 64 x 64
(224 x 224 for the timm transformers, whose patch grid is fixed). A module ``symbolic_trace``
cannot trace shows the reason (``auto`` then uses ``torch.export``).
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import rebasin  # noqa: E402
from tests.corpus import randomize_bn  # noqa: E402
from tests.test_torch_frontend import signature  # noqa: E402

MODELS = ["alexnet", "squeezenet1_0", "googlenet", "densenet121", "shufflenet_v2_x0_5", "mnasnet0_5",
          "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
          "resnext50_32x4d", "wide_resnet50_2", "convnext_tiny", "swin_t", "vit_b_16",
          "timm:resnet18", "timm:convnext_atto", "timm:efficientnet_b0", "timm:regnetx_002",
          "timm:ghostnet_050", "timm:poolformer_s12", "timm:levit_128s", "timm:mixer_s16_224",
          "timm:vit_tiny_patch16_224", "timm:mobilevit_xxs"]
FIXED_GRID = ("vit", "mixer", "levit")


def build(name):
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False, num_classes=10)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=10)
    side = 224 if any(k in name for k in FIXED_GRID) else 64
    return randomize_bn(model.eval()), (torch.randn(1, 3, side, side),)


def sound_under(model, inputs, spec, seeds=(0, 1)) -> bool:
    """Every class of ``spec`` permuted at random leaves the outputs equal (for each seed)."""
    return all(rebasin.verify_torch(model, rebasin.apply_permutation(
        model.state_dict(), spec, spec.random_permutations(s)), inputs).equal for s in seeds)


def timed(model, inputs, tracer):
    t0 = time.perf_counter()
    try:
        spec = rebasin.infer_spec(model, inputs, tracer=tracer)
    except rebasin.RebasinError as e:
        return None, str(e).split(": ", 1)[-1][:90]
    return spec, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", default=MODELS)
    args = p.parse_args()
    print("| model | fx classes | fx log-sym | fx s | export classes | export log-sym | export s | agree "
          "| sound |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name in args.models:
        model, inputs = build(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fx, fx_s = timed(model, inputs, "fx")
            ex, ex_s = timed(model, inputs, "export")
        if fx is None or ex is None:
            ok = "yes" if ex is not None and sound_under(model, inputs, ex) else "**NO**"
            print(f"| {name} | {fx_s if fx is None else len(fx.classes)} | | | "
                  f"{ex_s if ex is None else len(ex.classes)} | | | | {ok} |", flush=True)
            continue
        keep = set(ex.shapes)
        agree = "yes" if signature(fx, keep) == signature(ex, keep) else "**NO**"
        sound = "yes" if all(sound_under(model, inputs, spec) for spec in (fx, ex)) else "**NO**"
        print(f"| {name} | {len(fx.classes)} | {fx.log_symmetry:.1f} | {fx_s:.2f} | {len(ex.classes)} | "
              f"{ex.log_symmetry:.1f} | {ex_s:.2f} | {agree} | {sound} |", flush=True)


if __name__ == "__main__":
    main()
