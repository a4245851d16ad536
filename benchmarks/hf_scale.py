"""Out-of-core alignment of Llama-shaped Hugging Face folders: time and peak memory per stage.

    python benchmarks/hf_scale.py [--layers 6] [--device auto] [--json out.json]
    python benchmarks/hf_scale.py --layers 22          # the 1.1 B pair (TinyLlama shape)
    python benchmarks/hf_scale.py --extrapolate        # + the 7 B-shaped estimate from this run

Two random-init ``LlamaForCausalLM`` (hidden 2048, 32 query / 4 key-value heads, intermediate 5632,
vocab 32000) with trained-like values are saved by ``save_pretrained`` in bf16 with 300 MB shards
(cached under ``out/hf_scale/``; made in a child process so that their build does not count).
Then, in a fresh child process, the stages of ``rebasin align A B -o OUT`` run one after the
other, each with its wall time and the peak of ``RssAnon`` (memory the process allocated; mapped
checkpoint pages are page cache, not counted) sampled every 20 ms:

  open     read the shard headers, build the model from config.json on the meta device
  spec     trace it (FakeTensors) and infer the permutation classes
  solve    weight matching, tensors read lazily through the safetensors memory maps
  verify   B and the permuted B run one layer at a time on two token batches, outputs compared
  write    the permuted B written shard by shard with B's layout, then renamed into place

The target (issue 10): peak anonymous memory below 1 GiB + 1.5 x one model's size.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000)
SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, num_hidden_layers=32)


def config(layers: int, shape=SHAPE):
    import transformers

    return transformers.LlamaConfig(**{"num_hidden_layers": layers, **shape}, max_position_embeddings=2048,
                                    architectures=["LlamaForCausalLM"], tie_word_embeddings=False)


def make_pair(workdir: Path, layers: int) -> tuple[Path, Path]:
    """Folders A and B (seeds 0 and 1), made once."""
    a, b = workdir / "A", workdir / "B"
    for path, seed in ((a, 0), (b, 1)):
        if (path / "model.safetensors.index.json").exists():
            continue
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch, transformers\n"
                f"from benchmarks.hf_scale import config\n"
                f"torch.manual_seed({seed})\n"
                f"with torch.device('meta'):\n"
                f"    m = transformers.LlamaForCausalLM(config({layers}))\n"
                f"m = m.to_empty(device='cpu').to(torch.bfloat16)\n"
                f"with torch.no_grad():\n"
                f"    for n, p in m.named_parameters():\n"
                f"        p.normal_(1.0 if p.ndim == 1 else 0.0, 0.02 if p.ndim > 1 else 0.1)\n"
                f"    m.model.rotary_emb.inv_freq.copy_(m.model.rotary_emb.original_inv_freq)\n"
                f"m.save_pretrained({str(path)!r}, max_shard_size='300MB')\n")
        print(f"making {path} ({layers} layers, seed {seed}) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", code], check=True)
    return a, b


def run_stages(a: str, b: str, out: str, device: str) -> dict:
    """The align pipeline stage by stage in this process; wall time and peak RssAnon of each."""
    from memory import PeakMemory

    from rebasin import solvers
    from rebasin.checkpoints import check_permuted, open_checkpoint
    from rebasin.graph.infer import infer_spec

    stages, keep = {}, {}

    def stage(name, fn):
        t = time.perf_counter()
        with PeakMemory() as m:
            keep[name] = fn()
        stages[name] = {"s": time.perf_counter() - t, "peak_anon": m.peak_anon, "hwm": m.peak_hwm}
        print(f"  {name:<7} {stages[name]['s']:8.1f} s   peak RssAnon {m.peak_anon / 2**30:.2f} GiB",
              file=sys.stderr, flush=True)

    def opened():
        sa, sb = open_checkpoint(a), open_checkpoint(b)  # as `rebasin align` opens them
        sa.names(), sb.names()
        return sa, sb
    stage("open", opened)
    sa, sb = keep["open"]
    stage("spec", lambda: infer_spec(sa.module, sa.example_inputs))
    spec = keep["spec"]

    def progress(it, objective, message):
        print(f"    [{it:>3}] {message}  ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
    stage("solve", lambda: solvers.get("weight")(spec, sa.weights(), sb.weights(), progress=progress,
                                                 device=device, cache_bytes=cache_bytes(sb)))
    res = keep["solve"]
    stage("verify", lambda: check_permuted(sb, spec, res.perms))
    new, ver = keep["verify"]
    shutil.rmtree(out, ignore_errors=True)
    stage("write", lambda: new.save(out))
    size = sb.nbytes()
    return {"model_bytes": size, "classes": len(spec), "sizes": [c.size for c in spec.classes],
            "sweeps": len(res.objective) - 1, "converged": res.converged, "objective": res.objective,
            "verify": str(ver),
            "info": {k: v for k, v in res.info.items() if isinstance(v, (int, float, str))},
            "stages": stages, "peak_anon": max(s["peak_anon"] for s in stages.values()),
            "bound": 2**30 + 1.5 * size, "sweep_flops": sweep_flops(spec, sb)}


def cache_bytes(source) -> int:
    from rebasin.checkpoints import solver_cache_bytes

    return solver_cache_bytes(source)


def sweep_flops(spec, source) -> float:
    """Multiply-adds of one sweep's cost matrices: sum over members of numel x class size."""
    total = 0.0
    for c in spec.classes:
        for m in c.members:
            total += math.prod(source.shape(m.tensor)) * c.size
    return 2 * total


def lap_seconds(sizes=(2048, 5632, 11008)) -> dict:
    """Seconds of one exact linear assignment of each size (random float64 costs)."""
    import numpy as np

    from rebasin.solvers.weight_matching import assign

    out = {}
    rng = np.random.default_rng(0)
    for n in sizes:
        cost = rng.standard_normal((n, n))
        t = time.perf_counter()
        assign(cost)
        out[n] = time.perf_counter() - t
    return out


