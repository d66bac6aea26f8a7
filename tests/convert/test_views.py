"""views.py: the HF boxes of any box of a part hold exactly its elements, both ways, for hand-made views and
for every entry of the tiny configs' key tables."""
import numpy as np
import pytest

from glmv_jax.config import tiny
from glmv_jax.convert.mapping import key_table
from glmv_jax.convert.views import box_shape, full_box, slices, view

VIEWS = {
    "linear_heads": view((6, 4), split=((2, 3), (4,)), perm=(2, 0, 1)),          # (N*H, D) -> (D, N, H)
    "conv3d_merge": view((5, 2, 3, 2, 2), perm=(1, 2, 3, 4, 0), merge=(4, 1)),   # (Dv, C, T, P, P) -> (CTPP, Dv)
    "up_rows": view((6, 4), select=((3, 6), (0, 4)), perm=(1, 0)),               # fused [gate; up] rows
    "fused_experts": view((4, 6, 3), select=((0, 4), (3, 6), (0, 3)), perm=(0, 2, 1)),
    "split_and_merge": view((12, 5), split=((3, 4), (5,)), perm=(1, 0, 2), merge=(1, 2)),
}


def _random_box(rng, shape):
    box = []
    for n in shape:
        a = int(rng.integers(0, n))
        box.append((a, int(rng.integers(a + 1, n + 1))))
    return tuple(box)


def _check(v, box):
    hf = np.arange(np.prod(v.hf_shape)).reshape(v.hf_shape)
    part = v.to_part(hf[slices(v.select)])
    got = np.full(box_shape(box), -1)
    pieces = v.pieces(box)
    for piece in pieces:
        sub = tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(piece.part, box))
        assert (got[sub] == -1).all()                                  # pieces do not overlap
        got[sub] = v.read(piece, hf[slices(piece.hf)])
        np.testing.assert_array_equal(v.write(piece, got[sub]), hf[slices(piece.hf)])
    np.testing.assert_array_equal(got, part[slices(box)])             # and cover the box exactly
    assert sum(np.prod(box_shape(p.hf)) for p in pieces) == np.prod(box_shape(box))   # no element read twice
    return pieces


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_random_boxes_read_and_write_exactly_their_elements(name):
    v, rng = VIEWS[name], np.random.default_rng(0)
    hf = np.arange(np.prod(v.hf_shape)).reshape(v.hf_shape)
    np.testing.assert_array_equal(v.to_region(v.to_part(hf[slices(v.select)])), hf[slices(v.select)])
    for _ in range(300):
        _check(v, _random_box(rng, v.part_shape))


def test_whole_heads_and_channels_are_one_piece():
    assert len(_check(VIEWS["linear_heads"], ((1, 3), (0, 2), (0, 3)))) == 1      # D rows 1..3, both heads
    assert len(_check(VIEWS["conv3d_merge"], ((0, 24), (2, 4)))) == 1             # Dv channels 2..4
    assert len(_check(VIEWS["linear_heads"], ((0, 4), (0, 2), (1, 2)))) == 2      # one head_dim column: cut


@pytest.mark.parametrize("moe", [False, True])
def test_every_key_table_view(moe):
    rng = np.random.default_rng(1)
    for entry in key_table(tiny(moe=moe)):
        for v in entry.views:
            assert v.hf_shape == entry.shape
            assert len(_check(v, full_box(v.part_shape))) == 1, entry.key
            _check(v, _random_box(rng, v.part_shape))
