"""Mask generators and the pack / unpack helpers."""

from __future__ import annotations

import pytest
import torch

from data2vec.masking import (
    beit_block_mask,
    block_mask_2d,
    draw_masks,
    gather_tokens,
    mask_to_indices,
    random_mask,
    replace_masked,
    restore_tokens,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ BEiT block masking


@pytest.mark.parametrize("grid, num_masked, min_patches", [((14, 14), 75, 16), ((4, 4), 8, 2), ((6, 5), 13, 4)])
def test_beit_block_mask_never_exceeds_budget(grid, num_masked, min_patches) -> None:
    for seed in range(15):
        m = beit_block_mask(5, grid, num_masked, generator=gen(seed), min_patches=min_patches)
        assert m.shape == (5, grid[0] * grid[1])
        assert m.dtype == torch.bool
        counts = m.sum(1)
        assert bool((counts <= num_masked).all()), counts
        assert bool((counts > 0).all())


def test_beit_block_mask_usually_reaches_budget_and_is_blocky() -> None:
    # On a 14x14 grid with BEiT's settings the budget is nearly reached (it can fall a few
    # patches short when no block of >= min_patches fits the remaining budget).
    m = beit_block_mask(16, (14, 14), 75, generator=gen(0), min_patches=16)
    counts = m.sum(1).float()
    assert counts.mean() >= 70
    assert (counts == 75).float().mean() >= 0.4
    # Blocks: masked patches have many masked 4-neighbours (random masking would give ~38%).
    grid = m.view(16, 14, 14).float()
    nb = torch.zeros_like(grid)
    nb[:, 1:] += grid[:, :-1]
    nb[:, :-1] += grid[:, 1:]
    nb[:, :, 1:] += grid[:, :, :-1]
    nb[:, :, :-1] += grid[:, :, 1:]
    frac = (nb * grid).sum() / (grid.sum() * 4)
    assert frac > 0.55


def test_beit_block_mask_rejects_bad_budget() -> None:
    with pytest.raises(ValueError):
        beit_block_mask(1, (4, 4), 0, generator=gen(0))
    with pytest.raises(ValueError):
        beit_block_mask(1, (4, 4), 17, generator=gen(0))


# ------------------------------------------------------------------ data2vec 2.0 block masking


def test_block_mask_2d_inverse_base_numbers() -> None:
    # data2vec 2.0 image base: 14x14, R=0.8 -> 39 visible, 157 masked, for every row and seed.
    for seed in range(20):
        m = block_mask_2d(8, (14, 14), 0.8, generator=gen(seed), block_size=3, mask_prob_adjust=0.07)
        assert m.shape == (8, 196)
        assert m.sum(1).tolist() == [157] * 8
        assert (~m).sum(1).tolist() == [39] * 8


@pytest.mark.parametrize(
    "grid, p, block, adjust",
    [((4, 4), 0.75, 2, 0.05), ((14, 14), 0.75, 3, 0.1), ((7, 9), 0.6, 3, 0.0), ((4, 4), 0.65, 2, 0.05)],
)
def test_block_mask_2d_inverse_exact_count(grid, p, block, adjust) -> None:
    L = grid[0] * grid[1]
    expected = L - int(L * (1 - p))
    for seed in range(30):
        m = block_mask_2d(4, grid, p, generator=gen(seed), block_size=block, mask_prob_adjust=adjust)
        assert m.sum(1).tolist() == [expected] * 4


@pytest.mark.parametrize("grid, p", [((14, 14), 0.5), ((4, 4), 0.75), ((5, 7), 0.3), ((4, 4), 0.6)])
def test_block_mask_2d_non_inverse_exact_count(grid, p) -> None:
    L = grid[0] * grid[1]
    for seed in range(30):
        m = block_mask_2d(4, grid, p, generator=gen(seed), block_size=2, mask_prob_adjust=0.05, inverse=False)
        assert m.sum(1).tolist() == [int(L * p)] * 4


def test_block_mask_2d_blocks_are_centred() -> None:
    # Odd blocks are centred on their centre (offset block_size // 2), so with clamping the
    # coverage of the grid is mirror-symmetric: the top row is masked as often as the bottom row.
    m = block_mask_2d(4000, (7, 7), 0.3, generator=gen(0), block_size=3, mask_prob_adjust=0.0, inverse=False)
    freq = m.view(-1, 7, 7).float().mean(0)
    assert abs(float(freq[0].mean() - freq[-1].mean())) < 0.03
    assert abs(float(freq[:, 0].mean() - freq[:, -1].mean())) < 0.03
    torch.testing.assert_close(freq, freq.flip(0).flip(1), atol=0.06, rtol=0)


def test_block_mask_2d_visible_set_is_blocky() -> None:
    # In inverse mode blocks mark the visible patches: visible patches cluster.
    m = block_mask_2d(64, (14, 14), 0.8, generator=gen(3), block_size=3, mask_prob_adjust=0.07)
    vis = (~m).view(64, 14, 14).float()
    nb = torch.zeros_like(vis)
    nb[:, 1:] += vis[:, :-1]
    nb[:, :-1] += vis[:, 1:]
    nb[:, :, 1:] += vis[:, :, :-1]
    nb[:, :, :-1] += vis[:, :, 1:]
    frac = (nb * vis).sum() / (vis.sum() * 4)
    assert frac > 0.4  # uniformly random visible patches would give ~0.2


# ------------------------------------------------------------------ random masking


@pytest.mark.parametrize("L, p", [(16, 0.75), (512, 0.48), (10, 0.5), (7, 0.3)])
def test_random_mask_exact_count(L: int, p: float) -> None:
    for seed in range(20):
        m = random_mask(6, L, p, generator=gen(seed))
        assert m.shape == (6, L)
        assert m.sum(1).tolist() == [L - int(L * (1 - p))] * 6


def test_random_mask_text_numbers() -> None:
    m = random_mask(3, 512, 0.48, generator=gen(0))
    assert (~m).sum(1).tolist() == [266] * 3


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize(
    "fn",
    [
        lambda g: beit_block_mask(4, (6, 6), 15, generator=g, min_patches=3),
        lambda g: block_mask_2d(4, (6, 6), 0.7, generator=g, block_size=2),
        lambda g: block_mask_2d(4, (6, 6), 0.5, generator=g, block_size=2, inverse=False),
        lambda g: random_mask(4, 36, 0.6, generator=g),
        lambda g: draw_masks("inverse_block", 2, (6, 6), 0.75, generator=g, num_masks=3, mask_length=2),
    ],
)
def test_same_seed_same_mask_different_seed_different(fn) -> None:
    a = fn(gen(123))
    torch.manual_seed(999)  # the global RNG must not matter
    b = fn(gen(123))
    assert torch.equal(a, b)
    others = [fn(gen(s)) for s in range(5)]
    assert any(not torch.equal(a, o) for o in others)
    assert not torch.equal(fn(gen(1)), fn(gen(2)))


def test_rows_are_not_all_identical() -> None:
    m = block_mask_2d(8, (6, 6), 0.7, generator=gen(0), block_size=2)
    assert len({tuple(r.tolist()) for r in m}) > 1


# ------------------------------------------------------------------ draw_masks


@pytest.mark.parametrize("kind", ["beit_block", "inverse_block", "random"])
def test_draw_masks_shape(kind: str) -> None:
    m = draw_masks(kind, 3, (4, 4), 0.5, generator=gen(0), num_masks=2, mask_length=2, min_block_patches=2)
    assert m.shape == (6, 16)
    assert m.dtype == torch.bool
    if kind == "beit_block":
        assert bool((m.sum(1) <= 8).all())
    else:
        assert m.sum(1).tolist() == [8] * 6


def test_draw_masks_rows_of_a_sample_differ() -> None:
    m = draw_masks("random", 2, (4, 4), 0.5, generator=gen(0), num_masks=2)
    assert not torch.equal(m[0], m[1]) or not torch.equal(m[2], m[3])


def test_draw_masks_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown masking kind"):
        draw_masks("nope", 1, (4, 4), 0.5, generator=gen(0))


# ------------------------------------------------------------------ packing helpers


def test_mask_to_indices_rejects_unequal_rows() -> None:
    mask = torch.tensor([[True, False, False, False], [True, True, False, False]])
    with pytest.raises(ValueError, match="same number"):
        mask_to_indices(mask)


def test_ids_keep_are_visible_in_original_order() -> None:
    mask = random_mask(5, 20, 0.6, generator=gen(4))
    ids_keep, ids_restore = mask_to_indices(mask)
    assert ids_keep.shape == (5, 8)
    assert ids_restore.shape == (5, 20)
    for b in range(5):
        expected = torch.nonzero(~mask[b]).flatten()
        assert ids_keep[b].tolist() == expected.tolist()


def test_pack_and_restore_round_trip() -> None:
    g = gen(7)
    mask = block_mask_2d(3, (4, 5), 0.6, generator=g, block_size=2)
    x = torch.randn(3, 20, 6, generator=g)
    ids_keep, ids_restore = mask_to_indices(mask)
    ids_masked = torch.stack([torch.nonzero(r).flatten() for r in mask])
    visible = gather_tokens(x, ids_keep)
    assert visible.shape == (3, 20 - int(mask[0].sum()), 6)
    for b in range(3):
        assert torch.equal(visible[b], x[b][~mask[b]])
    masked = gather_tokens(x, ids_masked)
    assert torch.equal(restore_tokens(visible, masked, ids_restore), x)
    # Fill values land exactly on masked positions.
    fill = torch.full((3, ids_masked.shape[1], 6), -7.0)
    restored = restore_tokens(visible, fill, ids_restore)
    assert torch.equal(restored[mask], torch.full((int(mask.sum()), 6), -7.0))
    assert torch.equal(restored[~mask], x[~mask])


def test_gather_tokens() -> None:
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    ids = torch.tensor([[3, 0], [1, 1]])
    out = gather_tokens(x, ids)
    assert torch.equal(out[0], x[0, [3, 0]])
    assert torch.equal(out[1], x[1, [1, 1]])


def test_replace_masked() -> None:
    x = torch.randn(2, 5, 3, generator=gen(0))
    mask = torch.tensor([[True, False, False, True, False], [False] * 5])
    v = torch.tensor([1.0, 2.0, 3.0])
    out = replace_masked(x, mask, v)
    assert torch.equal(out[0, 0], v) and torch.equal(out[0, 3], v)
    assert torch.equal(out[~mask], x[~mask])
    # per-token values
    vals = torch.randn(2, 5, 3, generator=gen(1))
    out2 = replace_masked(x, mask, vals)
    assert torch.equal(out2[mask], vals[mask])
    assert torch.equal(out2[~mask], x[~mask])
    # the value is cast to the input dtype
    assert replace_masked(x.bfloat16(), mask, v).dtype == torch.bfloat16
