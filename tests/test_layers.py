"""The pipeline's stages import only stages below them (no cycles), read from the source's imports.

Layers, lowest first: the shared core (errors, spec, limits) imports no stage; model sources sit
below the runner, which sits below the graph package; solvers, the verifier, the checkpoint and
align commands and the CLI come after, in that order. A function-level import counts like any
other: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rebasin

PACKAGE = Path(rebasin.__file__).parent

LAYERS = [
    ("rebasin.errors", "rebasin.spec", "rebasin.limits", "rebasin.exchange", "rebasin.nesting"),
    ("rebasin.sources",),
    ("rebasin.execute",),
    ("rebasin.graph",),
    ("rebasin.solvers", "rebasin.canonical"),
    ("rebasin.verify", "rebasin.checkspec"),
    ("rebasin.checkpoints",),
    ("rebasin.align", "rebasin.passes"),
    ("rebasin.landscape",),
    ("rebasin.cli", "rebasin.__init__"),
]


def layer_of(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"module {module} is in no layer: add it to LAYERS")


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        yield name.removesuffix(".__init__") if name.endswith(".__init__") and name != "rebasin.__init__" \
            else name, path


def imports(path: Path, module: str, text: str | None = None) -> set[str]:
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m == "rebasin" or m.startswith("rebasin.")}


def test_every_module_has_a_layer():
    for name, _ in modules():
        layer_of(name)


def violations(name: str, path: Path, text: str | None = None) -> list[str]:
    bad = []
    mine = layer_of(name)
    for target in imports(path, name, text):
        try:
            theirs = layer_of(target)
        except AssertionError:  # a name imported from a module: rebasin.graph.infer.infer_spec
            theirs = layer_of(target.rpartition(".")[0])
        if theirs > mine:
            bad.append(f"{name} (layer {mine}) imports {target} (layer {theirs})")
    return bad


def test_no_stage_imports_a_later_stage():
    bad = [v for name, path in modules() for v in violations(name, path)]
    assert not bad, "\n".join(bad)


def test_a_backward_import_is_caught():
    """The check can fail: the ONNX frontend importing the verifier, even inside a function."""
    text = "def build():\n    from rebasin.verify import make_inputs\n"
    path = PACKAGE / "graph" / "onnx_frontend.py"
    assert violations("rebasin.graph.onnx_frontend", path, text) == [
        "rebasin.graph.onnx_frontend (layer 3) imports rebasin.verify.make_inputs (layer 5)"]
    assert violations("rebasin.limits", PACKAGE / "limits.py", "from rebasin.sources import onnx_checks\n")
