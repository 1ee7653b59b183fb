"""The engine deployment's replica: one OpenAI-compatible engine process on the NPUs Ray assigned to the replica.

Ray gives the replica its NPU slots (``ray.get_runtime_context().get_accelerator_ids()["NPU"]``) and sets
``ASCEND_RT_VISIBLE_DEVICES`` to them; the engine process inherits it, so an Ascend engine (vLLM-Ascend, MindIE)
uses exactly those NPUs. The engine listens on ``port + first slot`` and publishes its KV events on
``kv_events_port + first slot``: one engine per NPU slot on a node, at addresses known in advance, so a
Kubernetes Service (fuyao's router) and fuyao's KV-cache index (pod discovery) find the engines of a worker group
the same way they find any engine pods (docs/ray.md).

The replica forwards the ingress's requests to its engine (streamed chunks as they come), reports its engine in
``record_replica_metadata`` (what :mod:`fuyao.ray_serve.request_router` matches the index's answer against),
health-checks it for Serve, and stops it with the replica: the engine gets SIGTERM when the replica process dies
(``PR_SET_PDEATHSIG``, from a thread that lives as long as the process: :mod:`.child`), so no engine outlives
its replica and none dies before it. The engine leads its own process group; stopping it ends that group and every
process below it (vLLM's engine core too, whatever session it set). Calls to the engine have a read timeout
(``engine.readTimeout``, :mod:`.engine_client`): a hung engine fails its requests with 504, never holds them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import ray

from fuyao.contracts import RAY_RESOURCE_NPU
from fuyao.netaddr import url

from .child import port_free, spawn, stop
from .engine_client import EngineClient
from .ranking import OpenAiRequest, StreamHead
from .settings import EngineSettings

log = logging.getLogger("fuyao.ray_serve.engine")
ENV_VISIBLE_NPUS = "ASCEND_RT_VISIBLE_DEVICES"  # what Ray sets for its NPU resource (ray._private.accelerators.npu)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""The readiness probe's opener: to the engine on loopback directly, never through the pod's http_proxy."""


def npu_slots() -> list[str]:
    """The NPU ids Ray assigned to this process (its slots, mapped through the node's ASCEND_RT_VISIBLE_DEVICES)."""
    try:
        return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get(RAY_RESOURCE_NPU, [])]
    except Exception:
        return []


class EngineReplica:
    """The body of the engine deployment (``fuyao.ray_serve.app`` wraps it with ``serve.deployment``)."""

    def __init__(self, engine: Mapping[str, Any] | EngineSettings | None = None):
        self.settings = engine if isinstance(engine, EngineSettings) else EngineSettings.model_validate(engine or {})
        self.slots = npu_slots()
        # the lowest slot (Ray's ids come from a set: their order is not stable)
        offset = min((int(s) for s in self.slots if s.isdigit()), default=0)
        self.port = self.settings.port + offset
        self.kv_events_port = self.settings.kv_events_port + offset
        # the engine's name (its URL): the address it binds, or when it binds all of them, the node's (the pod IP)
        address = self.settings.host
        if address in ("", "0.0.0.0", "::"):
            address = ray.util.get_node_ip_address()
        self.url = url("http", address, self.port)
        # where this replica reaches its own engine: loopback when it binds every address, else the one it binds
        self.local_url = f"http://127.0.0.1:{self.port}" if self.settings.host in ("", "0.0.0.0", "::") else self.url
        if not port_free(self.settings.host, self.port):
            raise RuntimeError(f"port {self.port} (engine.port {self.settings.port} + NPU slot {offset}) is taken: "
                               "another engine (a replica sharing this NPU slot, or one still stopping) listens "
                               "there")
        args = self.settings.command_args(self.settings.host, self.port, self.kv_events_port)
        env = {**os.environ, **self.settings.env, "PYTHONUNBUFFERED": "1"}
        if self.slots:  # exactly this replica's NPUs, also where Ray was told not to set it (RAY_EXPERIMENTAL_NOSET_…)
            env[ENV_VISIBLE_NPUS] = ",".join(self.slots)
        log.info("starting engine %s on NPU slots %s: python -m %s %s", self.url, self.slots or "-",
                 self.settings.module, " ".join(args))
        self.process = spawn([sys.executable, "-m", self.settings.module, *args], env)
        self._stopping = False
        self._wait_ready()
        self.client = EngineClient(self.local_url, self.settings.read_timeout)
        threading.Thread(target=self._exit_with_engine, daemon=True, name="engine-watch").start()

    def _exit_with_engine(self, exit_process: Callable[[int], Any] = os._exit) -> None:
        """The replica ends when its engine does, so that Serve replaces it at once: a live replica whose engine is
        gone fails its health check only three times in a row (~30 s), and meanwhile answers every request with an
        error at once, which makes it look the least loaded to Serve's routers."""
        code = self.process.wait()
        if self._stopping:
            return
        log.error("the engine (python -m %s) exited with code %s: ending the replica for Serve to replace it",
                  self.settings.module, code)
        stop(self.process, self.settings.stop_timeout)  # what it started may live on
        exit_process(1)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout
        health = f"{self.local_url}/health"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stop(self.process, self.settings.stop_timeout)  # what it started may live on
                raise RuntimeError(f"the engine (python -m {self.settings.module}) exited with code "
                                   f"{self.process.returncode} before it was ready")
            try:
                with _DIRECT.open(health, timeout=2) as response:
                    if response.status == 200 and self.process.poll() is None:  # and it is ours, still running
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        stop(self.process, self.settings.stop_timeout)
        raise RuntimeError(f"the engine did not answer {health} within {self.settings.startup_timeout:.0f} s")

    # Serve hooks ---------------------------------------------------------------------------------------------------
    def record_replica_metadata(self) -> dict[str, Any]:
        """Static metadata for request routers: the engine's name in fuyao's KV-cache index (its URL)."""
        return {"engine": self.url, "model": self.settings.model, "npu_slots": self.slots}

    async def check_health(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"the engine exited with code {self.process.returncode}")
        await self.client.health()

    # Requests ------------------------------------------------------------------------------------------------------
    async def complete(self, request: OpenAiRequest) -> tuple[int, dict[str, Any]]:
        """A non-streamed request: the engine's status and JSON answer."""
        return await self.client.complete(request)

    async def stream(self, request: OpenAiRequest) -> AsyncIterator[StreamHead | bytes]:
        """A streamed request: a :class:`StreamHead`, then the engine's server-sent-event bytes
        (:meth:`EngineClient.stream`)."""
        async for item in self.client.stream(request):
            yield item

    async def models(self) -> dict[str, Any]:
        return await self.client.models()

    def engine_url(self) -> str:
        return self.url

    def __del__(self) -> None:
        self._stopping = True
        process = getattr(self, "process", None)
        if process is None:
            return
        try:
            stop(process, self.settings.stop_timeout)  # its group and every process below it, not the engine alone
        except Exception:  # the interpreter is exiting (psutil half torn down): the group, at least
            if process.returncode is None:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)

