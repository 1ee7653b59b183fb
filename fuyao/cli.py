"""``fuyao``: operator commands of the kernel. ``fuyao inventory`` shows what npu-smi reports for this node."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__, logs
from .contracts import ANNOTATION_NODE_TOPOLOGY, dump_annotation, npu_node_labels
from .inventory import NodeInventory, discover
from .npusmi import DEFAULT_TIMEOUT_S, NpuSmi, NpuSmiError


def _print_inventory(inv: NodeInventory) -> None:
    print(f"chip model: {inv.chip_model}   driver: {inv.driver_version or '?'}   devices: {len(inv.devices)}")
    print()
    print(f"{'DEVICE':<16}{'NPU':>5}{'CHIP':>5}{'PHY':>5}  {'MODEL':<11}{'HEALTH':<9}{'NUMA':>5}  "
          f"{'GROUP':<15}{'AICORE':>7}{'MEMORY(MB)':>11}  BUS")
    for d in inv.devices:
        print(f"{d.id:<16}{d.npu_id:>5}{d.chip_id:>5}{d.physical_id:>5}  {d.chip_model:<11}{d.health.value:<9}"
              f"{'-' if d.numa_node is None else d.numa_node:>5}  {d.group or '-':<15}"
              f"{'-' if d.aicore is None else d.aicore:>7}{'-' if d.memory_mb is None else d.memory_mb:>11}  "
              f"{d.bus_id or '-'}")
    print()
    print(f"interconnect groups (NUMA from {inv.numa_source}):")
    for g in inv.groups:
        print(f"  {g.id:<15} {g.kind.value:<10} {', '.join(g.devices)}")
    if not inv.groups:
        print("  (unknown: npu-smi reported no topology)")
    print()
    print("node labels the device plugin will publish:")
    for key, value in npu_node_labels(inv.chip_model, len(inv.devices), inv.driver_version).items():
        print(f"  {key}={value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fuyao", description="fuyao operator commands.")
    parser.add_argument("--version", action="version", version=f"fuyao {__version__}")
    logs.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    inv = sub.add_parser("inventory", help="discover this node's NPUs with npu-smi and print them")
    inv.add_argument("--npu-smi", default="npu-smi", help="path of the npu-smi binary (default: npu-smi on PATH)")
    inv.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per npu-smi call")
    inv.add_argument("--sysfs-root", default="/sys", help="where to read NUMA nodes from")
    inv.add_argument("--json", action="store_true", help="print the topology annotation value as JSON")
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        inventory = discover(NpuSmi(args.npu_smi, timeout_s=args.timeout), args.sysfs_root)
    except NpuSmiError as exc:
        print(f"fuyao inventory: {exc}", file=sys.stderr)
        sys.exit(1)
    if args.json:
        print(json.dumps({ANNOTATION_NODE_TOPOLOGY: json.loads(dump_annotation(inventory.to_topology()))},
                         indent=2))
    else:
        _print_inventory(inventory)


if __name__ == "__main__":
    main()


def component_placeholder(prog: str, description: str, issue: int, argv: list[str] | None = None) -> None:
    """Entry point of a component whose issue has not landed: ``--help`` works, running exits 2 and says so."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog=f"Not implemented yet: tracked by issue {issue}.")
    parser.add_argument("--version", action="version", version=f"{prog} (fuyao {__version__})")
    parser.add_argument("--config", help="versioned YAML config file")
    parser.parse_known_args(argv)
    print(f"{prog}: not implemented yet (issue {issue})", file=sys.stderr)
    sys.exit(2)
