"""``fuyao-vnpu``: operators' view of vNPUs on this node.

    fuyao-vnpu plan  --config vnpu-config.json     what apply would change (changes nothing)
    fuyao-vnpu apply --config vnpu-config.json     create/destroy static vNPUs to match the file
    fuyao-vnpu list                                every vNPU, its owner and whether a container uses it
    fuyao-vnpu gc                                  resolve interrupted creations, destroy our unused dynamic vNPUs

Exit codes: 0 done, 1 npu-smi or a vNPU change failed, 2 invalid config or plan (the entry and reason are named).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from fuyao import __version__, logs
from fuyao.contracts import RESOURCE_NPU_CORE, RESOURCE_VNPU, parse_core_device_id, parse_vnpu_device_id
from fuyao.inventory import NodeInventory, discover
from fuyao.npusmi import DEFAULT_TIMEOUT_S, NpuSmi, NpuSmiError

from .ledger import DEFAULT_LEDGER, Ledger
from .manager import VnpuError, VnpuManager, entry_in_use, static_changes
from .plan import Plan, PlanError, load_vnpu_config, make_plan
from .templates import load_templates
from .usage import DEFAULT_POD_RESOURCES_SOCKET, PodResourcesUnavailable, holdings


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
        logs.add_arguments(s)
    return p


def _held(args: argparse.Namespace) -> tuple[set[tuple[str, int]], set[str], str | None, list[frozenset[str]]]:
    """(vNPU slices held, npu-core devices held, why unknown, the cores each container holds)."""
    if args.no_kubelet:
        return set(), set(), None, []
    try:
        found = holdings(args.pod_resources_socket, (RESOURCE_VNPU, RESOURCE_NPU_CORE))
    except PodResourcesUnavailable as exc:
        return set(), set(), str(exc), []
    held = found.devices
    slices = {p for d in held[RESOURCE_VNPU] if (p := parse_vnpu_device_id(d)) is not None}
    cores = {d for d in held[RESOURCE_NPU_CORE] if parse_core_device_id(d) is not None}
    return slices, cores, None, found.groups.get(RESOURCE_NPU_CORE, [])


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
        plan = _plan(npu_smi, inventory, manager, args.config)
        slices, _cores, unknown, _groups = _held(args)
        if unknown:
            print(f"fuyao-vnpu: warning: {unknown}; vNPUs no longer in the plan are kept (use --no-kubelet on a "
                  "node without a kubelet)", file=sys.stderr)
        report = manager.apply(plan, None if unknown else slices)
        _print(report.summary(), args.json)
        return 1 if report.errors else 0
    if args.command == "list":
        owners = {(r.device_id, r.vnpu_id): r for r in ledger.records()}
        slices, cores, _unknown, _groups = _held(args)
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
                             "in_use": entry_in_use(entry) or (device.id, entry.vnpu_id) in slices
                             or bool(record and record.cores & cores)})
        _print(rows, args.json)
        return 0
    # gc
    asked = time.time()
    _slices, _cores, unknown, groups = _held(args)
    adopted = manager.recover()
    destroyed, errors = manager.collect_dynamic(groups if unknown is None else None, args.grace, observed_at=asked)
    _print({"adopted": [f"{r.device_id}/{r.vnpu_id}" for r in adopted],
            "destroyed": [f"{r.device_id}/{r.vnpu_id}" for r in destroyed], "errors": errors,
            "pod_resources": unknown or "ok"}, args.json)
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
