"""The simulated node: a JSON state file (env ``FAKE_NPU_SMI_STATE``) describing chips, health, vNPUs and faults.

Standard library only, and independent of ``fuyao.npusmi`` on purpose: the fake and the parsers must not share code,
so a misreading of the real format cannot hide in both. Writes are atomic (rename) under an exclusive ``flock``, so
concurrent ``create-vnpu`` calls never lose an update.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

SCHEMA_VERSION = 1
STATE_ENV = "FAKE_NPU_SMI_STATE"
PRESET_ENV = "FAKE_NPU_SMI_PRESET"
DEV_ENV = "FAKE_NPU_SMI_DEV"
"""Where the simulated driver keeps its device nodes (the host's ``/dev``): creating a vNPU makes
``vdavinci<id>`` there and destroying it removes the node, as the Ascend driver does. Unset: no device nodes."""
DEFAULT_PRESET = "910b4-8"
HEALTH_VALUES = ("OK", "Warning", "Alarm", "Critical", "UNKNOWN")
TOPOLOGY_KINDS = ("hccs-mesh", "hccs-ring", "hccs-halves", "pcie", "none", "unsupported")
FAULT_MODES = ("hang", "hang-after", "garbage", "truncate", "fail", "unsupported")

_REQUIRED = {
    "chip_model": str, "npu_count": int, "dies_per_npu": int, "aicore": int, "aicpu": int, "memory_mb": int,
    "memory_kind": str, "topology": str, "driver_version": str,
}


class StateError(Exception):
    """The state file or a preset is invalid; the message names the field."""


def _presets():  # type: ignore[no-untyped-def]
    from importlib import resources  # imported when used: each npu-smi call is a process start

    return resources.files("fuyao.npu_sim.presets")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _presets().iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    path = _presets() / f"{name}.json"
    if not path.is_file():
        raise StateError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    preset: dict[str, Any] = json.loads(path.read_text())
    return preset


def expand(raw: dict[str, Any]) -> dict[str, Any]:
    """A full state: the preset named by ``preset`` (if any) overlaid with the file's own fields, validated."""
    if not isinstance(raw, dict):
        raise StateError("state must be a JSON object")
    state = load_preset(raw["preset"]) if raw.get("preset") else {}
    state.update({k: v for k, v in raw.items() if k != "preset"})
    state.setdefault("schema_version", SCHEMA_VERSION)
    state.setdefault("chips", {})
    state.setdefault("vnpus", [])
    state.setdefault("faults", [])
    state.setdefault("templates", [])
    state.setdefault("processes", [])
    validate(state)
    return state


def validate(state: dict[str, Any]) -> None:
    if state.get("schema_version") != SCHEMA_VERSION:
        raise StateError(f"schema_version: expected {SCHEMA_VERSION}, got {state.get('schema_version')!r}")
    for key, kind in _REQUIRED.items():
        if not isinstance(state.get(key), kind):
            raise StateError(f"{key}: expected {kind.__name__}, got {state.get(key)!r}")
    if state["npu_count"] < 1 or state["dies_per_npu"] < 1:
        raise StateError("npu_count and dies_per_npu must be >= 1")
    if state["topology"] not in TOPOLOGY_KINDS:
        raise StateError(f"topology: expected one of {TOPOLOGY_KINDS}, got {state['topology']!r}")
    if state["memory_kind"] not in ("hbm", "ddr"):
        raise StateError(f"memory_kind: expected 'hbm' or 'ddr', got {state['memory_kind']!r}")
    reserved = state.get("vnpu_reserved_gb", 0)
    if isinstance(reserved, bool) or not isinstance(reserved, int | float) or not 0 <= reserved < vnpu_memory_gb(state):
        raise StateError(f"vnpu_reserved_gb: expected GB the driver keeps, below the chip's memory, got {reserved!r}")
    affinity = state.get("cpu_affinity")
    if affinity is not None and (not isinstance(affinity, list) or len(affinity) != state["npu_count"]):
        raise StateError("cpu_affinity: expected a list with one CPU range per NPU, or null")
    for key, chip in state["chips"].items():
        if chip.get("health", "OK") not in HEALTH_VALUES:
            raise StateError(f"chips.{key}.health: expected one of {HEALTH_VALUES}, got {chip.get('health')!r}")
    for i, fault in enumerate(state["faults"]):
        if fault.get("mode") not in FAULT_MODES or not isinstance(fault.get("command"), str):
            raise StateError(f"faults[{i}]: needs 'command' (a glob) and 'mode' in {FAULT_MODES}")


def state_path() -> str | None:
    return os.environ.get(STATE_ENV) or None


def read() -> dict[str, Any]:
    """The current state: the file named by FAKE_NPU_SMI_STATE, else the preset (FAKE_NPU_SMI_PRESET or default)."""
    path = state_path()
    if path is None:
        return expand({"preset": os.environ.get(PRESET_ENV, DEFAULT_PRESET)})
    with open(path, encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as exc:
            raise StateError(f"{path}: not valid JSON: {exc}") from None
    return expand(raw)


@contextlib.contextmanager
def locked_update() -> Iterator[dict[str, Any]]:
    """Read-modify-write the state file under an exclusive lock; the change is written only on success."""
    path = state_path()
    if path is None:
        raise StateError(f"this change needs a state file: set {STATE_ENV}")
    lock_path = path + ".lock"
    with open(lock_path, "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path, encoding="utf-8") as fh:
            try:
                raw = json.load(fh)
            except json.JSONDecodeError as exc:
                raise StateError(f"{path}: not valid JSON: {exc}") from None
        state = expand(raw)
        before = copy.deepcopy(state)
        yield state
        if state != before:
            validate(state)
            write(path, state)


def write(path: str, state: dict[str, Any]) -> None:
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fake-npu-smi.", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


# Derived facts --------------------------------------------------------------------------------------------------
def chips(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every compute die with its overrides applied: npu, chip, phy (= logic id), health, usage figures."""
    out = []
    for npu in range(state["npu_count"]):
        for die in range(state["dies_per_npu"]):
            phy = npu * state["dies_per_npu"] + die
            base = {
                "npu": npu, "chip": die, "phy": phy, "health": "OK", "error_codes": [], "error_information": [],
                "link": "UP",
                "power_w": 85.0 if die == 0 else None, "temp_c": 36 + (phy % 3), "aicore_percent": 0,
                "memory_used_mb": int(state["memory_mb"] * 0.0865), "hugepages": [0, 0],
                "bus_id": _bus_id(state, phy),
                "ddr_mb": [int(state.get("ddr_mb", 0) * 0.15), state.get("ddr_mb", 0)],
            }
            base.update(state["chips"].get(f"{npu}-{die}", {}))
            out.append(base)
    return out


def _bus_id(state: dict[str, Any], phy: int) -> str:
    buses = state.get("bus_ids")
    if buses and phy < len(buses):
        return str(buses[phy])
    return f"0000:{(0x01 + phy * 0x20) % 0x100:02X}:00.0"


def pci_device_id(state: dict[str, Any]) -> str:
    """The chip's PCI device id (vendor 0x19e5), as ``npu-smi info -t board`` prints it and sysfs holds it."""
    model = state["chip_model"].upper()
    for prefix, device in (("310P", "0xd500"), ("310", "0xd100"), ("910B", "0xd802"), ("910C", "0xd803")):
        if model.startswith(prefix):
            return device
    return "0xd801"  # Ascend 910 (910ProA/ProB/PremiumA)


def write_sysfs(state: dict[str, Any], root: str | Path) -> list[Path]:
    """A sysfs tree with one PCI function per NPU card (``bus/pci/devices/<bdf>/{vendor,device,class}``), as node
    feature discovery reads it, plus a Huawei NIC that is not an NPU. Returns the NPU device directories."""
    from pathlib import Path

    base = Path(root) / "bus" / "pci" / "devices"
    made = []
    cards = [c for c in chips(state) if c["chip"] == 0]
    entries = [(c["bus_id"].lower(), "0x19e5", pci_device_id(state), "0x120000") for c in cards]
    entries.append(("0000:7d:00.0", "0x19e5", "0x1822", "0x020000"))  # Hi1822 NIC: vendor 0x19e5, not an NPU
    for bdf, vendor, device, klass in entries:
        d = base / bdf
        d.mkdir(parents=True, exist_ok=True)
        for name, value in (("vendor", vendor), ("device", device), ("class", klass)):
            (d / name).write_text(value + "\n")
        if device != "0x1822":
            made.append(d)
    return made


def chip(state: dict[str, Any], npu: int, die: int) -> dict[str, Any] | None:
    return next((c for c in chips(state) if c["npu"] == npu and c["chip"] == die), None)


def template(state: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((t for t in state["templates"] if t["name"] == name), None)


def vnpu_id_range(state: dict[str, Any], phy: int) -> range:
    """vNPU ids a chip may use: phy_id*16+100 .. +107 on the Atlas inference series (310P), .. +115 on the others
    (Ascend's "Creating vNPUs")."""
    ids = 8 if state["chip_model"].upper().removeprefix("ASCEND").startswith("310P") else 16
    return range(phy * 16 + 100, phy * 16 + 100 + ids)


def vnpu_memory_gb(state: dict[str, Any]) -> float:
    """Memory the vNPU templates carve up: the nominal size (a 24 GB 310P3 shows 21527 MB in the table)."""
    return float(state.get("vnpu_memory_gb") or state["memory_mb"] / 1024)


def vnpu_reserved_gb(state: dict[str, Any]) -> float:
    """Memory the driver keeps for itself on a chip (``info-vnpu`` shows 60/64 GB free on an uncarved 64 GB 910B)."""
    return float(state.get("vnpu_reserved_gb") or 0)


def vnpu_takes_gb(state: dict[str, Any], t: dict[str, Any]) -> float:
    """What a created vNPU really gets: its template's share of the memory the driver leaves (a ``32g`` vNPU of a
    64 GB chip gets 30 GB: the driver's table reserves 30720 MB for it)."""
    nominal = vnpu_memory_gb(state)
    return float(t["memory_gb"]) * (nominal - vnpu_reserved_gb(state)) / nominal if nominal else 0.0


def chip_free(state: dict[str, Any], npu: int, die: int) -> dict[str, float]:
    """Free AICore, memory (GB) and AICPU on a chip after its vNPUs."""
    free = {"aicore": state["aicore"], "memory_gb": vnpu_memory_gb(state) - vnpu_reserved_gb(state),
            "aicpu": state["aicpu"]}
    for v in state["vnpus"]:
        if v["npu"] == npu and v["chip"] == die:
            t = template(state, v["template"]) or {"aicore": 0, "memory_gb": 0, "aicpu": 0}
            free["aicore"] -= t["aicore"]
            free["memory_gb"] -= vnpu_takes_gb(state, t)
            free["aicpu"] -= t["aicpu"]
    return free


def vnpu_device_node(vnpu_id: int, present: bool) -> None:
    """Make or remove ``$FAKE_NPU_SMI_DEV/vdavinci<id>``, the node the driver creates with a vNPU: a character
    device with /dev/null's numbers when we may (root), else an empty file (what fuyao checks is that it exists)."""
    root = os.environ.get(DEV_ENV)
    if not root:
        return
    from pathlib import Path

    path = Path(root) / f"vdavinci{vnpu_id}"
    if not present:
        path.unlink(missing_ok=True)
        return
    if path.exists():
        return
    try:
        os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        path.touch()
