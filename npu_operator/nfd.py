"""Node feature discovery for NPUs: a node with a Huawei PCI device (vendor ``0x19e5`` under
``/sys/bus/pci/devices``) is an NPU node. Pure over a sysfs root, so tests fake the tree."""

from __future__ import annotations

from pathlib import Path

from fuyao.contracts import LABEL_ACCELERATE_TYPE, LABEL_ACCELERATOR, label_value

HUAWEI_VENDOR = "0x19e5"
ACCELERATOR_VALUE = "huawei-ascend-npu"
# PCI device ids of Ascend chips (npu-smi info -t board "PCI Device ID"): 0xd100 310, 0xd500 310P, 0xd801 910,
# 0xd802 910B, 0xd803 910C; anything else of vendor 0x19e5 (NICs, RAID) is not an NPU.
ASCEND_DEVICE_IDS = {"0xd100": "310", "0xd500": "310P", "0xd801": "910", "0xd802": "910B", "0xd803": "910C"}


def ascend_devices(sysfs_root: str | Path = "/sys") -> list[tuple[str, str]]:
    """(PCI address, chip family) of every Ascend device under ``sysfs_root``."""
    base = Path(sysfs_root) / "bus" / "pci" / "devices"
    found = []
    for dev in sorted(base.iterdir()) if base.is_dir() else ():
        try:
            vendor = (dev / "vendor").read_text().strip().lower()
            device = (dev / "device").read_text().strip().lower()
        except OSError:
            continue
        if vendor == HUAWEI_VENDOR and device in ASCEND_DEVICE_IDS:
            found.append((dev.name, ASCEND_DEVICE_IDS[device]))
    return found


def node_labels(devices: list[tuple[str, str]], chip_model: str | None = None) -> dict[str, str]:
    """The labels an NPU node gets (empty when it has no Ascend device). ``chip_model`` from npu-smi, where it runs,
    is more precise than the PCI family (910B4 rather than 910B)."""
    if not devices:
        return {}
    families = sorted({family for _, family in devices})
    return {LABEL_ACCELERATOR: ACCELERATOR_VALUE,
            LABEL_ACCELERATE_TYPE: label_value(chip_model or "-".join(families))}
