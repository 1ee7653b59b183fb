"""``fuyao-npu-operator apply-crd`` (the chart's pre-install/pre-upgrade hook: Helm installs ``crds/`` once and never
upgrades them) against an HTTP server that answers as the API server does for one CustomResourceDefinition: the
requests it sends through the real kubernetes client, from a kubeconfig. A missing CRD is created by server-side apply
(authorized as ``create`` of that name, which the hook's ClusterRole can restrict by name); an older one gets the
package's spec whole by a PUT with the stored resourceVersion (a field the new CRD drops goes, whoever co-owns it),
keeping its metadata; a conflict is retried; a refusal exits 1 naming it."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from fuyao.npu_operator.api import CRD_NAME, crd
from fuyao.npu_operator.cli import main
from fuyao.npu_operator.kube import CRD_PATH


class CrdServer:
    """One CRD at :data:`CRD_PATH`: GET, apply PATCH (creates when missing), PUT (409 on a stale resourceVersion
    or when ``conflicts`` says so); every request recorded as (method, path, query, content type, body)."""

    def __init__(self) -> None:
        self.stored: dict[str, Any] | None = None
        self.version = 1
        self.conflicts = 0
        self.refuse = False
        self.requests: list[tuple[str, str, dict[str, list[str]], str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                outer.requests.append((self.command, url.path, parse_qs(url.query),
                                       self.headers.get("Content-Type", ""), body))
                status, answer = outer.answer(self.command, url.path, body)
                self._answer(status, answer)

            do_GET = do_PATCH = do_PUT = do_POST = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def status(self, code: int, message: str) -> tuple[int, dict[str, Any]]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}

    def store(self, obj: dict[str, Any]) -> dict[str, Any]:
        before = copy.deepcopy(self.stored)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if before is not None and {k: v for k, v in obj.items() if k != "metadata"} == {
                k: v for k, v in before.items() if k != "metadata"} and meta.get("annotations") == \
                before["metadata"].get("annotations"):
            return before  # a no-op update writes nothing: the resourceVersion stays
        self.version += 1
        meta["resourceVersion"] = str(self.version)
        self.stored = obj
        return copy.deepcopy(obj)

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if self.refuse:
            return self.status(403, f'customresourcedefinitions.apiextensions.k8s.io "{CRD_NAME}" is forbidden')
        if path != CRD_PATH:
            return self.status(404, f"{path} not found")
        if method == "GET":
            return (200, copy.deepcopy(self.stored)) if self.stored else self.status(404, "not found")
        if method == "PATCH" and self.stored is None:
            return 201, self.store(body)
        if method == "PUT":
            if self.stored is None:
                return self.status(404, "not found")
            if self.conflicts or body["metadata"].get("resourceVersion") != self.stored["metadata"]["resourceVersion"]:
                self.conflicts = max(0, self.conflicts - 1)
                self.version += 1  # someone else wrote it meanwhile
                self.stored["metadata"]["resourceVersion"] = str(self.version)
                return self.status(409, "the object has been modified; please apply your changes to the latest "
                                        "version and try again")
            return 200, self.store(body)
        return self.status(405, f"{method} not expected here")

    def kubeconfig(self, tmp_path: Path) -> Path:
        host, port = self.http.server_address[:2]
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": f"http://{host!s}:{port}"}}],
            "users": [{"name": "u", "user": {"token": "hook-token"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        return path


@pytest.fixture
def server() -> Iterator[CrdServer]:
    srv = CrdServer()
    thread = threading.Thread(target=srv.http.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.http.shutdown()
        srv.http.server_close()


def run(server: CrdServer, tmp_path: Path) -> int:
    with pytest.raises(SystemExit) as done:
        main(["apply-crd", "--kubeconfig", str(server.kubeconfig(tmp_path))])
    return int(done.value.code or 0)


def test_a_missing_crd_is_created_by_server_side_apply(server: CrdServer, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert run(server, tmp_path) == 0
    assert [(m, p) for m, p, *_ in server.requests] == [("GET", CRD_PATH), ("PATCH", CRD_PATH)]
    _, _, query, content_type, body = server.requests[1]
    assert query == {"fieldManager": ["fuyao-npu-operator"], "force": ["true"]}
    assert content_type.startswith("application/apply-patch+yaml")
    assert body == crd()  # what the package generates, which is the chart's crds/ file (tests/charts)
    assert f"customresourcedefinition {CRD_NAME} created" in capsys.readouterr().out


def test_an_older_crd_gets_the_new_spec_whole_and_keeps_its_metadata(server: CrdServer, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    old = crd()
    schema = old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    schema["retired"] = {"type": "string"}  # a field the new release drops
    del schema["qosAgent"]  # and one it adds
    old["metadata"].update({"annotations": {"example.com/owner": "platform"}, "finalizers": ["example.com/keep"],
                            "uid": "u-1", "managedFields": [{"manager": "helm", "operation": "Update"}]})
    server.store(old)
    stored_version = server.stored["metadata"]["resourceVersion"]  # type: ignore[index]
    server.conflicts = 1  # someone writes it between the hook's read and its write: read again, retry
    assert run(server, tmp_path) == 0
    methods = [m for m, *_ in server.requests]
    assert methods == ["GET", "PUT", "GET", "PUT"]
    first, second = server.requests[1][4], server.requests[3][4]
    assert first["metadata"]["resourceVersion"] == stored_version
    assert second["metadata"]["resourceVersion"] != stored_version  # the version read again
    assert "managedFields" not in second["metadata"]
    assert server.stored is not None
    assert server.stored["spec"] == crd()["spec"]  # "retired" gone, "qosAgent" there
    assert server.stored["metadata"]["annotations"] == {"example.com/owner": "platform"}
    assert server.stored["metadata"]["finalizers"] == ["example.com/keep"]
    assert f"customresourcedefinition {CRD_NAME} updated" in capsys.readouterr().out
    # a second run finds it current: nothing is written
    server.requests.clear()
    assert run(server, tmp_path) == 0
    assert f"customresourcedefinition {CRD_NAME} unchanged" in capsys.readouterr().out


def test_a_refusal_exits_1_naming_it(server: CrdServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server.refuse = True
    assert run(server, tmp_path) == 1
    err = capsys.readouterr().err
    assert "cannot apply the CustomResourceDefinition: 403" in err and "forbidden" in err
