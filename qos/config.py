"""The QoS agent's versioned configuration (YAML, ``--config``); flags override it; errors name the field.

```yaml
version: v1
interval: 10s                 # one collection cycle (at least 100ms)
window: 6                     # samples in the sliding window (LS usage = the window's peak)
cgroupRoot: /sys/fs/cgroup    # not empty
metricsAddress: 127.0.0.1:9401  # HOST:PORT of /metrics (empty: none)
batch:                        # kubernetes.io/batch-cpu / batch-memory (Koordinator's usage policy)
  cpuReclaimPercent: 65       # capacity x 65% - max(system used, reserved) - Σ LS used
  memoryReclaimPercent: 65
  changeThresholdPercent: 5   # publish when a value moves by more than 5% of capacity
  minPublishInterval: 30s
usage:                        # node annotation qos.openfuyao.com/usage, for the scheduler extender
  publishInterval: 60s        # at most once per interval (5,000 nodes → ≤ 84 patches/s), sooner on a jump
  jumpPercent: 10
cpuSuppress:
  enabled: true
  policy: cfsQuota            # cfsQuota: a quota on BE pods… / cpuset: BE pods on the budget's CPUs (always)
  thresholdPercent: 65        # …above this share of capacity (budget: capacity x 65% - LS - system)
  hysteresisPercent: 5        # lifted below threshold - hysteresis (at most thresholdPercent; unset: 5 or less)
  minBeMilli: 100             # BE pods together never get less than this (1..1000000)
beCpuShares: 2                # BE pods' CPU weight (v1 cpu.shares; v2 cpu.weight converted)
cpuWeightConversion: auto     # v2: how the runtime turns containers' shares into cpu.weight (auto|linear|quadratic)
cpuManagerStateFile: /var/lib/kubelet/cpu_manager_state  # the kubelet's static CPU manager: its exclusive CPUs
                              # are never BE's under the cpuset policy (empty: not read)
memoryEviction:
  enabled: true
  highPercent: 85             # node memory above this → evict BE pods…
  lowPercent: 80              # …until the projection is below this
```
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, Field, model_validator

from fuyao.config_files import ConfigError as ConfigError  # re-exported: callers catch it from here
from fuyao.config_files import ConfigSection, HostPort, Seconds, load_versioned_yaml, merged, validated
from fuyao.contracts import USAGE_STALE_S

CONFIG_VERSION: Final = "v1"
MIN_INTERVAL_S: Final = 0.1
"""The shortest cycle: each one reads every pod's cgroup files and may write Node status; below this it is a busy
loop on the node it is meant to protect."""
MAX_MIN_BE_MILLI: Final = 1_000_000  # 1,000 CPUs: more is a unit mistake, not a node


Percent = Annotated[float, Field(ge=0, le=100)]


def _interval(seconds: float) -> float:
    if seconds < MIN_INTERVAL_S:
        raise ValueError(f"{seconds * 1000:g}ms is too short: at least {MIN_INTERVAL_S * 1000:g}ms (each cycle reads "
                         "every pod's cgroup files)")
    return seconds


def _fresh_enough(seconds: float) -> float:
    if seconds > USAGE_STALE_S / 2:
        raise ValueError(f"{seconds:g}s is too long: at most {USAGE_STALE_S / 2:g}s (the scheduler extender takes a "
                         f"usage report older than {USAGE_STALE_S:g}s for a stopped agent and refuses BE pods there)")
    return seconds


class BatchSettings(ConfigSection):
    cpu_reclaim_percent: Percent = 65.0
    memory_reclaim_percent: Percent = 65.0
    change_threshold_percent: Percent = 5.0
    min_publish_interval: Seconds = 30.0


class UsageSettings(ConfigSection):
    publish_interval: Annotated[Seconds, AfterValidator(_fresh_enough)] = 60.0
    jump_percent: Percent = 10.0


class CpuSuppressSettings(ConfigSection):
    enabled: bool = True
    policy: Literal["cfsQuota", "cpuset"] = Field(
        default="cfsQuota", description="cpuset: BE pods share the highest-numbered CPUs their budget rounds up to "
        "(LS keeps the rest to itself); cfsQuota: BE pods share the budget as CFS quota above the threshold")
    threshold_percent: Percent = 65.0
    hysteresis_percent: Percent = 5.0
    min_be_milli: int = Field(default=100, ge=1, le=MAX_MIN_BE_MILLI)

    @model_validator(mode="after")
    def _hysteresis_within_threshold(self) -> CpuSuppressSettings:
        """Suppression lifts below threshold - hysteresis: above the threshold it would never lift. An unset
        hysteresis is the default capped at the threshold (thresholdPercent: 1 keeps BE pods suppressed)."""
        if self.hysteresis_percent > self.threshold_percent:
            if "hysteresis_percent" in self.model_fields_set:
                raise ValueError(f"hysteresisPercent ({self.hysteresis_percent:g}) must not be above "
                                 f"thresholdPercent ({self.threshold_percent:g}): suppression would never be lifted")
            object.__setattr__(self, "hysteresis_percent", self.threshold_percent)
        return self


class MemoryEvictionSettings(ConfigSection):
    enabled: bool = True
    high_percent: Percent = 85.0
    low_percent: Percent = 80.0

    @model_validator(mode="after")
    def _low_below_high(self) -> MemoryEvictionSettings:
        if self.low_percent >= self.high_percent:
            raise ValueError("lowPercent must be below highPercent")
        return self


class AgentConfig(ConfigSection):
    version: Literal["v1"] = CONFIG_VERSION
    node_name: str = Field(default="", description="this node (flag --node-name, env NODE_NAME)")
    interval: Annotated[Seconds, AfterValidator(_interval), AfterValidator(_fresh_enough)] = 10.0
    window: int = Field(default=6, ge=1, le=360)
    cgroup_root: str = Field(default="/sys/fs/cgroup", min_length=1)
    kubeconfig: str | None = None
    metrics_address: HostPort | Literal[""] = Field(default="127.0.0.1:9401",
                                                  description="HOST:PORT for /metrics (empty: no metrics)")
    state_file: str = Field(default="", description="where the agent keeps which pods hold BE limits it wrote and "
                            "which the cpuset policy narrowed, so that a pod turning LS, or a policy changed, across "
                            "an agent restart gets its values and CPUs back (empty: memory only)")
    batch: BatchSettings = BatchSettings()
    usage: UsageSettings = UsageSettings()
    cpu_suppress: CpuSuppressSettings = CpuSuppressSettings()
    be_cpu_shares: int = Field(default=2, ge=2, le=262144)
    cpu_weight_conversion: Literal["auto", "linear", "quadratic"] = Field(
        default="auto", description="cgroup v2: how the container runtime converts a container's cpu.shares to "
        "cpu.weight, which the agent follows for containers' weights (pods' follow the kubelet's, always linear): "
        "quadratic (runc >= 1.3.2, crun >= 1.23), linear (older runtimes); auto: read off a running LS container with "
        "a CPU request, quadratic until one is seen")
    cpu_manager_state_file: str = Field(
        default="/var/lib/kubelet/cpu_manager_state", description="the kubelet's CPU manager checkpoint: under the "
        "cpuset policy, CPUs its static policy gave containers exclusively are never BE pods' (empty: not read; "
        "missing or garbled: the cpuset policy gives way to CFS quotas until it reads again)")
    memory_eviction: MemoryEvictionSettings = MemoryEvictionSettings()


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    return validated(AgentConfig, merged(file_values, overrides))


def load_config_file(path: str) -> dict[str, Any]:
    return load_versioned_yaml(path, CONFIG_VERSION)
