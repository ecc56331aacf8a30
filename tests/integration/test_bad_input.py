"""A catalogue of bad inputs, each through the real ``ddw`` command, in-process.

Every case must end with exit code 1, exactly one line ``error: ...`` that names the offending
file (or config key) and says how to fix it, no uncaught exception (no traceback), and no
output left behind: no new file or folder under the test's folder, no ``.tmp`` file.
"""

import argparse
import contextlib
import os
import re
import shutil
import warnings

import mrcfile
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from deepdewedge.cli import app
from deepdewedge.io.checkpoint import load_checkpoint

runner = CliRunner()
UNET = "{chans: 4, num_downsample_layers: 1}"
SHAPE = (20, 28, 24)
# Progress bars and warnings are the only other lines a failing command may print.
PROGRESS = re.compile(r"^\s*[\w -]+: .*\[\d+:\d+|^WARNING: ")


def _write(path, data, voxel_size=7.5):
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.simplefilter("ignore")  # mrcfile warns about NaNs written on purpose
        mrc.set_data(data if np.iscomplexobj(data) else np.asarray(data, dtype=np.float32))
        mrc.voxel_size = voxel_size
    return path


def _halves(root):
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(SHAPE).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    t0 = _write(root / "tomo0.mrc", signal + rng.standard_normal(SHAPE))
    t1 = _write(root / "tomo1.mrc", signal + rng.standard_normal(SHAPE))
    return t0, t1


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _prepare_args(project, t0, t1, *extra):
    strides = ["--subtomo-extraction-strides", 6] * 3
    return (
        "prepare-data",
        "--project-dir",
        project,
        "--tomo0-files",
        t0,
        "--tomo1-files",
        t1,
        "--subtomo-size",
        8,
        "--val-fraction",
        0.2,
        *strides,
        *extra,
    )


def _fit_args(project, epochs, *extra):
    return (
        "fit-model",
        "--project-dir",
        project,
        "--unet-params-dict",
        UNET,
        "--num-epochs",
        epochs,
        "--batch-size",
        4,
        "--update-subtomo-missing-wedges-every-n-epochs",
        2,
        "--check-val-every-n-epochs",
        1,
        "--interpolation",
        "linear",
        *extra,
    )


@contextlib.contextmanager
def _one_thread():
    """Networks this small run fastest on one thread, and OpenMP threads spin-waiting for
    each other slow them down ten-fold on a busy two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _single_thread():
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Half tomograms and a project fitted for two epochs, shared by the module (read-only)."""
    root = tmp_path_factory.mktemp("fitted")
    t0, t1 = _halves(root)
    project = root / "proj"
    with _one_thread():
        assert _invoke(*_prepare_args(project, t0, t1)).exit_code == 0
        result = _invoke(*_fit_args(project, 2))
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def env(tmp_path, fitted):
    """A private copy of the fitted project and its inputs under ``tmp_path``."""
    shutil.copytree(fitted, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _snapshot(root):
    return {p.relative_to(root) for p in root.rglob("*")}


def _error_line(result):
    """The one ``error:`` line of a failed command, after checking the rest of the output."""
    assert result.exit_code == 1, result.output
    # An exception that escaped the command would be printed as a traceback by `ddw`.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    lines = [line.strip("\r") for line in result.output.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    others = [line for line in lines if line not in errors and not PROGRESS.match(line)]
    assert not others, result.output
    assert lines[-1] == errors[0], result.output
    return errors[0]


def _fails(root, args, prefix, *expected):
    """Run `args`; check the failure contract, the error's `prefix` and the texts after it."""
    before = _snapshot(root)
    result = _invoke(*args)
    line = _error_line(result)
    print(line)  # shown with `pytest -rP`: the catalogue of messages
    assert line.startswith(prefix), line
    for text in expected:
        assert str(text) in line[len(prefix) :], line
    assert "; " in line[len(prefix) :], f"no fix after the problem: {line}"
    after = _snapshot(root)
    assert not (after - before), f"left behind: {sorted(map(str, after - before))}"
    assert not [p for p in after if p.name.endswith(".tmp")]
    return line


# ----------------------------------------------------------------------------- bad volumes


def _bad_volume(path, kind):
    """Write a bad MRC of `kind` at `path` (or nothing, or a folder) and return the path."""
    rng = np.random.default_rng(1)
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
        return path
    if kind == "empty":
        path.write_bytes(b"")
        return path
    if kind == "not-mrc":
        path.write_text("this is a text file, not an MRC\n" * 64)
        return path
    if kind == "image":
        return _write(path, rng.standard_normal(SHAPE[1:]))
    if kind == "complex":
        data = rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE)
        return _write(path, data.astype(np.complex64))
    data = rng.standard_normal(SHAPE).astype(np.float32)
    if kind == "nan":
        data[3, 4, 5] = np.nan
        return _write(path, data)
    if kind == "truncated":
        _write(path, data)
        path.write_bytes(path.read_bytes()[:-1000])
        return path
    raise AssertionError(kind)


