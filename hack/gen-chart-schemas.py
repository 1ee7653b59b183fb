#!/usr/bin/env python3
"""Write charts/<chart>/values.schema.json for every fuyao chart (JSON Schema draft-07, which Helm checks on lint,
template, install and upgrade: a misspelt key or a wrong type fails with the key's path).

The pieces every chart shares (image, scheduling, resources, RBAC, metrics) are defined once here; each chart adds
its own keys. Unknown keys are errors (``additionalProperties: false``) except in free-form maps (labels,
annotations, resources) and ``config`` (the component validates its own config file at start, naming the field).
tests/charts/test_charts.py fails when a committed schema differs from what this prints.

Usage: hack/gen-chart-schemas.py [--check]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CHARTS = Path(__file__).resolve().parents[1] / "charts"
Schema = dict[str, Any]


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), description: str = "") -> Schema:
    schema: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def string(description: str = "", **extra: Any) -> Schema:
    return {"type": "string", **({"description": description} if description else {}), **extra}


def integer(minimum: int | None = None, maximum: int | None = None, description: str = "") -> Schema:
    schema: Schema = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    if description:
        schema["description"] = description
    return schema


def boolean(description: str = "") -> Schema:
    return {"type": "boolean", **({"description": description} if description else {})}


FREE_MAP: Schema = {"type": "object"}
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
LIST: Schema = {"type": "array"}
DURATION = string("a duration: 500ms, 5s, 1m, 1h", pattern=r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$")
PORT = integer(1, 65535)
QUANTITY: Schema = {"type": ["string", "integer"], "description": "a Kubernetes quantity, e.g. 10Gi",
                    "pattern": r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[mkMGTPE]|e[0-9]+)?$"}  # "10K": refused by Kubernetes
ABS_PATH = string(pattern=r"^/")
RESOURCE_NAME = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                 r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")  # a Kubernetes resource name, prefix optional
EXTENDED_RESOURCE_NAME = RESOURCE_NAME.replace(")?[A-Za-z0-9]", ")[A-Za-z0-9]", 1)  # the domain prefix required

IMAGE = obj({"repository": string("image repository", minLength=1), "tag": string("default: the chart's appVersion"),
             "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}, ("repository",))
RESOURCES = obj({"requests": FREE_MAP, "limits": FREE_MAP, "claims": LIST})
SERVICE_MONITOR = obj({"enabled": boolean("needs the monitoring.coreos.com CRDs"), "interval": DURATION,
                       "labels": STRING_MAP})
RBAC = obj({"create": boolean()})
SERVICE_ACCOUNT = obj({"create": boolean(), "name": string()})
ENV_LIST: Schema = {"type": "array", "items": {"type": "object", "required": ["name"]}}
VOLUME_LIST: Schema = {"type": "array", "items": {"type": "object", "required": ["name"]}}
MOUNT_LIST: Schema = {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}}
STRING_LIST: Schema = {"type": "array", "items": {"type": "string"}}


KV_BLOCK_SIZE: Schema = {**integer(16, 4096, "tokens per KV block, the engines' --block-size: vLLM on CPU takes "
                                      "multiples of 32 (default 128), vLLM-Ascend 128, the engine simulator 16"),
                          "multipleOf": 16}


def common() -> dict[str, Schema]:
    """Keys of every chart."""
    return {
        "global": FREE_MAP,  # what an umbrella chart passes down
        "image": IMAGE,
        "imagePullSecrets": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "nameOverride": string(),
        "fullnameOverride": string(),
        "podAnnotations": STRING_MAP,
        "rbac": RBAC,
        "serviceAccount": SERVICE_ACCOUNT,
    }


def placement() -> dict[str, Schema]:
    return {"nodeSelector": STRING_MAP, "affinity": FREE_MAP, "tolerations": {"type": "array", "items": FREE_MAP}}


def node_agent() -> dict[str, Schema]:
    """A DaemonSet's keys (device plugin, QoS agent)."""
    return {**placement(), "priorityClassName": string(), "resources": RESOURCES,
            "config": {**FREE_MAP, "description": "merged into the component's config file (validated at start)"},
            "extraArgs": STRING_LIST, "extraEnv": ENV_LIST, "extraVolumes": VOLUME_LIST,
            "extraVolumeMounts": MOUNT_LIST}


