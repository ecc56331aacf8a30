"""Property tests of config parsing: round trip, precedence, unknown keys, nested merges."""

import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepdewedge.config import (
    IGNORED_KEYS,
    KNOWN_KEYS,
    SECTIONS,
    STEP_MODELS,
    AdamParams,
    UNetParams,
    step_config,
)
from deepdewedge.io.mrc import InputError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HALVES = {"tomo0_files": ["t0.mrc"], "tomo1_files": ["t1.mrc"]}


def _load(step, sections, overrides=None):
    """`step_config` of `sections` written as a YAML file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(sections))
        return step_config(step, config_file=path, overrides=overrides), path


def _error(step, sections, overrides=None):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(sections))
        with pytest.raises(InputError) as err:
            step_config(step, config_file=path, overrides=overrides)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{path}: ")
        return message.removeprefix(f"{path}: ")


finite = {"allow_nan": False, "allow_infinity": False}
UNET = {
    "chans": st.integers(1, 256),
    "num_downsample_layers": st.integers(1, 4),
    "drop_prob": st.floats(0, 1, exclude_max=True, **finite),
    "residual": st.booleans(),
}
ADAM = {
    "lr": st.floats(1e-8, 1.0, **finite),
    "betas": st.tuples(st.floats(0, 1, **finite), st.floats(0, 1, **finite)),
    "eps": st.floats(1e-12, 1e-3, **finite),
    "weight_decay": st.floats(0, 1, **finite),
    "amsgrad": st.booleans(),
}
# Valid values of fit_model keys; subtomo_size is a multiple of 2**4, the deepest U-Net here.
FIT = {
    "project_dir": st.from_regex(r"[A-Za-z0-9_.-]{1,12}(/[A-Za-z0-9_-]{1,8}){0,2}", fullmatch=True),
    "seed": st.integers(-(2**31), 2**31),
    "gpu": st.none() | st.integers(-1, 7) | st.lists(st.integers(0, 7), max_size=3),
    "subtomo_size": st.none() | st.integers(1, 16).map(lambda k: 16 * k),
    "mw_angle": st.floats(0, 180, exclude_max=True, **finite),
    "unet_params_dict": st.fixed_dictionaries({}, optional=UNET),
    "adam_params_dict": st.fixed_dictionaries({}, optional=ADAM),
    "num_epochs": st.integers(1, 10**6),
    "batch_size": st.integers(1, 4096),
    "update_subtomo_missing_wedges_every_n_epochs": st.none() | st.integers(1, 1000),
    "check_val_every_n_epochs": st.integers(1, 1000),
    "save_model_every_n_epochs": st.none() | st.integers(1, 1000),
    "save_n_models_with_lowest_val_loss": st.integers(0, 10),
    "save_n_models_with_lowest_fitting_loss": st.integers(0, 10),
    "logger": st.sampled_from(["csv", "tensorboard"]),
    "rotate": st.booleans(),
    "wedge_mask": st.booleans(),
    "interpolation": st.sampled_from(["cubic", "linear"]),
    "precision": st.sampled_from(["auto", "32", "bf16-mixed"]),
    "resume": st.booleans(),
    "overwrite": st.booleans(),
}
# Keys other steps know; in shared they must not disturb fit_model.
OTHERS = {
    "tomo0_files": st.lists(st.just("a.mrc"), min_size=1, max_size=2),
    "val_fraction": st.floats(0, 1, exclude_max=True, **finite),
    "subtomo_overlap": st.integers(0, 100),
    "num_workers": st.integers(0, 8),
}


def _validated(config, key):
    value = getattr(config, key)
    if key in ("unet_params_dict", "adam_params_dict"):
        return value.model_dump()
    if key == "project_dir":
        return str(value)
    return value


def _expected(key, value):
    if key == "unet_params_dict":
        return UNetParams(**value).model_dump()
    if key == "adam_params_dict":
        return AdamParams(**value).model_dump()
    if key == "project_dir":
        return str(Path(value))
    return value


@SETTINGS
@given(
    values=st.fixed_dictionaries({}, optional=FIT),
    others=st.fixed_dictionaries({}, optional=OTHERS),
    data=st.data(),
)
def test_valid_values_round_trip(values, others, data):
    sections = {"shared": dict(others), "fit_model": {}}
    for key, value in values.items():
        sections[data.draw(st.sampled_from(["shared", "fit_model"]), label=key)][key] = value
    config, _ = _load("fit_model", sections)
    for key, value in values.items():
        assert _validated(config, key) == _expected(key, value), key
    # Keys nobody gave keep their defaults.
    default = STEP_MODELS["fit_model"]()
    for key in set(FIT) - set(values):
        assert _validated(config, key) == _validated(default, key), key


# (step, key, strategy of valid values) for keys that can sit in every layer.
LAYERED = [
    ("fit_model", "num_epochs", st.integers(1, 10**6)),
    ("fit_model", "mw_angle", st.floats(0, 180, exclude_max=True, **finite)),
    ("fit_model", "subtomo_size", st.integers(1, 32).map(lambda k: 8 * k)),
    ("fit_model", "interpolation", st.sampled_from(["cubic", "linear"])),
    ("prepare_data", "seed", st.integers(-(2**31), 2**31)),
    ("prepare_data", "val_fraction", st.floats(0, 1, exclude_max=True, **finite)),
    ("prepare_data", "standardize_full_tomos", st.booleans()),
    ("refine_tomogram", "batch_size", st.integers(1, 4096)),
    ("refine_tomogram", "subtomo_overlap", st.integers(0, 7)),
    ("reconstruct", "thickness", st.integers(1, 10**4)),
]


@SETTINGS
@given(case=st.sampled_from(LAYERED), data=st.data())
def test_command_line_beats_step_section_beats_shared(case, data):
    step, key, values = case
    layers = data.draw(
        st.lists(st.sampled_from(["shared", step, "cli"]), min_size=1, max_size=3, unique=True),
        label="layers",
    )
    given_values = {layer: data.draw(values, label=layer) for layer in layers}
    base = {"tomo_files": ["t.mrc"], "subtomo_size": 8} if step == "refine_tomogram" else {}
    if step == "reconstruct":
        base = {"tilt_series": "ts.mrc", "tilt_angles": "ts.tlt", "thickness": 100}
    if step == "fit_model":  # 2**1 divides every subtomo_size drawn
        base = {"unet_params_dict": {"num_downsample_layers": 1}}
    base.pop(key, None)
    sections = {"shared": dict(HALVES), step: base}
    for layer in ("shared", step):
        if layer in given_values:
            sections[layer][key] = given_values[layer]
    overrides = {key: given_values["cli"]} if "cli" in given_values else None
    config, _ = _load(step, sections, overrides)
    winner = next(given_values[layer] for layer in ("cli", step, "shared") if layer in layers)
    assert getattr(config, key) == winner


def _unknown(known):
    return st.from_regex(r"[a-z][a-z0-9_]{0,24}", fullmatch=True).filter(lambda k: k not in known)


@SETTINGS
@given(section=st.sampled_from(SECTIONS), data=st.data())
def test_unknown_key_in_any_section_is_one_line_naming_it(section, data):
    known = KNOWN_KEYS if section == "shared" else set(STEP_MODELS[section].model_fields)
    key = data.draw(_unknown(known | IGNORED_KEYS), label="key")
    sections = {"shared": dict(HALVES), section: {key: 1}}
    for step in ("prepare_data", "fit_model"):
        message = _error(step, sections)
        assert f"unknown key '{section}.{key}'" in message and "spelling" in message


@SETTINGS
@given(
    section=st.sampled_from(["shared", "fit_model"]),
    field=st.sampled_from(["unet_params_dict", "adam_params_dict"]),
    data=st.data(),
)
def test_unknown_nested_key_is_named_with_its_section(section, field, data):
    model = UNetParams if field == "unet_params_dict" else AdamParams
    key = data.draw(_unknown(set(model.model_fields)), label="key")
    message = _error("fit_model", {section: {field: {key: 1}}})
    assert message.startswith(f"{section}.{field}.{key}: unknown key")
    assert all(name in message for name in model.model_fields)


@SETTINGS
@given(
    section=st.sampled_from(["shared", "fit_model"]),
    key=st.sampled_from(["num_epochs", "batch_size", "check_val_every_n_epochs", "mw_angle"]),
    text=st.from_regex(r"[a-z]{1,12}", fullmatch=True).filter(
        lambda t: t not in ("inf", "nan", "infinity")
    ),
)
def test_wrong_type_is_one_line_naming_section_and_key(section, key, text):
    message = _error("fit_model", {section: {key: text}})
    assert message.startswith(f"{section}.{key}: ") and f"(got {text!r}); give a" in message


@SETTINGS
@given(
    shared=st.none() | st.fixed_dictionaries({}, optional=UNET),
    step=st.none() | st.fixed_dictionaries({}, optional=UNET),
    cli=st.none() | st.fixed_dictionaries({}, optional=UNET),
)
def test_nested_dicts_merge_key_by_key(shared, step, cli):
    sections = {"shared": {}, "fit_model": {}}
    if shared is not None:
        sections["shared"]["unet_params_dict"] = shared
    if step is not None:
        sections["fit_model"]["unet_params_dict"] = step
    config, _ = _load("fit_model", sections, {"unet_params_dict": cli})
    expected = UNetParams().model_dump()
    for layer in (shared, step, cli):
        expected.update(layer or {})
    assert config.unet_params_dict.model_dump() == expected


def test_command_line_errors_name_the_option():
    with pytest.raises(InputError) as err:
        step_config("fit_model", overrides={"unet_params_dict": {"chans": 0}})
    assert str(err.value).startswith("command line: --unet-params-dict chans: ")


@pytest.mark.parametrize(
    ("sections", "start"),
    [
        (
            {"shared": HALVES, "prepare_data": {"subtomo_extraction_strides": [6, 6]}},
            "prepare_data.subtomo_extraction_strides: need three positive strides (got [6, 6])",
        ),
        ({"shared": {"tomo0_files": 3}}, "shared.tomo0_files: Input should be a valid list"),
        ({"shared": {"tomo0_files": ["a"], "tomo1_files": []}}, "prepare_data: tomo0_files (1)"),
        ({"shared": {"tomo1_files": ["a"]}}, "prepare_data: missing required key 'tomo0_files'"),
        ({"shared": {"gpu": "zero"}, "prepare_data": HALVES}, "shared.gpu: "),
    ],
)
def test_error_messages_name_where_to_fix(sections, start):
    message = _error("prepare_data", sections)
    assert message.startswith(start) and "; " in message


@pytest.mark.parametrize("value", [32, "32"])
def test_precision_32_from_yaml_numbers_and_strings(value):
    assert step_config("fit_model", overrides={"precision": value}).precision == "32"


def test_precision_auto_is_float32_on_the_cpu():
    from deepdewedge.pipeline.common import resolve_precision

    assert step_config("fit_model").precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "32"
    assert resolve_precision("bf16-mixed", torch.device("cpu")) == "bf16-mixed"


@pytest.mark.parametrize("key", ["filter", "full_filter"])
def test_unknown_filter_is_one_line_naming_the_choices(key):
    step = {"tilt_series": "ts.mrc", "tilt_angles": "ts.tlt", "thickness": 8, key: "shepp"}
    message = _error("reconstruct", {"reconstruct": step})
    assert message.startswith(f"reconstruct.{key}: ") and "shepp" in message
    assert all(f"'{name}'" in message for name in ("ramp", "hamming", "sirt"))
