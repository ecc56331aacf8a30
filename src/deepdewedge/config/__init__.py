"""Validated configuration of each step; the only place defaults live.

The YAML layout is the published DeepDeWedge one: sections ``shared``, ``prepare_data``,
``fit_model`` and ``refine_tomogram``. Keys in ``shared`` go to every step that knows them;
keys in a step's section must be known to that step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from deepdewedge.config.base import DISTRIBUTED_BACKENDS, SECTIONS, Precision, _Step
from deepdewedge.config.dataset import DatasetConfig
from deepdewedge.config.fitting import (
    AdamParams,
    FitModelConfig,
    PrepareDataConfig,
    RefineTomogramConfig,
    UNetParams,
    check_divisible,
    check_overlap,
)
from deepdewedge.config.tilt_series import (
    DEMO,
    MakeMaskConfig,
    ReconstructConfig,
    SimulateConfig,
)
from deepdewedge.io.errors import InputError

__all__ = [
    "DEMO",
    "DISTRIBUTED_BACKENDS",
    "IGNORED_KEYS",
    "KNOWN_KEYS",
    "SECTIONS",
    "STEP_MODELS",
    "AdamParams",
    "DatasetConfig",
    "FitModelConfig",
    "MakeMaskConfig",
    "Precision",
    "PrepareDataConfig",
    "ReconstructConfig",
    "RefineTomogramConfig",
    "SimulateConfig",
    "UNetParams",
    "check_divisible",
    "check_overlap",
    "read_config_file",
    "step_config",
]


STEP_MODELS: dict[str, type[_Step]] = {
    "dataset": DatasetConfig,
    "reconstruct": ReconstructConfig,
    "make_mask": MakeMaskConfig,
    "prepare_data": PrepareDataConfig,
    "fit_model": FitModelConfig,
    "refine_tomogram": RefineTomogramConfig,
}
# Options of the published tool that have no effect here: data stays in memory (no loader
# workers), crops always get a √3 margin and mirror padding, results are always written.
IGNORED_KEYS = frozenset(
    {
        "num_workers",
        "pad_before_subtomo_extraction",
        "extract_larger_subtomos_for_rotating",
        "verbose",
        "return_tomos",
    }
)
KNOWN_KEYS = set().union(*(m.model_fields for m in STEP_MODELS.values())) | IGNORED_KEYS


COMMAND_LINE = "command line"
# How to fix a value pydantic rejected, by error type.
_HINTS = {
    "int_parsing": "give a whole number",
    "int_type": "give a whole number",
    "int_from_float": "give a whole number",
    "float_parsing": "give a number",
    "float_type": "give a number",
    "finite_number": "give a finite number",
    "bool_parsing": "give true or false",
    "bool_type": "give true or false",
    "string_type": "give a text value",
    "path_type": "give a file or folder path",
    "list_type": "give a list, e.g. [a, b]",
    "tuple_type": "give a list, e.g. [a, b]",
    "too_short": "give more items",
    "too_long": "give fewer items",
    "dict_type": "give a mapping, e.g. {key: value}",
    "model_type": "give a mapping, e.g. {key: value}",
    "model_attributes_type": "give a mapping, e.g. {key: value}",
    "literal_error": "use one of these values",
    "greater_than": "give a larger value",
    "greater_than_equal": "give a larger value",
    "less_than": "give a smaller value",
    "less_than_equal": "give a smaller value",
}


def read_config_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a YAML config with the published section layout, checking section and key names."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: config file not found; check the --config path")
    if not path.is_file():
        raise InputError(f"{path}: is a directory, not a config file; check the --config path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"{path}: not a text file; give the YAML config with --config (sections "
            f"{', '.join(SECTIONS)})"
        ) from None
    except OSError as err:
        raise InputError(
            f"{path}: cannot read the config file ({err.strerror}); check its permissions"
        ) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None)
        why = f" ({_one_line(problem)})" if problem else ""
        raise InputError(f"{path}: invalid YAML{where}{why}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected sections {', '.join(SECTIONS)} at the top level")
    for section, body in raw.items():
        if section not in SECTIONS:
            raise InputError(
                f"{path}: unknown section '{section}'; use one of {', '.join(SECTIONS)}"
            )
        if body is not None and not isinstance(body, dict):
            raise InputError(f"{path}: section '{section}' must be a mapping of keys to values")
        for key in body or {}:
            known = (
                KNOWN_KEYS
                if section == "shared"
                else set(STEP_MODELS[section].model_fields) | IGNORED_KEYS
            )
            if key not in known:
                raise InputError(f"{path}: unknown key '{section}.{key}'; check its spelling")
    return {section: dict(raw.get(section) or {}) for section in SECTIONS}


def step_config(
    step: str,
    *,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> _Step:
    """Build the validated config of one step from a config file and command-line overrides.

    Precedence: command line > the step's own section > ``shared``. Mappings such as
    ``unet_params_dict`` are merged key by key with the same precedence. Relative paths in the
    file are taken relative to the current directory, as the published tool does.

    Raises
    ------
    InputError
        One line naming the file and ``section.key`` (or the command-line option) of the first
        invalid value, and how to fix it.
    """
    model = STEP_MODELS[step]
    values: dict[str, Any] = {}
    # Where each value came from: "shared", the step's section or COMMAND_LINE, by key path.
    origins: dict[tuple[str, ...], str] = {}

    def put(key: str, value: Any, origin: str) -> None:
        if isinstance(value, dict):
            origins.update({(key, str(sub)): origin for sub in value})
            if isinstance(values.get(key), dict):
                value = {**values[key], **value}  # e.g. one U-Net option on top of the file's
        values[key] = value
        origins[(key,)] = origin

    if config_file is not None:
        sections = read_config_file(config_file)
        for key, value in sections["shared"].items():
            if key in model.model_fields:
                put(key, value, "shared")
        for key, value in sections[step].items():
            if key not in IGNORED_KEYS:
                put(key, value, step)
    for key, value in (overrides or {}).items():
        if value is not None:
            put(key, value, COMMAND_LINE)
    try:
        return model(**values)
    except ValidationError as err:
        raise InputError(_first_error(err, step, model, config_file, origins)) from None


def _one_line(text: object, limit: int | None = None) -> str:
    """`text` on one line, shortened to `limit` characters."""
    flat = " ".join(str(text).split())
    if limit is not None and len(flat) > limit:
        flat = flat[: limit - 3] + "..."
    return flat


def _clean_loc(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of an error location, without pydantic's union tags (``int``, ``list[int]``)."""
    parts: list[str] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
        elif current is not None:
            parts.append(str(part))
            field = current.model_fields.get(str(part))
            annotation = field.annotation if field is not None else None
            is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            current = annotation if is_model else None
    return parts


