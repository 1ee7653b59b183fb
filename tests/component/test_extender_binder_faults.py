"""The binder when the API server's answer is lost: a Binding sent and not answered may have happened, so the
devices it chose stay counted (until the watch says); one never sent (no connection) gives them back at once."""

from __future__ import annotations

import asyncio
import dataclasses

from fuyao.contracts import RESOURCE_NPU
from fuyao.kube_client import RestEndpoint
from fuyao.scheduler_extender.binder import Binder
from fuyao.scheduler_extender.cluster import ClusterCache
from fuyao.scheduler_extender.kube_protocol import BindingArgs
from fuyao.scheduler_extender.model import parse_pod
from tests.support.apiserver import RotatingToken, free_port
from tests.support.k8s_objects import node, pod, topology


def _cache_with_pending_pod() -> tuple[ClusterCache, str]:
    cache = ClusterCache()
    cache.replace_nodes([node("n1", topo=topology())])
    cache.replace_pods([])
    pending = pod("p", requests={RESOURCE_NPU: "2"}, uid="uid-p")
    cache.remember(parse_pod(pending))
    return cache, "uid-p"


def test_a_binding_whose_answer_is_lost_keeps_its_devices_and_one_never_sent_frees_them() -> None:
    async def scenario() -> None:
        received: list[bytes] = []

        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.append(await reader.read(65536))  # the request arrives (the API server may act on it) ...
            writer.close()  # ... and the connection drops before any answer

        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cache, uid = _cache_with_pending_pod()
        binder = Binder(RestEndpoint(f"http://127.0.0.1:{port}", None, RotatingToken()), cache, timeout_s=2)
        try:
            error = await binder(BindingArgs("p", "default", uid, "n1"))
            assert received and b"/binding" in received[0]
            assert "no answer" in error
            assert [p.uid for p in cache.pods_on("n1")] == [uid]  # still counted: it may be bound
            info = cache.node_info("n1")
            assert info is not None and len(info.assigned[RESOURCE_NPU]) == 2
        finally:
            await binder.close()
            server.close()
            await server.wait_closed()

        cache, uid = _cache_with_pending_pod()
        closed = Binder(RestEndpoint(f"http://127.0.0.1:{free_port()}", None, RotatingToken()), cache, timeout_s=2)
        try:
            error = await closed(BindingArgs("p", "default", uid, "n1"))
            assert "cannot connect" in error
            assert cache.pods_on("n1") == []  # never sent: its devices are free again
        finally:
            await closed.close()

    asyncio.run(scenario())


def test_warning_events_go_through_one_bounded_sender() -> None:
    """A thousand pods with a bad annotation: one sender thread, at most ``QUEUED`` events waiting, the rest
    dropped and counted (never a thread per pod)."""
    import threading
    import time

    from fuyao.scheduler_extender.binder import PodWarnings

    class SlowApi:
        def __init__(self) -> None:
            self.sent: list[str] = []
            self.gate = threading.Event()

        def create_namespaced_event(self, namespace: str, event: object, _request_timeout: float) -> None:
            self.gate.wait(5)
            self.sent.append(namespace)

    api = SlowApi()
    warnings = PodWarnings(api)
    before = threading.active_count()
    for i in range(1000):
        warnings(parse_pod(pod(f"w-{i}", uid=f"u-{i}")), "bad annotation")
    assert threading.active_count() <= before + 1
    assert warnings.dropped >= 1000 - PodWarnings.QUEUED - 1
    api.gate.set()
    deadline = time.monotonic() + 10
    while len(api.sent) < 1000 - warnings.dropped and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(api.sent) == 1000 - warnings.dropped


