"""Subscribes to the KV events of many engines (ZMQ SUB, one socket each, one thread for all) and applies them to
a :class:`~kvcache.index.KvIndex`, never silently wrong:

- on joining mid-stream, the batches the engine still buffers are replayed first;
- every message's sequence number is checked; after a gap the missing batches are asked from the engine's replay
  socket (vLLM's ROUTER: ``["", start seq]`` → ``["", seq, payload]``… then seq -1); if that is impossible or
  incomplete, the endpoint's entries are dropped (fewer hits, never a hit on a block that is gone);
- a payload that does not decode is counted and skipped (the endpoint is then also dropped: its state is unknown);
- endpoints can be added and removed while running (Kubernetes discovery).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from fuyao.kv_blocks import EventDecodeError, decode_batch

from .index import KvIndex

log = logging.getLogger(__name__)

END_SEQ = -1


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
    lag_s: float = 0.0


class Subscriber:
    def __init__(self, index: KvIndex, replay_timeout_s: float = 1.0,
                 on_batch: Callable[[str, int, float], None] | None = None):
        self.index = index
        self.replay_timeout_s = replay_timeout_s
        self.on_batch = on_batch  # (endpoint, events, lag seconds), for metrics
        self.stats: dict[str, SourceStats] = {}
        self._ctx = zmq.Context.instance()
        self._sources: dict[str, Source] = {}
        self._sockets: dict[str, zmq.Socket] = {}
        self._pending: list[tuple[str, Source | None]] = []
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

    def sources(self) -> dict[str, Source]:
        return dict(self._sources)

    def _apply_pending(self, poller: zmq.Poller) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for name, source in pending:
            old = self._sockets.pop(name, None)
            if old is not None:
                poller.unregister(old)
                old.close(linger=0)
            if source is None:
                self._sources.pop(name, None)
                self.index.drop(name)
                self.stats.pop(name, None)
                log.info("stopped following KV events of %s", name)
                continue
            socket = self._ctx.socket(zmq.SUB)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            socket.connect(source.events)
            poller.register(socket, zmq.POLLIN)
            self._sockets[name] = socket
            self._sources[name] = source
            self.stats[name] = SourceStats()
            self.index.endpoint(name, source.model)
            log.info("following KV events of %s at %s", name, source.events,
                     extra={"replay": source.replay, "model": source.model})

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
                for socket, _ in poller.poll(timeout=50):
                    name = next((n for n, s in self._sockets.items() if s is socket), None)
                    if name is None:
                        continue
                    # drain what is there, a batch at a time
                    while True:
                        try:
                            frames = socket.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(name, frames)
        finally:
            for socket in self._sockets.values():
                socket.close(linger=0)

    def _handle(self, name: str, frames: list[bytes]) -> None:
        stats = self.stats[name]
        if len(frames) != 3 or len(frames[1]) != 8:
            stats.decode_errors += 1
            log.warning("malformed KV event message from %s (%d frames)", name, len(frames))
            return
        seq = int.from_bytes(frames[1], "big")
        if stats.last_seq is None and seq > 0 and self._sources[name].replay:
            self._replay(name, 0, seq)  # joined mid-stream: catch up on what the engine still buffers
        expected = None if stats.last_seq is None else stats.last_seq + 1
        if expected is not None and seq < expected:
            return  # a duplicate (already applied through a replay)
        if expected is not None and seq > expected:
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
        self.index.apply(name, batch.events, self._sources[name].model if name in self._sources else "")
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
        try:
            socket.connect(source.replay)
            socket.send_multipart((b"", start.to_bytes(8, "big")))
            want = start
            deadline = time.monotonic() + self.replay_timeout_s
            while time.monotonic() < deadline:
                if not socket.poll(timeout=max(1, int((deadline - time.monotonic()) * 1000))):
                    break
                frames = socket.recv_multipart()
                if len(frames) != 3:
                    return False
                seq = int.from_bytes(frames[1], "big", signed=True)
                if seq == END_SEQ:
                    break
                if seq < want or seq >= until:
                    continue
                if seq != want:
                    return False  # the engine's buffer no longer has what we missed
                self._apply(name, seq, frames[2])
                want += 1
            self.stats[name].replays += 1
            return want == until
        finally:
            socket.close(linger=0)
