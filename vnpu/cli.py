"""``fuyao-vnpu``: operators' view of vNPUs on this node.

    fuyao-vnpu plan  --config vnpu-config.json     what apply would change (changes nothing)
    fuyao-vnpu apply --config vnpu-config.json     create/destroy static vNPUs to match the file
    fuyao-vnpu list                                every vNPU, its owner and whether a container uses it
    fuyao-vnpu gc                                  resolve interrupted creations, destroy our unused dynamic vNPUs

``apply`` is for nodes whose device plugin does not run a static plan (it applies its ConfigMap itself: apply
refuses while it serves ``npu.huawei.com/vNPU``); like the plugin, it does not carve a die a container holds whole.

Exit codes: 0 done, 1 npu-smi or a vNPU change failed (or apply refused), 2 invalid config or plan (the entry and
reason are named).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any, NamedTuple

from fuyao import __version__, logs
from fuyao.contracts import RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU, parse_vnpu_device_id, socket_name_for
from fuyao.inventory import NodeInventory, discover
from fuyao.npusmi import DEFAULT_TIMEOUT_S, NpuSmi, NpuSmiError

from .ledger import DEFAULT_LEDGER, Ledger
from .manager import VnpuError, VnpuManager, entry_in_use, static_changes
from .plan import Plan, PlanError, load_vnpu_config, make_plan
from .templates import load_templates
from .usage import DEFAULT_POD_RESOURCES_SOCKET, PodResourcesUnavailable, holdings

DEFAULT_DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
STATIC_SLICES_SOCKET = socket_name_for(RESOURCE_VNPU)
"""Where fuyao's device plugin serves ``npu.huawei.com/vNPU`` — only in static mode."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuyao-vnpu", description="Plan, apply, list and clean up vNPUs on this node.",
                                epilog="Docs: docs/vnpu.md")
    p.add_argument("--version", action="version", version=f"fuyao-vnpu (fuyao {__version__})")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "show what apply would change"), ("apply", "create/destroy static vNPUs"),
                       ("list", "list every vNPU"), ("gc", "clean up interrupted and unused vNPUs of ours")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--npu-smi", default="npu-smi", help="npu-smi binary (default: npu-smi on PATH)")
        s.add_argument("--npu-smi-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per npu-smi call")
        s.add_argument("--ledger", default=DEFAULT_LEDGER, help=f"fuyao's vNPU ledger (default: {DEFAULT_LEDGER})")
        s.add_argument("--json", action="store_true", help="machine-readable output")
        if name in ("plan", "apply"):
            s.add_argument("--config", required=True, help="vnpu-config.json (the ConfigMap's content)")
        if name in ("apply", "gc", "list"):
            s.add_argument("--pod-resources-socket", default=DEFAULT_POD_RESOURCES_SOCKET,
                           help="kubelet pod-resources API, to see which vNPUs containers hold")
            if name == "gc":
                s.add_argument("--grace", type=float, default=30.0,
                               help="never destroy a dynamic vNPU younger than this many seconds (the kubelet "
                                    "records an allocation only after Allocate returns; default 30)")
            s.add_argument("--no-kubelet", action="store_true",
                           help="this node runs no kubelet: trust npu-smi's container binding alone (without this, "
                                "nothing is destroyed when the pod-resources API does not answer)")
            if name == "apply":
                s.add_argument("--device-plugin-dir", default=DEFAULT_DEVICE_PLUGIN_DIR,
                               help="the kubelet's device-plugin directory: apply refuses while fuyao's device plugin "
                                    f"serves static vNPUs there (default: {DEFAULT_DEVICE_PLUGIN_DIR})")
        logs.add_arguments(s)
    return p


class Held(NamedTuple):
    """What containers hold, per the kubelet (nothing with ``--no-kubelet``)."""

    slices: set[tuple[str, int]]  # static vNPU slices (device, vNPU id)
    whole: set[str]  # dies held as whole NPUs
    unknown: str | None  # why the kubelet's view is unknown (then the sets are empty)
    groups: list[frozenset[str]]  # the npu-core devices each container holds


def _held(args: argparse.Namespace) -> Held:
    if args.no_kubelet:
        return Held(set(), set(), None, [])
    try:
        found = holdings(args.pod_resources_socket, (RESOURCE_VNPU, RESOURCE_NPU_CORE, RESOURCE_NPU))
    except PodResourcesUnavailable as exc:
        return Held(set(), set(), str(exc), [])
    held = found.devices
    slices = {p for d in held[RESOURCE_VNPU] if (p := parse_vnpu_device_id(d)) is not None}
    return Held(slices, held[RESOURCE_NPU], None, found.groups.get(RESOURCE_NPU_CORE, []))


