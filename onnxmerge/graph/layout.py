"""How the positions of one tensor axis decompose into feature spaces, and the union-find
that ties spaces together.

A *layout* describes one tensor axis. ``Atom(s)`` means position j is feature j of space s.
Compound layouts express the structure method.md §1 asks for:

- ``Concat(parts)``: positions are the parts one after another (channel concat).
- ``Grid(factors)``: row-major product; an ``int`` factor is an untracked replica axis
  (Flatten of [C,H,W] is ``Grid((Atom(s), H*W))``; attention heads are ``Grid((Atom(h), Atom(d)))``).
- ``Interleave(parts)``: position i*g + k is feature i of part k (a channel shuffle).
- ``Stacked(parts)`` / ``StackBody(parts)``: the two axes of a Concat reshaped to (g, c): the
  Reshape and Transpose of a channel shuffle, or a packed q/k/v projection reshaped to
  (3, D) until constant picks along the g axis (the selector) take its parts apart: each
  StackBody axis of the tensor then holds the picked parts' structure.

A space may later be *refined*: when a Split cuts it, or a Reshape splits it into heads, its
permutations are restricted to block or Kronecker form, recorded as a layout over new spaces.
``SpaceTable.resolve`` rewrites any stored layout into the current leaf spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Callable, Union


@dataclass(frozen=True)
class Atom:
    space: int


@dataclass(frozen=True)
class Concat:
    parts: tuple["Layout", ...]


@dataclass(frozen=True)
class Grid:
    factors: tuple[Union["Layout", int], ...]


@dataclass(frozen=True)
class Interleave:
    parts: tuple["Layout", ...]


@dataclass(frozen=True)
class Stacked:
    parts: tuple["Layout", ...]


@dataclass(frozen=True)
class StackBody:
    parts: tuple["Layout", ...]


Layout = Union[Atom, Concat, Grid, Interleave, Stacked, StackBody]
Factor = Union[Layout, int, None]


def layout_text(layout: Factor) -> str:
    """How ``onnxmerge inspect`` names an axis's layout: spaces as S<id>, a grid as their
    product, concat parts joined by +, an untracked axis as such."""
    if layout is None:
        return "untracked"
    if isinstance(layout, int):
        return str(layout)
    if isinstance(layout, Atom):
        return f"S{layout.space}"
    if isinstance(layout, Grid):
        return " x ".join(layout_text(f) for f in layout.factors)
    joined = " + ".join(layout_text(p) for p in layout.parts)
    return f"{type(layout).__name__.lower()}({joined})"


def make_grid(factors: list[Factor]) -> Layout | None:
    """Normalised Grid: flattens nested grids, merges adjacent ints, drops 1s; None if untracked."""
    flat: list[Layout | int] = []
    for factor in factors:
        items = factor.factors if isinstance(factor, Grid) else (factor,)
        for item in items:
            if item is None or item == 1:
                continue
            if isinstance(item, int) and flat and isinstance(flat[-1], int):
                flat[-1] *= item
            else:
                flat.append(item)
    if not any(not isinstance(f, int) for f in flat):
        return None
    return flat[0] if len(flat) == 1 else Grid(tuple(flat))


def grid_factors(layout: Layout | None, size: int) -> list[Layout | int]:
    """The row-major factors of an axis of ``size`` positions with this layout."""
    if layout is None:
        return [size] if size != 1 else []
    if isinstance(layout, Grid):
        return list(layout.factors)
    return [layout]


def layout_width(layout: Factor, leaf_width: Callable[[int], int]) -> int:
    """Positions of an axis with this layout, given each space's width."""
    if layout is None:
        return 1
    if isinstance(layout, int):
        return layout
    if isinstance(layout, Atom):
        return leaf_width(layout.space)
    if isinstance(layout, Grid):
        return prod(layout_width(f, leaf_width) for f in layout.factors)
    if isinstance(layout, Interleave | Concat):
        return sum(layout_width(p, leaf_width) for p in layout.parts)
    if isinstance(layout, Stacked):
        return len(layout.parts)
    return layout_width(layout.parts[0], leaf_width)


