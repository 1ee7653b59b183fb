"""The operator's two small programs that run in pods it creates:

- ``nfd``: on every node, label NPU nodes (``accelerator``, ``accelerate-type``, the driver version) from sysfs and
  npu-smi, and record which label keys it set so deleting the policy removes exactly those (an ``accelerator`` label
  already there, such as MindCluster's ``huawei-Ascend910``, is someone else's: left alone, never recorded);
- ``validate``: in a pod given one NPU, run ``npu-smi info`` and report what it shows through the container's
  termination message (the operator reads it from the pod's status; no log access needed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuyao.contracts import (
    ANNOTATION_NFD_LABELS,
    ENV_ASCEND_VISIBLE_DEVICES,
    LABEL_ACCELERATOR,
    LABEL_NPU_DRIVER,
    LABEL_NPU_FIRMWARE,
    label_value,
)
from fuyao.npusmi import parse
from fuyao.npusmi.client import NpuSmi
from fuyao.npusmi.errors import NpuSmiError

from . import nfd
from .driver import version_from_file

log = logging.getLogger(__name__)

TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096  # bytes the kubelet keeps of a termination message


# ---------------------------------------------------------------------------------------------------------------
# Node feature discovery
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Discovered:
    devices: tuple[tuple[str, str], ...]
    chip_model: str | None = None
    driver_version: str | None = None
    firmware_version: str | None = None
    problem: str = ""


def discover(sysfs_root: str, npu_smi: str, driver_version_file: str, timeout_s: float = 10.0) -> Discovered:
    """What this node has: Ascend PCI devices, and where npu-smi runs, the chip model and driver version (else the
    driver's version file)."""
    devices = tuple(nfd.ascend_devices(sysfs_root))
    if not devices:
        return Discovered(devices=())
    model = driver = firmware = None
    problem = ""
    if Path(npu_smi).exists():
        try:
            tool = NpuSmi(npu_smi, timeout_s=timeout_s)
            info = tool.info()
            model = info.chips[0].name if info.chips else None
            driver = info.driver_version
            if info.chips:
                firmware = tool.board(info.chips[0].npu_id).first("Firmware Version")
        except NpuSmiError as exc:
            problem = f"npu-smi: {exc}"
    if driver is None:
        with contextlib.suppress(OSError):
            driver = version_from_file(Path(driver_version_file).read_text())
    return Discovered(devices=devices, chip_model=model, driver_version=driver, firmware_version=firmware,
                      problem=problem)


def label_patch(found: Discovered, node_meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The node patch that makes its labels say what was found (None: nothing to change). Keys set earlier but not
    found now are removed; keys never recorded are never touched. An ``accelerator`` label discovery did not record
    was set by someone else (an administrator, MindCluster and Volcano's ``huawei-Ascend910``...): it is neither
    overwritten nor recorded, so deleting the policy leaves it too."""
    labels = nfd.node_labels(list(found.devices), found.chip_model)
    if labels and found.driver_version:
        labels[LABEL_NPU_DRIVER] = label_value(found.driver_version)
    if labels and found.firmware_version:
        labels[LABEL_NPU_FIRMWARE] = label_value(found.firmware_version)
    current = node_meta.get("labels") or {}
    recorded_raw = (node_meta.get("annotations") or {}).get(ANNOTATION_NFD_LABELS)
    recorded = {k for k in (recorded_raw or "").split(",") if k}
    if LABEL_ACCELERATOR in current and LABEL_ACCELERATOR not in recorded:
        labels.pop(LABEL_ACCELERATOR, None)
    stale = recorded - set(labels)
    if all(current.get(k) == v for k, v in labels.items()) and not stale and (
            recorded_raw == ",".join(sorted(labels)) or (not labels and recorded_raw is None)):
        return None
    patch_labels: dict[str, str | None] = {**dict.fromkeys(stale), **labels}
    keys = ",".join(sorted(labels))
    return {"metadata": {"labels": patch_labels, "annotations": {ANNOTATION_NFD_LABELS: keys or None}}}


def run_nfd(api: Any, node: str, sysfs_root: str, npu_smi: str, driver_version_file: str, interval_s: float,
            stop: threading.Event) -> None:
    """Label ``node`` every ``interval_s`` until ``stop`` (a failed pass is logged and retried)."""
    while not stop.is_set():
        try:
            found = discover(sysfs_root, npu_smi, driver_version_file)
            if found.problem:
                log.warning("node %s: %s (labelling from PCI ids only)", node, found.problem)
            meta = api.read_node(node).metadata
            patch = label_patch(found, {"labels": meta.labels, "annotations": meta.annotations})
            if patch is not None:
                api.patch_node(node, patch)
                log.info("node %s labelled: %s", node, patch["metadata"]["labels"])
        except Exception as exc:
            log.warning("node %s: discovery failed: %s", node, exc)
        stop.wait(interval_s)


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------
def validate(npu_smi: str = "npu-smi", env: Mapping[str, str] | None = None, dev_root: str = "/dev",
             timeout_s: float = 30.0) -> tuple[bool, str]:
    """(passed?, report): the container got its NPU (``ASCEND_VISIBLE_DEVICES`` and its device node), and
    ``npu-smi info`` runs and lists NPUs. The report starts with a one-line summary, then npu-smi's table."""
    env = os.environ if env is None else env
    visible = env.get(ENV_ASCEND_VISIBLE_DEVICES, "")
    if not visible:
        return False, f"no {ENV_ASCEND_VISIBLE_DEVICES} in the container: the device plugin did not allocate an NPU"
    missing = [f"{dev_root}/davinci{d}" for d in visible.split(",")
               if d.isdigit() and not Path(f"{dev_root}/davinci{d}").exists()]
    if missing:
        return False, f"{ENV_ASCEND_VISIBLE_DEVICES}={visible} but {', '.join(missing)} missing in the container"
    try:
        done = subprocess.run([npu_smi, "info"], capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        return False, f"{npu_smi} is not in the container (devicePlugin values npuSmi.mountIntoContainers)"
    except subprocess.TimeoutExpired:
        return False, f"npu-smi info did not answer within {timeout_s:.0f}s"
    if done.returncode != 0:
        return False, f"npu-smi info exited {done.returncode}: {(done.stderr or done.stdout).strip()[:500]}"
    try:
        info = parse.parse_info(done.stdout)
    except NpuSmiError as exc:
        return False, f"npu-smi info printed something unreadable: {exc}"
    if not info.chips:
        return False, "npu-smi info lists no NPU"
    models = sorted({c.name for c in info.chips})
    bad = [f"{c.npu_id}-{c.chip_id} {c.health_raw}" for c in info.chips if not c.health.schedulable]
    summary = (f"npu-smi info lists {len(info.chips)} NPU chip(s) ({', '.join(models)}), driver "
               f"{info.driver_version or 'unknown'}; this pod holds {ENV_ASCEND_VISIBLE_DEVICES}={visible}"
               + (f"; not healthy: {', '.join(bad)}" if bad else ""))
    return True, summary + "\n" + done.stdout


def write_termination_message(report: str, path: str = TERMINATION_LOG) -> None:
    data = report.encode()[: TERMINATION_LIMIT - 1]
    try:
        Path(path).write_bytes(data)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)
