"""Leader election on a ``coordination.k8s.io/v1`` Lease, with client-go's semantics (``tools/leaderelection``):

- a candidate takes the Lease when it is free or its holder has not renewed it for ``leaseDurationSeconds``, timed
  by the candidate's own clock from when it last saw the record change (never by comparing the holder's timestamps
  with ours: clocks differ between nodes);
- every write is an update with the Lease's ``resourceVersion``: of two candidates racing, the API server lets one
  through and answers 409 to the other;
- the leader renews every ``retry_period_s``; when it has not renewed for ``renew_deadline_s`` it stops leading
  *before* anyone else may take over (renew deadline < lease duration);
- on a clean stop the leader releases the Lease (holder emptied, duration 1 s), so a successor takes over at once.

The decisions are pure functions (:func:`may_acquire`, :func:`claimed`); :class:`LeaderElector` does the I/O.
A leader also publishes where it serves (``ANNOTATION_LEADER_URL`` on the Lease), so followers can hand it work.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from fuyao.contracts import ANNOTATION_LEADER_URL
from fuyao.kube_client import LazySession, RestEndpoint

log = logging.getLogger(__name__)

MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
"""metav1.MicroTime's JSON form (RFC 3339 with microseconds, UTC)."""


@dataclass(frozen=True)
class Timing:
    """client-go's defaults (kube-scheduler's ``leaderElection``: 15 s, 10 s, 2 s)."""

    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError("leader election needs 0 < retryPeriod < renewDeadline < leaseDuration, got "
                             f"{self.retry_period_s} / {self.renew_deadline_s} / {self.lease_duration_s}")


@dataclass(frozen=True)
class Record:
    """The Lease's spec, and its resourceVersion (the precondition of the next write)."""

    holder: str = ""
    duration_s: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0
    url: str = ""
    resource_version: str = ""

    @classmethod
    def of(cls, lease: dict[str, Any]) -> Record:
        spec = lease.get("spec") or {}
        meta = lease.get("metadata") or {}
        return cls(holder=spec.get("holderIdentity") or "", duration_s=int(spec.get("leaseDurationSeconds") or 0),
                   acquire_time=spec.get("acquireTime"), renew_time=spec.get("renewTime"),
                   transitions=int(spec.get("leaseTransitions") or 0),
                   url=(meta.get("annotations") or {}).get(ANNOTATION_LEADER_URL, ""),
                   resource_version=meta.get("resourceVersion") or "")

    def lease(self, name: str, namespace: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "namespace": namespace,
                                "annotations": {ANNOTATION_LEADER_URL: self.url}}
        if self.resource_version:
            meta["resourceVersion"] = self.resource_version
        spec: dict[str, Any] = {"holderIdentity": self.holder, "leaseDurationSeconds": self.duration_s,
                                "leaseTransitions": self.transitions}
        if self.acquire_time:
            spec["acquireTime"] = self.acquire_time
        if self.renew_time:
            spec["renewTime"] = self.renew_time
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


def held(record: Record | None, observed_at: float, now: float) -> bool:
    """Does the Lease have a live holder: one that changed it less than its duration ago, by our clock
    (``observed_at``: when we saw the record change; ``now``)?"""
    return record is not None and bool(record.holder) and now < observed_at + max(record.duration_s, 1)


def may_acquire(record: Record | None, me: str, observed_at: float, now: float) -> bool:
    """May ``me`` write itself into the Lease? Yes when there is none, it is free (released), ``me`` holds it, or
    its holder has not changed it for its whole duration."""
    return record is None or record.holder == me or not held(record, observed_at, now)


def claimed(record: Record | None, me: str, url: str, duration_s: float, wall: dt.datetime) -> Record:
    """The record ``me`` writes to take or renew the Lease: taking an existing Lease (from another holder, or
    released) counts a transition and sets the acquire time, as client-go does; a renewal keeps both."""
    stamp = wall.astimezone(dt.UTC).strftime(MICRO_TIME)
    if record is not None and record.holder == me:
        return Record(holder=me, duration_s=math.ceil(duration_s), acquire_time=record.acquire_time or stamp,
                      renew_time=stamp, transitions=record.transitions, url=url,
                      resource_version=record.resource_version)
    return Record(holder=me, duration_s=math.ceil(duration_s), acquire_time=stamp, renew_time=stamp,
                  transitions=record.transitions + 1 if record is not None else 0,  # as client-go counts them
                  url=url, resource_version=record.resource_version if record is not None else "")


def released(record: Record, wall: dt.datetime) -> Record:
    """What a leader writes when it stops cleanly (client-go ``ReleaseOnCancel``): no holder, a 1 s duration."""
    stamp = wall.astimezone(dt.UTC).strftime(MICRO_TIME)
    return Record(holder="", duration_s=1, acquire_time=stamp, renew_time=stamp, transitions=record.transitions,
                  url="", resource_version=record.resource_version)