def extrapolate(result: dict, layers: int) -> dict:
    """Time and memory of a 7 B-shaped pair (Llama-2-7B: hidden 4096, 32 layers, intermediate 11008)
    from this run: the cost matrices at this run's rate of multiply-adds per second, one assignment per
    class per sweep at the measured assignment times, as many sweeps as this run took."""
    import transformers  # noqa: F401

    from rebasin.graph.infer import infer_spec
    from rebasin.sources.skeleton import hf_example_inputs, hf_skeleton

    big = hf_skeleton(config(32, {k: v for k, v in SHAPE_7B.items() if k != "num_hidden_layers"}))
    spec = infer_spec(big, hf_example_inputs(big))
    shapes = dict(big.state_dict(keep_vars=True))

    class Shapes:
        def shape(self, n):
            return tuple(shapes[n].shape)
    flops = sweep_flops(spec, Shapes())
    solve = result["stages"]["solve"]["s"]
    sweeps = max(result["sweeps"], 1)
    lap = lap_seconds((128, 2048, 4096, 5632, 11008))
    this_lap = sum(_lap_time(n, lap) for n in result["sizes"])  # per sweep, in this run
    rate = result["sweep_flops"] * sweeps / max(solve - this_lap * sweeps, 1e-9)
    lap_big = sum(_lap_time(c.size, lap) for c in spec.classes)
    bytes_7b = sum(2 * math.prod(t.shape) for t in shapes.values() if t.is_floating_point()) // 2 * 2
    # peak memory: the baseline (imports) + the solver's cache + a working set that scales with the
    # largest of (largest float32 member tensor, largest class's n x n costs) between the two shapes
    base = result["stages"]["open"]["peak_anon"]
    cache_here = min(2 * 2**30, result["model_bytes"] // 4)
    cache_7b = min(2 * 2**30, bytes_7b // 4)
    biggest_here = max(max(result["sizes"]) ** 2, 32000 * SHAPE["hidden_size"])
    biggest_7b = max(max(c.size for c in spec.classes) ** 2, 32000 * SHAPE_7B["hidden_size"])
    working = max(result["peak_anon"] - base - cache_here, 0) * biggest_7b / biggest_here
    per_layer_anon = (result["peak_anon"] - base) / max(layers, 1)
    return {"classes": len(spec), "sweep_flops": flops, "flops_per_s": rate,
            "anon_estimate": base + cache_7b + working,
            "solve_s": sweeps * (flops / rate + lap_big), "lap_s_per_sweep": lap_big, "lap": lap,
            "model_bytes": bytes_7b, "bound": 2**30 + 1.5 * bytes_7b,
            "per_layer_anon_this_run": per_layer_anon}


def _lap_time(n: int, lap: dict) -> float:
    """Assignment seconds for size ``n`` from the nearest measured size, scaled as n^3."""
    ref = min(lap, key=lambda k: abs(math.log(k / n)))
    return lap[ref] * (n / ref) ** 3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", default=str(ROOT / "out" / "hf_scale"))
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--extrapolate", action="store_true", help="estimate a 7 B-shaped pair from this run")
    p.add_argument("--child", nargs=3, metavar=("A", "B", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_stages(*args.child, args.device)))
        return
    work = Path(args.workdir) / f"L{args.layers}"
    a, b = make_pair(work, args.layers)
    out = work / "aligned"
    t = time.perf_counter()
    cmd = [sys.executable, __file__, "--device", args.device, "--child", str(a), str(b), str(out)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["total_s"] = time.perf_counter() - t
    result["layers"] = args.layers
    gib = 2**30
    print(f"\nLlama-shaped pair, {args.layers} layers, {result['model_bytes'] / gib:.2f} GiB per model "
          f"(bf16), {result['classes']} classes, {result['sweeps']} sweeps (converged {result['converged']})")
    print("| stage | seconds | peak RssAnon GiB |\n|---|---:|---:|")
    for name, s in result["stages"].items():
        print(f"| {name} | {s['s']:.1f} | {s['peak_anon'] / gib:.2f} |")
    ok = result["peak_anon"] < result["bound"]
    total = sum(s["s"] for s in result["stages"].values())
    peak = result["peak_anon"] / gib
    print(f"| **all** (child process {result['total_s']:.0f} s) | {total:.1f} | {peak:.2f} "
          f"(bound 1 GiB + 1.5 x model = {result['bound'] / gib:.2f}: {'met' if ok else 'NOT met'}) |")
    print(f"verification: {result['verify']}")
    if args.extrapolate:
        e = extrapolate(result, args.layers)
        result["extrapolated_7b"] = e
        laps = {k: round(v, 2) for k, v in e["lap"].items()}
        print(f"\n7 B-shaped pair (hidden 4096, 32 layers, intermediate 11008; "
              f"{e['model_bytes'] / gib:.1f} GiB per model in bf16), from this run's rate of "
              f"{e['flops_per_s'] / 1e9:.1f} GFLOP/s in the cost matrices and the measured assignment "
              f"seconds by size {laps}:")
        print(f"  {e['classes']} classes; one sweep: {e['sweep_flops'] / 1e12:.2f} TFLOP of cost matrices + "
              f"{e['lap_s_per_sweep']:.0f} s of assignments; {result['sweeps']} sweeps ~ "
              f"{e['solve_s'] / 60:.0f} min")
        print(f"  peak RssAnon ~ {e['anon_estimate'] / gib:.1f} GiB (baseline + cache + this run's working "
              f"set scaled by the largest class / tensor); the bound for it: {e['bound'] / gib:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
