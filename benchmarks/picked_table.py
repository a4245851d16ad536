"""Print, for each picked-experts model (tests/test_pick_onnx.py's PickedMoE variants exported by
the dynamo exporter and the corpus's TorchScript export of it; the corpus Mixtral and the
group-limited and argmax routers of benchmarks/moe_survey.py, with ``batched_mm`` experts, exported
by the dynamo exporter): the class sizes each frontend finds, sum of log(size!) on each, and whether
the two specs agree on every tensor the export keeps as it is (names mapped through the weights'
values).

    python benchmarks/picked_table.py
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rebasin  # noqa: E402
from tests import test_pick_onnx as pick  # noqa: E402
from tests import test_routing as routing  # noqa: E402
from tests.test_torch_frontend import signature  # noqa: E402


def _sizes(spec) -> str:
    """Class sizes as ``size x count``, smallest first."""
    sizes = sorted(c.size for c in spec.classes)
    return ", ".join(f"{n}x{sizes.count(n)}" if sizes.count(n) > 1 else str(n) for n in sorted(set(sizes)))


def _row(name, model, inputs, path):
    torch_spec = rebasin.infer_spec(model, inputs)
    onnx_spec = rebasin.infer_spec(path)
    names = pick._torch_names(path, model)
    keep = set(names.values())
    equal = signature(pick._renamed(onnx_spec, names), keep) == signature(torch_spec, keep)
    print(f"| {name} | {_sizes(torch_spec)} | {torch_spec.log_symmetry:.1f} | {_sizes(onnx_spec)} | "
          f"{onnx_spec.log_symmetry:.1f} | {'yes' if equal else 'NO'} ({len(keep)} tensors) |", flush=True)
    return equal


def main():
    print("| model | torch classes | torch sum log | onnx classes | onnx sum log | equal |")
    print("|---|---|---:|---|---:|---|")
    ok = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for variant in pick.PROVEN + pick.ADVERSARIAL + pick.LINEAR:
            ok &= _row(f"PickedMoE {variant} (dynamo)", *pick._model(variant), pick._export(variant))
        script = pick._export("sound", dynamo=False)
        ok &= _row("PickedMoE sound (TorchScript)", *pick._model("sound"), script)
        ok &= _row("Mixtral batched_mm (dynamo)", *pick.mixtral_batched_mm())
        for family in ("glm4_moe", "deepseek_v3", "phimoe"):  # group-limited and argmax routers
            ok &= _row(f"{family} batched_mm (dynamo)", *routing._batched_mm_export(family))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
