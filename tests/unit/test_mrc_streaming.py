"""Streaming MRC access: lazy maps of any mode, volumes filled in place and published whole."""

import mmap
import sys

import mrcfile
import numpy as np
import pytest
import torch

from deepdewedge.io import mrc as mrc_module
from deepdewedge.io.atomic import remove_stale_temporaries
from deepdewedge.io.mrc import (
    InputError,
    map_volume,
    new_volume,
    read_volume,
    release_planes,
)

DROPS_PAGES = sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED")


def test_map_volume_keeps_the_stored_mode(tmp_path):
    path = tmp_path / "int.mrc"
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5) - 30
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 4.2
    volume, voxel = map_volume(path)
    assert isinstance(volume, np.memmap) and volume.dtype == np.int16
    assert np.array_equal(volume, data) and voxel == pytest.approx(4.2)


def test_map_volume_reads_big_endian_files(tmp_path):
    path = tmp_path / "big.mrc"
    data = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(">f4")
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
    volume, _ = map_volume(path)
    assert np.array_equal(np.asarray(volume, dtype=np.float32), data.astype(np.float32))


def test_map_volume_rejects_what_read_volume_rejects(tmp_path):
    path = tmp_path / "image.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.zeros((4, 5), np.float32))
    with pytest.raises(InputError, match="expected a 3D volume"):
        map_volume(path)
    with pytest.raises(InputError, match="no such file"):
        map_volume(tmp_path / "missing.mrc")


def test_new_volume_is_published_whole_with_header_and_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(mrc_module, "_SLAB_VOXELS", 7)  # statistics over many slabs
    data = np.random.default_rng(1).standard_normal((9, 4, 3)).astype(np.float32) * 3 + 1
    path = tmp_path / "sub" / "out.mrc"
    with new_volume(path, data.shape, voxel_size=6.25) as out:
        assert isinstance(out, np.memmap) and out.dtype == np.float32
        assert not path.exists() and len(list(path.parent.glob(".out.mrc.*.tmp"))) == 1
        out[:] = data
    back, voxel = read_volume(path)
    assert np.array_equal(back, data) and voxel == pytest.approx(6.25)
    with mrcfile.open(path) as mrc:
        assert mrc.header.dmin == data.min() and mrc.header.dmax == data.max()
        assert mrc.header.dmean == pytest.approx(data.mean(dtype=np.float64), abs=1e-6)
        assert mrc.header.rms == pytest.approx(data.std(dtype=np.float64), rel=1e-6)
    assert list(path.parent.iterdir()) == [path]


def test_a_failed_new_volume_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.mrc"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="stopped"), new_volume(path, (2, 3, 4)) as out:
        out[:] = 1.0
        raise RuntimeError("stopped")
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


def test_remove_stale_temporaries_only_of_the_target(tmp_path):
    target = tmp_path / "a[1].mrc"
    mine = [tmp_path / ".a[1].mrc.x8_3kq0a.tmp", tmp_path / ".a[1].mrc.abc.tmp"]
    others = [
        tmp_path / ".a[1].mrc.json.x8_3kq0a.tmp",
        tmp_path / ".b.mrc.x8_3kq0a.tmp",
        tmp_path / "a[1].mrc",
    ]
    for path in mine + others:
        path.write_bytes(b"")
    assert sorted(remove_stale_temporaries(target)) == sorted(mine)
    assert all(p.exists() for p in others) and not any(p.exists() for p in mine)
    assert remove_stale_temporaries(tmp_path / "missing" / "x.mrc") == []


def _rss_file_kib():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not DROPS_PAGES, reason="needs Linux madvise(MADV_DONTNEED)")
def test_released_planes_leave_the_resident_set_and_keep_their_data(tmp_path):
    shape = (64, 128, 256)  # 8 MiB; planes of 128 KiB
    data = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    path = tmp_path / "big.mrc"
    with new_volume(path, shape) as out:
        before = _rss_file_kib()
        out[:] = data
        written = _rss_file_kib()
        release_planes(out, 0, 40)
        released = _rss_file_kib()
        assert np.array_equal(out[:41], data[:41])  # faulted back in from the file
        release_planes(out, 0, shape[0])
    assert written - before > 7 * 1024
    assert written - released > 4.5 * 1024  # 40 of 64 planes, in whole pages
    assert np.array_equal(read_volume(path)[0], data)

    volume, _ = map_volume(path)
    np.asarray(volume[16:48]).sum()
    touched = _rss_file_kib()
    release_planes(volume[16:], 0, 32)  # a view: planes 16:48 of the file
    assert touched - _rss_file_kib() > 3.5 * 1024


@pytest.mark.parametrize(
    "volume",
    [np.zeros((4, 5, 6), np.float32), torch.zeros(4, 5, 6), np.zeros((6, 5, 4), np.float32).T],
)
def test_releasing_planes_of_arrays_in_memory_changes_nothing(volume):
    copy = volume.clone() if isinstance(volume, torch.Tensor) else volume.copy()
    release_planes(volume, 0, 4)
    assert (volume == copy).all()


def test_planes_to_release_are_clipped_to_the_volume(tmp_path):
    with new_volume(tmp_path / "a.mrc", (3, 4, 1024)) as out:
        out[:] = 2.0
        for z0, z1 in [(-5, 1), (2, 99), (2, 2), (3, 1)]:
            release_planes(out, z0, z1)
    assert np.array_equal(read_volume(tmp_path / "a.mrc")[0], np.full((3, 4, 1024), 2.0))