BAD_VOLUMES = [
    ("truncated", ("truncated", "export")),
    ("image", ("3D", "(28, 24)")),
    ("complex", ("complex", "mode 2")),
    ("nan", ("NaN or Inf voxels",)),
    ("empty", ("empty", "export")),
    ("not-mrc", ("not an MRC", "export")),
    ("missing", ("no such file", "check the path")),
    ("directory", ("is a directory", ".mrc file")),
]


@pytest.mark.parametrize(("kind", "expected"), BAD_VOLUMES, ids=[k for k, _ in BAD_VOLUMES])
@pytest.mark.parametrize("half", [0, 1])
def test_prepare_data_rejects_bad_tomogram(tmp_path, kind, expected, half):
    t0, t1 = _halves(tmp_path / "in")
    bad = _bad_volume(tmp_path / "in" / f"bad_{kind}.mrc", kind)
    pair = (bad, t1) if half == 0 else (t0, bad)
    _fails(tmp_path, _prepare_args(tmp_path / "proj", *pair), f"error: {bad}: ", *expected)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [pytest.param(k, e, id=k) for k, e in BAD_VOLUMES],
)
def test_refine_tomogram_rejects_bad_tomogram(env, kind, expected):
    """Refinement memory-maps its input: the checks must hold without reading it all."""
    bad = _bad_volume(env / f"bad_{kind}.mrc", kind)
    args = ("refine-tomogram", "--project-dir", env / "proj", "--tomo-files", bad)
    _fails(env, args, f"error: {bad}: ", *expected)


def test_prepare_data_rejects_mismatched_halves(tmp_path):
    t0, _ = _halves(tmp_path / "in")
    small = _write(tmp_path / "in" / "small.mrc", np.zeros((20, 28, 20)))
    _fails(
        tmp_path,
        _prepare_args(tmp_path / "proj", t0, small),
        f"error: {small}: shape (20, 28, 20) differs from {t0} (20, 28, 24)",
        "same reconstruction geometry",
    )


def test_refine_tomogram_rejects_mismatched_halves(env):
    small = _write(env / "small.mrc", np.zeros((20, 28, 20)))
    args = (
        "refine-tomogram",
        "--project-dir",
        env / "proj",
        "--tomo0-files",
        env / "tomo0.mrc",
        "--tomo1-files",
        small,
    )
    _fails(env, args, f"error: {small}: shape", "same reconstruction geometry")


def test_refine_checks_every_pair_before_writing_any(env):
    """A bad second pair must not leave the first pair's refined tomogram behind."""
    args = (
        "refine-tomogram",
        "--project-dir",
        env / "proj",
        "--tomo0-files",
        env / "tomo0.mrc",
        "--tomo1-files",
        env / "tomo1.mrc",
        "--tomo0-files",
        env / "tomo1.mrc",
        "--tomo1-files",
        env / "missing.mrc",
    )
    _fails(env, args, f"error: {env / 'missing.mrc'}: no such file", "check the path")


def test_prepare_data_rejects_subtomo_larger_than_tomogram(tmp_path):
    t0, t1 = _halves(tmp_path / "in")
    args = _prepare_args(tmp_path / "proj", t0, t1, "--subtomo-size", 32)
    _fails(tmp_path, args, f"error: {t0}: ", "smaller than subtomo_size 32", "<= 20")


def test_prepare_data_rejects_empty_mask(tmp_path):
    t0, t1 = _halves(tmp_path / "in")
    mask = _write(tmp_path / "in" / "mask.mrc", np.zeros(SHAPE))
    args = _prepare_args(tmp_path / "proj", t0, t1, "--mask-files", mask)
    _fails(tmp_path, args, f"error: {mask}: ", "check the mask")


def test_prepare_data_rejects_mask_of_other_shape(tmp_path):
    t0, t1 = _halves(tmp_path / "in")
    mask = _write(tmp_path / "in" / "mask.mrc", np.ones((20, 28, 20)))
    args = _prepare_args(tmp_path / "proj", t0, t1, "--mask-files", mask)
    _fails(tmp_path, args, f"error: {mask}: ", "make the mask from this tomogram")


