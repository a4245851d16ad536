"""check-spec: is a spec written by hand or by another tool sound for a model?

Two checks, the second confirming the first:

1. **Against the model's own analysis.** Every class is cut into *atoms*: one position of an item
   (``tensor, axis, offset + j, stride, size``), so that a member written as one block and the same
   positions written as several members compare equal. A foreign class is sound when its atoms
   are exactly the atoms of one or more inferred classes of its size (permuting several sound
   classes by the same permutation is sound). Anything else is named: an atom no inferred class
   holds (a blocked axis, with the analysis's reason, or a layout the model does not have), or an
   atom of an inferred class that the foreign class leaves out although it moves with it (a
   BatchNorm statistic, a residual stream permuted in one block only).
2. **By random permutations.** Each class that check 1 rejects is permuted alone at random and the
   model's outputs compared: a difference *confirms* the problem. A spec that passes check 1 is
   permuted whole (every class at random, two seeds) and must compute the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rebasin.errors import SpecMismatchError, VerificationError
from rebasin.spec import PermutationClass, Spec


@dataclass(frozen=True)
class Problem:
    """Why a class of the checked spec is unsound: the class, the member at fault, the reason, and
    whether a random permutation of the class alone changed the outputs (``None``: not run)."""

    cls: str
    member: str
    why: str
    confirmed: bool | None = None

    def __str__(self) -> str:
        run = {True: " (confirmed: a random permutation of the class alone changes the outputs)",
               False: " (a random permutation of the class alone did not change the outputs on the test "
                      "inputs, but the analysis cannot prove it safe)", None: ""}[self.confirmed]
        return f"class {self.cls}: member {self.member}: {self.why}{run}"


@dataclass
class SpecCheck:
    """The verdict of :func:`check_spec`: ``sound`` when ``problems`` is empty."""

    classes: int
    problems: list = field(default_factory=list)
    verification: list = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.sound:
            runs = "; ".join(str(v) for v in self.verification)
            return (f"sound: {self.classes} classes, each equal to inferred classes; random permutations: "
                    f"{runs}")
        return "\n".join([f"unsound: {len(self.problems)} problem(s) in {self.classes} classes"]
                         + [f"  {p}" for p in self.problems])


def atoms(c: PermutationClass) -> dict[tuple, str]:
    """Atom -> the member it comes from (``tensor[axis]``, with offset/block/slice when not plain).

    Example:
        >>> from rebasin.spec import Member
        >>> sorted(atoms(PermutationClass("h", 2, (Member("w", 0, block=2),))))
        [('w', 0, 0, 2, 2, ()), ('w', 0, 1, 2, 2, ())]
    """
    out = {}
    for m in c.members:
        for j in range(m.block):
            out[(m.tensor, m.axis, m.offset + j, m.stride, c.size, m.at)] = m.label()
    return out


def structural_problems(spec: Spec, inferred: Spec) -> list[Problem]:
    """Check 1 of the module docstring: the classes of ``spec`` against the ``inferred`` ones."""
    owner: dict[tuple, str] = {}
    inferred_atoms = {}
    for c in inferred.classes:
        inferred_atoms[c.name] = atoms(c)
        for a in inferred_atoms[c.name]:
            owner[a] = c.name
    blocked = {(b.tensor, b.axis): b.reason for b in inferred.blocked}
    seen: dict[tuple, str] = {}
    problems = []
    for c in spec.classes:
        mine = atoms(c)
        hit = set()
        for a, label in mine.items():
            if a in seen:
                problems.append(Problem(c.name, label, f"also moved by class {seen[a]}"))
                break
            seen[a] = c.name
            if a in owner:
                hit.add(owner[a])
                continue
            reason = blocked.get(a[:2])
            why = (f"the analysis blocks this axis: {reason}" if reason else
                   "no permutation of the model moves these positions together with the rest of the class")
            problems.append(Problem(c.name, label, why))
            break
        else:
            for name in sorted(hit):
                left = [label for a, label in inferred_atoms[name].items() if a not in mine]
                if left:
                    why = f"moves with the class's other members (inferred class {name}) but is left out"
                    problems.append(Problem(c.name, left[0], why))
                    break
    return problems


def fit_to_model(spec: Spec, shapes: dict) -> Spec:
    """``spec`` with the model's weight shapes: a member naming a tensor the model lacks, or not
    fitting its shape, is refused (:class:`SpecMismatchError`)."""
    for c in spec.classes:
        for m in c.members:
            if m.tensor not in shapes:
                raise SpecMismatchError(f"class {c.name}: {m.tensor!r} is not a weight of the model")
    return Spec(spec.classes, spec.blocked, shapes=dict(shapes), source=spec.source,
                graph_hash=spec.graph_hash)


def check_spec(model, spec: Spec, inferred: Spec, example_inputs=None, seeds=(0, 1)) -> SpecCheck:
    """Check ``spec`` for ``model`` (ONNX path / ModelProto or ``torch.nn.Module`` with
    ``example_inputs``) against ``inferred`` (the model's own spec) and by random permutations.

    Raises :class:`SpecMismatchError` when the spec was inferred from another graph or names
    tensors the model does not have.

    Example:
        >>> import rebasin  # doctest: +SKIP
        >>> check_spec("mlp.onnx", hand_written, rebasin.infer_spec("mlp.onnx")).sound  # doctest: +SKIP
        True
    """
    from rebasin.verify import check_permutation

    spec.check_graph(inferred.graph_hash)
    spec = fit_to_model(spec, inferred.shapes)
    out = SpecCheck(len(spec.classes), structural_problems(spec, inferred))

    def differs(sub: Spec, seed: int) -> str:
        """'' when the model permuted at random by ``sub`` computes the same outputs, else why not."""
        plain = Spec(sub.classes)  # the graph was checked above
        try:
            _, res = check_permutation(model, plain, plain.random_permutations(seed),
                                       example_inputs=example_inputs)
        except VerificationError as e:
            return str(e)
        out.verification.append(res)
        return ""

    if out.problems:
        out.problems = [Problem(p.cls, p.member, p.why, any(differs(Spec((spec[p.cls],)), s) for s in seeds))
                        for p in out.problems]
        out.verification = []
        return out
    for s in seeds:
        why = differs(spec, s)
        if why:  # every class equals inferred ones, yet the outputs change: the analysis is wrong
            name = why.split("breaks equivalence is ", 1)[-1].split(" ", 1)[0]
            out.problems.append(Problem(name, "-", f"a random permutation (seed {s}) changes the outputs: "
                                                   f"{why}", True))
            break
    return out
