"""Regenerate the op table of docs/ops.md from the rules (rebasin.graph.rules.ops_table).

Run (from the repository root):
    python -m benchmarks.ops_doc
tests/test_ops_doc.py fails when the committed table differs from the generated one.
"""

from __future__ import annotations

import os
from pathlib import Path

from rebasin.graph.rules import ops_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "ops.md"
BEGIN, END = "<!-- ops-table:begin (python -m benchmarks.ops_doc) -->", "<!-- ops-table:end -->"


def render(text: str) -> str:
    """``text`` with the part between the markers replaced by the current table."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{ops_table()}\n{END}{tail}"


def main():
    new = render(DOC.read_text())
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, DOC)


if __name__ == "__main__":
    main()
