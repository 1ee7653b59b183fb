"""The local cluster's certificates, made with the ``openssl`` command line as kubeadm lays them out: a cluster CA
that signs the kubelet's serving certificate and the API server's client certificate for kubelets, and a front-proxy
CA for the aggregation layer (metrics-server and KEDA's metrics API server trust the API server through it).

The API server's own serving certificate stays the one it generates itself (``--cert-dir``), which every kubeconfig
and every pod's service-account CA already trusts."""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "3650"


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {result.stderr.strip()}")


def ca(directory: Path, name: str, common_name: str) -> Pair:
    """A self-signed CA ``<name>.crt`` / ``<name>.key`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pair.key), "-out", str(pair.cert),
             "-days", DAYS, "-subj", f"/CN={common_name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return pair


def sign(issuer: Pair, directory: Path, name: str, common_name: str, organizations: tuple[str, ...] = (),
         sans: tuple[str, ...] = (), server: bool = False) -> Pair:
    """A certificate ``<name>.crt`` / ``<name>.key`` signed by ``issuer``: a client certificate (CN = user,
    O = groups, as the API server and the kubelet read them) or, with ``server``, a serving certificate for
    ``sans`` (IP addresses and DNS names)."""
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    subject = "".join(f"/O={o}" for o in organizations) + f"/CN={common_name}"
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pair.key), "-out", str(csr),
             "-subj", subject)
    extensions = directory / f"{name}.ext"
    lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}"]
    if sans:
        lines.append("subjectAltName=" + ",".join(f"{'IP' if _is_ip(s) else 'DNS'}:{s}" for s in sans))
    extensions.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(issuer.cert), "-CAkey", str(issuer.key),
             "-CAcreateserial", "-out", str(pair.cert), "-days", DAYS, "-sha256", "-extfile", str(extensions))
    csr.unlink()
    extensions.unlink()
    return pair


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ClusterPki:
    """What ``make`` writes: file paths for the API server's and the kubelet's flags."""

    ca: Pair
    kubelet: Pair
    apiserver_kubelet_client: Pair
    front_proxy_ca: Pair
    front_proxy_client: Pair

    def apiserver_args(self) -> tuple[str, ...]:
        """The API server's flags for talking to kubelets (verify their serving certificate, authenticate with a
        client certificate) and for the aggregation layer (kubeadm's values)."""
        return (f"--kubelet-certificate-authority={self.ca.cert}",
                f"--kubelet-client-certificate={self.apiserver_kubelet_client.cert}",
                f"--kubelet-client-key={self.apiserver_kubelet_client.key}",
                f"--client-ca-file={self.ca.cert}",
                f"--requestheader-client-ca-file={self.front_proxy_ca.cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-username-headers=X-Remote-User",
                f"--proxy-client-cert-file={self.front_proxy_client.cert}",
                f"--proxy-client-key-file={self.front_proxy_client.key}")


def make(directory: Path, node: str, node_ip: str) -> ClusterPki:
    cluster_ca = ca(directory, "ca", "fuyao-local-ca")
    front = ca(directory, "front-proxy-ca", "fuyao-local-front-proxy-ca")
    return ClusterPki(
        ca=cluster_ca,
        kubelet=sign(cluster_ca, directory, "kubelet", f"system:node:{node}", ("system:nodes",),
                     sans=(node_ip, node), server=True),
        # kubeadm's name; the group gives the API server full access on the kubelet (webhook authorization)
        apiserver_kubelet_client=sign(cluster_ca, directory, "apiserver-kubelet-client",
                                      "kube-apiserver-kubelet-client", ("system:masters",)),
        front_proxy_ca=front,
        front_proxy_client=sign(front, directory, "front-proxy-client", "front-proxy-client"))