def plugin_serves_static_slices(device_plugin_dir: str) -> bool:
    """Whether fuyao's device plugin serves static vNPU slices on this node now (its socket answers): it applies
    its own ConfigMap then, and offers the slices — an apply from here would fight its plan and destroy slices the
    kubelet may be handing out."""
    path = os.path.join(device_plugin_dir, STATIC_SLICES_SOCKET)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except OSError:  # no such socket, or a stale one from a plugin that is gone
            return False
    return True


def _plan(npu_smi: NpuSmi, inventory: NodeInventory, manager: VnpuManager, config_path: str) -> Plan:
    config = load_vnpu_config(config_path)
    templates = tuple(manager.templates.values())
    capacity = {d.id: c for d in inventory.devices if (c := manager.capacity(d.id, for_plan=True)) is not None}
    return make_plan(config, inventory.devices, templates, capacity)


def _print(data: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    if isinstance(data, dict):
        for key, value in data.items():
            print(f"{key}: {value}")
    else:
        for row in data:
            print("  ".join(f"{v}" for v in row.values()))


def run(args: argparse.Namespace) -> int:
    npu_smi = NpuSmi(args.npu_smi, timeout_s=args.npu_smi_timeout)
    inventory = discover(npu_smi)
    if not inventory.devices:
        print("fuyao-vnpu: npu-smi reports no NPUs", file=sys.stderr)
        return 1
    ledger = Ledger(args.ledger)
    templates, _source = load_templates(npu_smi, inventory.chip_model, inventory.devices[0].npu_id)
    manager = VnpuManager(npu_smi, ledger, inventory.devices, templates=templates)
    if args.command == "plan":
        plan = _plan(npu_smi, inventory, manager, args.config)
        records = ledger.records()
        devices = sorted({d.device_id for d in plan.devices} | {r.device_id for r in records})
        changes = static_changes(plan, records, {d: set(e) for d, e in manager.existing(devices).items()})
        _print({"plan": [{"device": d.device_id, "vnpus": {t.name: n for t, n in d.parts}, "count": d.count}
                         for d in plan.devices],
                "create": [f"{n} x {t.name} on {d}" for d, t, n in changes.create],
                "destroy": [f"{r.device_id}/{r.vnpu_id} ({r.template})" for r in changes.destroy],
                "keep": [f"{r.device_id}/{r.vnpu_id} ({r.template})" for r in changes.keep]}, args.json)
        return 0
    if args.command == "apply":
        if not args.no_kubelet and plugin_serves_static_slices(args.device_plugin_dir):
            raise VnpuError(f"apply refused, nothing changed: the device plugin serves static vNPUs on this node "
                            f"({os.path.join(args.device_plugin_dir, STATIC_SLICES_SOCKET)}) and applies its "
                            "vnpu-config ConfigMap itself — change the ConfigMap instead (an apply from here would "
                            "fight its plan and destroy slices it still offers)")
        plan = _plan(npu_smi, inventory, manager, args.config)
        held = _held(args)
        if held.unknown:
            print(f"fuyao-vnpu: warning: {held.unknown}; vNPUs no longer in the plan are kept and dies not carved yet "
                  "stay whole (use --no-kubelet on a node without a kubelet)", file=sys.stderr)
        report = manager.apply(plan, None if held.unknown else held.slices,
                               held_whole=None if held.unknown else held.whole)
        _print(report.summary(), args.json)
        return 1 if report.errors else 0
    if args.command == "list":
        owners = {(r.device_id, r.vnpu_id): r for r in ledger.records()}
        held = _held(args)
        allocations = set(held.groups)
        rows = []
        for device in inventory.devices:
            try:
                info = manager.observe(device.id)
            except NpuSmiError:
                continue
            for entry in info.vnpus:
                record = owners.get((device.id, entry.vnpu_id))
                rows.append({"device": device.id, "vnpu_id": entry.vnpu_id, "template": entry.template,
                             "owner": record.owner if record else "not fuyao",
                             "state": record.state if record else "-",
                             "in_use": entry_in_use(entry) or (device.id, entry.vnpu_id) in held.slices
                             or bool(record and record.dynamic and record.cores in allocations)})
        _print(rows, args.json)
        return 0
    # gc
    asked = time.time()
    held = _held(args)
    adopted = manager.recover()
    destroyed, errors = manager.collect_dynamic(held.groups if held.unknown is None else None, args.grace,
                                                observed_at=asked)
    _print({"adopted": [f"{r.device_id}/{r.vnpu_id}" for r in adopted],
            "destroyed": [f"{r.device_id}/{r.vnpu_id}" for r in destroyed], "errors": errors,
            "pod_resources": held.unknown or "ok"}, args.json)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        sys.exit(run(args))
    except PlanError as exc:
        print(f"fuyao-vnpu: plan rejected, nothing changed: {exc}", file=sys.stderr)
        sys.exit(2)
    except (NpuSmiError, VnpuError) as exc:
        print(f"fuyao-vnpu: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