SCHEMAS: dict[str, Schema] = {
    "npu-device-plugin": obj({
        **common(), **node_agent(),
        "privileged": boolean("npu-smi opens the driver's management devices"),
        "npuSmi": obj({"path": ABS_PATH, "timeout": DURATION,
                       "mountIntoContainers": boolean("mount npu-smi at /usr/local/bin/npu-smi into every container "
                                                      "that receives NPUs, as Ascend's container runtime does")},
                      ("path",)),
        "containerEnv": {**STRING_MAP, "description": "environment for every container that receives NPUs"},
        "hostPaths": obj({"devicePlugins": ABS_PATH, "podResources": ABS_PATH, "dev": ABS_PATH, "state": ABS_PATH,
                          "driver": {"type": "array", "items": ABS_PATH}},
                         ("devicePlugins", "podResources", "dev", "state")),
        "health": obj({"interval": DURATION, "failureThreshold": integer(1),
                       "faultTable": {**FREE_MAP, "description": "fuyao's fault table (version: v1) or MindCluster's "
                                      "faultCode.json; empty: the built-in table (validated at start)"},
                       "reset": obj({"enabled": boolean(), "maxAttempts": integer(1), "window": DURATION,
                                     "settle": DURATION}),
                       "hccnTool": {"type": "string", "pattern": r"^$|^/", "description": "empty: no link checks"},
                       "linkInterval": DURATION}),
        "serverUsage": {"enum": ["", "train", "infer"]},
        "vnpu": obj({"mode": {"enum": ["off", "static", "dynamic"]},
                     "config": obj({"devices": {"type": "array", "items": {"type": "object"}}},
                                   description="vnpu-config.json (static mode)")}),
        "metrics": obj({"enabled": boolean(), "port": PORT, "serviceMonitor": SERVICE_MONITOR,
                        "prometheusRule": obj({"enabled": boolean(), "labels": STRING_MAP,
                                               "resetPendingFor": DURATION, "unhealthyFor": DURATION,
                                               "notRegisteredFor": DURATION})},
                       description="/metrics on port 9400 by default"),
    }),
    "scheduler-extender": obj({
        **common(), **placement(), "priorityClassName": string(), "resources": RESOURCES,
        "replicas": integer(0, None, "replicas behind the Service; with bind, more than one needs leaderElection"),
        "leaderElection": obj({"enabled": boolean("elect the binder with a Lease; followers forward binds to it"),
                               "leaseDuration": DURATION, "renewDeadline": DURATION, "retryPeriod": DURATION}),
        "antiAffinity": {"enum": ["", "soft", "hard"], "description": "spread the replicas over nodes (when "
                         "affinity is empty): soft prefers it, hard requires it"},
        "podDisruptionBudget": obj({"enabled": boolean(), "minAvailable": integer(0)}),
        "service": obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": PORT,
                        "clusterIP": string(pattern=r"^$|^None$|^[0-9a-fA-F.:]+$")}),
        "tls": obj({"secretName": string("a kubernetes.io/tls Secret; empty: plain HTTP")}),
        "bind": boolean("act as the binder (bindVerb)"),
        "metrics": obj({"serviceMonitor": obj({**SERVICE_MONITOR["properties"], "tlsConfig": {
                            **FREE_MAP, "description": "the scrape's TLS (Prometheus Operator SafeTLSConfig) when "
                            "tls.secretName is set; empty: the Secret's ca.crt and the Service's DNS name"}}),
                        "prometheusRule": obj({"enabled": boolean(), "labels": STRING_MAP,
                                               "slowSeconds": {"type": "number", "exclusiveMinimum": 0}})}),
        "config": {**FREE_MAP, "description": "merged into the extender's config file (validated at start)"},
        "scheduler": obj({"enabled": boolean("a second kube-scheduler configured with the extender"),
                          "schedulerName": string(minLength=1), "image": string(minLength=1),
                          "replicas": integer(0), "leaderElect": boolean(), "resources": RESOURCES}),
        "extenderEntry": obj({"weight": integer(1), "httpTimeout": DURATION, "volcanoHttpTimeout": DURATION,
                              "tlsConfig": obj({k: string() for k in ("serverName", "caData", "caFile", "certData",
                                                                      "certFile", "keyData", "keyFile")}
                                               | {"insecure": boolean()},
                                               description="kube-scheduler's extenders[].tlsConfig"),
                              "ignorable": boolean(),
                              "managedResources": {
                                  "type": "array", "uniqueItems": True, "description":
                                  "extended resource names, domain/name (a YAML list: Volcano exits on any other "
                                  "type; kube-scheduler refuses names without a domain)",
                                  "items": string(pattern=EXTENDED_RESOURCE_NAME)},
                              "volcanoJobEnqueueable": boolean("serve Volcano's jobEnqueueable verb")}),
        "extraArgs": STRING_LIST, "extraEnv": ENV_LIST,
    }),
    "npu-operator": obj({
        **common(), **placement(), "priorityClassName": string(), "resources": RESOURCES,
        "operator": obj({"resync": DURATION, "npuSmi": ABS_PATH, "sysfsRoot": ABS_PATH, "driverVersionFile": ABS_PATH,
                         "nfdInterval": DURATION, "nfdEnv": STRING_MAP,
                         "nfdHostDirs": {"type": "array", "items": ABS_PATH}, "extraArgs": STRING_LIST,
                         "cleanupTimeout": DURATION,
                         "upgradeCRD": boolean("a pre-install/pre-upgrade hook applies the NPUClusterPolicy CRD "
                                               "(Helm never upgrades crds/)")}),
        "policy": obj({"create": boolean("install the NPUClusterPolicy 'cluster' from the sections below")}),
        "driver": obj({"enabled": boolean("check each NPU node's driver version"),
                       "version": string("expected driver version; empty: report what is found"),
                       "firmwareVersion": string("expected firmware version; empty: report what is found")}),
        "nfd": obj({"enabled": boolean("label NPU nodes (the policy's nodeFeatureDiscovery)")}),
        "devicePlugin": obj({"enabled": boolean(), "image": string(), "healthInterval": DURATION,
                             "values": {**FREE_MAP, "description": "the npu-device-plugin chart's values"}}),
        "vnpu": obj({"enabled": boolean(), "mode": {"enum": ["static", "dynamic"]},
                     "config": {**FREE_MAP, "description": "vnpu-config.json (static mode)"}}),
        "exporter": obj({"enabled": boolean(), "serviceMonitor": boolean()}),
        "schedulerExtender": obj({"enabled": boolean(), "image": string(),
                                  "values": {**FREE_MAP, "description": "the scheduler-extender chart's values"}}),
        "qosAgent": obj({"enabled": boolean(), "image": string(),
                         "values": {**FREE_MAP, "description": "the qos-agent chart's values"}}),
        "validator": obj({"enabled": boolean(), "image": string()}),
    }),
    "qos-agent": obj({
        **common(), **node_agent(),
        "cgroupRoot": ABS_PATH, "stateDir": ABS_PATH, "interval": DURATION,
        "kubeletRootDir": string("the kubelet's --root-dir, mounted read-only for its cpu_manager_state (\"\": not "
                                 "mounted)", pattern=r"^(/.*)?$"),
        "nodeRestriction": obj({"enabled": boolean()}, description="a ValidatingAdmissionPolicy limiting the agent "
                               "to its own Node (Kubernetes >= 1.30)"),
        "metrics": obj({"enabled": boolean(), "port": PORT, "serviceMonitor": SERVICE_MONITOR,
                        "prometheusRule": obj({"enabled": boolean(), "labels": STRING_MAP,
                                               "evictionStorm": integer(1)})},
                       description="/metrics on port 9401 by default"),
    }),
    "ai-inference-optimization": obj({
        **common(),
        "configMapName": string(minLength=1, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        "router": obj({
            "replicas": integer(0), "port": PORT,
            "strategy": {"enum": ["round-robin", "least-connections", "intelligent", "prefix-aware"]},
            "service": obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": PORT}),
            "discovery": obj({"namespace": string("empty: every namespace")}),
            "pdSeparation": obj({"enabled": boolean(), "fallback": {"enum": ["decode-only", "error"]}}),
            "model": string(),
            "tokenizer": string("engine (the engines' /tokenize), builtin, or the served model's directory or "
                                "tokenizer.json", minLength=1),
            "engineApiKeySecret": obj({"name": string('a Secret in the release namespace ("": none)'),
                                       "key": string(minLength=1)}, required=("name", "key"),
                                      description="the engines' API key (vLLM --api-key) for the router's own /v1 "
                                                  "calls, given to it as FUYAO_ENGINE_API_KEY"),
            "config": {**FREE_MAP, "description": "merged into the router's config.yaml (validated at start)"},
            "resources": RESOURCES, **placement(),
        }),
        "kvCache": obj({
            "enabled": boolean(), "replicas": integer(0), "size": QUANTITY, "blockSize": KV_BLOCK_SIZE,
            "hashSeed": integer(0), "port": PORT,
            "blockHashing": obj({"mode": {"enum": ["content", "vllm"]},
                                 "algo": {"enum": ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]},
                                 "seed": {"type": ["string", "null"]}},
                                description="how blocks are named, for the router and the index alike"),
            "discovery": obj({"labelSelector": string(minLength=1)}),
            "volume": obj({
                "enabled": boolean("the shared tier's RWX volume, where engines' FuyaoKVConnector keeps KV blocks"),
                "existingClaim": string("a PVC to use; empty: the chart makes one"),
                "storageClass": string("the made claim's class (e.g. nfs-client); empty: the cluster's default"),
                "size": QUANTITY, "accessModes": STRING_LIST, "mountPath": ABS_PATH, "interval": DURATION,
                "fsGroup": integer(0, description="the group that owns the tier's files (engine pods use it too)"),
            }, description="real KV bytes: docs/kv-cache.md"),
            "config": {**FREE_MAP, "description": "merged into the kv_cache section (validated at start)"},
            "resources": RESOURCES, **placement(),
        }),
        "monitoring": obj({
            "serviceMonitor": SERVICE_MONITOR,
            "prometheusRule": obj({"enabled": boolean(), "labels": STRING_MAP,
                                   "latencyQuantile": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                                   "highInferenceLatencySeconds": {"type": "number", "exclusiveMinimum": 0},
                                   "highInferenceErrorRatio": {"type": "number", "minimum": 0, "maximum": 1},
                                   "lowCacheHitRatio": {"type": "number", "minimum": 0, "maximum": 1},
                                   "lowNpuUtilization": {"type": "number", "minimum": 0, "maximum": 1},
                                   "circuitOpenFor": DURATION,
                                   "kvEventsStaleSeconds": {"type": "number", "exclusiveMinimum": 0}}),
            "enginePodMonitor": obj({"enabled": boolean(), "labelSelector": string(minLength=1),
                                     "port": {"type": ["string", "integer"]}, "interval": DURATION}),
            "grafanaDashboard": obj({"enabled": boolean(), "labels": STRING_MAP}),
        }),
        "autoscaling": obj({
            "enabled": boolean("KEDA ScaledObjects for the targets (needs the keda.sh CRDs)"),
            "prometheus": obj({"serverAddress": string(pattern=r"^https?://")}),
            "pollingInterval": integer(1), "cooldownPeriod": integer(0), "scaleDownStabilization": integer(0),
            "targets": {"type": "array", "items": obj({
                "deployment": string(minLength=1, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
                "namespace": string(pattern=r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
                "minReplicas": integer(0), "maxReplicas": integer(1),
                "requestsPerReplica": {"type": "number", "exclusiveMinimum": 0}}, ("deployment", "maxReplicas"))},
        }),
    }),
}


def render(chart: str) -> str:
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "title": f"fuyao {chart} values",
              **SCHEMAS[chart]}
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for chart in SCHEMAS:
        path = CHARTS / chart / "values.schema.json"
        text = render(chart)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale (run hack/gen-chart-schemas.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
