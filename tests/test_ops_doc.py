"""docs/ops.md lists every op with a rule, from the rules themselves (so it cannot go stale)."""

from pathlib import Path

from benchmarks.ops_doc import DOC, render
from rebasin.graph.rules import RULES


def test_ops_doc_is_generated_from_the_rules():
    text = DOC.read_text()
    assert text == render(text), "docs/ops.md is stale: run python -m benchmarks.ops_doc"


def test_every_rule_key_is_documented():
    text = Path(DOC).read_text()
    missing = [k for k in RULES if f"`{k}`" not in text]
    assert not missing, missing


def test_every_rule_says_what_it_pins():
    for key, fn in RULES.items():
        assert fn.__doc__ and "Pins:" in fn.__doc__, key
