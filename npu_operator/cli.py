"""``fuyao-npu-operator``: the NPU operator and the programs it runs in its pods.

Subcommands:
  run       the controller (the operator's Deployment)
  nfd       node feature discovery on one node (the operator's DaemonSet)
  validate  the validation pod's check: one NPU, npu-smi info
  cleanup   delete the policy and wait for the operator to remove the stack (Helm's pre-delete hook)
  crd       print the CustomResourceDefinition
  apply-crd create or update the CustomResourceDefinition in the cluster (Helm's pre-install/pre-upgrade hook)

Exit codes: 0 after SIGTERM/SIGINT or success, 1 for a failed validation, cleanup or CRD update, 2 for invalid
flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuyao import daemon as fuyao_daemon
from fuyao import netaddr
from fuyao.config_files import parse_duration

from .controller import CLEANUP_MARGIN_S, CLEANUP_TIMEOUT_S, stop_wait

log = logging.getLogger("npu_operator")
DOCS = "docs/npu-operator.md"


def _duration(flag: str) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{flag}: {exc}") from None
    return parse


def _cleanup_timeout(flag: str) -> Callable[[str], float]:
    """A duration long enough for the operator's wait for the components' pods (:func:`controller.stop_wait`)."""
    def parse(raw: str) -> float:
        seconds = _duration(flag)(raw)
        try:
            stop_wait(seconds)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{flag}: {exc}") from None
        return seconds
    return parse


def _key_value(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{raw!r}: expected NAME=VALUE")
    return name, value


def _client(kubeconfig: str | None) -> Any:
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise SystemExit("no cluster: pass --kubeconfig, or run in a pod")
    config.load_incluster_config()
    return client.ApiClient()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _run(args: argparse.Namespace) -> int:
    from kubernetes import client

    from fuyao.kube_watch import ListWatch

    from .controller import Controller, PolicyEvents
    from .kube import Rest
    from .render import Settings

    api_client = _client(args.kubeconfig)
    settings = Settings(namespace=args.namespace, image=args.image, image_pull_policy=args.image_pull_policy,
                        charts_dir=Path(args.charts_dir), helm=args.helm, npu_smi=args.npu_smi,
                        sysfs_root=args.sysfs_root, driver_version_file=args.driver_version_file,
                        nfd_interval=args.nfd_interval, extra_env=dict(args.nfd_env),
                        host_dirs=tuple(args.nfd_host_dir))
    controller = Controller(Rest(api_client), settings, resync_s=args.resync,
                            stop_wait_s=stop_wait(args.cleanup_timeout))

    class Wake:
        """Other kinds than the policy: a pass at most every min_interval_s."""

        def replace(self, items: list[dict[str, Any]]) -> None:
            controller.wake()

        def upsert(self, obj: dict[str, Any]) -> None:
            controller.wake()

        def delete(self, obj: dict[str, Any]) -> None:
            controller.wake()

    from .api import GROUP, PLURAL, VERSION

    core, apps, custom = client.CoreV1Api(api_client), client.AppsV1Api(api_client), client.CustomObjectsApi(
        api_client)
    ns = {"namespace": args.namespace}
    watches = [
        ListWatch("npuclusterpolicies", custom.list_cluster_custom_object,
                  PolicyEvents(lambda: controller.wake(urgent=True)),
                  kwargs={"group": GROUP, "version": VERSION, "plural": PLURAL}),
        ListWatch("nodes", core.list_node, Wake()),
        ListWatch("pods", core.list_namespaced_pod, Wake(), kwargs=ns),
        ListWatch("daemonsets", apps.list_namespaced_daemon_set, Wake(), kwargs=ns),
        ListWatch("deployments", apps.list_namespaced_deployment, Wake(), kwargs=ns),
    ]
    for w in watches:
        w.start()
    stop = _stop_on_signals()
    def stop_when_told() -> None:
        stop.wait()
        controller.stop()

    threading.Thread(target=stop_when_told, daemon=True).start()
    log.info("npu operator started (namespace %s, charts %s, image %s)", args.namespace, args.charts_dir,
             args.image)
    if args.health_address:
        _serve_health(args.health_address, controller)
    controller.wake()
    controller.run()
    for w in watches:
        w.stop()
    return 0


def _serve_health(address: str, controller: Any) -> None:
    """/healthz (the process runs) and /readyz (the last reconcile succeeded) for the Deployment's probes."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/healthz" or (self.path == "/readyz" and controller.reconciles > 0
                                             and not controller.last_error)
            body = b"ok" if ok else (controller.last_error or "not reconciled yet").encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    def bind(at: str) -> ThreadingHTTPServer:
        server_class: type[ThreadingHTTPServer] = type("HealthServer", (ThreadingHTTPServer,),
                                                       {"address_family": netaddr.family(at)})
        return server_class((at, port), Handler)

    host, port = netaddr.listen_parts(address)
    server = netaddr.bind_listen(host, bind)
    threading.Thread(target=server.serve_forever, daemon=True, name="health").start()