def _first_error(
    err: ValidationError,
    step: str,
    model: type[BaseModel],
    config_file: str | os.PathLike | None,
    origins: dict[tuple[str, ...], str],
) -> str:
    """One line: where the first invalid value came from, what is wrong, how to fix it."""
    first = err.errors()[0]
    raw_loc = tuple(str(p) for p in first["loc"] if not isinstance(p, int))
    parts = _clean_loc(model, tuple(first["loc"]))
    # The origin of the most specific key path we know.
    origin = next(
        (origins[raw_loc[:n]] for n in range(len(raw_loc), 0, -1) if raw_loc[:n] in origins),
        None,
    )
    msg = _one_line(first["msg"]).removeprefix("Value error, ")
    kind = first["type"]
    if origin == COMMAND_LINE:
        option = "--" + parts[0].replace("_", "-")
        where = f"{COMMAND_LINE}: {option}" + (f" {'.'.join(parts[1:])}" if parts[1:] else "")
    elif origin is not None:
        where = f"{config_file}: {origin}.{'.'.join(parts)}"
    else:  # a required key nobody gave, or a rule about several keys
        where = f"{config_file if config_file is not None else COMMAND_LINE}: {step}"
    if kind == "missing" and origin is None:
        key = parts[0] if parts else "?"
        return (
            f"{where}: missing required key '{key}'; add it to the {step} or shared section of "
            f"the config, or give --{key.replace('_', '-')}"
        )
    if kind == "missing":
        return f"{where}: a value is missing ({msg}); complete it"
    if kind == "extra_forbidden":
        known: Any = model
        for name in first["loc"][:-1]:
            field = getattr(known, "model_fields", {}).get(name)
            known = field.annotation if field is not None else None
        names = getattr(known, "model_fields", None)
        listed = f" (known keys: {', '.join(names)})" if names else ""
        return f"{where}: unknown key; check its spelling{listed}"
    if not parts:  # a rule about several keys: the message names them and the fix
        return f"{where}: {msg}"
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {_one_line(repr(got), 60)})"
    problem, _, fix = msg.partition("; ")  # our own validators end with the fix
    fix = fix or _HINTS.get(kind, f"correct {'.'.join(parts)}")
    return f"{where}: {problem}{shown}; {fix}"
