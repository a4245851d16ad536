"""Compare rebasin (this project) with its peers on the same models and the same weights, in one run.

Peers (both ship a top-level ``rebasin`` module, so each lives in its own venv, never in ``.venv``):

* ``snimu``    -- PyPI ``rebasin==0.0.47`` (github.com/snimu/rebasin): ``PermutationCoordinateDescent``,
  weight matching by permutation coordinate descent.
* ``sinkhorn`` -- PyPI ``sinkhorn-rebasin==0.0.2`` (Pena et al., CVPR 2023): ``RebasinNet`` trained with
  ``DistL2Loss`` (the weight-matching / L2 mode), AdamW, then hard permutations by linear assignment
  (``--sinkhorn-steps``, ``--sinkhorn-lr``).

How to run (from the repository root, with the project's python)::

    .venv/bin/python benchmarks/peers.py --setup      # once: out/peers/{snimu,sinkhorn}-venv
    .venv/bin/python benchmarks/peers.py --quick      # MLP + resnet18, 300 s timeout
    .venv/bin/python benchmarks/peers.py              # all models, all tools, 900 s timeout
    .venv/bin/python benchmarks/peers.py --models resnet18 vgg11 --tools rebasin snimu --timeout 1800

``--setup`` creates each peer venv with the base interpreter of ``.venv``, shares ``.venv``'s torch and
torchvision through a ``.pth`` file that appends ``.venv``'s site-packages to ``sys.path`` (the
``__editable__`` finder of this project in ``.venv`` is NOT run, since ``.pth`` files are only processed
in site directories, so ``import rebasin`` finds the peer), installs the peer with ``--no-deps`` plus its
few small pure-python deps, and checks that ``import rebasin`` resolves into the peer venv.
``--setup --full-install`` installs ``torch==2.14.1 torchvision==0.29.1`` into each venv instead of sharing
(from this machine's local wheel files; costs several GB).

What happens: for every model, A and B are random initialisations from seeds 0 and 1, with BatchNorm
affine parameters and running statistics randomised too (so nothing is trivially equal). The two
state_dicts and one input batch are generated once and saved to ``out/peers/models/`` and every tool loads
those same files. Each (model, tool) pair runs in its own subprocess (``peers.py --run-peer TOOL MODEL`` in
the tool's python) under a wall-clock timeout; the runner saves the permuted B's state_dict and this script
then checks it, with the same code for every tool. Logs: ``out/peers/logs/``.

Models: ``mlp`` (Flatten -> 3 hidden Linear(512) + ReLU -> Linear(10), input 2x1x28x28), and the
torchvision ``resnet18``, ``mobilenet_v3_small``, ``vgg11`` (input 2x3x224x224), all in eval mode.

Columns (markdown table on stdout, the same rows in ``out/peers/results.json``):

* ``spec s``      -- finding the permutation structure: rebasin ``infer_spec``; snimu the
  ``PermutationCoordinateDescent`` constructor (torchview trace); sinkhorn the ``RebasinNet`` constructor.
* ``align s``     -- solving and applying: rebasin ``align(..., "weight", spec=spec)`` including its
  verification; snimu ``.rebasin()``; sinkhorn the training loop plus the hard permutation.
* ``total s``     -- spec + align (imports, model building and loading excluded; the JSON's
  ``process_s`` is the whole subprocess).
* ``peak RSS GB`` -- peak resident memory (``VmHWM``) of the runner process, imports and model loading
  included; measured also when the run is cut off by the timeout or by the ``--max-rss`` memory guard
  (default 16 GB).
* ``classes``     -- number of permutation classes the tool found (rebasin: ``len(spec)``; snimu:
  permutations in its model graph; sinkhorn: permutation matrices of ``RebasinNet``).
* ``equivalent``  -- whether P(B) computes what B computes: ``max|P(B)(x) - B(x)| <= 1e-4 * max|B(x)|`` on
  the saved input (``max rel`` in the JSON); ``no`` is a broken permutation.
* ``dist before`` -- ``||A - B||``: sqrt of the summed squared differences over all floating-point
  state_dict entries (weights, biases, BatchNorm running statistics).
* ``dist after``  -- ``||A - P(B)||`` on the same entries. Lower is better, but only meaningful where
  ``equivalent`` is yes.

A run that fails shows its error (``timeout``, ``killed at the memory limit``, the tool's exception, or the
exit status) instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
OUT = ROOT / "out" / "peers"
MODELS_DIR = OUT / "models"
RUNS_DIR = OUT / "runs"
LOGS_DIR = OUT / "logs"

MODELS = ["mlp", "resnet18", "mobilenet_v3_small", "vgg11"]
QUICK_MODELS = ["mlp", "resnet18"]
SEEDS = (0, 1)  # A, B

# tool -> (label, pip requirement of the peer, its small deps installed with --no-deps)
TOOLS = {
    "rebasin": ("rebasin (this)", None, []),
    "snimu": ("snimu rebasin 0.0.47", "rebasin==0.0.47", ["torchview", "graphviz"]),
    "sinkhorn": ("sinkhorn-rebasin 0.0.2", "sinkhorn-rebasin==0.0.2", ["torchviz", "graphviz"]),
}
PEERS = [t for t, (_, req, _) in TOOLS.items() if req]
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
RTOL = 1e-4


def venv_dir(tool: str) -> Path:
    return OUT / f"{tool}-venv"


def venv_python(tool: str) -> Path:
    return venv_dir(tool) / "bin" / "python"


# --------------------------------------------------------------------------- models (shared by all sides)


def build(name: str):
    """A fresh module of architecture ``name`` (eval mode)."""
    from torch import nn

    if name == "mlp":
        m = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    else:
        import torchvision

        m = getattr(torchvision.models, name)(weights=None)
    return m.eval()


def input_shape(name: str) -> tuple:
    return (2, 1, 28, 28) if name == "mlp" else (2, 3, 224, 224)


def paths(name: str) -> dict:
    return {"a": MODELS_DIR / f"{name}-seed{SEEDS[0]}.pt", "b": MODELS_DIR / f"{name}-seed{SEEDS[1]}.pt",
            "x": MODELS_DIR / f"{name}-input.pt"}


def make_state(name: str, seed: int) -> dict:
    """state_dict of ``name`` initialised from ``seed``, BatchNorm affine params and running stats random."""
    import torch

    torch.manual_seed(seed)
    m = build(name)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.weight.copy_(torch.rand(n) + 0.5)
                mod.bias.copy_(torch.randn(n) * 0.1)
                mod.running_mean.copy_(torch.randn(n) * 0.1)
                mod.running_var.copy_(torch.rand(n) + 0.5)
    return m.state_dict()


def ensure_models(names, regen: bool = False) -> None:
    import torch

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    for name in names:
        p = paths(name)
        if regen or not all(v.exists() for v in p.values()):
            torch.save(make_state(name, SEEDS[0]), p["a"])
            torch.save(make_state(name, SEEDS[1]), p["b"])
            torch.save(torch.randn(input_shape(name), generator=torch.Generator().manual_seed(123)), p["x"])


def load(name: str):
    """(A, B, x): modules with the saved state_dicts loaded, and the saved input."""
    import torch

    p = paths(name)
    a, b = build(name), build(name)
    a.load_state_dict(torch.load(p["a"]))
    b.load_state_dict(torch.load(p["b"]))
    return a, b, torch.load(p["x"])


# --------------------------------------------------------------------------- runners (one per tool)


def run_rebasin(a, b, x) -> dict:
    import rebasin

    t0 = time.perf_counter()
    spec = rebasin.infer_spec(a, example_inputs=(x,))
    t1 = time.perf_counter()
    res = rebasin.align(a, b, "weight", example_inputs=(x,), spec=spec)
    t2 = time.perf_counter()
    return {"spec_s": t1 - t0, "align_s": t2 - t1, "classes": len(spec), "state": res.model}


def run_snimu(a, b, x) -> dict:
    import torch

    from rebasin import PermutationCoordinateDescent

    torch.manual_seed(0)  # it visits the permutations in torch.randperm order
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(a, b, x)
    t1 = time.perf_counter()
    pcd.rebasin()  # permutes b in place
    t2 = time.perf_counter()
    return {"spec_s": t1 - t0, "align_s": t2 - t1, "classes": len(pcd.pinit.model_graph.permutation_to_info),
            "state": b.state_dict()}


def run_sinkhorn(a, b, x, steps: int = 50, lr: float = 10.0) -> dict:
    """As the package's examples/main_alignment_{mlp,resnet}.py, but permuting B towards A: RebasinNet(B)
    from the identity, DistL2Loss(A), AdamW(lr) on the soft permutations for ``steps`` steps (50 and lr 10
    as in the resnet example; lr 0.1 of the MLP example never left the identity here); after each step
    the hard (linear-assignment) permutation is evaluated and the best one is kept."""
    import importlib

    import torch

    sk = importlib.import_module("rebasin")  # the peer's package (not this project's)
    sk_loss = importlib.import_module("rebasin.loss")

    torch.manual_seed(0)
    t0 = time.perf_counter()
    pi = sk.RebasinNet(b, input_shape=tuple(x.shape))
    pi.identity_init()
    t1 = time.perf_counter()
    crit = sk_loss.DistL2Loss(a)
    opt = torch.optim.AdamW(pi.p.parameters(), lr=lr)
    best, state = math.inf, None
    for _ in range(steps):
        pi.train()
        loss = crit(pi())
        opt.zero_grad()
        loss.backward()
        opt.step()
        pi.eval()
        with torch.no_grad():
            hard = pi()
            val = float(crit(hard))
        if val < best:
            best, state = val, {k: v.detach().clone() for k, v in hard.state_dict().items()}
    t2 = time.perf_counter()
    return {"spec_s": t1 - t0, "align_s": t2 - t1, "classes": len(pi.p), "state": state,
            "note": f"{steps} steps, lr {lr}, best hard L2 loss {best:.4g}"}


def run_peer(args) -> None:
    """Inside the tool's python: run one tool on one model, save P(B) and a JSON record."""
    import torch

    import rebasin as mod

    rec = {"tool": args.run_peer[0], "model": args.run_peer[1], "module": mod.__file__,
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    tool, name = args.run_peer
    try:
        a, b, x = load(name)
        if tool == "rebasin":
            r = run_rebasin(a, b, x)
        elif tool == "snimu":
            r = run_snimu(a, b, x)
        else:
            r = run_sinkhorn(a, b, x, args.sinkhorn_steps, args.sinkhorn_lr)
        state = {k: v.detach().contiguous() for k, v in r.pop("state").items()}
        torch.save(state, args.result.with_suffix(".pt"))
        rec.update(r, total_s=r["spec_s"] + r["align_s"], peak_rss_gb=proc_gb("self", "VmHWM"))
    except Exception as e:  # report any failure of the tool as its result
        traceback.print_exc()
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    args.result.write_text(json.dumps(rec, indent=1))


# --------------------------------------------------------------------------- driver


def proc_gb(pid, field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of a process, GB; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


def spawn(cmd, timeout: float, max_rss: float, log: Path) -> tuple:
    """Run ``cmd`` in its own process group; kill the group after ``timeout`` s or once its RSS passes
    ``max_rss`` GB. Returns (exit status, or "timeout" / "memory" when killed; wall s; peak RSS GB).

    The peak is the child's ``VmHWM`` sampled every 0.2 s (the runner also reports its own at the end).
    Not ``wait4``'s ``ru_maxrss``: on Linux that counts the parent's memory copied at fork time."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=OUT, env=env,
                             start_new_session=True)
        killed, peak = None, 0.0
        while True:
            peak = max(peak, proc_gb(p.pid, "VmHWM"))
            if p.poll() is not None:
                break
            if time.perf_counter() - t0 > timeout:
                killed = "timeout"
            elif proc_gb(p.pid, "VmRSS") > max_rss:
                killed = "memory"
            if killed:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                break
            time.sleep(0.2)
    return killed or p.returncode, time.perf_counter() - t0, peak


def sq_dist(sa: dict, sb: dict) -> float:
    return math.sqrt(sum(float(((sa[k].double() - sb[k].double()) ** 2).sum())
                         for k in sa if sa[k].is_floating_point()))


def evaluate(name: str, state_path: Path) -> dict:
    """Equivalence of P(B) with B on the saved input, and the distances to A."""
    import torch

    a, b, x = load(name)
    sa, sb = a.state_dict(), b.state_dict()
    sp = torch.load(state_path)
    pb = build(name)
    out = {"dist_before": sq_dist(sa, sb)}
    try:
        pb.load_state_dict(sp)
    except RuntimeError as e:
        return {**out, "equivalent": False, "eval_error": str(e).splitlines()[0]}
    with torch.no_grad():
        yb, yp = b(x), pb(x)
    rel = float((yp - yb).abs().max() / yb.abs().max().clamp_min(1e-30))
    return {**out, "dist_after": sq_dist(sa, pb.state_dict()), "max_rel": rel, "equivalent": rel <= RTOL}


def run_one(tool: str, name: str, args) -> dict:
    py = Path(sys.executable) if tool == "rebasin" else venv_python(tool)
    rec = {"model": name, "tool": tool, "label": TOOLS[tool][0]}
    if not py.exists():
        return {**rec, "error": f"no venv (run --setup): {py}"}
    for d in (RUNS_DIR, LOGS_DIR):
        d.mkdir(parents=True, exist_ok=True)
    result = RUNS_DIR / f"{name}-{tool}.json"
    result.unlink(missing_ok=True)
    result.with_suffix(".pt").unlink(missing_ok=True)
    cmd = [str(py), str(HERE), "--run-peer", tool, name, "--result", str(result),
           "--sinkhorn-steps", str(args.sinkhorn_steps), "--sinkhorn-lr", str(args.sinkhorn_lr)]
    log = LOGS_DIR / f"{name}-{tool}.log"
    code, wall, rss = spawn(cmd, args.timeout, args.max_rss, log)
    rec.update(process_s=wall, peak_rss_gb=rss, log=str(log))
    if code == "timeout":
        return {**rec, "error": f"timeout ({args.timeout:g} s)"}
    if code == "memory":
        return {**rec, "error": f"killed at the memory limit ({args.max_rss:g} GB RSS) after {wall:.0f} s"}
    if not result.exists():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        return {**rec, "error": f"exit status {code}" + (f": {tail[0][:200]}" if tail else "")}
    got = json.loads(result.read_text())
    got["peak_rss_gb"] = max(rss, got.get("peak_rss_gb", 0.0))
    rec.update(got)
    state = result.with_suffix(".pt")
    if "error" not in rec:
        rec.update(evaluate(name, state))
    if not args.keep:
        state.unlink(missing_ok=True)
    return rec


def fmt(v, spec: str = ".2f") -> str:
    return "" if v is None else format(v, spec)


def row(r: dict) -> str:
    head = f"| {r['model']} | {r['label']} |"
    if "error" in r:
        rss = fmt(r.get("peak_rss_gb"))
        return f"{head} | | | {rss} | | {r['error'].replace('|', '/')} | | |"
    eq = "yes" if r["equivalent"] else f"NO (rel err {r['max_rel']:.1e})" if "max_rel" in r else "NO"
    return (f"{head} {fmt(r['spec_s'])} | {fmt(r['align_s'])} | {fmt(r['total_s'])} | "
            f"{fmt(r['peak_rss_gb'])} | {r['classes']} | {eq} | {fmt(r['dist_before'], '.1f')} | "
            f"{fmt(r.get('dist_after'), '.1f')} |")


HEADER = ("| model | tool | spec s | align s | total s | peak RSS GB | classes | equivalent | dist before "
          "| dist after |\n|---|---|---:|---:|---:|---:|---:|---|---:|---:|")


def setup(full: bool) -> None:
    shared = sysconfig.get_paths()["purelib"]
    for tool in PEERS:
        d = venv_dir(tool)
        req, deps = TOOLS[tool][1], TOOLS[tool][2]
        print(f"== {tool}: {d}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(d)], check=True)
        pip = [str(venv_python(tool)), "-m", "pip", "install", "-q"]
        if full:
            subprocess.run(pip + TORCH_PINS + [req], check=True)
        else:
            site = Path(subprocess.run([str(venv_python(tool)), "-c", "import sysconfig; "
                                        "print(sysconfig.get_paths()['purelib'])"],
                                       check=True, capture_output=True, text=True).stdout.strip())
            (site / "_peers_shared_torch.pth").write_text(shared + "\n")
            subprocess.run(pip + ["--no-deps", req] + deps, check=True)
        check = subprocess.run([str(venv_python(tool)), "-c", "import rebasin, torch, torchvision; "
                                "print(rebasin.__file__); print(torch.__version__)"],
                               cwd=OUT, capture_output=True, text=True)
        got = check.stdout.split()
        if check.returncode or not got or not got[0].startswith(str(d)):
            sys.exit(f"{tool}: `import rebasin` does not resolve into {d}:\n{check.stdout}{check.stderr}")
        print(f"   import rebasin -> {got[0]} (torch {got[1]})", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help="create the peer venvs under out/peers and exit")
    p.add_argument("--full-install", action="store_true",
                   help="with --setup: install torch/torchvision into each venv instead of sharing .venv's")
    p.add_argument("--models", nargs="+", choices=MODELS)
    p.add_argument("--tools", nargs="+", choices=list(TOOLS))
    p.add_argument("--quick", action="store_true", help="mlp + resnet18 only, timeout 300 s")
    p.add_argument("--timeout", type=float, help="wall-clock limit per (model, tool) run, s (default 900)")
    p.add_argument("--max-rss", type=float, default=16.0,
                   help="kill a run whose RSS passes this many GB (protects the machine; default 16)")
    p.add_argument("--regen", action="store_true", help="regenerate the saved A/B state_dicts and inputs")
    p.add_argument("--keep", action="store_true", help="keep the permuted B state_dicts in out/peers/runs")
    p.add_argument("--sinkhorn-steps", type=int, default=50)
    p.add_argument("--sinkhorn-lr", type=float, default=10.0,
                   help="AdamW lr (the package's resnet example uses 10; 0.1 left the MLP unaligned here)")
    p.add_argument("--output", type=Path, default=OUT / "results.json")
    p.add_argument("--run-peer", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.run_peer:
        return run_peer(args)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.setup:
        return setup(args.full_install)
    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    tools = args.tools or list(TOOLS)
    args.timeout = args.timeout or (300.0 if args.quick else 900.0)
    ensure_models(models, args.regen)
    print(HEADER, flush=True)
    rows = []
    for name in models:
        for tool in tools:
            r = run_one(tool, name, args)
            rows.append(r)
            print(row(r), flush=True)
            args.output.write_text(json.dumps(rows, indent=1))
    print(f"\nJSON: {args.output}")


if __name__ == "__main__":
    main()