def _nfd(args: argparse.Namespace) -> int:
    from kubernetes import client

    from .agents import run_nfd

    if not args.node_name:
        raise SystemExit("fuyao-npu-operator nfd: --node-name (or $NODE_NAME) is required")
    api = client.CoreV1Api(_client(args.kubeconfig))
    run_nfd(api, args.node_name, args.sysfs_root, args.npu_smi, args.driver_version_file, args.interval,
            _stop_on_signals())
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .agents import validate, write_termination_message

    passed, report = validate(args.npu_smi, dev_root=args.dev_root)
    print(report, flush=True)
    write_termination_message(report, args.termination_log)
    return 0 if passed else 1


def _cleanup(args: argparse.Namespace) -> int:
    """Delete the policy and wait until it is gone (the operator's finalizer removes the stack). If the operator
    does not finish within the timeout, do its cleanup here and drop the finalizer, so an uninstall never hangs."""
    from .api import POLICY_NAME
    from .controller import FINALIZER, POLICY_PATH, cleanup
    from .kube import KubeError, Rest

    rest = Rest(_client(args.kubeconfig))
    try:
        rest.request("DELETE", POLICY_PATH)
    except KubeError as exc:
        if exc.status != 404:
            raise
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if rest.get(POLICY_PATH) is None:
            print(f"policy {POLICY_NAME} deleted")
            return 0
        time.sleep(1)
    for line in cleanup(rest, args.namespace):
        print(line)
    policy = rest.get(POLICY_PATH)
    if policy is not None:
        keep = [f for f in policy["metadata"].get("finalizers") or [] if f != FINALIZER]
        rest.merge_patch(POLICY_PATH, {"metadata": {"finalizers": keep or None}})
        print(f"the operator did not remove the stack within {args.timeout:.0f}s: cleaned up here")
    return 0


def _crd(args: argparse.Namespace) -> int:
    import yaml

    from .api import crd

    print(yaml.safe_dump(crd(), sort_keys=False) if args.output == "yaml" else json.dumps(crd(), indent=2))
    return 0


