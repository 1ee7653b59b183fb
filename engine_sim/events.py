"""KV events over ZMQ, as vLLM's ``ZmqEventPublisher`` sends them: a PUB socket (``tcp://*:PORT`` binds, a plain
``tcp://host:PORT`` connects — vLLM's rule) carrying ``[topic, seq (8-byte big-endian), payload]``, and an optional
ROUTER replay socket: a request ``[identity, "", start seq]`` is answered with every buffered ``[seq, payload]``
from that seq on, then ``[-1 (8-byte big-endian, signed), ""]``. Publishing runs in its own thread."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque

import zmq

from fuyao.kv_blocks import EventBatch, EventFormat, encode_batch

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def _binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KvEventPublisher:
    def __init__(self, endpoint: str, replay_endpoint: str | None = None, topic: str = "",
                 fmt: EventFormat = "release", buffer_steps: int = 10_000):
        self.fmt = fmt
        self.enabled = True  # fault injection: "stop emitting events"
        self._topic = topic.encode()
        self._queue: queue.Queue[tuple[int, EventBatch] | None] = queue.Queue(maxsize=100_000)
        self._numbering = threading.Lock()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(100_000)
        self._pub.setsockopt(zmq.LINGER, 0)
        if _binds(endpoint):
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay = None
        self.replay_endpoint = None
        if replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    @property
    def sequence(self) -> int:
        """The next sequence number."""
        return self._seq

    def publish(self, batch: EventBatch) -> None:
        if not self.enabled:
            return
        with self._numbering:  # numbered here, so a batch dropped below is a gap subscribers see
            seq = self._seq
            self._seq += 1
            try:
                self._queue.put_nowait((seq, batch))
            except queue.Full:
                log.warning("KV event queue full: batch %d dropped (subscribers will see a sequence gap)", seq)

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=2)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    def _run(self) -> None:
        while True:
            if self._replay is not None and self._replay.poll(0):
                try:
                    self._serve_replay()
                except zmq.ZMQError as exc:
                    log.warning("replay request failed: %s", exc)
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                return
            seq, batch = item
            payload = encode_batch(batch, self.fmt)
            try:
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
            except zmq.ZMQError as exc:
                log.warning("KV event send failed: %s", exc)
            self._buffer.append((seq, payload))

    def _serve_replay(self) -> None:
        assert self._replay is not None
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            log.warning("invalid replay request (%d frames)", len(frames))
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in list(self._buffer):  # vLLM 0.32's framing: the topic frame before the sequence
            if seq >= first:
                self._replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
