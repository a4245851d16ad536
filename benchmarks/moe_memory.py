"""Peak memory of Mixtral folders read through transformers' weight conversions, against the
largest module tensor.

    python benchmarks/moe_memory.py [--hidden 512] [--inter 1024] [--experts 8] [--layers 2]

Two random ``MixtralForCausalLM`` with trained-like values are saved by ``save_pretrained`` in
bf16 (files: one tensor per expert; module: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``
stacked) under ``out/moe_memory/``, in a child process so that their build does not count. Then,
in this process:

  read     every module tensor of B composed from its files, one at a time
           (``HFFolderSource.read``), the peak of ``RssAnon`` above the level before each read
           (sampled every 1 ms), against the size of the largest module tensor
  stages   ``rebasin align A B -o OUT`` stage by stage (``benchmarks/hf_scale.run_stages``):
           peak ``RssAnon`` of each, above the level after the imports and one folder opened

``RssAnon`` is memory the process allocated; the mapped checkpoint pages are page cache.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def make_pair(workdir: Path, cfg: dict) -> tuple[Path, Path]:
    """Folders A and B (seeds 0 and 1), made in a child process, once per shape."""
    tag = "_".join(f"{k}{v}" for k, v in sorted(cfg.items()))
    a, b = workdir / f"A_{tag}", workdir / f"B_{tag}"
    for path, seed in ((a, 0), (b, 1)):
        if (path / "model.safetensors.index.json").exists():
            continue
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                f"from tests import hf_folders\n"
                f"hf_folders.make_folder('mixtral', {str(path)!r}, {seed}, shard='20MB', **{cfg!r})\n")
        print(f"making {path.name} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return a, b


def read_peaks(folder: Path) -> dict:
    """Per module tensor: its bytes and the peak RssAnon above the level before reading it."""
    from memory import PeakMemory

    from rebasin.sources import open_model

    src = open_model(str(folder))
    src.names()
    out = {}
    for name in src.names():
        with PeakMemory(interval=0.001) as m:
            value = src.read(name)
            nbytes = value.numel() * value.element_size()
            del value
        out[name] = {"bytes": nbytes, "peak_above": m.peak_anon - m.start_anon}
    return {"tensors": out, "layout": src.layout.describe()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--workdir", default=str(ROOT / "out" / "moe_memory"))
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    cfg = dict(hidden=args.hidden, inter=args.inter, experts=args.experts, layers=args.layers, vocab=1024)
    workdir = Path(args.workdir)
    a, b = make_pair(workdir, cfg)
    from hf_scale import run_stages
    from memory import status

    from rebasin.checkpoints import open_checkpoint

    open_checkpoint(str(b)).names()  # torch, transformers and a skeleton: the baseline, in no stage
    base = status()["RssAnon"]
    reads = read_peaks(b)
    out = workdir / "B_aligned"
    shutil.rmtree(out, ignore_errors=True)
    stages = run_stages(str(a), str(b), str(out), "cpu")
    shutil.rmtree(out, ignore_errors=True)
    tensors = reads["tensors"]
    largest = max(tensors, key=lambda k: tensors[k]["bytes"])
    worst = max(tensors, key=lambda k: tensors[k]["peak_above"])
    mib = 2**20
    print(f"Mixtral {cfg}: {reads['layout']}")
    print(f"model B: {stages['model_bytes'] / mib:.1f} MiB in bf16; largest module tensor {largest}: "
          f"{tensors[largest]['bytes'] / mib:.1f} MiB")
    print(f"read, one module tensor at a time: worst peak above the level before the read "
          f"{tensors[worst]['peak_above'] / mib:.1f} MiB ({worst}, {tensors[worst]['bytes'] / mib:.1f} MiB)")
    print(f"align stages, peak RssAnon above the level after the imports and one folder opened "
          f"({base / mib:.0f} MiB):")
    for name, st in stages["stages"].items():
        print(f"  {name:<7} {st['s']:6.1f} s  {(st['peak_anon'] - base) / mib:7.1f} MiB  "
              f"= {(st['peak_anon'] - base) / tensors[largest]['bytes']:.1f} x the largest module tensor")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg, "base_anon": base, "reads": reads,
                                               "largest": largest, "stages": stages["stages"],
                                               "model_bytes": stages["model_bytes"]}, indent=1, default=str))
    assert math.isfinite(tensors[worst]["peak_above"])


if __name__ == "__main__":
    main()
