"""prepare-data writes its banks one tomogram at a time, with the crops of the seeded windows."""

import json

import mrcfile
import numpy as np
import pytest
import torch

from deepdewedge import prepare_data
from deepdewedge.config import step_config
from deepdewedge.fit.bank import extract_crops, select_subtomos
from deepdewedge.io.errors import InputError
from deepdewedge.pipeline.prepare import load_banks

SHAPES = [(16, 30, 26), (20, 24, 24), (18, 28, 32)]


def _write(path, data):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data, dtype=np.float32))
    return path


@pytest.fixture
def pairs(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i, shape in enumerate(SHAPES):
        signal = 3 + 2 * rng.standard_normal(shape)
        files.append(
            tuple(
                _write(tmp_path / f"t{i}_tomo{h}.mrc", signal + rng.standard_normal(shape))
                for h in (0, 1)
            )
        )
    return files


def _config(tmp_path, pairs, **options):
    return step_config(
        "prepare_data",
        overrides={
            "project_dir": tmp_path / "proj",
            "tomo0_files": [p[0] for p in pairs],
            "tomo1_files": [p[1] for p in pairs],
            "subtomo_size": 8,
            "subtomo_extraction_strides": [6, 7, 8],
            "val_fraction": 0.2,
            "seed": 11,
            **options,
        },
    )


def _in_memory(config):
    """The banks as they were built before: every tomogram's crops, concatenated."""
    generator = torch.Generator().manual_seed(config.seed)
    parts = {key: [] for key in ("fit0", "fit1", "val0", "val1")}
    records = []
    for i, files in enumerate(zip(config.tomo0_files, config.tomo1_files, strict=True)):
        tomos = [mrcfile.read(f).astype(np.float32) for f in files]
        if config.standardize_full_tomos:
            tomos = [(t - t.astype(np.float64).mean()) / t.astype(np.float64).std() for t in tomos]
        sel = select_subtomos(
            tomos[0].shape,
            subtomo_size=8,
            strides_zyx=config.strides,
            mask=None,
            min_nonzero_mask_fraction=0.0,
            val_fraction=config.val_fraction,
            generator=generator,
        )
        for half, tomo in zip("01", tomos, strict=True):
            crops = extract_crops(tomo.astype(np.float32), sel.starts, subtomo_size=8)
            parts["fit" + half].append(crops[~sel.is_val])
            parts["val" + half].append(crops[sel.is_val])
        records += [
            {"tomo_index": i, "start_zyx": st, "split": "val" if v else "fitting"}
            for st, v in zip(sel.starts.tolist(), sel.is_val.tolist(), strict=True)
        ]
    return {k: torch.cat(v) for k, v in parts.items()}, records


@pytest.mark.parametrize("standardize", [False, True])
def test_banks_hold_the_crops_of_the_seeded_windows(tmp_path, pairs, standardize):
    config = _config(tmp_path, pairs, standardize_full_tomos=standardize)
    result = prepare_data(config)
    expected, records = _in_memory(config)
    assert (result["n_fitting"], result["n_val"]) == (len(expected["fit0"]), len(expected["val0"]))
    banks, meta = load_banks(tmp_path / "proj/subtomos", subtomo_size=8)
    assert meta["subtomos"] == records and meta["bank_size"] == 14 and meta["bank_id"]
    for name, rows in expected.items():
        got = getattr(banks, name)[:]
        assert got.shape == rows.shape
        torch.testing.assert_close(got, rows, atol=1e-5 if standardize else 0, rtol=1e-5)
    assert not list((tmp_path / "proj").rglob(".*.tmp"))


def test_a_failure_midway_keeps_the_banks_prepared_before(tmp_path, pairs):
    prepare_data(_config(tmp_path, pairs))
    folder = tmp_path / "proj/subtomos"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    # The last tomogram's second half equals its first: found only when the pair is read.
    _write(pairs[2][1], mrcfile.read(pairs[2][0]))
    with pytest.raises(InputError, match="identical to"):
        prepare_data(_config(tmp_path, pairs, overwrite=True, seed=12))
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # no .tmp
    assert json.loads((folder / "metadata.json").read_text())["config"]["seed"] == 11
