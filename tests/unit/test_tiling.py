import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepdewedge.tiling import (
    blending_weights,
    blending_window_1d,
    extract_windows,
    grid_starts,
    weight_normaliser_1d,
    window_starts,
)

SHAPE = (20, 37, 29)


def _reassemble(tiles, starts, shape, window_zyx, overlap_zyx):
    """Weighted sum of tiles divided by the separable normaliser (the refine recipe)."""
    weights = blending_weights(window_zyx, overlap_zyx).numpy()
    out = np.zeros(shape, dtype=np.float32)
    for tile, (z, y, x) in zip(tiles.numpy(), starts.tolist(), strict=True):
        wd, wh, ww = window_zyx
        out[z : z + wd, y : y + wh, x : x + ww] += weights * tile
    norms = [
        weight_normaliser_1d(size, window, torch.unique(starts[:, axis]), overlap).numpy()
        for axis, (size, window, overlap) in enumerate(
            zip(shape, window_zyx, overlap_zyx, strict=True)
        )
    ]
    return out / (norms[0][:, None, None] * norms[1][None, :, None] * norms[2][None, None, :])


@pytest.mark.parametrize(
    ("size", "window", "stride", "expected"),
    [(10, 4, 3, [0, 3, 6]), (12, 4, 4, [0, 4, 8]), (9, 4, 5, [0, 5]), (10, 10, 3, [0])],
)
def test_window_starts_examples(size, window, stride, expected):
    assert window_starts(size, window, stride) == expected


@settings(max_examples=200, deadline=None)
@given(data=st.data(), size=st.integers(1, 300))
def test_window_starts_cover_the_axis_without_duplicates(data, size):
    window = data.draw(st.integers(1, size))
    stride = data.draw(st.integers(1, 2 * window))
    starts = window_starts(size, window, stride)

    assert starts[0] == 0
    assert starts[-1] == size - window
    assert all(b > a for a, b in zip(starts, starts[1:], strict=False))
    assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))
    covered = np.zeros(size, dtype=bool)
    for start in starts:
        covered[start : start + window] = True
    if stride <= window:
        assert covered.all()


def test_window_starts_rejects_window_larger_than_axis():
    with pytest.raises(ValueError, match=r"window \(64\) is larger than the axis \(48\)"):
        window_starts(48, 64, 32)


@pytest.mark.parametrize(("size", "window", "stride"), [(10, 4, 0), (10, 0, 1), (0, 1, 1)])
def test_window_starts_rejects_non_positive_arguments(size, window, stride):
    with pytest.raises(ValueError):
        window_starts(size, window, stride)


def test_grid_starts_is_cartesian_product_z_slowest():
    starts = grid_starts(SHAPE, (8, 16, 12), (6, 10, 9))
    per_axis = [
        window_starts(n, w, s) for n, w, s in zip(SHAPE, (8, 16, 12), (6, 10, 9), strict=True)
    ]
    expected = [[z, y, x] for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]]

    assert starts.dtype == torch.int64
    assert starts.shape == (len(expected), 3)
    assert starts.tolist() == expected


def test_grid_starts_error_names_the_axis():
    with pytest.raises(ValueError, match="along z"):
        grid_starts((8, 37, 29), (16, 16, 16), (8, 8, 8))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_extract_windows_matches_slicing(as_tensor):
    rng = np.random.default_rng(0)
    volume = rng.standard_normal(SHAPE).astype(np.float64)
    starts = grid_starts(SHAPE, (8, 16, 12), (5, 7, 9))
    source = torch.from_numpy(volume) if as_tensor else volume

    tiles = extract_windows(source, starts, (8, 16, 12))

    assert tiles.dtype == torch.float32
    assert tiles.shape == (len(starts), 8, 16, 12)
    for tile, (z, y, x) in zip(tiles.numpy(), starts.tolist(), strict=True):
        expected = volume[z : z + 8, y : y + 16, x : x + 12].astype(np.float32)
        np.testing.assert_array_equal(tile, expected)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("window_zyx", [(8, 16, 12), (30, 50, 40)])
def test_extract_windows_reflect_matches_numpy_reflect_padding(as_tensor, window_zyx):
    rng = np.random.default_rng(1)
    volume = rng.standard_normal(SHAPE).astype(np.float32)
    pad = 60
    padded = np.pad(volume, pad, mode="reflect")
    starts = torch.tensor([[-5, -9, 20], [15, 30, -3], [-20, 0, 0], [3, 4, 5]])
    source = torch.from_numpy(volume) if as_tensor else volume

    tiles = extract_windows(source, starts, window_zyx, reflect=True)

    wd, wh, ww = window_zyx
    for tile, (z, y, x) in zip(tiles.numpy(), (starts + pad).tolist(), strict=True):
        np.testing.assert_array_equal(tile, padded[z : z + wd, y : y + wh, x : x + ww])


def test_extract_windows_reflect_on_single_voxel_axis():
    volume = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    tiles = extract_windows(volume, [[-2, 0, 0]], (4, 2, 3), reflect=True)
    np.testing.assert_array_equal(tiles[0].numpy(), np.broadcast_to(volume, (4, 2, 3)))