# ------------------------------------------------------------------------ unwritable output


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions"
)
@pytest.mark.parametrize("command", ["prepare-data", "refine-tomogram"])
def test_unwritable_output_folder(env, command):
    locked = env / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if command == "prepare-data":
            args = _prepare_args(locked / "proj", env / "tomo0.mrc", env / "tomo1.mrc")
        else:
            args = (
                "refine-tomogram",
                "--project-dir",
                env / "proj",
                "--tomo-files",
                env / "tomo0.mrc",
                "--output-dir",
                locked / "out",
            )
        _fails(env, args, f"error: {locked}", "Permission denied")
    finally:
        locked.chmod(0o700)


def _reconstruct_inputs(root, n_tilts=9, n_angles=9):
    rng = np.random.default_rng(2)
    stack = _write(root / "ts.mrc", rng.standard_normal((n_tilts, 16, 16)), voxel_size=2.0)
    angles = root / "ts.tlt"
    angles.write_text("\n".join(f"{a:.1f}" for a in np.linspace(-60, 60, n_angles)) + "\n")
    return stack, angles


@pytest.mark.parametrize("command", ["prepare-data", "refine-tomogram", "reconstruct"])
def test_output_folder_below_a_file(env, command):
    """Root-safe variant: the output folder's parent is a file, which fails for root too."""
    blocker = env / "blocker"
    blocker.write_text("a file where a folder is expected\n")
    out = blocker / "out"
    if command == "prepare-data":
        args = _prepare_args(out, env / "tomo0.mrc", env / "tomo1.mrc")
    elif command == "refine-tomogram":
        args = (
            "refine-tomogram",
            "--project-dir",
            env / "proj",
            "--tomo-files",
            env / "tomo0.mrc",
            "--output-dir",
            out,
        )
    else:
        stack, angles = _reconstruct_inputs(env)
        args = (
            "reconstruct",
            "--tilt-series",
            stack,
            "--tilt-angles",
            angles,
            "--thickness",
            8,
            "--output-dir",
            out,
        )
    _fails(env, args, f"error: {blocker}", "output")


# ------------------------------------------------------------------------------ checkpoints


def test_resume_with_another_architecture(env):
    latest = env / "proj/logs/checkpoints/latest.ckpt"
    before = latest.read_bytes()
    args = _fit_args(env / "proj", 3, "--resume")
    args = tuple("{chans: 8, num_downsample_layers: 1}" if a == UNET else a for a in args)
    _fails(env, args, f"error: {latest}: ", "different network architecture", "unet_params_dict")
    assert latest.read_bytes() == before


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_refine_with_corrupted_checkpoint(env):
    latest = env / "proj/logs/checkpoints/latest.ckpt"
    _truncate(latest)
    args = (
        "refine-tomogram",
        "--project-dir",
        env / "proj",
        "--tomo-files",
        env / "tomo0.mrc",
        "--model-checkpoint-file",
        latest,
    )
    _fails(env, args, f"error: {latest}: ", "truncated", "fit")


def test_resume_from_corrupted_checkpoint(env):
    latest = env / "proj/logs/checkpoints/latest.ckpt"
    _truncate(latest)
    _fails(env, _fit_args(env / "proj", 3, "--resume"), f"error: {latest}: ", "truncated")


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "lightning", "foreign"])
def test_refine_with_bad_checkpoint_file(env, kind):
    ckpt = env / "model.ckpt"
    if kind == "directory":
        ckpt.mkdir()
    elif kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "text":
        ckpt.write_text("hello\n")
    elif kind == "lightning":  # pickled objects, as in the published tool's checkpoints
        torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(chans=64)}, ckpt)
    elif kind == "foreign":
        torch.save({"state_dict": {}}, ckpt)
    args = (
        "refine-tomogram",
        "--project-dir",
        env / "proj",
        "--tomo-files",
        env / "tomo0.mrc",
        "--model-checkpoint-file",
        ckpt,
    )
    _fails(env, args, f"error: {ckpt}: ", "ddw fit-model" if kind != "missing" else "check")


def test_refine_subtomo_size_not_divisible(env):
    args = (
        "refine-tomogram",
        "--project-dir",
        env / "proj",
        "--tomo-files",
        env / "tomo0.mrc",
        "--subtomo-size",
        9,
    )
    _fails(env, args, "error: ", "subtomo_size 9 must be divisible by", "choose e.g. 10")


def test_fit_subtomo_size_not_divisible_by_the_prepared_size(env):
    args = _fit_args(env / "proj", 1, "--overwrite")
    args = tuple("{chans: 4, num_downsample_layers: 4}" if a == UNET else a for a in args)
    _fails(env, args, f"error: {env / 'proj/subtomos'}: ", "divisible by", "choose e.g. 16")


