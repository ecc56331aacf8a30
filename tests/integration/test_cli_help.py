"""`ddw --help`: answered without torch, every option explained, defaults from the config models."""

import os
import re
import subprocess
import sys

import pytest
import typer.main
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

import deepdewedge
from deepdewedge import pipeline
from deepdewedge.cli import app
from deepdewedge.config import (
    DatasetConfig,
    FitModelConfig,
    MakeMaskConfig,
    PrepareDataConfig,
    ReconstructConfig,
    RefineTomogramConfig,
)

COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]
MODELS: dict[str, type[BaseModel]] = {
    "reconstruct": ReconstructConfig,
    "make-mask": MakeMaskConfig,
    "prepare-data": PrepareDataConfig,
    "fit-model": FitModelConfig,
    "refine-tomogram": RefineTomogramConfig,
}
# Options of a command that set a dataset run's config, by the field they set.
DATASET_OPTIONS = {"dataset": "path", "shard": "shard"}
# Modules that only the commands that run may import.
HEAVY = ("torch", "numpy", "matplotlib", "tqdm", "scipy")
SHOWN_DEFAULT = re.compile(r"\\?\[default: (.*)\]$")


def _ddw(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "300", "TERMINAL_WIDTH": "300"}
    return subprocess.run(
        [sys.executable, "-m", "deepdewedge.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _options(command: str) -> list:
    params = COMMANDS[command].params
    return [p for p in params if p.param_type_name == "option" and p.name != "help"]


def _shown_default(option) -> str | None:
    match = SHOWN_DEFAULT.search(option.help or "")
    if match is not None:
        return match.group(1)
    if option.show_default and option.default is not None:  # shown by typer itself
        return str(option.default)
    return None


def _shows(shown: str | None, default: object, flag: str) -> bool:
    """Whether `shown`, the default in an option's help, is the model's `default`."""
    if default is None:
        return shown is None
    if shown is None:
        return False
    if isinstance(default, bool):
        return shown == (flag if default else f"no-{flag}")
    if isinstance(default, BaseModel):
        return yaml.safe_load(shown) == default.model_dump(mode="json")
    if isinstance(default, list):
        return shown == (" ".join(map(str, default)) or "none")
    if isinstance(default, int | float):
        return float(shown) == default
    return shown == str(default)


def _model_default(model: type[BaseModel], name: str) -> object:
    field = model.model_fields[name]
    return None if field.is_required() else field.get_default(call_default_factory=True)


def test_importing_the_cli_imports_neither_torch_nor_the_pipeline_steps():
    code = (
        "import sys, deepdewedge.cli; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r} "
        "or m.startswith('deepdewedge.pipeline.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_of_every_command_imports_no_torch():
    code = (
        "import sys\n"
        "from deepdewedge.cli import app\n"
        f"for args in [[]] + [[c] for c in {sorted(COMMANDS)!r}]:\n"
        "    try:\n"
        "        app([*args, '--help'], prog_name='ddw')\n"
        "    except SystemExit as stop:\n"
        "        assert not stop.code, (args, stop.code)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_public_api_still_imports():
    from deepdewedge import fit_model, prepare_data, refine_tomogram

    assert callable(fit_model) and callable(prepare_data) and callable(refine_tomogram)
    for name in pipeline.__all__:
        assert callable(getattr(pipeline, name)), name
    assert set(deepdewedge.__all__) <= set(dir(deepdewedge))
    with pytest.raises(AttributeError):
        deepdewedge.no_such_name  # noqa: B018


@pytest.mark.parametrize("command", [None, *sorted(COMMANDS)])
def test_help_runs(command):
    args = ["--help"] if command is None else [command, "--help"]
    result = _ddw(*args)
    assert result.returncode == 0, result.stderr
    assert "Usage: ddw" in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command):
    options = _options(command)
    assert options
    missing = [option.opts[0] for option in options if not (option.help or "").strip()]
    assert not missing, f"ddw {command}: no help for {missing}"


@pytest.mark.parametrize("command", sorted(MODELS))
def test_defaults_shown_are_the_config_models(command):
    model = MODELS[command]
    for option in _options(command):
        if option.name == "config":
            continue
        if option.name in DATASET_OPTIONS:
            default = _model_default(DatasetConfig, DATASET_OPTIONS[option.name])
        else:
            default = _model_default(model, option.name)
        flag = option.name.replace("_", "-")
        shown = _shown_default(option)
        assert _shows(shown, default, flag), f"ddw {command} --{flag}: {shown!r} vs {default!r}"


def test_simulate_and_demo_defaults_are_their_own():
    from deepdewedge.demo import DEMO
    from deepdewedge.pipeline.simulation import SimulateConfig

    for option in _options("simulate"):
        default = _model_default(SimulateConfig, option.name)
        flag = option.name.replace("_", "-")
        shown = _shown_default(option)
        assert _shows(shown, default, flag), f"ddw simulate --{flag}: {shown!r} vs {default!r}"
    epochs = next(o for o in _options("demo") if o.name == "num_epochs")
    assert _shown_default(epochs) == str(DEMO["num_epochs"])


@pytest.mark.parametrize(
    ("command", "option", "model", "field"),
    [
        ("reconstruct", "--taper-px", ReconstructConfig, "taper_px"),
        ("fit-model", "--num-epochs", FitModelConfig, "num_epochs"),
        ("fit-model", "--batch-size", FitModelConfig, "batch_size"),
        ("refine-tomogram", "--batch-size", RefineTomogramConfig, "batch_size"),
        ("prepare-data", "--subtomo-size", PrepareDataConfig, "subtomo_size"),
    ],
)
def test_rendered_help_shows_the_model_default(command, option, model, field):
    result = _ddw(command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.replace("│", " ").split())
    match = re.search(re.escape(option) + r" <int> [^│]*?\[default: (\d+)\]", text)
    assert match is not None, text
    assert int(match.group(1)) == model.model_fields[field].default


def test_options_not_given_leave_the_config_file_alone(monkeypatch, tmp_path):
    import deepdewedge.cli as cli

    seen: dict = {}
    monkeypatch.setattr(cli, "_run_prepare", lambda config, overrides: seen.update(overrides))
    config = tmp_path / "config.yaml"
    config.write_text("prepare_data:\n  subtomo_size: 64\n")
    result = CliRunner().invoke(app, ["prepare-data", "-c", str(config), "--val-fraction", "0.2"])
    assert result.exit_code == 0, result.output
    assert seen.pop("val_fraction") == 0.2
    assert all(value is None for value in seen.values()), seen
