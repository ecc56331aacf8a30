import warnings

import mrcfile
import numpy as np
import pytest
import torch

from deepdewedge.io.checkpoint import load_checkpoint, save_checkpoint
from deepdewedge.io.mrc import InputError, read_volume, write_volume


def test_round_trip_keeps_voxel_size_and_values(tmp_path):
    vol = np.random.default_rng(0).standard_normal((5, 6, 7)).astype(np.float32)
    path = write_volume(tmp_path / "sub" / "v.mrc", vol, voxel_size=13.02)
    back, voxel = read_volume(path)
    assert np.array_equal(back, vol) and voxel == pytest.approx(13.02, rel=1e-5)
    mapped, _ = read_volume(path, mmap=True)
    assert np.array_equal(np.asarray(mapped), vol)
    assert not list(path.parent.glob(".*tmp"))  # no temporary left behind


def test_other_modes_are_converted(tmp_path):
    path = tmp_path / "int.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    vol, voxel = read_volume(path, mmap=True)
    assert vol.dtype == np.float32 and vol[1, 2, 3] == 23 and voxel == 1.0


def _bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.mrc"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
        return path
    if kind == "empty":
        path.write_bytes(b"")
        return path
    data = np.ones((4, 5, 6), dtype=np.float32)
    if kind == "nan":
        data[1, 2, 3] = np.nan
    if kind == "image":
        data = data[0]
    with warnings.catch_warnings(), mrcfile.new(path) as mrc:
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN we write on purpose
        mrc.set_data(data)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-50])
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("empty", "not a readable MRC"),
        ("truncated", "not a readable MRC"),
        ("nan", "NaN"),
        ("image", "expected a 3D volume"),
    ],
)
def test_bad_volumes_give_one_line_errors(tmp_path, kind, message):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(InputError) as err:
        read_volume(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_checkpoint_round_trip_and_errors(tmp_path):
    path = save_checkpoint(tmp_path / "a.ckpt", {"x": torch.arange(3)})
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="unreadable or truncated"):
        load_checkpoint(bad)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(InputError, match="not a DeepDeWedge checkpoint"):
        load_checkpoint(other)
    with pytest.raises(InputError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.ckpt")


def test_outputs_get_the_usual_file_mode_not_a_private_one(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        path = write_volume(tmp_path / "v.mrc", np.zeros((4, 4, 4), np.float32))
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
