"""Run the bad-input battery of tests/test_reliability.py and print what each case answers.

    .venv/bin/python benchmarks/battery_table.py > /tmp/battery.md

One row per case: the command (paths shortened), the exit code, and the line rebasin printed
(the error on stderr, or for a success the line the test looks for on stdout). The table in
docs/reliability.md is this script's output.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_reliability import CASES, ERR, run  # noqa: E402


def main() -> int:
    print("| case | command | exit | what rebasin says |")
    print("|---|---|---|---|")
    t0 = time.perf_counter()
    bad = 0
    for name, (build, code, text, where) in CASES.items():
        with tempfile.TemporaryDirectory() as d:
            args = build(Path(d))
            argv = [str(a).replace(d + "/", "").replace(d, ".") for a in args]
            rc, out, err = run(*args)
            stream = err if where == ERR else out
            lines = [ln for ln in stream.splitlines() if re.search(text, ln)] or stream.splitlines()[-1:]
            said = lines[0].replace(d + "/", "").replace(d, ".") if lines else ""
            ok = rc == code and re.search(text, stream) is not None
            bad += not ok
            cmd = "rebasin " + " ".join(argv)
            print(f"| {name} | `{cmd}` | {rc}{'' if ok else ' (UNEXPECTED)'} | {said.replace('|', '/')} |")
    print(f"\n{len(CASES)} cases, {len(CASES) - bad} as expected, {time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
