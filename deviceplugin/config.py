"""The device plugin's versioned configuration: a YAML file (``--config``) whose values command-line flags override.

```yaml
version: v1
npuSmi: {path: npu-smi, timeout: 10s}
devicePluginDir: /var/lib/kubelet/device-plugins
devRoot: /dev
health:
  interval: 5s
  failureThreshold: 3
  faultTable: /etc/fuyao/faults/faultCode.json   # fuyao's v1 table or MindCluster's faultCode.json
  reset: {enabled: true, maxAttempts: 3, window: 24h, settle: 30s, timeout: 60s}
  isolationState: /var/lib/fuyao/npu-isolated.json
  hccnTool: /usr/local/Ascend/driver/tools/hccn_tool    # "" turns link checks off
  linkInterval: 30s
metricsAddress: 127.0.0.1:9400
driverMounts:
  - {hostPath: /usr/local/Ascend/driver/lib64, readOnly: true}
```

Unknown keys are errors (a typo must not silently fall back to a default); every error names the field.
"""

from __future__ import annotations

import os
import re
from typing import Any, Final, Literal

from pydantic import Field, field_validator

from fuyao.config_files import ConfigError as ConfigError  # re-exported: callers catch it from here
from fuyao.config_files import ConfigSection, Seconds, load_versioned_yaml, merged, validated
from fuyao.contracts import (
    ENV_ASCEND_RUNTIME_OPTIONS,
    ENV_ASCEND_VISIBLE_DEVICES,
    ENV_ASCEND_VNPU_SPECS,
    ServerUsage,
)

CONFIG_VERSION: Final = "v1"
DEFAULT_DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9400"
MAX_SOCKET_NAME = 40  # our longest socket name is fuyao-npu.huawei.com-npu-core.sock (34)
DEFAULT_DRIVER_MOUNTS = (
    "/usr/local/Ascend/driver/lib64",
    "/usr/local/Ascend/driver/include",
    "/usr/local/dcmi",
    "/usr/local/bin/npu-smi",
)






class NpuSmiSettings(ConfigSection):
    path: str = Field(default="npu-smi", min_length=1, description="npu-smi binary (a name on PATH or a path)")
    timeout: Seconds = Field(default=10.0, description="seconds before a hung npu-smi call is killed")


class ResetSettings(ConfigSection):
    """Hot reset of an NPU whose fault level asks for one (FreeRestartNPU, RestartNPU), once no pod holds it."""

    enabled: bool = True
    max_attempts: int = Field(default=3, ge=1, description="resets within `window` before the NPU is isolated")
    window: Seconds = Field(default=86400.0, description="how long a reset counts towards maxAttempts")
    settle: Seconds = Field(default=30.0, description="time an NPU gets to come back after a reset")
    timeout: Seconds = Field(default=60.0, description="seconds before a hung npu-smi reset call is killed")


class HealthSettings(ConfigSection):
    interval: Seconds = Field(default=5.0, description="how often npu-smi is polled for device health")
    failure_threshold: int = Field(default=3, ge=1, description="consecutive npu-smi failures before every device "
                                                                "is reported Unhealthy")
    fault_table: str | None = Field(default=None, description="fault table file: fuyao's (version: v1) or "
                                    "MindCluster's faultCode.json; default: the built-in table")
    reset: ResetSettings = ResetSettings()
    isolation_state: str = Field(default="/var/lib/fuyao/npu-isolated.json",
                                 description="record of isolated NPUs (keep it on the host)")
    hccn_tool: str = Field(default="hccn_tool", description="hccn_tool for link checks (a name on PATH or a path); "
                           "empty: no link checks. Skipped, with a log line, when it is not installed")
    link_interval: Seconds = Field(default=30.0, description="how often each NPU's link is checked")


class DriverMount(ConfigSection):
    """A host path bind-mounted into every container that receives NPUs (skipped when missing on the host)."""

    host_path: str = Field(min_length=1)
    container_path: str | None = Field(default=None, description="defaults to host_path")
    read_only: bool = True

    @field_validator("host_path", "container_path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value

    @property
    def target(self) -> str:
        return self.container_path or self.host_path


class VnpuSettings(ConfigSection):
    """vNPUs: ``static`` carves dies as the ConfigMap file says, ``dynamic`` creates a vNPU per container."""

    mode: Literal["off", "static", "dynamic"] = "off"
    config: str | None = Field(default=None, description="vnpu-config.json (static mode; re-read when it changes)")
    ledger: str = Field(default="/var/lib/fuyao/vnpu-ledger.json", description="which vNPUs fuyao created")
    pod_resources_socket: str = Field(default="/var/lib/kubelet/pod-resources/kubelet.sock",
                                      description="kubelet pod-resources API: which containers hold which devices")
    reconcile_interval: Seconds = Field(default=10.0, description="how often orphans are collected")
    collect_grace: Seconds = Field(default=30.0, description="a dynamic vNPU younger than this is never collected "
                                                             "(the kubelet records an allocation after Allocate)")


class PluginConfig(ConfigSection):
    """Everything the daemon needs; built from defaults, then the YAML file, then flags."""

    version: Literal["v1"] = CONFIG_VERSION
    npu_smi: NpuSmiSettings = NpuSmiSettings()
    device_plugin_dir: str = DEFAULT_DEVICE_PLUGIN_DIR
    dev_root: str = "/dev"
    host_root: str = Field(default="/", description="where host paths (driver mounts) are visible to the plugin")
    sysfs_root: str = "/sys"
    node_name: str | None = None
    kubeconfig: str | None = None
    health: HealthSettings = HealthSettings()
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    driver_mounts: tuple[DriverMount, ...] = tuple(DriverMount(host_path=p) for p in DEFAULT_DRIVER_MOUNTS)
    container_env: dict[str, str] = Field(
        default_factory=dict, description="environment for every container that receives NPUs, beside the driver "
        "mounts (e.g. LD_LIBRARY_PATH for the driver's libraries); the device variables cannot be overridden")
    server_usage: ServerUsage | None = Field(default=None, description="value of the server-usage node label")
    prefer_scheduler_assignment: bool = Field(
        default=True, description="prefer the devices the scheduler wrote into a pending pod's annotation")
    publish_node: bool = Field(default=True, description="patch node labels and the topology annotation")
    vnpu: VnpuSettings = VnpuSettings()

    @field_validator("container_env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = {ENV_ASCEND_VISIBLE_DEVICES, ENV_ASCEND_VNPU_SPECS, ENV_ASCEND_RUNTIME_OPTIONS}
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name in reserved:
                raise ValueError(f"{name} is set by the plugin for the devices it allocates")
        return value

    @field_validator("metrics_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value == "":
            return value  # metrics off
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT (or an empty string to turn metrics off)")
        return value

    @field_validator("device_plugin_dir")
    @classmethod
    def _socket_paths_fit(cls, value: str) -> str:
        longest = os.path.join(value, "x" * MAX_SOCKET_NAME)
        if len(longest.encode()) > 107:
            raise ValueError(f"too long for unix socket paths inside it ({len(value)} characters; at most "
                             f"{106 - MAX_SOCKET_NAME})")
        return value

    @field_validator("device_plugin_dir", "dev_root", "host_root", "sysfs_root")
    @classmethod
    def _absolute_dir(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> PluginConfig:
    """Merge file values and flag overrides (dotted snake_case keys such as ``health.interval``) and validate."""
    return validated(PluginConfig, merged(file_values, overrides))


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the YAML file; its ``version`` must be present and known."""
    return load_versioned_yaml(path, CONFIG_VERSION)