def test_extract_windows_rejects_windows_outside_the_volume():
    volume = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="along z"):
        extract_windows(volume, [[15, 0, 0]], (8, 8, 8))
    with pytest.raises(ValueError, match="along x"):
        extract_windows(volume, [[0, 0, -1]], (8, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        extract_windows(volume, [[0, 0]], (8, 8, 8))


def test_extract_windows_with_no_starts():
    tiles = extract_windows(np.zeros(SHAPE), [], (4, 5, 6))
    assert tiles.shape == (0, 4, 5, 6)


def test_blending_window_is_positive_symmetric_and_flat_in_the_middle():
    taper = blending_window_1d(16, 5)
    assert taper.shape == (16,)
    assert taper.dtype == torch.float32
    assert (taper > 0).all()
    torch.testing.assert_close(taper, taper.flip(0))
    torch.testing.assert_close(taper[5:11], torch.ones(6))
    assert (taper[:5].diff() > 0).all()
    torch.testing.assert_close(blending_window_1d(7, 0), torch.ones(7))
    assert (blending_window_1d(6, 6) > 0).all()


@pytest.mark.parametrize(("window", "overlap"), [(16, 8), (16, 3), (9, 4), (12, 1)])
def test_blending_windows_on_a_regular_grid_are_a_partition_of_unity(window, overlap):
    stride = window - overlap
    starts = [k * stride for k in range(6)]
    total = weight_normaliser_1d(starts[-1] + window, window, starts, overlap)
    torch.testing.assert_close(total[overlap:-overlap], torch.ones(len(total) - 2 * overlap))


@pytest.mark.parametrize(("window", "overlap"), [(0, 0), (8, -1), (8, 9)])
def test_blending_window_rejects_bad_arguments(window, overlap):
    with pytest.raises(ValueError):
        blending_window_1d(window, overlap)


def test_blending_weights_are_the_outer_product():
    weights = blending_weights((6, 8, 10), (2, 3, 4))
    wz, wy, wx = blending_window_1d(6, 2), blending_window_1d(8, 3), blending_window_1d(10, 4)
    torch.testing.assert_close(weights, torch.einsum("i,j,k->ijk", wz, wy, wx))


def test_weight_normaliser_rejects_starts_outside_the_axis():
    with pytest.raises(ValueError, match="outside an axis of 10"):
        weight_normaliser_1d(10, 4, [0, 7], 2)


def _shape_window_overlap():
    axis = st.integers(1, 24).flatmap(
        lambda size: st.integers(1, size).flatmap(
            lambda window: st.tuples(st.just(size), st.just(window), st.integers(0, window - 1))
        )
    )
    return st.tuples(axis, axis, axis)


@settings(max_examples=60, deadline=None)
@given(axes=_shape_window_overlap())
def test_separable_normaliser_equals_the_summed_weight_volume(axes):
    shape, window_zyx, overlap_zyx = (tuple(v) for v in zip(*axes, strict=True))
    strides = [w - o for w, o in zip(window_zyx, overlap_zyx, strict=True)]
    starts = grid_starts(shape, window_zyx, strides)
    weights = blending_weights(window_zyx, overlap_zyx).double()
    brute = torch.zeros(shape, dtype=torch.float64)
    wd, wh, ww = window_zyx
    for z, y, x in starts.tolist():
        brute[z : z + wd, y : y + wh, x : x + ww] += weights
    norms = [
        weight_normaliser_1d(n, w, torch.unique(starts[:, i]), o).double()
        for i, (n, w, o) in enumerate(zip(shape, window_zyx, overlap_zyx, strict=True))
    ]
    torch.testing.assert_close(brute, torch.einsum("i,j,k->ijk", *norms), rtol=1e-5, atol=0)


@settings(max_examples=60, deadline=None)
@given(axes=_shape_window_overlap(), seed=st.integers(0, 2**16), as_tensor=st.booleans())
def test_extract_then_blend_reproduces_the_volume(axes, seed, as_tensor):
    shape, window_zyx, overlap_zyx = (tuple(v) for v in zip(*axes, strict=True))
    strides = [w - o for w, o in zip(window_zyx, overlap_zyx, strict=True)]
    volume = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    starts = grid_starts(shape, window_zyx, strides)

    tiles = extract_windows(torch.from_numpy(volume) if as_tensor else volume, starts, window_zyx)
    restored = _reassemble(tiles, starts, shape, window_zyx, overlap_zyx)

    np.testing.assert_allclose(restored, volume, rtol=0, atol=1e-5)


def test_extract_then_blend_reproduces_a_memmapped_volume(tmp_path):
    rng = np.random.default_rng(2)
    volume = np.memmap(tmp_path / "tomo.raw", dtype=np.float32, mode="w+", shape=SHAPE)
    volume[:] = rng.standard_normal(SHAPE)
    volume.flush()
    readonly = np.memmap(tmp_path / "tomo.raw", dtype=np.float32, mode="r", shape=SHAPE)
    window_zyx, overlap_zyx = (8, 16, 12), (3, 6, 5)
    starts = grid_starts(
        SHAPE, window_zyx, [w - o for w, o in zip(window_zyx, overlap_zyx, strict=True)]
    )

    tiles = extract_windows(readonly, starts, window_zyx)
    restored = _reassemble(tiles, starts, SHAPE, window_zyx, overlap_zyx)

    np.testing.assert_allclose(restored, np.asarray(readonly), rtol=0, atol=1e-5)
