"""LS/BE colocation: the QoS keys of the design doc, Volcano and Koordinator and their precedence, the colocation
node label, and the usage the QoS agent publishes."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .base import ContractError, Schema, parse_enum

LABEL_VOLCANO_COLOCATION = "volcano.sh/colocation"
"""Node label (``"true"``) that admits best-effort pods on the node (Volcano's key)."""
LABEL_VOLCANO_QOS = "volcano.sh/qos"
"""The design doc's pod label: ``LS`` or ``BE``."""
ANNOTATION_VOLCANO_QOS_LEVEL = "volcano.sh/qos-level"
"""Volcano's annotation: LC | HLS | LS | BE, or Huawei CCE's integers -7..7 (negative = offline)."""
LABEL_KOORDINATOR_QOS = "koordinator.sh/qosClass"
"""Koordinator's label: LSE | LSR | LS | BE | SYSTEM."""
ANNOTATION_NODE_USAGE = "qos.openfuyao.com/usage"
"""Node annotation (JSON, :class:`NodeUsage`) written by the QoS agent: measured CPU/memory use, LS and BE."""


class QoSClass(StrEnum):
    """The two classes fuyao schedules and enforces: latency-sensitive and best-effort."""

    LS = "LS"
    BE = "BE"


_VOLCANO_QOS_LEVELS = {"LC": QoSClass.LS, "HLS": QoSClass.LS, "LS": QoSClass.LS, "BE": QoSClass.BE}
_KOORDINATOR_QOS = {"LSE": QoSClass.LS, "LSR": QoSClass.LS, "LS": QoSClass.LS, "SYSTEM": QoSClass.LS,
                    "BE": QoSClass.BE}


def parse_volcano_qos_label(raw: str) -> QoSClass:
    return parse_enum(QoSClass, LABEL_VOLCANO_QOS, raw, case_insensitive=True)


def parse_volcano_qos_level(raw: str) -> QoSClass:
    """Volcano's names, or Huawei CCE's integers (-7..7, negative = offline/BE)."""
    if not isinstance(raw, str):
        raise ContractError(ANNOTATION_VOLCANO_QOS_LEVEL, "expected a string", value=raw)
    value = raw.strip()
    if value.upper() in _VOLCANO_QOS_LEVELS:
        return _VOLCANO_QOS_LEVELS[value.upper()]
    try:
        level = int(value)
    except ValueError:
        raise ContractError(ANNOTATION_VOLCANO_QOS_LEVEL, "expected LC, HLS, LS, BE or an integer -7..7",
                            value=raw) from None
    if not -7 <= level <= 7:
        raise ContractError(ANNOTATION_VOLCANO_QOS_LEVEL, "integer level out of range -7..7", value=raw)
    return QoSClass.BE if level < 0 else QoSClass.LS


def parse_koordinator_qos(raw: str) -> QoSClass:
    if not isinstance(raw, str):
        raise ContractError(LABEL_KOORDINATOR_QOS, "expected a string", value=raw)
    value = raw.strip().upper()
    if value not in _KOORDINATOR_QOS:
        raise ContractError(LABEL_KOORDINATOR_QOS, f"expected one of {list(_KOORDINATOR_QOS)}", value=raw)
    return _KOORDINATOR_QOS[value]


class QoSResolution(BaseModel):
    """The QoS class of a pod, the key it came from, and values that were ignored because they are invalid."""

    model_config = ConfigDict(frozen=True)

    qos: QoSClass
    source: str | None = Field(description="The key that decided, or None for the default")
    problems: tuple[str, ...] = ()


def resolve_qos(labels: Mapping[str, str], annotations: Mapping[str, str]) -> QoSResolution:
    """QoS class by documented precedence.

    1. label ``volcano.sh/qos`` (the design doc's key), 2. annotation ``volcano.sh/qos-level``,
    3. label ``koordinator.sh/qosClass``, 4. default ``LS`` (never demote a pod we cannot classify).
    An invalid value is reported in ``problems`` and the next key is tried. (Called for every pod event: the answer
    for the three keys' values is kept.)
    """
    values = (labels.get(LABEL_VOLCANO_QOS), annotations.get(ANNOTATION_VOLCANO_QOS_LEVEL),
              labels.get(LABEL_KOORDINATOR_QOS))
    if all(v is None or type(v) is str for v in values):
        return _resolve_qos(*values)
    return _resolve_qos.__wrapped__(*values)  # not strings (malformed input): not kept


@functools.lru_cache(maxsize=256)
def _resolve_qos(volcano_label: str | None, volcano_annotation: str | None,
                 koordinator_label: str | None) -> QoSResolution:
    sources = (
        (LABEL_VOLCANO_QOS, volcano_label, parse_volcano_qos_label),
        (ANNOTATION_VOLCANO_QOS_LEVEL, volcano_annotation, parse_volcano_qos_level),
        (LABEL_KOORDINATOR_QOS, koordinator_label, parse_koordinator_qos),
    )
    problems: list[str] = []
    for key, value, parse in sources:
        if value is None:
            continue
        try:
            return QoSResolution(qos=parse(value), source=key, problems=tuple(problems))
        except ContractError as exc:
            problems.append(str(exc))
    return QoSResolution(qos=QoSClass.LS, source=None, problems=tuple(problems))


USAGE_STALE_S = 120.0
"""A ``qos.openfuyao.com/usage`` older than this is stale: the extender ignores its measurement and takes the QoS
agent that wrote it for stopped (its batch resources no longer enforced). The agent publishes at least twice as
often."""


class NodeUsage(Schema):
    """Value of node annotation ``qos.openfuyao.com/usage``: real usage measured by the QoS agent (LS and BE), so
    the scheduler extender can place by what nodes do, not only by what pods requested."""

    schema_version: Literal[1] = 1
    updated_at: float = Field(description="Unix seconds of the measurement; stale values are ignored")
    cpu_capacity_milli: int = Field(gt=0)
    cpu_used_milli: int = Field(ge=0)
    memory_capacity_bytes: int = Field(gt=0)
    memory_used_bytes: int = Field(ge=0)
    be_cpu_used_milli: int = Field(default=0, ge=0)
    be_memory_used_bytes: int = Field(default=0, ge=0)

    @property
    def cpu_ratio(self) -> float:
        return min(1.0, self.cpu_used_milli / self.cpu_capacity_milli)

    @property
    def memory_ratio(self) -> float:
        return min(1.0, self.memory_used_bytes / self.memory_capacity_bytes)

    @property
    def be_pressure(self) -> float:
        """The larger of BE's CPU and memory share of the node."""
        return min(1.0, max(self.be_cpu_used_milli / self.cpu_capacity_milli,
                            self.be_memory_used_bytes / self.memory_capacity_bytes))
