"""Fuzz the ONNX loader and analysis with mutated model bytes.

    python -m tests.fuzz_loader --cases 300 --seed 0

Each case takes a small valid model (tests/hostile.py), mutates its serialized bytes (bit flips,
random overwrites, insertions, deletions, truncation, a repeated chunk) and runs what the CLI runs:
load, infer the spec, permute every class at random and verify. A case passes when it succeeds or
raises a documented :class:`rebasin.errors.RebasinError`; any other exception, a case slower than
``--case-limit`` seconds, or a crash of the process (the test runs this in a subprocess) fails.

A case that loads and is verified equal is "accepted": mutations of weight bytes give valid models.
Prints one summary line: ``cases N: accepted A, refused R (by error class ...), slowest S s``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import onnx

SEEDS = ("mlp", "conv_bn", "control_if", "control_loop", "control_scan", "quantized")


def seed_models() -> list[bytes]:
    from tests import hostile

    return [getattr(hostile, name)().SerializeToString() for name in SEEDS]


OPS = ("Relu", "Add", "Mul", "MatMul", "Transpose", "Reshape", "Softmax", "Sigmoid", "Identity", "Concat",
       "Flatten", "Gemm", "Conv", "ReduceMean", "Split", "Gather", "If", "TotallyUnknown")


def mutate_fields(data: bytes, rng: np.random.Generator) -> bytes:
    """Edit the parsed model: rewire an input, swap an op, change an attribute / a dimension / a
    type / the opset, drop or repeat a node, drop an initializer or a graph input."""
    m = onnx.load_from_string(data)
    g = m.graph
    names = [x for n in g.node for x in (*n.input, *n.output)] + [t.name for t in g.initializer] + ["ghost"]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    for _ in range(int(rng.integers(1, 3))):
        kind = int(rng.integers(9))
        node = pick(g.node) if len(g.node) else None
        if kind == 0 and node is not None and node.input:
            node.input[int(rng.integers(len(node.input)))] = pick(names)
        elif kind == 1 and node is not None:
            node.op_type = pick(OPS)
        elif kind == 2 and node is not None and node.attribute:
            a = pick(node.attribute)
            if a.type == onnx.AttributeProto.INT:
                a.i = int(rng.integers(-3, 6))
            elif a.type == onnx.AttributeProto.INTS and a.ints:
                a.ints[int(rng.integers(len(a.ints)))] = int(rng.integers(-3, 6))
        elif kind == 3 and g.initializer:
            t = pick(g.initializer)
            if t.dims:
                i = int(rng.integers(len(t.dims)))
                if rng.random() < 0.5:
                    t.dims[i] = max(0, t.dims[i] + int(rng.integers(-2, 3)))
                else:  # the same bytes read with the dimensions in another order
                    t.dims[:] = list(rng.permutation(list(t.dims)))
        elif kind == 4 and (g.input or g.output):
            vi = pick([*g.input, *g.output])
            vi.type.tensor_type.elem_type = int(rng.integers(0, 17))
        elif kind == 5:
            for op in m.opset_import:
                op.version = int(rng.integers(1, 31))
        elif kind == 6 and node is not None:
            g.node.remove(node)
        elif kind == 7 and node is not None:
            g.node.append(node)
        elif kind == 8 and g.initializer:
            g.initializer.remove(pick(g.initializer))
    return m.SerializeToString()


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Half the cases edit fields of the parsed model, half mutate the raw bytes."""
    if rng.random() < 0.5:
        return mutate_fields(data, rng)
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(6)
        i = int(rng.integers(len(b))) if b else 0
        if kind == 0:  # flip one bit
            b[i] ^= 1 << int(rng.integers(8))
        elif kind == 1:  # overwrite a few bytes
            n = int(rng.integers(1, 9))
            b[i:i + n] = rng.bytes(n)
        elif kind == 2:  # insert bytes
            b[i:i] = rng.bytes(int(rng.integers(1, 9)))
        elif kind == 3:  # delete bytes
            del b[i:i + int(rng.integers(1, 9))]
        elif kind == 4:  # truncate
            del b[i:]
        else:  # repeat a chunk (repeated protobuf fields)
            n = int(rng.integers(1, 33))
            b[i:i] = b[i:i + n]
    return bytes(b)


def run_case(path: str) -> str:
    """What ``rebasin permute --random`` does; returns "accepted" or raises."""
    import rebasin
    from rebasin.sources.onnx import load_model
    from rebasin.verify import check_finite

    check_finite({t.name: onnx.numpy_helper.to_array(t) for t in load_model(path).graph.initializer})
    spec = rebasin.infer_spec(path)
    rebasin.check_permutation(path, spec, spec.random_permutations(0))
    return "accepted"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case-limit", type=float, default=20.0, help="seconds one case may take")
    args = ap.parse_args(argv)
    from rebasin import limits
    from rebasin.errors import RebasinError, VerificationError

    limits.set_time_limit(args.case_limit / 4)  # a model that runs for ever is stopped and refused

    rng = np.random.default_rng(args.seed)
    seeds = seed_models()
    outcomes: collections.Counter = collections.Counter()
    slowest = 0.0
    failures = []
    with tempfile.TemporaryDirectory(prefix="rebasin-fuzz-") as d:
        path = os.path.join(d, "m.onnx")
        for case in range(args.cases):
            data = mutate(seeds[case % len(seeds)], rng)
            with open(path, "wb") as f:
                f.write(data)
            print(f"case {case}", file=sys.stderr, flush=True)  # the last line names a crashing case
            t = time.perf_counter()
            try:
                outcomes[run_case(path)] += 1
            except VerificationError as e:  # a model that loads must never permute unsoundly
                failures.append((case, f"unsound: {e}"))
            except RebasinError as e:
                outcomes[f"refused ({type(e).__name__})"] += 1
            except Exception:  # noqa: BLE001 - undocumented: a failure
                failures.append((case, "\n".join(traceback.format_exc().splitlines()[-8:])))
            dt = time.perf_counter() - t
            slowest = max(slowest, dt)
            if dt > args.case_limit:
                failures.append((case, f"took {dt:.1f} s"))
    summary = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    print(f"cases {args.cases}: {summary}; failures {len(failures)}; slowest case {slowest:.2f} s")
    for case, why in failures[:5]:
        print(f"--- case {case} (seed {args.seed}):\n{why}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