def test_assumed_binds_do_not_expire_while_the_pod_watch_is_failing() -> None:
    """An assumption is forgotten when the watch never reported its bind within the TTL; while the pod watch fails
    the watch's silence says nothing, so assumptions are kept (a bound pod forgotten would free its devices)."""
    import time

    from fuyao.scheduler_extender import cluster as c

    cache, uid = _cache_with_pending_pod()
    cache.assume(dataclasses.replace(parse_pod(pod("p", requests={RESOURCE_NPU: "2"}, uid="uid-p")),
                                     node_name="n1"))
    assert [p.uid for p in cache.pods_on("n1")] == [uid]
    later = time.monotonic() + c.ASSUME_TTL_S + 1
    real = time.monotonic
    try:
        time.monotonic = lambda: later  # type: ignore[assignment]
        cache.failing["pods"] = "connection refused"
        cache.expire_assumed()
        assert [p.uid for p in cache.pods_on("n1")] == [uid]  # kept while the watch is failing
        del cache.failing["pods"]
        cache.expire_assumed()
        assert cache.pods_on("n1") == []  # the watch works and never reported it: forgotten
    finally:
        time.monotonic = real  # type: ignore[assignment]


def test_a_retried_bind_to_another_node_keeps_what_the_lost_first_one_did() -> None:
    """kube-scheduler's bind times out on node n1 (the Binding happened; its answer was lost) and it retries on n2:
    the API server refuses with 409 and the pod, read again, is on n1. The second attempt's assumption had replaced
    the first's and was then dropped, leaving n1's two NPUs free in the cache until the watch caught up (another
    bind could be given them). Now the pod read bound to n1 counts there, and the 409's reason is in the error."""
    from aiohttp import web

    async def scenario() -> None:
        cache, uid = _cache_with_pending_pod()
        cache.replace_nodes([node("n1", topo=topology()), node("n2", topo=topology())])
        bound = pod("p", requests={RESOURCE_NPU: "2"}, uid=uid, node_name="n1", phase="Pending",
                    assigned={RESOURCE_NPU: ["Ascend910-0", "Ascend910-1"]})
        bound["metadata"]["resourceVersion"] = "7"
        conflict = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                    "message": 'Operation cannot be fulfilled on pods/binding "p": pod p is already assigned to '
                               'node "n1"'}

        async def binding(_request: web.Request) -> web.Response:
            return web.json_response(conflict, status=409)

        async def read(_request: web.Request) -> web.Response:
            return web.json_response(bound)

        app = web.Application()
        app.router.add_post("/api/v1/namespaces/default/pods/p/binding", binding)
        app.router.add_get("/api/v1/namespaces/default/pods/p", read)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        binder = Binder(RestEndpoint(f"http://127.0.0.1:{port}", None, RotatingToken()), cache, timeout_s=2)
        try:
            error = await binder(BindingArgs("p", "default", uid, "n2"))
            assert error == "pod default/p is already bound to n1"
            assert [p.uid for p in cache.pods_on("n1")] == [uid] and cache.pods_on("n2") == []
            info = cache.node_info("n1")
            assert info is not None and info.assigned[RESOURCE_NPU] == {"Ascend910-0", "Ascend910-1"}
            # a 409 whose re-read shows nothing new (the pod is being deleted...): the API server's reason is said
            bound["spec"].pop("nodeName")
            cache.forget_assumed(uid)
            error = await binder(BindingArgs("p", "default", uid, "n2"))
            assert "already assigned to node" in error and "409" in error, error
        finally:
            await binder.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_failed_attempt_forgets_only_its_own_assumption() -> None:
    # attempt 1 (n1) fails with a 500 after attempt 2 (n2) assumed the pod: attempt 1 dropped attempt 2's devices
    # while its Binding was still in flight
    cache, uid = _cache_with_pending_pod()
    cache.replace_nodes([node("n1", topo=topology()), node("n2", topo=topology())])
    pending = parse_pod(pod("p", requests={RESOURCE_NPU: "2"}, uid=uid))
    first, second = (dataclasses.replace(pending, node_name=n) for n in ("n1", "n2"))
    cache.assume(first)
    cache.assume(second)
    cache.forget_assumed(uid, only=first)
    assert [p.uid for p in cache.pods_on("n2")] == [uid]
    cache.forget_assumed(uid, only=second)
    assert cache.pods_on("n2") == []
