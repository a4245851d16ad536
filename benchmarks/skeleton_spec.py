"""Spec of a 1.1B-parameter Llama (TinyLlama shape) from its config alone: time and peak memory.

The model is built with every parameter on the ``meta`` device (``hf_skeleton``) and traced with
FakeTensors, so no weight is ever allocated (a materialised float32 copy would be 4.4 GB).

    python benchmarks/skeleton_spec.py [--layers 22] [--json]

Prints the figures: import, build and infer_spec seconds; peak RSS (VmHWM) after importing torch,
transformers and the Llama model code (the baseline any use of the model pays), after the build,
and at the end.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource  # pragma: no cover - not Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args = p.parse_args()

    t0 = time.perf_counter()
    import transformers
    from transformers import LlamaForCausalLM  # noqa: F401  (the model code: most of the baseline)

    import rebasin
    from rebasin.sources.skeleton import hf_example_inputs, hf_skeleton

    t_import = time.perf_counter() - t0
    rss_import = peak_rss_mib()
    cfg = transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=args.layers,
                                   num_attention_heads=32, num_key_value_heads=4,
                                   intermediate_size=5632, vocab_size=32000,
                                   max_position_embeddings=2048, architectures=["LlamaForCausalLM"])
    with tempfile.TemporaryDirectory() as folder:
        cfg.save_pretrained(folder)  # from a folder, as for a downloaded checkpoint's config.json
        t1 = time.perf_counter()
        model = hf_skeleton(folder)
        t_build = time.perf_counter() - t1
    n_params = sum(p.numel() for p in model.parameters())
    rss_build = peak_rss_mib()
    t2 = time.perf_counter()
    spec = rebasin.infer_spec(model, hf_example_inputs(model))
    t_spec = time.perf_counter() - t2
    fig = {
        "layers": args.layers, "parameters": n_params,
        "float32_weights_mib": round(n_params * 4 / 2**20),
        "import_s": round(t_import, 2), "build_s": round(t_build, 2), "infer_spec_s": round(t_spec, 2),
        "peak_rss_after_import_mib": round(rss_import), "peak_rss_after_build_mib": round(rss_build),
        "peak_rss_mib": round(peak_rss_mib()),
        "classes": len(spec.classes), "blocked": len(spec.blocked),
        "log_symmetry": round(spec.log_symmetry, 1), "source": spec.source,
        "pid": os.getpid(),
    }
    if args.json:
        print(json.dumps(fig))
        return
    for k, v in fig.items():
        if k != "pid":
            print(f"{k:28s} {v}")


if __name__ == "__main__":
    main()
