"""Bounded fuzz of the ONNX loader in CI (``make fuzz`` runs many more cases).

The fuzz runs in a subprocess so that a crash in native code (protobuf, onnx, onnxruntime) or a
hang fails this test instead of taking pytest down.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mutated_onnx_bytes_give_documented_errors_only():
    r = subprocess.run([sys.executable, "-m", "tests.fuzz_loader", "--cases", "1500", "--seed", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    last = r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else []
    assert r.returncode == 0, (r.returncode, r.stdout[-3000:], last)
    summary = r.stdout.strip().splitlines()[0]
    assert summary.startswith("cases 1500:") and "failures 0" in summary, r.stdout
    accepted = int(summary.split("accepted ")[1].split(",")[0].split(";")[0])
    assert accepted > 50, summary  # the mutations reach the analysis, not only the parser
