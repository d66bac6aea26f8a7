"""How one HF tensor lays out in one parameter slice, and the box arithmetic that reads or writes part of it.

Every HF <-> parameter transform in mapping.py is a `View`: take a region of the HF tensor (`select`, e.g.
the gate rows of a fused gate_up weight), split each of its dims into finer dims (`split`, e.g. rows
N*H -> (N, H)), permute the fine dims (`perm`, e.g. (out, in) -> (in, out)), and merge runs of them into
the part's dims (`merge`, e.g. the Conv3d (C, T, P, P) -> one patch dim). The "part" is what the
target fills: the parameter leaf at Target.index, shape leaf.shape[len(index):].

`pieces(part_box)` maps a box of the part (one device's shard of it) to HF boxes: a list of `Piece`s,
each an HF box whose elements are exactly one sub-box of the part, so a host reads (or writes) only the
bytes of its own shards. Boxes are tuples of (start, stop) per dim. A sub-box is cut wherever a box
is not one contiguous run of a merged or split dim (rare: the usual shardings cut whole heads or
channels and give one piece).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Piece:
    hf: Box                      # in the full HF tensor
    part: Box                    # in the part
    fine: tuple[int, ...]        # the sub-box's fine-dim lengths, in HF (split) order


def full_box(shape) -> Box:
    return tuple((0, int(n)) for n in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def _groups(sizes: tuple[int, ...], counts: tuple[int, ...]) -> list[tuple[int, ...]]:
    out, i = [], 0
    for c in counts:
        out.append(tuple(sizes[i:i + c]))
        i += c
    return out


def _contiguous(box: Box, sizes: tuple[int, ...]) -> bool:
    """Whether `box` over dims `sizes` is one row-major run: leading dims single, one range, the rest full."""
    j = next((i for i, (a, b) in enumerate(box) if b - a > 1), len(box))
    return all(r == (0, s) for r, s in zip(box[j + 1:], sizes[j + 1:]))


def _run(box: Box, sizes: tuple[int, ...]) -> tuple[int, int]:
    """(start, stop) of a contiguous `box` in the merged (row-major) index."""
    first = np.ravel_multi_index(tuple(a for a, _ in box), sizes) if sizes else 0
    last = np.ravel_multi_index(tuple(b - 1 for _, b in box), sizes) if sizes else 0
    return int(first), int(last) + 1


def _split_run(a: int, b: int, sizes: tuple[int, ...]) -> list[Box]:
    """A run [a, b) of the merged index over `sizes` -> contiguous boxes covering it, in order."""
    if len(sizes) == 1:
        return [((a, b),)]
    inner = math.prod(sizes[1:])
    o0, o1 = a // inner, (b - 1) // inner
    if o0 == o1:
        return [((o0, o0 + 1),) + rest for rest in _split_run(a - o0 * inner, b - o0 * inner, sizes[1:])]
    out, full = [], full_box(sizes[1:])
    if a % inner:
        out += [((o0, o0 + 1),) + rest for rest in _split_run(a % inner, inner, sizes[1:])]
        o0 += 1
    stop = o1 + 1 if b % inner == 0 else o1
    if stop > o0:
        out.append(((o0, stop),) + full)
    if b % inner:
        out += [((o1, o1 + 1),) + rest for rest in _split_run(0, b % inner, sizes[1:])]
    return out


@dataclass(frozen=True)
class View:
    hf_shape: tuple[int, ...]
    select: Box                               # region of the HF tensor, per HF dim
    split: tuple[tuple[int, ...], ...]        # per HF dim: the fine dims it splits into (product = region size)
    perm: tuple[int, ...]                     # part's fine-dim order, as indices into the split order
    merge: tuple[int, ...]                    # per part dim: how many consecutive permuted fine dims it merges

    @property
    def fine_shape(self) -> tuple[int, ...]:
        return tuple(s for group in self.split for s in group)

    @property
    def part_shape(self) -> tuple[int, ...]:
        permuted = tuple(self.fine_shape[p] for p in self.perm)
        return tuple(math.prod(g) for g in _groups(permuted, self.merge))

    # whole tensors -------------------------------------------------------------------------

    def to_part(self, region: np.ndarray) -> np.ndarray:
        """The selected region of the HF tensor (shape box_shape(select)) -> the part."""
        return region.reshape(self.fine_shape).transpose(self.perm).reshape(self.part_shape)

    def to_region(self, part: np.ndarray) -> np.ndarray:
        """The part -> the selected region of the HF tensor (the inverse of to_part)."""
        permuted = tuple(self.fine_shape[p] for p in self.perm)
        region = box_shape(self.select)
        return part.reshape(permuted).transpose(np.argsort(self.perm)).reshape(region)

    # boxes --------------------------------------------------------------------------------

    def pieces(self, part_box: Box) -> list[Piece]:
        """The HF boxes holding exactly the elements of `part_box`, each with its sub-box of the part."""
        fine = self.fine_shape
        permuted = tuple(fine[p] for p in self.perm)
        merge_groups, split_counts = _groups(permuted, self.merge), tuple(len(g) for g in self.split)
        per_dim = [_split_run(a, b, g) for (a, b), g in zip(part_box, merge_groups)]
        inverse = np.argsort(self.perm)
        out = []
        for combo in itertools.product(*per_dim):
            boxed = tuple(r for group in combo for r in group)             # permuted fine order
            for sub in self._refine(tuple(boxed[i] for i in inverse), split_counts, merge_groups):
                out.append(self._piece(sub, split_counts, merge_groups))
        return out

    def _refine(self, box: Box, split_counts, merge_groups) -> list[Box]:
        """Cuts a fine box (split order) into single values along a dim until every HF dim and every part
        dim sees one contiguous run."""
        permuted = tuple(box[p] for p in self.perm)
        checks = [(box, split_counts, self.split, lambda i: i),
                  (permuted, self.merge, merge_groups, lambda i: self.perm[i])]
        for dims, counts, sizes, to_split_order in checks:
            first = 0
            for count, group_sizes in zip(counts, sizes):
                group = dims[first:first + count]
                if not _contiguous(group, group_sizes):
                    j = next(i for i, (a, b) in enumerate(group) if b - a > 1)
                    dim = to_split_order(first + j)
                    a, b = box[dim]
                    return [s for v in range(a, b)
                            for s in self._refine(box[:dim] + ((v, v + 1),) + box[dim + 1:], split_counts,
                                                  merge_groups)]
                first += count
        return [box]

    def _piece(self, box: Box, split_counts, merge_groups) -> Piece:
        hf = tuple((s0 + a, s0 + b) for (s0, _), (a, b) in
                   zip(self.select, (_run(g, s) for g, s in zip(_groups(box, split_counts), self.split))))
        permuted = tuple(box[p] for p in self.perm)
        part = tuple(_run(g, s) for g, s in zip(_groups(permuted, self.merge), merge_groups))
        return Piece(hf, part, box_shape(box))

    def read(self, piece: Piece, block: np.ndarray) -> np.ndarray:
        """HF block (shape box_shape(piece.hf)) -> the part's sub-box (shape box_shape(piece.part))."""
        return block.reshape(piece.fine).transpose(self.perm).reshape(box_shape(piece.part))

    def write(self, piece: Piece, block: np.ndarray) -> np.ndarray:
        """The part's sub-box -> its HF block (the inverse of read)."""
        permuted = tuple(piece.fine[p] for p in self.perm)
        return block.reshape(permuted).transpose(np.argsort(self.perm)).reshape(box_shape(piece.hf))


def view(hf_shape, split=None, perm=None, merge=None, select=None) -> View:
    """A View with defaults: the whole tensor, no split, identity order, no merge."""
    hf_shape = tuple(int(d) for d in hf_shape)
    select = tuple(select) if select is not None else full_box(hf_shape)
    split = tuple(tuple(g) for g in split) if split is not None else tuple((b - a,) for a, b in select)
    n = sum(len(g) for g in split)
    perm = tuple(perm) if perm is not None else tuple(range(n))
    merge = tuple(merge) if merge is not None else (1,) * n
    for group, (a, b) in zip(split, select):
        assert math.prod(group) == b - a, (hf_shape, split, select)
    assert sorted(perm) == list(range(n)) and sum(merge) == n, (perm, merge)
    return View(hf_shape, select, split, perm, merge)