def leaves(layout: Layout | None) -> list[int]:
    """Space ids of all atoms in a layout, in order."""
    if layout is None or isinstance(layout, int):
        return []
    if isinstance(layout, Atom):
        return [layout.space]
    children = layout.factors if isinstance(layout, Grid) else layout.parts
    return [s for child in children for s in leaves(child)]


def nested(layout: Factor) -> list[Factor]:
    """A layout and every layout inside it."""
    if layout is None or isinstance(layout, int | Atom):
        return [layout]
    children = layout.factors if isinstance(layout, Grid) else layout.parts
    return [layout, *(inner for child in children for inner in nested(child))]


class LayoutConflict(Exception):
    """Two layouts that must be equal cannot be made equal (internal; becomes a barrier)."""


@dataclass
class SpaceTable:
    """Union-find over spaces with widths, fixed flags and refinements."""

    parent: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    fixed: dict[int, list[str]] = field(default_factory=dict)
    refinement: dict[int, Layout] = field(default_factory=dict)

    def new(self, width: int, origin: str) -> Atom:
        self.parent.append(len(self.parent))
        self.widths.append(int(width))
        self.origins.append(origin)
        return Atom(len(self.parent) - 1)

    def find(self, space: int) -> int:
        root = space
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[space] != root:
            self.parent[space], space = root, self.parent[space]
        return root

    def resolve(self, layout: Factor) -> Factor:
        """The layout in terms of current leaf spaces (roots without refinement)."""
        if layout is None or isinstance(layout, int):
            return layout
        if isinstance(layout, Atom):
            root = self.find(layout.space)
            if root in self.refinement:
                return self.resolve(self.refinement[root])
            return Atom(root)
        if isinstance(layout, Grid):
            return make_grid([self.resolve(f) for f in layout.factors])
        return type(layout)(tuple(self.resolve(p) for p in layout.parts))

    def width(self, layout: Factor) -> int:
        return layout_width(layout, lambda space: self.widths[self.find(space)])

    def fix(self, layout: Factor, reason: str) -> None:
        for space in leaves(self.resolve(layout)):
            reasons = self.fixed.setdefault(space, [])
            if reason not in reasons:
                reasons.append(reason)

    def is_fixed(self, space: int) -> bool:
        return self.find(space) in self.fixed

    def refine(self, space: int, fresh: Layout) -> Layout:
        """Restrict a leaf space to the structure ``fresh``, a layout over new spaces."""
        root = self.find(space)
        self.refinement[root] = fresh
        if root in self.fixed:
            for reason in self.fixed.pop(root):
                self.fix(fresh, reason)
        return fresh

    def _fresh_like(self, shape: Factor, origin: str) -> Factor:
        if shape is None or isinstance(shape, int):
            return shape
        if isinstance(shape, Atom):
            return self.new(self.width(shape), origin)
        if isinstance(shape, Grid):
            return Grid(tuple(self._fresh_like(f, origin) for f in shape.factors))
        return type(shape)(tuple(self._fresh_like(p, origin) for p in shape.parts))

    def unify(self, a: Factor, b: Factor) -> None:
        """Make two layouts describe the same features; raises LayoutConflict if impossible."""
        a, b = self.resolve(a), self.resolve(b)
        if a == b:
            return
        if a is None or b is None or isinstance(a, int) or isinstance(b, int):
            raise LayoutConflict(f"tracked channels meet untracked ones ({layout_text(a)} vs {layout_text(b)})")
        if self.width(a) != self.width(b):
            raise LayoutConflict(f"widths differ ({self.width(a)} vs {self.width(b)})")
        if isinstance(a, Atom) and isinstance(b, Atom):
            self._union(a.space, b.space)
        elif isinstance(a, Atom) or isinstance(b, Atom):
            atom, other = (a, b) if isinstance(a, Atom) else (b, a)
            fresh = self._fresh_like(other, self.origins[self.find(atom.space)])
            self.unify(self.refine(atom.space, fresh), other)
        elif type(a) is type(b):
            self._unify_children(a, b)
        else:
            raise LayoutConflict(f"incompatible structures {type(a).__name__} and {type(b).__name__}")

    def _unify_children(self, a: Layout, b: Layout) -> None:
        left = a.factors if isinstance(a, Grid) else a.parts
        right = b.factors if isinstance(b, Grid) else b.parts
        if len(left) != len(right) or any(self.width(x) != self.width(y) for x, y in zip(left, right)):
            raise LayoutConflict(f"structures of different shape ({a} vs {b})")
        for x, y in zip(left, right):
            if isinstance(x, int) or isinstance(y, int):
                if x != y:
                    raise LayoutConflict(f"replica axis meets channels ({x} vs {y})")
                continue
            self.unify(x, y)

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        # keep the older space as root so ids stay in creation order
        ra, rb = min(ra, rb), max(ra, rb)
        self.parent[rb] = ra
        reasons = self.fixed.pop(rb, [])
        refined_a, refined_b = self.refinement.get(ra), self.refinement.pop(rb, None)
        if refined_b is not None:
            if refined_a is None:
                self.refinement[ra] = refined_b
            else:
                self.unify(refined_a, refined_b)
        for reason in reasons:
            self.fix(Atom(ra), reason)
        if ra in self.fixed and ra in self.refinement:
            for reason in self.fixed.pop(ra):
                self.fix(self.refinement[ra], reason)

    def split_factor(self, factor: Layout | int, size: int) -> tuple[Layout | int, Layout | int]:
        """Split one row-major factor into an outer factor of ``size`` and the rest."""
        whole = self.width(factor)
        if whole % size:
            raise LayoutConflict(f"cannot split {whole} positions into groups of {size}")
        if isinstance(factor, int):
            return size, factor // size
        factor = self.resolve(factor)
        if isinstance(factor, Atom):
            origin = self.origins[factor.space]
            outer, inner = self.new(size, origin), self.new(whole // size, origin)
            self.refine(factor.space, Grid((outer, inner)))
            return outer, inner
        if isinstance(factor, Concat) and len(factor.parts) == size:
            if len({self.width(p) for p in factor.parts}) != 1:
                raise LayoutConflict("reshaping a concat of unequal parts")
            return Stacked(factor.parts), StackBody(factor.parts)
        if isinstance(factor, StackBody):  # each part alike: (3, D) -> (3, heads, head_dim)
            halves = [self.split_factor(part, size) for part in factor.parts]
            return StackBody(tuple(o for o, _ in halves)), StackBody(tuple(i for _, i in halves))
        if isinstance(factor, Grid):
            raise LayoutConflict("splitting a grid factor across axes")
        raise LayoutConflict(f"cannot split {type(factor).__name__} across axes")

    def leaf_spaces(self) -> list[int]:
        """Current leaf spaces in creation order."""
        return [s for s in range(len(self.parent)) if self.find(s) == s and s not in self.refinement]

    def cut(self, layout: Layout | None, sizes: list[int]) -> list[Layout | None]:
        """Cut an axis into consecutive pieces of ``sizes``, refining spaces at the cuts."""
        layout = self.resolve(layout)
        if layout is None:
            return [None] * len(sizes)
        if len(sizes) == 1:
            return [layout]
        if isinstance(layout, Atom):
            origin = self.origins[layout.space]
            pieces = [self.new(size, origin) for size in sizes]
            self.refine(layout.space, Concat(tuple(pieces)))
            return pieces
        if not isinstance(layout, Concat):
            raise LayoutConflict(f"cannot cut a {type(layout).__name__} layout along its axis")
        pieces: list[list[Layout]] = [[] for _ in sizes]
        bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        start = 0
        for part in layout.parts:
            width = self.width(part)
            inner = [min(max(b - start, 0), width) for b in bounds]
            widths = [inner[k + 1] - inner[k] for k in range(len(sizes))]
            used = [k for k, w in enumerate(widths) if w]
            for k, piece in zip(used, self.cut(part, [widths[k] for k in used])):
                pieces[k].append(piece)
            start += width
        return [p[0] if len(p) == 1 else Concat(tuple(p)) for p in pieces]