def test_early_stopping_without_validation_sub_tomograms(tmp_path):
    t0, t1 = _halves(tmp_path)
    project = tmp_path / "proj"
    args = tuple(0 if a == 0.2 else a for a in _prepare_args(project, t0, t1))
    assert _invoke(*args).exit_code == 0
    _fails(
        tmp_path,
        _fit_args(project, 2, "--early-stopping-patience", 3),
        f"error: {project / 'subtomos'}: ",
        "early_stopping_patience needs validation sub-tomograms",
        "val_fraction > 0",
    )


# -------------------------------------------------------------------------- interrupted fit


def _prepared(env):
    shutil.rmtree(env / "proj/logs")
    return env / "proj"


def test_interrupted_fit_leaves_a_resumable_checkpoint(env, monkeypatch):
    project = _prepared(env)
    import deepdewedge.fit.loop as loop

    real = loop.fill_missing_wedges

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "fill_missing_wedges", interrupt)  # first update: epoch 2
    result = _invoke(*_fit_args(project, 4))
    assert result.exit_code == 130, result.output
    assert "interrupted; resume fitting with --resume" in result.output.splitlines()
    ckpts = project / "logs/checkpoints"
    assert not list(ckpts.glob("*.tmp")) and not list(ckpts.glob(".*.tmp"))
    state = load_checkpoint(ckpts / "latest.ckpt")
    assert state["epoch"] == 1 and len(state["history"]) == 2

    monkeypatch.setattr(loop, "fill_missing_wedges", real)
    result = _invoke(*_fit_args(project, 4, "--resume"))
    assert result.exit_code == 0, result.output
    assert load_checkpoint(ckpts / "latest.ckpt")["epoch"] == 3
    lines = (project / "logs/losses.csv").read_text().splitlines()
    assert len(lines) == 5


def _interrupt_second_checkpoint_write(env, monkeypatch):
    """Fit with Ctrl-C arriving while epoch 1's latest.ckpt is being written."""
    project = _prepared(env)
    import deepdewedge.fit.loop as loop

    losses = iter([0.5, 0.4, 0.3, 0.2])  # every epoch improves on validation
    monkeypatch.setattr(loop, "validation_loss", lambda *args: next(losses))
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        real_save(obj, f, *args, **kwargs)
        if calls["n"] == 3:  # epoch 0: latest + best-val; epoch 1: latest
            raise KeyboardInterrupt  # before the rename of the finished temporary file

    monkeypatch.setattr(torch, "save", save)
    result = _invoke(*_fit_args(project, 3))
    monkeypatch.setattr(torch, "save", real_save)
    assert result.exit_code == 130, result.output
    assert "interrupted; resume fitting with --resume" in result.output.splitlines()
    return project / "logs/checkpoints"


def test_fit_interrupted_while_writing_a_checkpoint(env, monkeypatch):
    """The atomic write keeps the previous latest.ckpt and removes its temporary file."""
    ckpts = _interrupt_second_checkpoint_write(env, monkeypatch)
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(ckpts / "latest.ckpt")["epoch"] == 0
    result = _invoke(*_fit_args(env / "proj", 3, "--resume"))
    assert result.exit_code == 0, result.output
    assert load_checkpoint(ckpts / "latest.ckpt")["epoch"] == 2


def test_interrupted_checkpoint_write_keeps_the_best_checkpoint(env, monkeypatch):
    ckpts = _interrupt_second_checkpoint_write(env, monkeypatch)
    ranked = load_checkpoint(ckpts / "latest.ckpt")["best_checkpoints"]["val_loss"]
    assert ranked and all((ckpts / name).exists() for _, name in ranked)


# ----------------------------------------------------------------------------- reconstruct


def test_reconstruct_rejects_wrong_number_of_tilt_angles(tmp_path):
    stack, angles = _reconstruct_inputs(tmp_path, n_tilts=9, n_angles=8)
    args = (
        "reconstruct",
        "--tilt-series",
        stack,
        "--tilt-angles",
        angles,
        "--thickness",
        8,
        "--output-dir",
        tmp_path / "out",
    )
    _fails(tmp_path, args, f"error: {angles}: 8 tilt angles for a stack of 9 images", "belongs")


# ------------------------------------------------------------------------------ config file