class LeaderElector:
    """Campaigns for the Lease ``namespace/name`` as ``identity`` until :meth:`stop`. ``is_leader`` holds while this
    process may act as the leader; ``leader_url`` is where the current leader serves (empty when unknown)."""

    def __init__(self, endpoint: RestEndpoint, namespace: str, name: str, identity: str, url: str,
                 timing: Timing = Timing(), on_change: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.endpoint, self.namespace, self.name = endpoint, namespace, name
        self.identity, self.url, self.timing = identity, url, timing
        self.on_change = on_change
        self.clock = clock
        self.record: Record | None = None
        self._observed_at = 0.0  # our clock when the record last changed (holder or renew time)
        self._renewed_at: float | None = None  # our clock at our last successful write as the leader
        self._leading = False
        self._task: asyncio.Task[None] | None = None
        self._client = LazySession(endpoint.ssl_context, 4, timing.retry_period_s)
        self.last_error = ""

    # State ------------------------------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """Leading, and renewed within the renew deadline (checked at every call: a stalled loop stops leading)."""
        if self._leading and self._renewed_at is not None and \
                self.clock() - self._renewed_at >= self.timing.renew_deadline_s:
            self._set_leading(False, "could not renew the lease within the renew deadline")
        return self._leading

    @property
    def leader(self) -> str:
        return self.record.holder if self.record is not None else ""

    @property
    def leader_url(self) -> str:
        if self.is_leader:
            return self.url
        record = self.record
        if record is None or record.holder == self.identity or not held(record, self._observed_at, self.clock()):
            return ""
        return record.url

    def _set_leading(self, leading: bool, why: str) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        log.info("%s the %s/%s lease: %s", "leading with" if leading else "no longer leading with", self.namespace,
                 self.name, why, extra={"identity": self.identity, "leader": leading})
        if self.on_change is not None:
            self.on_change(leading)

    # I/O --------------------------------------------------------------------------------------------------------
    def _url(self, collection: bool = False) -> str:
        base = (f"{self.endpoint.base_url}/apis/coordination.k8s.io/v1/namespaces/"
                f"{quote(self.namespace, safe='')}/leases")
        return base if collection else f"{base}/{quote(self.name, safe='')}"

    async def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        headers = self.endpoint.headers()
        if body is not None:
            headers["Content-Type"] = "application/json"
        async with self._client().request(method, url, headers=headers, server_hostname=self.endpoint.server_hostname,
                                          data=orjson.dumps(body) if body is not None else None) as response:
            data = await response.read()
            try:
                parsed = orjson.loads(data) if data else {}
            except orjson.JSONDecodeError:
                parsed = {"message": data[:200].decode(errors="replace")}
            return response.status, parsed if isinstance(parsed, dict) else {}

    def _observe(self, record: Record | None) -> None:
        old = self.record
        if old is None or record is None or (old.holder, old.renew_time) != (record.holder, record.renew_time):
            self._observed_at = self.clock()
        self.record = record

    async def try_acquire_or_renew(self) -> bool:
        """One round: read the Lease, write ourselves into it when allowed. True when we lead after it."""
        status, body = await self._call("GET", self._url())
        if status == 404:
            current = None
        elif status == 200:
            current = Record.of(body)
        else:
            raise LeaseError(f"GET lease: {status} {body.get('message', '')}")
        if current is not None:
            self._observe(current)
        now = self.clock()
        if not may_acquire(current, self.identity, self._observed_at, now):
            self._set_leading(False, f"held by {current.holder if current else '?'}")
            return False
        mine = claimed(current, self.identity, self.url, self.timing.lease_duration_s, dt.datetime.now(dt.UTC))
        if current is None:
            status, body = await self._call("POST", self._url(collection=True), mine.lease(self.name, self.namespace))
        else:
            status, body = await self._call("PUT", self._url(), mine.lease(self.name, self.namespace))
        if status == 409:
            return False  # another candidate wrote first (update: stale resourceVersion; create: exists)
        if status not in (200, 201):
            raise LeaseError(f"{'create' if current is None else 'update'} lease: {status} {body.get('message', '')}")
        self._observe(Record.of(body))
        self._renewed_at = now
        self._set_leading(True, "acquired" if current is None or current.holder != self.identity else "renewed")
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.try_acquire_or_renew()
                self.last_error = ""
            except (aiohttp.ClientError, TimeoutError, LeaseError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("leader election: %s", self.last_error, extra={"identity": self.identity})
            except Exception as exc:  # anything else (a token file, a bug) must not end the campaign silently
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("leader election: unexpected error", extra={"identity": self.identity})
            self.is_leader  # noqa: B018 (steps down when the renew deadline passed)
            # client-go: wait.JitterUntil(retryPeriod, JitterFactor 1.2) while campaigning; renew every retryPeriod
            await asyncio.sleep(self.timing.retry_period_s * (1.0 if self._leading else 1.0 + random.random() * 0.2))

    def start(self) -> LeaderElector:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def stop(self, release: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if release and self._leading and self.record is not None:
            try:
                status, _ = await self._call("PUT", self._url(),
                                             released(self.record, dt.datetime.now(dt.UTC)).lease(self.name,
                                                                                                  self.namespace))
                log.info("released the %s/%s lease (%s)", self.namespace, self.name, status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("could not release the lease: %s", exc)
            self._set_leading(False, "stopped")
        await self._client.close()


class LeaseError(Exception):
    """The API server refused a Lease call for a reason other than a lost race."""