def _apply_crd(args: argparse.Namespace) -> int:
    """The CRD this package generates (the chart's ``crds/`` file is the same, tests/charts checks it) into the
    cluster: Helm installs ``crds/`` once and never upgrades them."""
    from .api import crd
    from .kube import KubeError, Rest, apply_crd

    try:
        print(apply_crd(Rest(_client(args.kubeconfig)), crd()), flush=True)
    except KubeError as exc:
        print(f"cannot apply the CustomResourceDefinition: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = fuyao_daemon.parser("fuyao-npu-operator", "The NPU operator: one NPUClusterPolicy installs, validates and "
                            "reports every NPU component.", DOCS)
    sub = p.add_subparsers(dest="command", required=True)
    env = os.environ.get

    r = sub.add_parser("run", help="the controller")
    r.add_argument("--kubeconfig", help="default: the in-cluster service account")
    r.add_argument("--namespace", default=env("POD_NAMESPACE", "npu-operator"),
                   help="where the components run (default: $POD_NAMESPACE)")
    r.add_argument("--image", default=env("OPERATOR_IMAGE", "ghcr.io/openfuyao/fuyao:0.1.0"),
                   help="the components' image unless the policy names one (default: $OPERATOR_IMAGE)")
    r.add_argument("--image-pull-policy", default="IfNotPresent", choices=["Always", "IfNotPresent", "Never"])
    r.add_argument("--charts-dir", default="/opt/fuyao/charts", help="fuyao's charts (in the image)")
    r.add_argument("--helm", default="helm", help="helm binary (renders the charts: helm template)")
    r.add_argument("--resync", type=_duration("--resync"), default=30.0, help="reconcile at least this often")
    r.add_argument("--npu-smi", default="/usr/local/bin/npu-smi", help="npu-smi on the nodes (for discovery)")
    r.add_argument("--sysfs-root", default="/sys", help="sysfs on the nodes (for discovery)")
    r.add_argument("--driver-version-file", default="/usr/local/Ascend/driver/version.info")
    r.add_argument("--nfd-interval", default="30s", help="how often discovery re-labels each node")
    r.add_argument("--nfd-env", type=_key_value, action="append", default=[], metavar="NAME=VALUE",
                   help="environment for discovery's pods (repeatable)")
    r.add_argument("--nfd-host-dir", action="append", default=[], metavar="DIR",
                   help="a host directory mounted read-only into discovery's pods (repeatable)")
    r.add_argument("--health-address", default="0.0.0.0:8081", help="/healthz and /readyz; empty: off")
    r.add_argument("--cleanup-timeout", type=_cleanup_timeout("--cleanup-timeout"), default=CLEANUP_TIMEOUT_S,
                   help="the uninstall hook's --timeout (the chart passes both operator.cleanupTimeout): a deleted "
                        f"policy waits for its components' pods {CLEANUP_MARGIN_S:g}s less, then cleans the nodes "
                        f"(default {CLEANUP_TIMEOUT_S:g}s)")
    r.set_defaults(func=_run)

    n = sub.add_parser("nfd", help="label this node's NPUs")
    n.add_argument("--kubeconfig")
    n.add_argument("--node-name", default=env("NODE_NAME"))
    n.add_argument("--sysfs-root", default="/sys")
    n.add_argument("--npu-smi", default="/usr/local/bin/npu-smi")
    n.add_argument("--driver-version-file", default="/usr/local/Ascend/driver/version.info")
    n.add_argument("--interval", type=_duration("--interval"), default=30.0)
    n.set_defaults(func=_nfd)

    v = sub.add_parser("validate", help="check that this pod got an NPU and npu-smi info shows it")
    v.add_argument("--npu-smi", default="npu-smi")
    v.add_argument("--dev-root", default="/dev")
    v.add_argument("--termination-log", default="/dev/termination-log")
    v.set_defaults(func=_validate)

    c = sub.add_parser("cleanup", help="delete the policy and wait for the stack to go (Helm pre-delete hook)")
    c.add_argument("--kubeconfig")
    c.add_argument("--namespace", default=env("POD_NAMESPACE", "npu-operator"))
    c.add_argument("--timeout", type=_cleanup_timeout("--timeout"), default=CLEANUP_TIMEOUT_S,
                   help="how long to wait for the operator's cleanup before doing it here; the operator's "
                        f"--cleanup-timeout must say the same (default {CLEANUP_TIMEOUT_S:g}s)")
    c.set_defaults(func=_cleanup)

    d = sub.add_parser("crd", help="print the CustomResourceDefinition")
    d.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    d.set_defaults(func=_crd)

    a = sub.add_parser("apply-crd", help="create or update the CustomResourceDefinition in the cluster (the chart's "
                                         "pre-install/pre-upgrade hook: Helm never upgrades crds/)")
    a.add_argument("--kubeconfig", help="default: the in-cluster service account")
    a.set_defaults(func=_apply_crd)
    return p


def main(argv: list[str] | None = None) -> None:
    args = fuyao_daemon.parse(build_parser(), argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
