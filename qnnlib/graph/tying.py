"""Tied groups: tensors that must share one set of quantisation parameters.

A union-find over the quantised activation tensors, driven only by the ties that the rules
table produced (:mod:`qnnlib.graph.select`). A group's range covers all of its members, so a
producer takes the parameters its tied consumer needs and no requantisation is left between them.

One exception is decided by calibrated ranges (:func:`narrow_ties`): a Concat input that other
nodes also read, and whose range spans at most :data:`NARROW_FRACTION` of its group's, keeps its own
parameters. Tied, it would hold at most 16 of the group's 256 levels for those other readers (a
Softmax output concatenated with wide features lost all but 7 dB); untied, the Concat requantises
it (QLinearConcat takes a scale per input) and only the Concat's output holds it coarsely.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qnnlib.graph.select import Tie


class UnionFind:
    """Disjoint sets over strings with path halving and union by size."""

    def __init__(self, items: Sequence[str]) -> None:
        self._parent = {x: x for x in items}
        self._size = dict.fromkeys(items, 1)

    def find(self, x: str) -> str:
        """The representative of the set holding ``x``."""
        parent = self._parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: str, b: str) -> bool:
        """Merge the sets of ``a`` and ``b``; True when they were distinct."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self._size[ra] < self._size[rb]:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._size[ra] += self._size[rb]
        return True


@dataclass(frozen=True)
class TiedGroup:
    """One set of tensors sharing parameters; ``members`` in graph order, ``ties`` that joined them."""

    id: int
    members: tuple[str, ...]
    ties: tuple[Tie, ...]

    @property
    def requantizations_avoided(self) -> int:
        """Each member beyond the first would otherwise carry its own parameters and a requantisation."""
        return len(self.members) - 1


def tie_groups(activations: Sequence[str], ties: Sequence[Tie]) -> tuple[TiedGroup, ...]:
    """Group ``activations`` (in graph order) by ``ties``; group ids follow the first member's order."""
    uf = UnionFind(activations)
    for tie in ties:
        uf.union(tie.a, tie.b)
    by_root: dict[str, list[str]] = {}
    for name in activations:
        by_root.setdefault(uf.find(name), []).append(name)
    ties_by_root: dict[str, list[Tie]] = {}
    for tie in ties:
        ties_by_root.setdefault(uf.find(tie.a), []).append(tie)
    return tuple(
        TiedGroup(i, tuple(members), tuple(ties_by_root.get(root, ())))
        for i, (root, members) in enumerate(by_root.items())
    )


#: A Concat input read elsewhere is untied when its range spans at most this fraction of its group's.
NARROW_FRACTION = 1.0 / 16


def _span(lo: float, hi: float) -> float:
    """The width of the grid a range needs: it always includes zero."""
    return max(hi, 0.0) - min(lo, 0.0)


def narrow_ties(groups: Sequence[TiedGroup], ranges: Mapping[str, tuple[float, float]]) -> tuple[Tie, ...]:
    """The Concat ties to drop (see the module docstring).

    A tie is dropped when its input was observed on its own (``covered == ""``) and its range
    ``[min(lo, 0), max(hi, 0)]`` is at most :data:`NARROW_FRACTION` as wide as the union of the
    group's observed ranges.
    """
    drop: list[Tie] = []
    for group in groups:
        known = [ranges[m] for m in group.members if m in ranges and ranges[m][0] <= ranges[m][1]]
        if not known:
            continue
        width = _span(min(lo for lo, _ in known), max(hi for _, hi in known))
        drop.extend(tie for tie in group.ties
                    if tie.op_type == "Concat" and not tie.covered and tie.a in ranges
                    and _span(*ranges[tie.a]) <= NARROW_FRACTION * width)
    return tuple(drop)
