"""fuyao.kube_client.RestEndpoint: auth headers read per call, or reused on a hot path for a bounded time."""

from __future__ import annotations

from fuyao import kube_client
from fuyao.kube_client import RestEndpoint
from tests.support.apiserver import RotatingToken


def test_headers_are_read_per_call_unless_a_max_age_is_given(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    now = [100.0]
    monkeypatch.setattr(kube_client.time, "monotonic", lambda: now[0])
    conf = RotatingToken()
    endpoint = RestEndpoint("https://api", None, conf)
    assert endpoint.headers() == {"Authorization": "Bearer t1"}
    assert endpoint.headers() == {"Authorization": "Bearer t2"}  # no max age: read again
    assert endpoint.headers(10.0) == {"Authorization": "Bearer t2"}  # just read: reused
    now[0] += 9.9
    kept = endpoint.headers(10.0)
    assert kept == {"Authorization": "Bearer t2"} and conf.reads == 2
    kept["Authorization"] = "tampered"  # a caller's copy, not the kept one
    now[0] += 0.2
    assert endpoint.headers(10.0) == {"Authorization": "Bearer t3"}  # older than 10 s: read again
    assert endpoint.headers(10.0) == {"Authorization": "Bearer t3"} and conf.reads == 3


def _kubeconfig(tmp_path, cluster: dict, user: dict):  # type: ignore[no-untyped-def]
    import yaml

    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": cluster}], "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return str(path)


def test_a_kubeconfig_token_file_is_read_again_every_minute(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # a rotated token (a projected service-account token the kubeconfig points at) is picked up without a restart
    now = [1000.0]
    monkeypatch.setattr(kube_client.time, "monotonic", lambda: now[0])
    (tmp_path / "token").write_text("first\n")
    api = kube_client.connect(_kubeconfig(tmp_path, {"server": "https://127.0.0.1:6443",
                                                     "insecure-skip-tls-verify": True}, {"tokenFile": "token"}))
    endpoint = kube_client.rest_endpoint(api)
    assert list(endpoint.headers().values()) == ["Bearer first"]  # without the file's newline
    (tmp_path / "token").write_text("second\n")
    now[0] += 30
    assert "Bearer first" in endpoint.headers().values()  # read less than a minute ago
    now[0] += 31
    assert "Bearer second" in endpoint.headers().values()
    (tmp_path / "token").unlink()  # a failed read keeps the last token
    now[0] += 61
    assert "Bearer second" in endpoint.headers().values()


def test_tls_server_name_checks_the_certificate_against_that_name(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # the API server reached by IP whose certificate names only api.internal: the kubeconfig's tls-server-name is the
    # name checked (and sent as SNI); without it the same connection is refused
    import asyncio
    import ssl

    from fuyao.http_client import ConnectError, UpstreamError, UpstreamPool
    from tests.support import pki

    ca = pki.ca(tmp_path, "ca", "test-ca")
    served = pki.sign(ca, tmp_path, "api", "api.internal", sans=("api.internal",), server=True)
    api = kube_client.connect(_kubeconfig(tmp_path, {"server": "https://127.0.0.1:1", "certificate-authority":
                                                     str(ca.cert), "tls-server-name": "api.internal"},
                                          {"token": "x"}))
    endpoint = kube_client.rest_endpoint(api)
    assert endpoint.server_hostname == "api.internal"

    async def run() -> tuple[int, str]:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(served.cert, served.key)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            named = UpstreamPool(ssl_context=endpoint.ssl_context, server_hostname=endpoint.server_hostname)
            response = await named.request(f"https://127.0.0.1:{port}", b"GET", "/version", b"", total=10)
            status = response.status
            await response.read()
            await named.close()
            plain = UpstreamPool(ssl_context=endpoint.ssl_context)
            try:
                await plain.request(f"https://127.0.0.1:{port}", b"GET", "/version", b"", total=10)
                refused = "no"
            except (ConnectError, UpstreamError, ssl.SSLError) as exc:
                refused = str(exc)
            await plain.close()
            return status, refused
        finally:
            server.close()

    status, refused = asyncio.run(run())
    assert status == 200
    assert refused != "no" and ("certificate" in refused.lower() or "hostname" in refused.lower()
                                or "127.0.0.1" in refused)
