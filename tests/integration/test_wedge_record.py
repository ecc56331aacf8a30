"""The missing wedge travels with the data: reconstruct → prepare-data → fit-model → refine."""

import json

import mrcfile
import numpy as np
import pytest
import torch

from deepdewedge import fit_model, prepare_data, refine_tomogram
from deepdewedge.config import step_config
from deepdewedge.fit import loop
from deepdewedge.fit import step as fit_step
from deepdewedge.io.checkpoint import load_checkpoint
from deepdewedge.io.mrc import InputError
from deepdewedge.pipeline import refining
from tests.messages import assert_one_line

FIT = {
    "unet_params_dict": {"chans": 2, "num_downsample_layers": 1},
    "num_epochs": 1,
    "batch_size": 4,
    "interpolation": "linear",
    "precision": "32",
}


def _halves(root, tilt_range=None):
    """`{stem}_tomo0/1.mrc` and, with `tilt_range`, the record ``ddw reconstruct`` writes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((16, 32, 32)).astype(np.float32)
    paths = []
    for half in ("tomo0", "tomo1"):
        path = root / f"ts_{half}.mrc"
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(signal + rng.standard_normal(signal.shape).astype(np.float32))
        paths.append(path)
    if tilt_range is not None:
        (root / "ts_reconstruct.json").write_text(json.dumps({"tilt_range_deg": tilt_range}))
    return paths


def _prepare(root, t0, t1, **options):
    overrides = {"project_dir": root / "proj", "tomo0_files": [t0], "tomo1_files": [t1]}
    overrides |= {"subtomo_size": 16, "subtomo_extraction_strides": [8, 8, 8], **options}
    prepare_data(step_config("prepare_data", overrides=overrides))
    return json.loads((root / "proj/subtomos/metadata.json").read_text())


def _fit(root, **options):
    config = step_config("fit_model", overrides={**FIT, "project_dir": root / "proj", **options})
    return fit_model(config)


@pytest.mark.parametrize(
    ("tilt_range", "mw_angle", "expected_angle", "expected_range"),
    [
        ([-50.0, 65.0], None, 65.0, [-50.0, 65.0]),  # the recorded asymmetric range
        ([-50.0, 65.0], 60.0, 60.0, [-60.0, 60.0]),  # a given angle wins
        (None, None, 60.0, [-60.0, 60.0]),  # nothing recorded: 60°
    ],
)
def test_prepare_records_the_wedge(tmp_path, tilt_range, mw_angle, expected_angle, expected_range):
    t0, t1 = _halves(tmp_path / "in", tilt_range)
    meta = _prepare(tmp_path, t0, t1, mw_angle=mw_angle)
    assert meta["mw_angle"] == pytest.approx(expected_angle)
    assert meta["tilt_range_deg"] == pytest.approx(expected_range)


def test_fit_and_refine_take_the_wedge_of_the_banks(tmp_path, monkeypatch):
    t0, t1 = _halves(tmp_path / "in", [-50.0, 65.0])
    _prepare(tmp_path, t0, t1)
    masks = []
    real_mask = loop.missing_wedge_mask

    def spy(shape, **wedge):
        masks.append(wedge)
        return real_mask(shape, **wedge)

    monkeypatch.setattr(loop, "missing_wedge_mask", spy)
    result = _fit(tmp_path)
    assert masks and masks[0]["tilt_range_deg"] == pytest.approx((-50.0, 65.0))
    state = load_checkpoint(result["checkpoint"])
    assert state["mw_angle"] == pytest.approx(65.0)
    assert state["tilt_range_deg"] == pytest.approx([-50.0, 65.0])

    # A fit told another wedge than the banks': one line naming the banks' record.
    with pytest.raises(InputError) as err:
        _fit(tmp_path, mw_angle=60.0, overwrite=True)
    message = assert_one_line(err, tmp_path / "proj/subtomos/metadata.json")
    assert "65°" in message and "60°" in message
    _fit(tmp_path, mw_angle=65.0, overwrite=True)  # agreeing is fine

    refine = {"project_dir": tmp_path / "proj", "tomo0_files": [t0], "tomo1_files": [t1]}
    with pytest.raises(InputError) as err:
        refine_tomogram(step_config("refine_tomogram", overrides={**refine, "mw_angle": 60.0}))
    assert_one_line(err, "checkpoints")

    # Tiles masked for refinement get the wedge the model was fitted for.
    wedges = []
    real_refine = refining.refine_volume

    def spy_refine(*args, **kwargs):
        wedges.append(kwargs["tile_wedge"])
        return real_refine(*args, **kwargs)

    monkeypatch.setattr(refining, "refine_volume", spy_refine)
    refine |= {"mask_tile_wedges": True, "precision": "32"}
    refine_tomogram(step_config("refine_tomogram", overrides=refine))
    assert wedges == [{"tilt_range_deg": (-50.0, 65.0)}] * 2


def _two_tomograms(root):
    """Half tomograms `(16, 24, 24)` of two tomograms."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    files = {"tomo0_files": [], "tomo1_files": []}
    for name in ("a", "b"):
        signal = rng.standard_normal((16, 24, 24)).astype(np.float32)
        for half in ("tomo0", "tomo1"):
            path = root / f"{name}_{half}.mrc"
            with mrcfile.new(path, overwrite=True) as mrc:
                mrc.set_data(signal + rng.standard_normal(signal.shape).astype(np.float32))
            files[f"{half}_files"].append(path)
    return files


