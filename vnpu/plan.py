"""Static partitioning: the design doc's ``vnpu-config.json`` and the planner that turns it into real templates.

```json
{"devices": [{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "8GB"},
             {"device_id": "Ascend910-1", "vnpu_count": 2, "template": "vir10_3c_16g"}]}
```

``device_id`` is a physical id (``"0"``) or a device ID (``"Ascend910-0"``). The planner is pure: it either returns
a plan in which every entry fits its chip (AICore, memory, AICPU), or raises :class:`PlanError` naming the entry and
the reason — a plan is accepted or rejected as a whole, so nothing is created from a half-valid file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from fuyao.inventory import NpuDevice

from .templates import Template, smallest_covering

MAX_VNPUS_PER_CHIP = 16  # vNPU ids phy*16+100 .. +115 (Atlas training series, A2, A3)
INFERENCE_VNPU_IDS = 8  # vNPU ids phy*16+100 .. +107 (Atlas inference series: 310P)


def is_310p_model(chip_model: str) -> bool:
    """npu-smi's chip name (``310P3``, ``Ascend310P3``) is an Atlas inference series (310P) chip."""
    return chip_model.strip().upper().removeprefix("ASCEND").startswith("310P")


def vnpu_id_count(chip_model: str) -> int:
    """How many vNPU ids a chip has (Ascend's "Creating vNPUs", ``-v vnpu_id``): ``phy_id*16+100`` … ``+107`` on
    the Atlas inference series (310P), … ``+115`` on the others."""
    return INFERENCE_VNPU_IDS if is_310p_model(chip_model) else MAX_VNPUS_PER_CHIP


class PlanError(ValueError):
    """The config cannot be applied; names the entry (index and device) and why."""

    def __init__(self, message: str, entry: int | None = None, device_id: str | None = None):
        self.entry = entry
        self.device_id = device_id
        where = "" if entry is None else f"devices[{entry}]" + (f" (device {device_id!r})" if device_id else "") + ": "
        super().__init__(where + message)


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|G|GIB|GI|MB|M|MIB|MI)?\s*$", re.IGNORECASE)


def parse_memory_gb(raw: str | int | float) -> float:
    """``"16GB"``, ``"16G"``, ``"16Gi"``, ``"16384MB"``, ``16`` → GB (the unit templates are sized in)."""
    if isinstance(raw, bool):
        raise ValueError(f"expected a size such as 16GB or 8192MB, got {raw!r}")
    if isinstance(raw, int | float):
        value, unit = float(raw), "GB"
    else:
        m = _MEMORY.match(raw)
        if not m:
            raise ValueError(f"expected a size such as 16GB or 8192MB, got {raw!r}")
        value, unit = float(m.group(1)), (m.group(2) or "GB").upper()
    gb = value / 1024 if unit.startswith("M") else value
    if gb <= 0:
        raise ValueError(f"size must be positive, got {raw!r}")
    return gb


class DeviceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(min_length=1)
    vnpu_count: StrictInt = Field(default=0, ge=0, le=MAX_VNPUS_PER_CHIP)
    vnpu_memory: str | None = None
    template: str | None = None
    mix: dict[str, StrictInt] | None = Field(default=None, description="a mixed split: template → how many, e.g. "
                                       "{\"vir10_3c_32g\": 1, \"vir05_1c_16g\": 2} (instead of vnpu_count with "
                                       "template or vnpu_memory)")

    @model_validator(mode="after")
    def _one_way(self) -> DeviceEntry:
        if self.mix is None:
            if self.vnpu_count == 0 and (self.template is not None or self.vnpu_memory is not None):
                raise ValueError("template / vnpu_memory without vnpu_count: say how many vNPUs (vnpu_count >= 1), "
                                 "or leave both out to keep the chip whole")
            return self
        if self.template is not None or self.vnpu_memory is not None:
            raise ValueError("mix names its templates: leave template and vnpu_memory out")
        if any(n < 1 for n in self.mix.values()) or not self.mix:
            raise ValueError("mix: every template needs a count of at least 1")
        total = sum(self.mix.values())
        if self.vnpu_count not in (0, total) or total > MAX_VNPUS_PER_CHIP:
            raise ValueError(f"mix makes {total} vNPUs; vnpu_count, when given, must say the same "
                             f"(at most {MAX_VNPUS_PER_CHIP})")
        return self

    @field_validator("device_id", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("vnpu_memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"expected a size such as 16GB or 8192MB, got {value!r}")
        gb = parse_memory_gb(value)
        return value if isinstance(value, str) else f"{gb:.6f}".rstrip("0").rstrip(".") + "GB"

    @property
    def memory_gb(self) -> float | None:
        return None if self.vnpu_memory is None else parse_memory_gb(self.vnpu_memory)


class VnpuConfig(BaseModel):
    """The ``vnpu-config.json`` ConfigMap."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=1, ge=1, le=1)
    devices: tuple[DeviceEntry, ...] = ()


def load_vnpu_config(path: str | Path) -> VnpuConfig:
    """Read and validate the file; errors are :class:`PlanError` naming the file and the field."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise PlanError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path} is not valid JSON: {exc}") from None
    return parse_vnpu_config(data, str(path))


def parse_vnpu_config(data: Any, source: str = "vnpu config") -> VnpuConfig:
    try:
        return VnpuConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise PlanError(f"{source}: field {field!r}: {first['msg'].removeprefix('Value error, ')}") from None


class ChipCapacity(BaseModel):
    """What a chip offers to vNPUs (``info-vnpu`` Total, or the inventory when that is not available). Only the
    AICores and AICPUs decide what fits: that is what npu-smi checks before it creates a vNPU (the driver's
    ``npu_chip_set.c``). Memory is not a budget here: the driver keeps some of the chip for itself (a 64 GB 910B
    shows 60 GB free) and gives each vNPU a share of the rest, less than its template's name says (a ``32g`` vNPU
    gets 30 GB), so two ``32g`` halves of a 64 GB chip fit although 64 > 60. ``memory_gb`` is reported only."""

    model_config = ConfigDict(frozen=True)

    aicore: int
    memory_gb: float
    aicpu: int | None = None
    chip_model: str = ""
    """npu-smi's chip name (``310P3``, ``910B4``, ``910ProB``...): which family's rules apply ("" unknown)."""

    @property
    def is_310p(self) -> bool | None:
        return is_310p_model(self.chip_model) if self.chip_model else None


class DevicePlan(BaseModel):
    """One device's vNPUs: ``parts`` (template, how many); empty keeps the die whole."""

    model_config = ConfigDict(frozen=True)

    device_id: str
    npu_id: int
    chip_id: int
    physical_id: int
    parts: tuple[tuple[Template, int], ...] = ()

    @property
    def count(self) -> int:
        return sum(n for _, n in self.parts)

    def describe(self) -> str:
        return " + ".join(f"{n} x {t.name}" for t, n in self.parts) or "whole"


class Plan(BaseModel):
    """Per device: the template and how many vNPUs of it. Devices not listed are left whole."""

    model_config = ConfigDict(frozen=True)

    devices: tuple[DevicePlan, ...]

    def for_device(self, device_id: str) -> DevicePlan | None:
        return next((d for d in self.devices if d.device_id == device_id), None)

    def without(self, device_ids: Collection[str]) -> Plan:
        """The plan for every other device."""
        return Plan(devices=tuple(d for d in self.devices if d.device_id not in device_ids)) if device_ids else self

    @property
    def carved(self) -> set[str]:
        """Devices that are split into vNPUs (no longer offered whole)."""
        return {d.device_id for d in self.devices if d.count > 0}


def resolve_device(raw: str, devices: Sequence[NpuDevice]) -> NpuDevice | None:
    for device in devices:
        if raw == device.id or (raw.isdigit() and int(raw) == device.physical_id):
            return device
    return None


def fits(template: Template, count: int, capacity: ChipCapacity) -> str | None:
    """None when ``count`` copies of ``template`` fit the chip's AICores and AICPUs (see :class:`ChipCapacity`:
    never its memory figure), else the reason."""
    return fits_all(((template, count),), capacity)


def fits_all(parts: Sequence[tuple[Template, int]], capacity: ChipCapacity) -> str | None:
    """None when the templates of ``parts`` (template, how many) fit the chip together: their AICores and AICPUs
    add up to no more than it has (npu-smi's own check), else the reason."""
    what = " + ".join(f"{n} x {t.name}" for t, n in parts)
    cores = sum(n * t.aicore for t, n in parts)
    if cores > capacity.aicore:
        return f"{what} need {cores} AICore, the chip has {capacity.aicore}"
    cpus = sum(n * t.aicpu for t, n in parts)
    if capacity.aicpu is not None and cpus > capacity.aicpu:
        return f"{what} need {cpus} AICPU, the chip has {capacity.aicpu}"
    family = capacity.is_310p  # the 910 A1's vir02/vir04 share names with 310P templates, not their rules
    if parts and (family or (family is None and all(_P310_TEMPLATE.match(t.name) for t, _ in parts))):
        problem = _vgroup_problem(parts, capacity, what)
        if problem:
            return problem
    return _media_problem(parts, what)


# A template ending in _m / _dvpp takes every media unit of its chip (VPC, VDEC, JPEGD, PNGD, VENC, JPEGE), one ending
# in _nm / _ndvpp takes none (Ascend's template naming): only media-less templates may share a chip with the former.
_ALL_MEDIA = re.compile(r"_(m|dvpp)$")
_NO_MEDIA = re.compile(r"_(nm|ndvpp)$")


def _media_problem(parts: Sequence[tuple[Template, int]], what: str) -> str | None:
    names = {t.name: n for t, n in parts if n}
    every = [name for name in names if _ALL_MEDIA.search(name)]
    if not every:
        return None
    others = [name for name in names if not _NO_MEDIA.search(name)]
    if names[every[0]] > 1 or len(others) > 1:
        return (f"{what}: {every[0]} takes every media unit of the chip; only templates without media units "
                "(_nm, _ndvpp) may share its chip (rule dvpp)")
    return None


# 310P templates name no memory size (vir01, vir02_1c, vir04_3c_ndvpp...); their chips add vGroup rules
# (docs/facts/vnpu-template-rules.md): at most 7 vNPUs and 4 vGroups (npu-smi -g 0..3) per chip; every template but
# vir01 takes a vGroup of its own, two vir01 share one 2-AICore vGroup (a lone vir01 still costs 2 AICores); the
# vir04_4c_dvpp template takes every media unit, so only vir04_3c_ndvpp may sit beside it.
_P310_TEMPLATE = re.compile(r"^vir0[124](_\dc)?(_n?dvpp)?$")
P310_MAX_VNPUS = 7
P310_MAX_VGROUPS = 4


def _vgroup_problem(parts: Sequence[tuple[Template, int]], capacity: ChipCapacity, what: str) -> str | None:
    count = {t.name: n for t, n in parts if n}
    vnpus = sum(count.values())
    if vnpus > P310_MAX_VNPUS:
        return f"{what} are {vnpus} vNPUs, a 310P chip holds at most {P310_MAX_VNPUS} (rule 310p/vnpus)"
    shared = (count.get("vir01", 0) + 1) // 2
    groups = sum(n for name, n in count.items() if name != "vir01") + shared
    if groups > P310_MAX_VGROUPS:
        return (f"{what} need {groups} vGroups (two vir01 share one, every other template takes its own), a 310P "
                f"chip has {P310_MAX_VGROUPS} (rule 310p/vgroups)")
    cores = sum(n * t.aicore for t, n in parts if t.name != "vir01") + 2 * shared
    if cores > capacity.aicore:
        return (f"{what} need {cores} AICore (a vir01 vGroup takes 2, shared by two vir01), the chip has "
                f"{capacity.aicore} (rule 310p/vgroups)")
    return None


def make_plan(config: VnpuConfig, devices: Sequence[NpuDevice], templates: Sequence[Template],
              capacity: Mapping[str, ChipCapacity]) -> Plan:
    """Map every entry to a real template that fits its chip, or raise :class:`PlanError` for the first that
    cannot (nothing is planned from an invalid file)."""
    planned: list[DevicePlan] = []
    seen: dict[str, int] = {}
    names = sorted(t.name for t in templates)
    for index, entry in enumerate(config.devices):
        device = resolve_device(entry.device_id, devices)
        if device is None:
            raise PlanError(f"no such device on this node (devices: {[d.id for d in devices]})", index,
                            entry.device_id)
        if device.id in seen:
            raise PlanError(f"device listed twice (also devices[{seen[device.id]}])", index, entry.device_id)
        seen[device.id] = index
        if entry.vnpu_count == 0 and entry.mix is None:
            planned.append(DevicePlan(device_id=device.id, npu_id=device.npu_id, chip_id=device.chip_id,
                                      physical_id=device.physical_id))
            continue
        if not templates:
            raise PlanError(f"{device.chip_model} cannot be split into vNPUs (no templates)", index, entry.device_id)
        cap = capacity.get(device.id)
        if cap is None:
            raise PlanError("capacity of the chip is unknown (npu-smi info-vnpu and the inventory say nothing)",
                            index, entry.device_id)
        if entry.mix is not None:
            parts = tuple((_named(name, templates, names, entry, index), n) for name, n in entry.mix.items())
            problem = fits_all(parts, cap)
            if problem:
                raise PlanError(problem, index, entry.device_id)
        else:
            parts = ((_choose(entry, templates, cap, names, index), entry.vnpu_count),)
        ids = vnpu_id_count(device.chip_model)
        count = sum(n for _, n in parts)
        if count > ids:
            raise PlanError(f"{count} vNPUs, but a {device.chip_model} chip has {ids} vNPU ids (phy_id*16+100 .. "
                            f"+{99 + ids})", index, entry.device_id)
        planned.append(DevicePlan(device_id=device.id, npu_id=device.npu_id, chip_id=device.chip_id,
                                  physical_id=device.physical_id, parts=parts))
    plan = Plan(devices=tuple(planned))
    _duo_cards_one_mode(plan, devices, config, seen)
    return plan


def _duo_cards_one_mode(plan: Plan, devices: Sequence[NpuDevice], config: VnpuConfig, seen: Mapping[str, int]) -> None:
    """Both chips of an Atlas 300I Duo card (two 310P chips behind one card id) are split into vNPUs, or both stay
    whole: the driver splits a Duo card as a whole (docs/facts/vnpu-template-rules.md)."""
    carved = plan.carved
    cards: dict[int, list[NpuDevice]] = {}
    for device in devices:
        if is_310p_model(device.chip_model):
            cards.setdefault(device.npu_id, []).append(device)
    for npu_id, chips in sorted(cards.items()):
        split = [d for d in chips if d.id in carved]
        whole = [d for d in chips if d.id not in carved]
        if len(chips) > 1 and split and whole:
            index = seen[split[0].id]
            raise PlanError(f"{split[0].id} is split but {', '.join(d.id for d in whole)} on the same Atlas 300I Duo "
                            f"card (card {npu_id}) is not: both chips of a Duo card are split into vNPUs, or both "
                            "stay whole; list every chip of the card", index, config.devices[index].device_id)


def _named(name: str, templates: Sequence[Template], names: list[str], entry: DeviceEntry, index: int) -> Template:
    template = next((t for t in templates if t.name == name), None)
    if template is None:
        raise PlanError(f"unknown template {name!r} (this chip has {names})", index, entry.device_id)
    return template


def _choose(entry: DeviceEntry, templates: Sequence[Template], cap: ChipCapacity, names: list[str],
            index: int) -> Template:
    memory = entry.memory_gb
    if entry.template is not None:
        template = _named(entry.template, templates, names, entry, index)
        if memory is not None and template.memory_gb + 1e-9 < memory:
            raise PlanError(f"template {template.name} has {template.memory_gb:g} GB, less than vnpu_memory "
                            f"{entry.vnpu_memory}", index, entry.device_id)
        problem = fits(template, entry.vnpu_count, cap)
        if problem:
            raise PlanError(problem, index, entry.device_id)
        return template
    if memory is None:
        raise PlanError("give vnpu_memory (e.g. \"8GB\") or template", index, entry.device_id)
    candidates = smallest_covering(templates, memory_gb=memory)
    if not candidates:
        largest = max(t.memory_gb for t in templates)
        raise PlanError(f"no template has {entry.vnpu_memory} (largest: {largest:g} GB)", index, entry.device_id)
    problems = []
    for template in candidates:
        problem = fits(template, entry.vnpu_count, cap)
        if problem is None:
            return template
        problems.append(problem)
    raise PlanError(problems[0], index, entry.device_id)
