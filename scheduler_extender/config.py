"""The extender's versioned configuration (YAML, ``--config``); flags override it; errors name the field.

```yaml
version: v1
listen: 127.0.0.1:8888
tls: {certFile: /etc/fuyao/tls.crt, keyFile: /etc/fuyao/tls.key}
kubeconfig: null              # in-cluster config in a pod; without either, no watches (requests carry Nodes)
bind: true                    # act as the binder (bindVerb): choose devices, annotate, create the Binding
leaderElection:               # several replicas: one binds (the Lease holder), the others forward binds to it
  enabled: false
  namespace: null             # default: the pod's namespace (POD_NAMESPACE)
  leaseName: fuyao-scheduler-extender
  identity: null              # default: POD_NAME, else the host name
  advertiseUrl: null          # where followers reach this replica; default: <scheme>://POD_IP:<listen port>
  leaseDuration: 15s
  renewDeadline: 10s
  retryPeriod: 2s
plugins:                      # weight 0 turns scoring off (the filter still runs)
  deviceFit: {weight: 3, strategy: binpack}
  numa: {weight: 2}
  businessType: {weight: 1, stackingPenalty: 0.1}
  qosColocation: {weight: 2, lsUsageWatermark: 0.7, lsMaxUsage: 0.95, bePressureWatermark: 0.5}
  pdAffinity: {weight: 2, topologyKey: topology.kubernetes.io/zone, ratio: "1:2", spreadPenalty: 0.2}
```
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import ConfigDict, Field, model_validator

from fuyao.config_files import ConfigError as ConfigError  # re-exported: callers catch it from here
from fuyao.config_files import ConfigSection, HostPort, Seconds, load_versioned_yaml, merged, validated

from .plugins.registry import settings_model

CONFIG_VERSION: Final = "v1"




class TlsSettings(ConfigSection):
    cert_file: str
    key_file: str


class LeaderElectionSettings(ConfigSection):
    enabled: bool = False
    namespace: str | None = None
    lease_name: str = Field(default="fuyao-scheduler-extender", min_length=1, max_length=253,
                            pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    identity: str | None = None
    advertise_url: str | None = Field(default=None, pattern=r"^https?://")
    lease_duration: Seconds = 15.0
    renew_deadline: Seconds = 10.0
    retry_period: Seconds = 2.0

    @model_validator(mode="after")
    def _ordered(self) -> LeaderElectionSettings:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("needs 0 < retryPeriod < renewDeadline < leaseDuration (client-go's rule: a leader "
                             "steps down before anyone may take over)")
        return self


PluginSettings = settings_model()
"""``plugins:``: one section per registered plugin (``plugins.registry``), each its plugin's args with their
defaults."""


class ExtenderConfig(ConfigSection):
    model_config = ConfigDict(allow_inf_nan=False)  # an infinite volcanoScoreScale sent every score as null

    version: Literal["v1"] = CONFIG_VERSION
    listen: HostPort = "127.0.0.1:8888"
    reuse_port: bool = Field(default=False, description="listen with SO_REUSEPORT, so that several extender "
                             "processes share the port (each with its own state, metrics and /explain)")
    tls: TlsSettings | None = None
    kubeconfig: str | None = None
    bind: bool = True
    leader_election: LeaderElectionSettings = LeaderElectionSettings()
    metrics: bool = True
    explain_entries: int = Field(default=10000, ge=0, description="pods whose last decision /explain keeps")
    explain_node_budget: int = Field(default=2_000_000, ge=0, description="node entries (scores, rejections) "
                                     "kept for /explain in all; ~100 bytes each")
    shortlist: int = Field(default=16, ge=0, description="the filter passes only this many feasible nodes, the "
                           "best by the extender's score (0: all); kube-scheduler scores only those. 1: the "
                           "extender decides (kube-scheduler binds its node without scoring), except for pods with "
                           "soft preferences (preferred affinity, ScheduleAnyway spread), which get 16")
    volcano_score_scale: float = Field(default=100.0, gt=0, description="Volcano adds extender scores raw to its "
                                       "node-order scores (0..100 scale): our [0,1] total is multiplied by this")
    plugins: PluginSettings = PluginSettings()  # type: ignore[valid-type]  # a model made from the plugin registry

    @model_validator(mode="after")
    def _one_binder(self) -> ExtenderConfig:
        if self.leader_election.enabled and not self.bind:
            raise ValueError("leaderElection elects the binder: it needs bind: true")
        if self.reuse_port and self.bind:
            raise ValueError("reuse_port needs bind: false: the binder remembers the devices it has just assigned "
                             "until the watch shows them, and several processes would each remember only their own")
        return self


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> ExtenderConfig:
    return validated(ExtenderConfig, merged(file_values, overrides))


def load_config_file(path: str) -> dict[str, Any]:
    return load_versioned_yaml(path, CONFIG_VERSION)