def test_tomograms_with_different_tilt_ranges_keep_their_own_wedges(tmp_path, monkeypatch):
    files = _two_tomograms(tmp_path / "in")
    own = [[-60.0, 60.0], [-45.0, 65.0]]
    prepare = {
        "project_dir": tmp_path / "proj",
        **files,
        "subtomo_size": 8,
        "subtomo_extraction_strides": [8, 8, 8],
        "val_fraction": 0.2,
        "tilt_ranges_deg": own,
    }
    prepare_data(step_config("prepare_data", overrides=prepare))
    meta_file = tmp_path / "proj/subtomos/metadata.json"
    meta = json.loads(meta_file.read_text())
    assert meta["tilt_ranges_deg"] == own
    # The common wedge stays recorded too: the tilts both tomograms have.
    assert meta["tilt_range_deg"] == [-45.0, 60.0] and meta["mw_angle"] == pytest.approx(75.0)
    fitting = [r["tomo_index"] for r in meta["subtomos"] if r["split"] == "fitting"]
    assert set(fitting) == {0, 1}

    wedges = []
    real_batch = fit_step.make_batch

    def spy(*args, **kwargs):
        wedges.append(kwargs.get("tilt_range_deg"))
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(fit_step, "make_batch", spy)
    fit = {**FIT, "project_dir": tmp_path / "proj", "check_val_every_n_epochs": 1}
    fit["unet_params_dict"] = {"chans": 4, "num_downsample_layers": 1}
    result = fit_model(step_config("fit_model", overrides=fit))
    assert len(result["history"]) == 1 and result["history"][0]["val_loss"] is not None
    # Every batch (input statistics, fitting steps, validation) masks each pair with its own
    # tomogram's tilt range.
    assert wedges and all(isinstance(w, torch.Tensor) for w in wedges)
    assert torch.cat(wedges).unique(dim=0).tolist() == own
    state = load_checkpoint(result["checkpoint"])
    assert state["tilt_ranges_deg"] == own and state["tilt_range_deg"] == [-45.0, 60.0]

    # A given mw_angle is one symmetric wedge for all: the fit keeps one shared mask.
    prepare |= {"mw_angle": 60.0, "overwrite": True}
    prepare_data(step_config("prepare_data", overrides=prepare))
    assert json.loads(meta_file.read_text())["tilt_ranges_deg"] == [[-60.0, 60.0]] * 2
    wedges.clear()
    result = fit_model(step_config("fit_model", overrides={**fit, "overwrite": True}))
    assert wedges and all(w == (-60.0, 60.0) for w in wedges)
    assert load_checkpoint(result["checkpoint"])["tilt_ranges_deg"] is None
