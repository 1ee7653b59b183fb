"""Versioned YAML configuration files of the fuyao daemons: read, merge with flags, validate — one
implementation, so every component reports a bad file the same way (exit 2, the field named as written)."""

from __future__ import annotations

import logging
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("fuyao.config")


class ConfigSection(BaseModel):
    """Base of every section of a component's config file: camelCase keys, as Kubernetes writes them (snake_case
    keys still load, with a deprecation warning: :func:`camel_case_keys`), unknown keys are errors (a typo must not
    fall back to a default silently), values frozen."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(raw: str) -> float:
    """Seconds from a Go-style duration (``10s``, ``1m30s``, ``500ms``) or a bare number of seconds; a
    ``ValueError`` saying what is expected otherwise (the caller names the field, flag or annotation)."""
    text = raw.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"expected a duration such as 10s, 1m30s or 500ms, got {raw!r}") from None
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be a finite number of seconds, got {raw!r}")
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {raw!r}")
    return seconds


def _duration(value: Any) -> Any:
    return parse_duration(value) if isinstance(value, str) else value


Seconds = Annotated[float, BeforeValidator(_duration), Field(gt=0, allow_inf_nan=False)]
"""A duration in a config file (``10s``, ``1m30s``, ``500ms`` or a number of seconds), as seconds."""


def _host_port(value: str) -> str:
    _host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT")
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]
"""A listen address, ``HOST:PORT`` (port 0: any free port)."""


class ConfigError(ValueError):
    """An invalid configuration value; ``field`` is dotted, as written in the YAML (camelCase)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"invalid config field {field!r}: {message}" if field else f"invalid config: {message}")


def load_versioned_yaml(path: str | os.PathLike[str], version: str) -> dict[str, Any]:
    """Read the YAML file; its ``version`` must be present and equal to ``version``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping at the top level")
    if "version" not in data:
        raise ConfigError("version", f"missing; this build reads version {version!r}")
    if data["version"] != version:
        raise ConfigError("version", f"unsupported version {data['version']!r}; this build reads {version!r}")
    return data


def merged(file_values: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """File values with flag overrides applied; override keys are dotted snake_case (``health.interval``),
    None means "flag not given"."""
    data: dict[str, Any] = dict(file_values or {})
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        target = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            # into the spelling the file used: a snake_case section is merged over its camelCase twin on loading
            key = part if part != to_camel(part) and isinstance(target.get(part), dict) else to_camel(part)
            section = target.get(key)
            target[key] = dict(section) if isinstance(section, dict) else {}
            target = target[key]
        target.pop(leaf, None)  # a snake_case spelling in the file would win over the flag on loading
        target[to_camel(leaf)] = value
    return data


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models a field holds: itself, or inside Optional / list / tuple / dict values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    args = typing.get_args(annotation)
    if origin in (dict, Mapping):
        args = args[1:]  # values only: a dict's keys are data (URLs, names), never renamed
    found: list[type[BaseModel]] = []
    for arg in args:
        if origin is Annotated or origin in (typing.Union, types.UnionType, list, tuple, dict, Mapping):
            found += _models_in(arg)
    return found


def camel_case_keys(model: type[BaseModel], data: Any, renamed: list[tuple[str, str]] | None = None,
                    written_at: str = "", camel_at: str = "") -> Any:
    """``data`` with every key written in snake_case where ``model`` says camelCase renamed, recursively; each rename
    is appended to ``renamed`` as (the dotted key as written, as it should be). A mapping that has both spellings of
    a key keeps both values, merged, the snake_case one over the other (a user's override merged onto generated
    defaults, as a Helm chart does). Keys that are not the model's fields are left for validation to name."""
    renamed = renamed if renamed is not None else []

    def at(base: str, key: str) -> str:
        return f"{base}.{key}" if base else key

    if isinstance(data, list):
        return [camel_case_keys(model, item, renamed, f"{written_at}[{i}]", f"{camel_at}[{i}]")
                for i, item in enumerate(data)]
    if not isinstance(data, Mapping):
        return data
    fields = model.model_fields
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = fields.get(key) if isinstance(key, str) else None
        alias = (field.alias or key) if field is not None else None
        if field is None:
            field, alias = next((f for f in fields.values() if f.alias == key), None), key
        if field is None or alias is None:
            out[key] = value
            continue
        written, camel = at(written_at, str(key)), at(camel_at, alias)
        for sub in _models_in(field.annotation):
            if isinstance(value, Mapping) and typing.get_origin(field.annotation) in (dict, Mapping):
                value = {k: camel_case_keys(sub, v, renamed, at(written, k), at(camel, k)) for k, v in value.items()}
            else:
                value = camel_case_keys(sub, value, renamed, written, camel)
            break
        if key != alias:
            renamed.append((written, camel))
            if alias in out and isinstance(out[alias], Mapping) and isinstance(value, Mapping):
                value = {**out[alias], **value}
        elif alias in out:  # the snake_case spelling came first, and wins
            value = {**value, **out[alias]} if isinstance(value, Mapping) and isinstance(out[alias], Mapping) \
                else out[alias]
        out[alias] = value
    return out


def validated(model: type[M], data: Mapping[str, Any], what: str = "config") -> M:
    """The model, or :class:`ConfigError` naming the first bad field as the YAML writes it (camelCase). Keys written
    in snake_case load, with one deprecation warning each (they are refused from config version v2 on)."""
    renamed: list[tuple[str, str]] = []
    data = camel_case_keys(model, data, renamed=renamed)
    for written, camel in renamed:
        log.warning("%s key %r is deprecated (snake_case): write %r; snake_case keys load until config version v2",
                    what, written, camel, extra={"key": written, "camelCase": camel})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))  # locations are by alias already
        raise ConfigError(field, first["msg"].removeprefix("Value error, ")) from None


def _is_union_tag(part: Any) -> bool:
    """A part of a pydantic error location that names a union member or a validator (``function-after[...]``,
    ``list[...]``, ``str``), not a key the user wrote."""
    return isinstance(part, str) and ("[" in part or part.startswith("function-") or part in (
        "str", "int", "float", "bool", "list", "dict", "none"))


TOKENIZER_KEYWORDS = ("builtin", "engine")
"""Tokenizer settings that name no file: fuyao's builtin tokenizer (the engine simulator's), or the engines' own
``/tokenize`` (the router's default: the served model's tokenizer and chat template, whatever they are)."""


def check_tokenizer_path(value: str | None) -> str | None:
    """A tokenizer setting: ``None`` (the component's default), a keyword of :data:`TOKENIZER_KEYWORDS`, or a model
    directory holding ``tokenizer.json``, or that file."""
    if value in (None, ""):
        return None
    if value in TOKENIZER_KEYWORDS:
        return value
    path = Path(value)
    if not (path / "tokenizer.json" if path.is_dir() else path).is_file():
        raise ValueError(f"{value}: expected builtin, engine, a model directory with tokenizer.json, or a "
                         "tokenizer.json file")
    return value


TokenizerPath = Annotated[str | None, AfterValidator(check_tokenizer_path)]
"""A config field naming a tokenizer (see :func:`check_tokenizer_path`)."""
