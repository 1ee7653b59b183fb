"""A real control plane for integration tests: etcd and kube-apiserver from ``hack/build-upstream.sh``, on
loopback ports, in a private temp directory.

Authentication is a static token file: an admin token (``system:masters``) for the test itself, and one token per
extra user so components can be run with exactly the RBAC their chart grants. Each user gets a kubeconfig.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

CACHE = Path(os.environ.get("FUYAO_CACHE", Path.home() / ".cache" / "fuyao"))
BIN = CACHE / "bin"


# Ports free_port hands out: never the kernel's ephemeral range (below), nor the NodePort range, nor the
# well-known ports of the local clusters' components (kubelet 10250, ...).
_PORT_RANGES = ((20000, 29999), (61000, 65535))
_handed_out: set[int] = set()
_pick = random.Random(os.urandom(16))  # not the global generator: a test that seeds it would repeat ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _bindable(port: int) -> bool:
    """Nothing holds ``port`` on any local address (a wildcard bind fails on any of them)."""
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive ports nothing holds, for a daemon to listen on later, and never handed
    out before in this process. Never from the kernel's ephemeral range: a port found by binding port 0 is one the
    kernel gives the next process that binds port 0 or connects out (vLLM's engine core picks its ZMQ ports so),
    and a vLLM engine started second lost its port to the first one's that way (the CI run of 2026-12-07)."""
    low, high = _ephemeral_range()
    candidates = [(first, last) for first, last in _PORT_RANGES if last < low or first > high]
    for _ in range(2000):
        first, last = _pick.choice(candidates)
        base = _pick.randint(first, last - count + 1)
        ports = range(base, base + count)
        if not _handed_out.intersection(ports) and all(_bindable(port) for port in ports):
            _handed_out.update(ports)
            return base
    raise RuntimeError(f"no {count} consecutive free ports in {candidates} outside the ephemeral range {low}-{high}")


def binary(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise RuntimeError(f"{path} missing: run hack/build-upstream.sh (hack/test.sh does it)")
    return str(path)


@contextlib.contextmanager
def control_plane(*nodes: dict) -> Iterator[LocalApiServer]:  # type: ignore[type-arg]
    """etcd + kube-apiserver with the default ServiceAccount and these nodes (``LocalApiServer.add_node``; no
    kubelets: pods bound to them stay Pending), stopped afterwards."""
    server = LocalApiServer().start()
    try:
        server.create([{"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": "default", "namespace": "default"}}])
        for raw in nodes:
            server.add_node(raw)
        yield server
    finally:
        server.stop()


def least_privilege(user: str, rules: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    """A ClusterRole with exactly ``rules`` bound to ``user``, and the default ServiceAccount pods need: what a
    component's chart grants, to create before testing the component as that user."""
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": user},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": user},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": "default"}},
    ]


class LocalApiServer:
    def __init__(self, users: dict[str, list[str]] | None = None, extra_args: tuple[str, ...] = (),
                 bind_address: str = "127.0.0.1"):
        """``users``: name → groups, each gets a token and a kubeconfig (``kubeconfig_for(name)``).
        ``bind_address``: where the API server listens and what it advertises (the ``kubernetes`` Service's
        endpoint); loopback unless pods must reach it (the local cluster binds the host end of its private link)."""
        self.root = Path(tempfile.mkdtemp(prefix="fapi", dir="/tmp"))
        self.users = {"admin": ["system:masters"], **(users or {})}
        self.tokens = {name: f"{name}-{os.urandom(8).hex()}" for name in self.users}
        self.etcd_port, self.peer_port, self.port = free_port(), free_port(), free_port()
        self.bind_address = bind_address
        self.url = f"https://{bind_address}:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.extra_args = extra_args

    def start(self, timeout: float = 90.0) -> LocalApiServer:
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        self._spawn("etcd", [binary("etcd"), "--data-dir", str(self.root / "etcd"), "--name", "default",
                             "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                             "--initial-cluster", f"default={peer_url}", "--log-level", "warn"])
        key = self.root / "sa.key"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        tokens = self.root / "tokens.csv"
        tokens.write_text("".join(f'{self.tokens[u]},{u},{u},"{",".join(g)}"\n' for u, g in self.users.items()))
        self._spawn("kube-apiserver", [
            binary("kube-apiserver"), f"--etcd-servers={etcd_url}", f"--bind-address={self.bind_address}",
            f"--secure-port={self.port}", f"--cert-dir={self.root / 'certs'}", f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={key}", f"--service-account-signing-key-file={key}",
            "--service-cluster-ip-range=10.96.0.0/16", "--allow-privileged=true", "--v=0", *self.extra_args])
        self._wait_ready(timeout)
        return self

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True))

    def _wait_ready(self, timeout: float) -> None:
        context: ssl.SSLContext | None = None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}: {self.log_tail()}")
            request = urllib.request.Request(self.url + "/readyz",
                                             headers={"Authorization": f"Bearer {self.tokens['admin']}"})
            try:
                if context is None:  # the apiserver writes its self-signed chain at start
                    context = ssl.create_default_context(cafile=str(self.root / "certs" / "apiserver.crt"))
                with urllib.request.urlopen(request, context=context, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError as exc:  # includes ssl.SSLError and a missing/partial certificate file
                context = None if isinstance(exc, (FileNotFoundError, ssl.SSLError)) else context
                last = str(exc)
            time.sleep(0.3)
        raise RuntimeError(f"kube-apiserver not ready after {timeout}s ({last}): {self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.root.glob("*.log"))

    def kubeconfig_for(self, user: str) -> str:
        path = self.root / f"{user}.kubeconfig"
        if not path.exists():
            path.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "local",
                "clusters": [{"name": "local", "cluster": {
                    "server": self.url, "certificate-authority": str(self.root / "certs" / "apiserver.crt")}}],
                "users": [{"name": user, "user": {"token": self.tokens[user]}}],
                "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
            }))
        return str(path)

    def client(self, user: str = "admin"):  # type: ignore[no-untyped-def]
        from kubernetes import client, config

        return client.CoreV1Api(config.new_client_from_config(config_file=self.kubeconfig_for(user)))

    def create(self, documents: list[dict]) -> None:  # type: ignore[type-arg]
        """Create objects (RBAC, service accounts...) as admin."""
        from kubernetes import config, utils

        api = config.new_client_from_config(config_file=self.kubeconfig_for("admin"))
        for doc in documents:
            utils.create_from_dict(api, doc)

    def add_node(self, raw: dict, conditions: list[dict] | None = None, api=None) -> None:  # type: ignore[no-untyped-def,type-arg]
        """A node object as a kubelet would leave it (``raw`` from ``tests.support.k8s_objects.node``): created,
        its status patched in, and the not-ready taint admission puts on new nodes cleared (no kubelet here).
        ``api``: a CoreV1Api to reuse (many nodes)."""
        api = api or self.client()
        name = raw["metadata"]["name"]
        api.create_node({k: v for k, v in raw.items() if k != "status"})
        status = {**raw["status"], **({"conditions": conditions} if conditions else {})}
        api.patch_node_status(name, {"status": status})
        api.patch_node(name, {"spec": {"taints": None}})

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


class RotatingToken:
    """A client configuration (``kubernetes.client.Configuration``'s ``auth_settings``) whose bearer token changes on
    every read, as a projected service-account token does, sped up: shows who reads it again and when."""

    def __init__(self) -> None:
        self.reads = 0

    def auth_settings(self) -> dict[str, dict[str, str]]:
        self.reads += 1
        return {"BearerToken": {"in": "header", "key": "Authorization", "value": f"Bearer t{self.reads}"}}
