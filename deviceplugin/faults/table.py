"""The fault table: which level each npu-smi error code has, and what the device plugin does at each level.

Levels are MindCluster's (``faultCode.json`` of its device plugin; facts in docs/facts/ascend-faults.md §1), so a
table a user already keeps for MindCluster works here unchanged. Two file formats are read:

- fuyao's versioned table (``version: v1``), YAML or JSON::

      version: v1
      unknownCode: RestartBusiness      # level of a code the table does not list
      levels:
        NotHandleFault: ["80E21007"]
        RestartNPU: ["8C03A000", "80E18005"]
        ...

- MindCluster's ``faultCode.json`` as is: ``{"NotHandleFaultCodes": [...], "RestartNPUCodes": [...], ...}``.

A code listed at several levels takes the most severe (MindCluster's rule). Codes are hex, compared
case-insensitively, with or without ``0x``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fuyao.config_files import ConfigError
from fuyao.contracts import FaultAction
from fuyao.npusmi import NpuHealthState

TABLE_VERSION = "v1"
DEFAULT_TABLE = "default-fault-table.yaml"


class FaultLevel(StrEnum):
    """MindCluster's fault levels, mildest first (its device plugin's ``getMostSeriousFaultType`` order)."""

    NOT_HANDLE = "NotHandleFault"
    SUB_HEALTH = "SubHealthFault"
    RESTART_REQUEST = "RestartRequest"
    RESTART_BUSINESS = "RestartBusiness"
    FREE_RESTART_NPU = "FreeRestartNPU"
    RESTART_NPU = "RestartNPU"
    PRE_SEPARATE_NPU = "PreSeparateNPU"
    SEPARATE_NPU = "SeparateNPU"
    MANUALLY_SEPARATE_NPU = "ManuallySeparateNPU"

    @property
    def severity(self) -> int:
        return _ORDER.index(self)

    @property
    def action(self) -> FaultAction:
        return ACTIONS[self]


_ORDER = list(FaultLevel)

ACTIONS: dict[FaultLevel, FaultAction] = {
    FaultLevel.NOT_HANDLE: FaultAction.KEEP,
    FaultLevel.SUB_HEALTH: FaultAction.KEEP,
    # the workload restarts its request or service; the chip takes no new pods while the code lasts
    FaultLevel.RESTART_REQUEST: FaultAction.UNHEALTHY,
    FaultLevel.RESTART_BUSINESS: FaultAction.UNHEALTHY,
    # hot reset once no pod holds the chip (fuyao never kills a pod to reset: RestartNPU waits like FreeRestartNPU)
    FaultLevel.FREE_RESTART_NPU: FaultAction.RESET,
    FaultLevel.RESTART_NPU: FaultAction.RESET,
    # no new pods; the pod on it keeps running (Unhealthy never stops a running container)
    FaultLevel.PRE_SEPARATE_NPU: FaultAction.UNHEALTHY,
    FaultLevel.SEPARATE_NPU: FaultAction.ISOLATE,
    FaultLevel.MANUALLY_SEPARATE_NPU: FaultAction.ISOLATE,
}

# MindCluster faultCode.json key → level (ManuallySeparateNPU has no code list: it comes from fault frequency)
MINDCLUSTER_KEYS: dict[str, FaultLevel] = {f"{level.value}Codes": level for level in FaultLevel
                                           if level != FaultLevel.MANUALLY_SEPARATE_NPU}
MINDCLUSTER_NETWORK_KEYS = ("NotHandleFaultNetworkCodes", "PreSeparateNPUNetworkCodes", "SeparateNPUNetworkCodes",
                            "SubHealthFaultNetworkCodes")
_CODE = re.compile(r"^(0[xX])?([0-9A-Fa-f]{1,16})$")


def normalize_code(raw: str) -> str:
    """``0x80e01801`` → ``80E01801``; raises ValueError for anything that is not a hex code."""
    m = _CODE.match(raw.strip())
    if m is None:
        raise ValueError(f"{raw!r} is not a hex fault code (e.g. 80E01801)")
    return m.group(2).upper()


class FaultTableFile(BaseModel):
    """fuyao's fault table file, version v1."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    version: str
    unknown_code: FaultLevel = Field(default=FaultLevel.RESTART_BUSINESS, alias="unknownCode")
    levels: dict[FaultLevel, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if value != TABLE_VERSION:
            raise ValueError(f"unsupported version {value!r}; this build reads {TABLE_VERSION!r}")
        return value

    @field_validator("levels", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for level, codes in value.items():
                bad = [c for c in codes or () if not isinstance(c, str)] if isinstance(codes, list) else [codes]
                if bad:
                    raise ValueError(f"{level}: {bad[0]!r} is not a string; quote hex codes (YAML reads 80E21007 "
                                     "unquoted as a number)")
        return value

    @field_validator("levels")
    @classmethod
    def _codes(cls, value: dict[FaultLevel, tuple[str, ...]]) -> dict[FaultLevel, tuple[str, ...]]:
        return {level: tuple(normalize_code(c) for c in codes) for level, codes in value.items()}


class FaultTable:
    """Code → level, and the level of a chip's codes taken together."""

    def __init__(self, levels: Mapping[FaultLevel, Iterable[str]], unknown_code: FaultLevel, source: str):
        self.unknown_code = unknown_code
        self.source = source
        self.codes: dict[str, FaultLevel] = {}
        for level, codes in levels.items():
            for code in codes:
                known = self.codes.get(code)
                if known is None or level.severity > known.severity:
                    self.codes[code] = level  # listed twice: the more severe level wins

    def level_of_code(self, code: str) -> FaultLevel:
        try:
            key = normalize_code(code)
        except ValueError:
            return self.unknown_code
        return self.codes.get(key, self.unknown_code)

    def level(self, codes: Iterable[str], health: NpuHealthState) -> FaultLevel | None:
        """The level of a chip: its worst code's, or with no codes, what npu-smi's Health says (Alarm, Critical and
        UNKNOWN count as ``unknownCode``; OK and Warning are no fault). None when the chip has no fault."""
        levels = [self.level_of_code(c) for c in codes]
        if not levels:
            return None if health.schedulable else self.unknown_code
        return max(levels, key=lambda lv: lv.severity)


def _from_mindcluster(data: Mapping[str, Any], source: str) -> FaultTable:
    unknown = [k for k in data if k not in MINDCLUSTER_KEYS and k not in MINDCLUSTER_NETWORK_KEYS]
    if unknown:
        raise ConfigError(unknown[0], f"{source}: not a faultCode.json key (known: {', '.join(MINDCLUSTER_KEYS)})")
    levels: dict[FaultLevel, list[str]] = {}
    for key, raw in data.items():
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
            raise ConfigError(key, f"{source}: expected a list of hex code strings")
        level = MINDCLUSTER_KEYS.get(key) or FaultLevel(key.removesuffix("NetworkCodes"))
        for i, code in enumerate(raw):
            try:
                levels.setdefault(level, []).append(normalize_code(code))
            except ValueError as exc:
                raise ConfigError(f"{key}[{i}]", f"{source}: {exc}") from None
    # MindCluster grades a code it does not list by the event's severity, which npu-smi does not print; fuyao's
    # default (Unhealthy while it lasts, no reset, no isolation) applies
    return FaultTable(levels, FaultLevel.RESTART_BUSINESS, source)


def parse_table(data: Any, source: str) -> FaultTable:
    if not isinstance(data, dict):
        raise ConfigError("", f"{source}: expected a mapping at the top level")
    if "version" not in data and any(k.endswith("Codes") for k in data):
        return _from_mindcluster(data, source)
    if "version" not in data:
        raise ConfigError("version", f"{source}: missing; this build reads version {TABLE_VERSION!r} (or "
                                     "MindCluster's faultCode.json)")
    try:
        parsed = FaultTableFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(field, f"{source}: {first['msg'].removeprefix('Value error, ')}") from None
    return FaultTable(parsed.levels, parsed.unknown_code, source)


def load_table(path: str | None = None) -> FaultTable:
    """The table at ``path`` (YAML or JSON, either format), or the built-in default."""
    if path is None:
        text = resources.files(__package__).joinpath(DEFAULT_TABLE).read_text()
        return parse_table(yaml.safe_load(text), f"built-in {DEFAULT_TABLE}")
    try:
        return _load_file(path)
    except ConfigError as exc:
        if exc.field == "health.faultTable":
            raise
        inner = f" {exc.field}:" if exc.field else ""
        raise ConfigError("health.faultTable", f"{inner} {str(exc).split(': ', 1)[-1]}".strip()) from None


def _load_file(path: str) -> FaultTable:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("health.faultTable", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("health.faultTable", f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}"
                                               f": {exc}") from None
    return parse_table(data, path)