def _config(tmp_path, **sections):
    """A config for the tiny halves with `sections` merged on top (None deletes a key)."""
    t0, t1 = _halves(tmp_path / "in")
    content = {
        "shared": {
            "project_dir": str(tmp_path / "proj"),
            "tomo0_files": [str(t0)],
            "tomo1_files": [str(t1)],
            "subtomo_size": 8,
        },
        "prepare_data": {"subtomo_extraction_strides": [6, 6, 6], "val_fraction": 0.2},
        "fit_model": {
            "unet_params_dict": {"chans": 4, "num_downsample_layers": 1},
            "num_epochs": 1,
            "batch_size": 4,
            "interpolation": "linear",
        },
        "refine_tomogram": {"subtomo_overlap": 2},
    }
    for section, body in sections.items():
        for key, value in body.items():
            content.setdefault(section, {})[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


CONFIG_CASES = [
    # (id, command, sections, expected texts)
    ("typo-step", "fit-model", {"fit_model": {"num_epoch": 3}}, ["'fit_model.num_epoch'"]),
    ("typo-shared", "prepare-data", {"shared": {"subtomo_sise": 8}}, ["'shared.subtomo_sise'"]),
    ("typo-run", "run", {"prepare_data": {"val_frac": 0.1}}, ["'prepare_data.val_frac'"]),
    ("typo-nested", "fit-model", {"fit_model": {"unet_params_dict": {"depth": 2}}}, ["depth"]),
    ("batch-size-five", "fit-model", {"fit_model": {"batch_size": "five"}}, ["batch_size"]),
    ("tomo0-files-int", "prepare-data", {"shared": {"tomo0_files": 3}}, ["tomo0_files"]),
    ("mw-angle-text", "prepare-data", {"shared": {"mw_angle": "sixty"}}, ["mw_angle"]),
    ("mw-angle-200", "prepare-data", {"shared": {"mw_angle": 200}}, ["mw_angle", "180"]),
    ("mw-angle-200-fit", "fit-model", {"fit_model": {"mw_angle": 200}}, ["mw_angle", "180"]),
    ("mw-angle-200-run", "run", {"shared": {"mw_angle": 200}}, ["mw_angle", "180"]),
    (
        "not-divisible",
        "fit-model",
        {"fit_model": {"subtomo_size": 12, "unet_params_dict": {"num_downsample_layers": 3}}},
        ["subtomo_size 12", "divisible", "choose e.g. 16"],
    ),
    ("missing-key", "prepare-data", {"shared": {"tomo0_files": None}}, ["tomo0_files"]),
    (
        "strides",
        "prepare-data",
        {"prepare_data": {"subtomo_extraction_strides": [6, 6]}},
        ["strides"],
    ),
]


@pytest.mark.parametrize(
    ("command", "sections", "expected"),
    [c[1:] for c in CONFIG_CASES],
    ids=[c[0] for c in CONFIG_CASES],
)
def test_bad_config_value(tmp_path, command, sections, expected):
    path = _config(tmp_path, **sections)
    if sections.get("shared", {}).get("tomo0_files", 0) is None:
        text = yaml.safe_load(path.read_text())
        del text["shared"]["tomo0_files"]
        path.write_text(yaml.safe_dump(text))
    _fails(tmp_path, (command, "--config", path), f"error: {path}: ", *expected)


@pytest.mark.parametrize("command", ["prepare-data", "fit-model", "refine-tomogram", "run"])
def test_invalid_yaml_syntax(tmp_path, command):
    path = tmp_path / "config.yaml"
    path.write_text("shared:\n  project_dir: ./proj\n  tomo0_files: [a.mrc\nfit_model: {\n")
    _fails(tmp_path, (command, "--config", path), f"error: {path}: invalid YAML", "fix")


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
@pytest.mark.parametrize("command", ["prepare-data", "run"])
def test_config_path_is_not_a_config_file(tmp_path, kind, command):
    path = tmp_path / "config.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":  # e.g. a tomogram given to --config by mistake
        _write(path, np.full((4, 5, 6), 0.5))
    _fails(tmp_path, (command, "--config", path), f"error: {path}: ", "--config")


def test_mw_angle_out_of_range_on_the_command_line(tmp_path):
    t0, t1 = _halves(tmp_path / "in")
    args = _prepare_args(tmp_path / "proj", t0, t1, "--mw-angle", 200)
    _fails(tmp_path, args, "error: command line: --mw-angle: ", "less than 180")


def test_run_validates_every_section_before_writing(tmp_path):
    path = _config(tmp_path, fit_model={"batch_size": "five"})
    result = _invoke("run", "--config", path)
    assert not (tmp_path / "proj").exists(), "prepare-data ran before fit_model was validated"
    line = _error_line(result)
    assert line.startswith(f"error: {path}: fit_model.batch_size: ")
