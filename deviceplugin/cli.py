"""Entry point of ``fuyao-device-plugin``: flags and config file →
:class:`~fuyao.deviceplugin.daemon.DevicePluginDaemon`.

Exit codes: 0 after SIGTERM/SIGINT, 2 for invalid flags or config (the message names the field).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from fuyao import __version__
from fuyao import daemon as fuyao_daemon
from fuyao.contracts import RESOURCE_NPU, RESOURCE_NPU_CORE

from .config import (
    DEFAULT_DEVICE_PLUGIN_DIR,
    DEFAULT_METRICS_ADDRESS,
    PluginConfig,
    build_config,
    load_config_file,
)

log = logging.getLogger("deviceplugin")

# flag dest → dotted config field
_FLAG_FIELDS = {
    "npu_smi": "npu_smi.path",
    "npu_smi_timeout": "npu_smi.timeout",
    "device_plugin_dir": "device_plugin_dir",
    "dev_root": "dev_root",
    "host_root": "host_root",
    "sysfs_root": "sysfs_root",
    "node_name": "node_name",
    "kubeconfig": "kubeconfig",
    "health_interval": "health.interval",
    "health_failure_threshold": "health.failure_threshold",
    "fault_table": "health.fault_table",
    "hccn_tool": "health.hccn_tool",
    "isolation_state": "health.isolation_state",
    "link_interval": "health.link_interval",
    "metrics_address": "metrics_address",
    "server_usage": "server_usage",
    "vnpu_mode": "vnpu.mode",
    "vnpu_config": "vnpu.config",
    "vnpu_ledger": "vnpu.ledger",
    "pod_resources_socket": "vnpu.pod_resources_socket",
}


def build_parser() -> argparse.ArgumentParser:
    p = fuyao_daemon.parser(
        "fuyao-device-plugin",
        f"Kubelet device plugin for Huawei Ascend NPUs: advertises {RESOURCE_NPU} over the device-plugin API "
        "v1beta1, with health checks, topology-aware allocation, node labels and Prometheus metrics. Flags "
        "override the config file.", "docs/device-plugin.md")
    p.add_argument("--config", help="versioned YAML config file (version: v1)")
    p.add_argument("--npu-smi", help="npu-smi binary, a name on PATH or a path (default: npu-smi)")
    p.add_argument("--npu-smi-timeout", help="kill an npu-smi call after this long (default: 10s)")
    p.add_argument("--device-plugin-dir",
                   help=f"kubelet device-plugin directory holding kubelet.sock (default: {DEFAULT_DEVICE_PLUGIN_DIR})")
    p.add_argument("--dev-root", help="where the NPU device nodes (davinciN, davinci_manager...) are (default: /dev)")
    p.add_argument("--host-root", help="where host paths of driver mounts are visible to the plugin (default: /)")
    p.add_argument("--sysfs-root", help="where to read NUMA nodes from (default: /sys)")
    p.add_argument("--node-name", help="this node's name (default: env NODE_NAME, else the hostname)")
    p.add_argument("--kubeconfig", help="kubeconfig for node publishing (default: in-cluster config when in a pod; "
                                        "without either, publishing is off)")
    p.add_argument("--health-interval", help="npu-smi health poll interval, e.g. 5s or 500ms (default: 5s)")
    p.add_argument("--health-failure-threshold", type=int,
                   help="consecutive npu-smi failures before all devices are Unhealthy (default: 3)")
    p.add_argument("--fault-table", help="NPU fault table: fuyao's (version: v1) or MindCluster's faultCode.json "
                                         "(default: the built-in table)")
    p.add_argument("--hccn-tool", help="hccn_tool for NPU link checks; empty turns them off (default: hccn_tool)")
    p.add_argument("--link-interval", help="how often each NPU's link is checked, e.g. 30s (default: 30s)")
    p.add_argument("--isolation-state", help="record of isolated NPUs (default: /var/lib/fuyao/npu-isolated.json)")
    p.add_argument("--release-npu", action="append", metavar="DEVICE",
                   help="release an isolated NPU (repeatable), e.g. after a repair, and exit; the running plugin "
                        "puts it back in service at its next poll")
    p.add_argument("--metrics-address",
                   help=f"HOST:PORT for /metrics, empty to disable (default: {DEFAULT_METRICS_ADDRESS})")
    p.add_argument("--server-usage", help="value of the server-usage node label: train or infer (default: unset)")
    p.add_argument("--vnpu-mode", choices=["off", "static", "dynamic"],
                   help=f"vNPUs: static slices from --vnpu-config, dynamic per-container vNPUs ({RESOURCE_NPU_CORE}),"
                        " or off (default: static when --vnpu-config is given, else off)")
    p.add_argument("--vnpu-config", help="vnpu-config.json, the ConfigMap of static slices (re-read on change)")
    p.add_argument("--vnpu-ledger", help="file recording the vNPUs fuyao created (default: "
                                         "/var/lib/fuyao/vnpu-ledger.json; keep it on the host)")
    p.add_argument("--pod-resources-socket",
                   help="kubelet pod-resources API (default: /var/lib/kubelet/pod-resources/kubelet.sock)")
    return p


def config_from_args(args: argparse.Namespace) -> PluginConfig:
    file_values = load_config_file(args.config) if args.config else {}
    overrides = {field: getattr(args, dest) for dest, field in _FLAG_FIELDS.items()}
    if overrides["node_name"] is None and os.environ.get("NODE_NAME"):
        overrides["node_name"] = os.environ["NODE_NAME"]
    if overrides["vnpu.config"] and not overrides["vnpu.mode"] and \
            not (file_values.get("vnpu") or {}).get("mode"):
        overrides["vnpu.mode"] = "static"
    config = build_config(file_values, overrides)
    from .faults.table import load_table

    load_table(config.health.fault_table)  # a bad table: exit 2 naming the field, before anything starts
    return config


def release(path: str, devices: list[str]) -> int:
    """``--release-npu``: 0 when every device was isolated and is released, 1 otherwise."""
    from .faults.isolation import IsolationRecord

    record = IsolationRecord(path)
    isolated = record.read()
    code = 0
    for device in devices:
        if record.release(device):
            print(f"released {device} ({isolated[device].reason}, isolated since {isolated[device].since})")
        else:
            print(f"{device} is not isolated (isolated: {', '.join(sorted(isolated)) or 'none'})", file=sys.stderr)
            code = 1
    return code


def main(argv: list[str] | None = None) -> None:
    args = fuyao_daemon.parse(build_parser(), argv)
    config = fuyao_daemon.config_or_exit("fuyao-device-plugin", lambda: config_from_args(args))
    if args.release_npu:
        sys.exit(release(config.health.isolation_state, args.release_npu))
    from .daemon import DevicePluginDaemon

    daemon = DevicePluginDaemon(config)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("starting fuyao-device-plugin %s", __version__,
             extra={"node": daemon.node_name, "config": config.model_dump(mode="json", by_alias=True,
                                                                          exclude={"kubeconfig"})})
    sys.exit(daemon.run())


if __name__ == "__main__":
    main()
