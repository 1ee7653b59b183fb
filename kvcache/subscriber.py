"""Subscribes to the KV events of many engines (ZMQ SUB, one socket each, one thread for all) and applies them to
a :class:`~fuyao.kvcache.index.KvIndex`, never silently wrong (a lookup may find fewer blocks than an engine holds,
never a block it no longer holds):

- on joining mid-stream, the batches the engine still buffers are replayed first (vLLM's ROUTER: ``["", start
  seq]`` → ``["", seq, payload]``… then seq -1); if that is impossible or incomplete, what was replayed is dropped;
- every message's sequence number is checked; after a gap the missing batches are asked from the engine's replay
  socket; if that is impossible or incomplete, the endpoint's entries are dropped;
- an engine that restarted is noticed two ways, and then handled as a fresh join (its entries dropped, the new
  engine's buffer replayed from 0): its sequence numbers go backwards (one publisher's batches arrive in order on a
  SUB socket and replays come on their own socket, so a backwards number is never a duplicate), or the connection
  was lost (a socket monitor on each SUB socket, in the same poller, reports ``EVENT_DISCONNECTED``; its entries are
  dropped at once and the next batch starts a fresh join — so a restarted engine that has already published more
  batches than the old one is not taken for a continuation with a gap);
- a payload that does not decode is counted and skipped (the endpoint is then also dropped: its state is unknown);
- endpoints can be added and removed while running (Kubernetes discovery).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from fuyao.kv_blocks import EventDecodeError, decode_batch

from .index import KvIndex

log = logging.getLogger(__name__)

END_SEQ = -1
RETRY_S = 30.0
"""An endpoint left out after a failure (an address refused, its handling failed) is followed again after this."""
HEARTBEAT_IVL_MS = 5000
HEARTBEAT_TIMEOUT_MS = 15000
"""ZeroMQ heartbeats on each event socket (the engine's libzmq answers them by itself): a connection whose peer
vanished without closing it (a node crash, a partition) is seen as lost after this long and the engine's entries
dropped, instead of staying "connected" with stale blocks until TCP gives up, which can take hours."""
CONNECTION_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


@dataclass(frozen=True)
class Source:
    """One engine's event stream: ``name`` is how the index (and the router) calls the engine, usually its URL."""

    name: str
    events: str  # tcp://host:5557
    replay: str | None = None  # tcp://host:5558
    model: str = ""


@dataclass
class SourceStats:
    last_seq: int | None = None
    batches: int = 0
    gaps: int = 0
    replays: int = 0
    drops: int = 0
    decode_errors: int = 0
    restarts: int = 0  # the engine started over (its sequence went back): entries dropped, stream followed anew
    disconnects: int = 0  # the connection was lost: entries dropped, the next batch starts a fresh join
    connected: bool = False
    lag_s: float = 0.0
    error: str | None = None  # why the endpoint is not followed (ZeroMQ refused its address, its handling failed)


class Subscriber:
    def __init__(self, index: KvIndex, replay_timeout_s: float = 1.0,
                 on_batch: Callable[[str, int, float], None] | None = None):
        self.index = index
        self.replay_timeout_s = replay_timeout_s
        self.on_batch = on_batch  # (endpoint, events, lag seconds), for metrics
        self.stats: dict[str, SourceStats] = {}
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sources: dict[str, Source] = {}
        self._sockets: dict[str, zmq.Socket] = {}
        self._monitors: dict[str, zmq.Socket] = {}
        self._names: dict[zmq.Socket, str] = {}  # SUB socket → endpoint
        self._watched: dict[zmq.Socket, str] = {}  # monitor socket → endpoint
        self._seq_before: dict[str, int] = {}  # the last sequence number before the connection was lost
        self._pending: list[tuple[str, Source | None]] = []
        self._retry: dict[str, tuple[float, Source]] = {}  # endpoints left out after a failure: when to try again
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Sources -----------------------------------------------------------------------------------------------------
    def add(self, source: Source) -> None:
        with self._lock:
            self._pending.append((source.name, source))

    def remove(self, name: str) -> None:
        with self._lock:
            self._pending.append((name, None))
            self._retry.pop(name, None)

    def sources(self) -> dict[str, Source]:
        return dict(self._sources)

    def _apply_pending(self, poller: zmq.Poller) -> None:
        with self._lock:
            now = time.monotonic()
            for name, (at, again) in list(self._retry.items()):
                if at <= now and not any(n == name for n, _ in self._pending):
                    del self._retry[name]
                    self._pending.append((name, again))  # followed again: the failure may have been passing
            pending, self._pending = self._pending, []
        for name, source in pending:
            if name in self._sockets:
                self._close(name, poller)
                self.index.drop(name, forget=False)  # a new stream for this name: the old one's entries go
            self._seq_before.pop(name, None)
            if source is None:
                self._sources.pop(name, None)
                self.index.drop(name)
                self.stats.pop(name, None)
                log.info("stopped following KV events of %s", name)
                continue
            socket = self._ctx.socket(zmq.SUB)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.IPV6, 1)  # an IPv6 pod's tcp://[addr]:port (IPv4 addresses still connect)
            socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            monitor = socket.get_monitor_socket(CONNECTION_EVENTS)  # before connecting: no event is missed
            try:
                socket.connect(source.events)
            except zmq.ZMQError as exc:  # an address ZeroMQ cannot use: this endpoint only, never the thread
                monitor.close(linger=0)
                socket.close(linger=0)
                self._sources[name] = source
                self.stats[name] = SourceStats(error=f"cannot connect to {source.events}: {exc}")
                self.index.endpoint(name, source.model)  # listed (with the error) in /v1/endpoints
                self._later(name, source)
                log.error("not following the KV events of %s: cannot connect to %s (%s)", name, source.events, exc)
                continue
            poller.register(socket, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            self._sockets[name], self._monitors[name] = socket, monitor
            self._names[socket], self._watched[monitor] = name, name
            self._sources[name] = source
            self.stats[name] = SourceStats()
            self.index.endpoint(name, source.model)
            log.info("following KV events of %s at %s", name, source.events,
                     extra={"replay": source.replay, "model": source.model})

    def _close(self, name: str, poller: zmq.Poller | None = None) -> None:
        socket, monitor = self._sockets.pop(name), self._monitors.pop(name)
        del self._names[socket], self._watched[monitor]
        if poller is not None:
            poller.unregister(socket)
            poller.unregister(monitor)
        with contextlib.suppress(zmq.ZMQError):
            socket.disable_monitor()
        monitor.close(linger=0)
        socket.close(linger=0)

    # The loop ----------------------------------------------------------------------------------------------------
    def start(self) -> Subscriber:
        self._thread = threading.Thread(target=self._run, name="kv-subscriber", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def _run(self) -> None:
        poller = zmq.Poller()
        try:
            while not self._stop.is_set():
                self._apply_pending(poller)
                ready = poller.poll(timeout=50)
                # connection events first: batches that follow a reconnect must not be taken as a continuation
                for socket, _ in ready:
                    if (name := self._watched.get(socket)) is not None:
                        self._guarded(name, self._connection_events, poller)
                for socket, _ in ready:
                    if (name := self._names.get(socket)) is not None:
                        self._guarded(name, self._drain, poller)
        finally:
            for name in list(self._sockets):
                self._close(name)

    def _guarded(self, name: str, step: Callable[[str], None], poller: zmq.Poller) -> None:
        """Run one endpoint's step; a failure stops following that endpoint (its entries dropped, the reason in its
        stats and the log), never the thread that follows every other one."""
        if name not in self._sockets:
            return  # closed by an earlier step of this round
        try:
            step(name)
        except Exception as exc:  # one engine's stream must not stop the others'
            log.exception("stopped following the KV events of %s (again in %g s): %s", name, RETRY_S, exc)
            self._close(name, poller)
            self.index.drop(name, forget=False)
            stats = self.stats.get(name)
            if stats is not None:
                stats.connected, stats.error = False, f"{exc.__class__.__name__}: {exc}"
            source = self._sources.get(name)
            if source is not None:
                self._later(name, source)

    def _later(self, name: str, source: Source) -> None:
        with self._lock:
            self._retry[name] = (time.monotonic() + RETRY_S, source)

    def _drain(self, name: str) -> None:
        """Apply what the endpoint's socket holds, a batch at a time, looking at its connection events before each
        (a disconnect reported meanwhile is handled before the batches that follow it)."""
        socket, monitor = self._sockets[name], self._monitors[name]
        while True:
            if int(monitor.get(zmq.EVENTS)) & zmq.POLLIN:
                self._connection_events(name)
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(name, frames)

    def _connection_events(self, name: str) -> None:
        monitor, stats = self._monitors[name], self.stats[name]
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_CONNECTED:
                stats.connected = True
                log.info("connected to the KV events of %s", name)
            elif event == zmq.EVENT_DISCONNECTED:
                # the batches the lost connection delivered were queued before the event: apply them first
                socket = self._sockets[name]
                while True:
                    try:
                        frames = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(name, frames)
                stats.connected = False
                stats.disconnects += 1
                dropped = self._unfollow(name)
                log.warning("lost the connection to the KV events of %s; dropped its %d entries (the next batch "
                            "starts a fresh join)", name, dropped)

    def _unfollow(self, name: str) -> int:
        """Forget where the endpoint's stream was (the next batch starts a fresh join) and drop its entries."""
        stats = self.stats[name]
        if stats.last_seq is not None:
            self._seq_before[name] = stats.last_seq
        stats.last_seq = None
        return self.index.drop(name, forget=False)

    def _handle(self, name: str, frames: list[bytes]) -> None:
        stats = self.stats[name]
        if len(frames) != 3 or len(frames[1]) != 8:
            stats.decode_errors += 1
            log.warning("malformed KV event message from %s (%d frames)", name, len(frames))
            return
        seq = int.from_bytes(frames[1], "big")
        if stats.last_seq is not None and seq <= stats.last_seq:
            # batches of one publisher arrive in order (replays come on their own socket): a new publisher
            previous = stats.last_seq
            stats.restarts += 1
            dropped = self._unfollow(name)
            self._seq_before.pop(name, None)
            log.warning("KV events of %s: sequence went back from %d to %d (the engine restarted); dropped its %d "
                        "entries and follows it anew", name, previous, seq, dropped)
        elif stats.last_seq is None and seq <= self._seq_before.pop(name, -1):
            stats.restarts += 1  # the first batch after a lost connection, numbered at or below the last one before
        if stats.last_seq is None:
            # a fresh join (first batch, or after a restart or a lost connection; the entries are empty): catch up
            # on what the engine still buffers
            if seq > 0 and self._sources[name].replay and not self._replay(name, 0, seq):
                stats.drops += 1
                dropped = self.index.drop(name, forget=False)
                log.warning("KV events of %s: joined at batch %d and batches 0..%d could not be replayed; dropped "
                            "the %d entries replayed", name, seq, seq - 1, dropped)
        elif seq > stats.last_seq + 1:
            expected = stats.last_seq + 1
            stats.gaps += 1
            if not self._replay(name, expected, seq):
                stats.drops += 1
                dropped = self.index.drop(name, forget=False)
                log.warning("KV events of %s: sequence gap %d..%d could not be replayed; dropped its %d entries",
                            name, expected, seq - 1, dropped)
        self._apply(name, seq, frames[2])

    def _apply(self, name: str, seq: int, payload: bytes) -> None:
        stats = self.stats[name]
        try:
            batch = decode_batch(payload)
        except EventDecodeError as exc:
            stats.decode_errors += 1
            stats.last_seq = seq
            dropped = self.index.drop(name, forget=False)
            log.warning("undecodable KV event batch %d from %s (%s); dropped its %d entries", seq, name, exc,
                        dropped)
            return
        try:
            self.index.apply(name, batch.events, self._sources[name].model if name in self._sources else "")
        except Exception as exc:  # decodable but not applicable (a negative token id, an unhashable hash...)
            stats.decode_errors += 1
            stats.last_seq = seq
            dropped = self.index.drop(name, forget=False)
            log.warning("KV event batch %d from %s could not be applied (%s: %s); dropped its %d entries", seq,
                        name, type(exc).__name__, exc, dropped)
            return
        stats.last_seq = seq
        stats.batches += 1
        stats.lag_s = max(0.0, time.time() - batch.ts)
        if self.on_batch is not None:
            self.on_batch(name, len(batch.events), stats.lag_s)

    def _replay(self, name: str, start: int, until: int) -> bool:
        """Ask the engine for batches ``start`` .. ``until - 1``; True when all were applied."""
        source = self._sources.get(name)
        if source is None or not source.replay:
            return False
        socket = self._ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IPV6, 1)
        try:
            try:
                socket.connect(source.replay)
            except zmq.ZMQError as exc:
                log.warning("cannot ask %s for a replay at %s (%s): its entries are dropped instead", name,
                            source.replay, exc)
                return False
            socket.send_multipart((b"", start.to_bytes(8, "big")))
            want = start
            deadline = time.monotonic() + self.replay_timeout_s
            while time.monotonic() < deadline:
                if not socket.poll(timeout=max(1, int((deadline - time.monotonic()) * 1000))):
                    break
                frames = socket.recv_multipart()
                # vLLM 0.32: ("", topic, seq, payload); earlier releases sent no topic frame: ("", seq, payload)
                if len(frames) not in (3, 4):
                    return False
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == END_SEQ:
                    break
                if seq < want or seq >= until:
                    continue
                if seq != want:
                    return False  # the engine's buffer no longer has what we missed
                self._apply(name, seq, frames[-1])
                want += 1
            self.stats[name].replays += 1
            return want == until
        finally:
            socket.close(linger=0)
