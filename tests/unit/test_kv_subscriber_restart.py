"""The KV subscriber notices an engine that restarted, over real ZMQ sockets in-process: a sequence number going
backwards, and a lost connection after which the new engine has already published more batches than the old one.
Either way the old engine's blocks leave the index and the new engine's are indexed (through its replay buffer when
it has one) — for the ``fuyao-kvcache`` service's subscriber and for the router's in-process index alike."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from fuyao.engine_sim.events import KvEventPublisher
from fuyao.inference_router.config import build_config
from fuyao.inference_router.fleet import PrefixSource
from fuyao.kv_blocks import BlockStored, EventBatch, encode_batch
from fuyao.kvcache.index import KvIndex
from fuyao.kvcache.subscriber import Source, SourceStats, Subscriber
from tests.support.apiserver import free_port
from tests.support.polling import wait_for


def _batch(*hashes: int) -> EventBatch:
    return EventBatch(time.time(), [BlockStored(list(hashes), None, [], 4)])  # no tokens: keyed by its hashes


def _frames(seq: int, *hashes: int) -> list[bytes]:
    return [b"kv@test@m", seq.to_bytes(8, "big"), encode_batch(_batch(*hashes))]


class _Replay:
    """A replay ROUTER serving ``buffer`` (seq → hashes) the way vLLM does, in a thread; ``requests`` are the start
    sequence numbers asked. ``topic``: vLLM 0.32's framing (``"", topic, seq, payload``; its end marker
    ``"", "", -1, ""``); without it, earlier releases' (``"", seq, payload``)."""

    def __init__(self, port: int, topic: bool = True):
        self.topic = topic
        self.buffer: dict[int, tuple[int, ...]] = {}
        self.requests: list[int] = []
        self._router = zmq.Context.instance().socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(f"tcp://127.0.0.1:{port}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._router.poll(20):
                continue
            client, _, start = self._router.recv_multipart()
            first = int.from_bytes(start, "big")
            self.requests.append(first)
            head = [client, b""]
            for seq in sorted(s for s in self.buffer if s >= first):
                frames = _frames(seq, *self.buffer[seq])
                self._router.send_multipart(head + (frames if self.topic else frames[1:]))
            self._router.send_multipart(head + ([b""] if self.topic else []) + [(-1).to_bytes(8, "big", signed=True),
                                                                                   b""])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._router.close(linger=0)


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture
def subscriber() -> Iterator[Subscriber]:
    sub = Subscriber(KvIndex(block_size=4), replay_timeout_s=2.0).start()
    try:
        yield sub
    finally:
        sub.stop()


@pytest.mark.parametrize("framing", ["vllm-0.32", "earlier", None])
def test_a_sequence_going_back_is_a_restart(subscriber: Subscriber, ports: tuple[int, int],
                                            framing: str | None) -> None:
    with_replay = framing is not None
    events_port, replay_port = ports
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{events_port}")
    replay = _Replay(replay_port, topic=framing == "vllm-0.32") if with_replay else None
    subscriber.add(Source("engine", f"tcp://127.0.0.1:{events_port}",
                          f"tcp://127.0.0.1:{replay_port}" if with_replay else None))
    index, stats = subscriber.index, subscriber.stats
    try:
        sent: dict[int, tuple[int, ...]] = {}

        def send(seq: int, *hashes: int) -> None:
            sent[seq] = hashes
            pub.send_multipart(_frames(seq, *hashes))

        # the slow-joiner problem: publish until the subscriber is connected
        wait_for(lambda: send(len(sent), 100 + len(sent)) or time.sleep(0.02) or index.blocks, 5, "the subscription")
        if replay is not None:
            replay.buffer = dict(sent)
        last = len(sent) + 4
        for seq in range(len(sent), last + 1):
            send(seq, 100 + seq)
        wait_for(lambda: 100 + last in index.blocks, 5, "the old engine's last batch")
        assert stats["engine"].restarts == 0
        if replay is not None:
            replay.requests.clear()
        # the engine restarts behind the same connection: its batches 0 and 1 were missed, 2 arrives
        if replay is not None:
            replay.buffer = {0: (200,), 1: (201,), 2: (202,)}
        pub.send_multipart(_frames(2, 202))
        wait_for(lambda: 202 in index.blocks, 5, "the new engine's batch")
        assert stats["engine"].restarts == 1 and stats["engine"].last_seq == 2
        if replay is not None:
            assert set(index.blocks) == {200, 201, 202} and replay.requests == [0]  # resynced from its buffer
        else:
            assert set(index.blocks) == {202}  # what it published before is unknown: fewer hits, never wrong
        pub.send_multipart(_frames(3, 203))  # and the stream goes on from there
        wait_for(lambda: 203 in index.blocks, 5, "the next batch")
        assert stats["engine"].gaps == 0 and stats["engine"].restarts == 1
    finally:
        pub.close(linger=0)
        if replay is not None:
            replay.close()


def _wait_port_free(port: int) -> None:
    def free() -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
            return True

    wait_for(free, 5, f"port {port} to be free")


def _engine(events_port: int, replay_port: int | None) -> KvEventPublisher:
    for port in (events_port, replay_port):
        if port is not None:
            _wait_port_free(port)
    return KvEventPublisher(f"tcp://*:{events_port}", f"tcp://*:{replay_port}" if replay_port else None)


def _publish_until_seen(engine: KvEventPublisher, index: KvIndex, first: int) -> set[int]:
    """Publish a new block per batch until the subscriber has one (the slow-joiner problem); all those published."""
    published: set[int] = set()

    def seen() -> bool:
        block = first + len(published)
        engine.publish(_batch(block))
        published.add(block)
        time.sleep(0.02)
        return bool(published & set(index.blocks))

    wait_for(seen, 10, "the subscription")
    return published


@pytest.mark.parametrize("follower", ["service", "router"])
def test_a_lost_connection_drops_the_engine_and_the_next_batch_is_a_fresh_join(ports: tuple[int, int],
                                                                              follower: str) -> None:
    """The service's subscriber with a replay socket; the router's in-process index (``PrefixSource``, no replay)."""
    events_port, replay_port = ports
    url = "http://engine:8000"
    if follower == "service":
        sub = Subscriber(KvIndex(block_size=4), replay_timeout_s=2.0).start()
        sub.add(Source(url, f"tcp://127.0.0.1:{events_port}", f"tcp://127.0.0.1:{replay_port}"))
        prefix = None
    else:
        prefix = PrefixSource(build_config({"kv_cache": {"events": {f"tcp://127.0.0.1:{events_port}": url}}})
                              .kv_cache)
        prefix.start()
        assert prefix.subscriber is not None
        sub = prefix.subscriber
    with_replay = follower == "service"
    index = sub.index
    engine = _engine(events_port, replay_port if with_replay else None)
    try:
        old = _publish_until_seen(engine, index, 100)
        for block in range(150, 155):
            engine.publish(_batch(block))
        old |= set(range(150, 155))
        wait_for(lambda: 154 in index.blocks, 5, "the old engine's batches")
        assert index.lookup(hashes=[154]) == {url: 1}
        engine.shutdown()  # the engine dies: its cache is gone, so are its entries, before any new batch
        wait_for(lambda: not old & set(index.blocks), 5, "the old blocks to go")
        assert sub.stats[url].disconnects == 1 and not sub.stats[url].connected
        # the new engine starts on the same ports and publishes more batches than the old one did before the
        # subscriber is connected again (these are lost on the SUB socket; only its replay buffer has them)
        engine = _engine(events_port, replay_port if with_replay else None)
        early = set(range(300, 300 + len(old) + 5))
        for block in sorted(early):
            engine.publish(_batch(block))
        late = _publish_until_seen(engine, index, 400)
        wait_for(lambda: sub.stats[url].connected, 5, "the reconnect")
        new = early | late
        assert not old & set(index.blocks), "an old block came back"
        assert set(index.blocks) <= new
        if with_replay:
            wait_for(lambda: new <= set(index.blocks), 5, "the new engine's blocks, replayed")
            assert sub.stats[url].replays >= 1 and sub.stats[url].gaps == 0
        assert index.lookup(hashes=[154]) == {} and index.lookup(hashes=[max(late)]) == {url: 1}
        if prefix is not None:
            assert prefix.cached_blocks(url) == len(set(index.blocks))
    finally:
        engine.shutdown()
        sub.stop()


def test_a_batch_that_decodes_but_cannot_be_applied_drops_that_engine_and_the_thread_goes_on() -> None:
    """A token id the index cannot take (negative) in an otherwise well-formed batch: that engine's entries are
    dropped and counted as a decode error; the subscriber's one thread serves every engine, so it must not die."""
    sub = Subscriber(KvIndex(block_size=4))
    sub.stats["engine"] = SourceStats()
    good = encode_batch(_batch(100))
    bad = encode_batch(EventBatch(ts=time.time(), events=[BlockStored([7], None, [-1, 2, 3, 4], 4)]))
    sub._apply("engine", 0, good)
    assert 100 in sub.index.blocks
    sub._apply("engine", 1, bad)  # raised out of the subscriber's loop before
    assert 100 not in sub.index.blocks and sub.stats["engine"].decode_errors == 1
    sub._apply("engine", 2, encode_batch(_batch(101)))
    assert 101 in sub.index.blocks and sub.stats["engine"].last_seq == 2


def test_an_engine_on_an_ipv6_address_is_followed(subscriber: Subscriber, ports: tuple[int, int]) -> None:
    # an IPv6 pod network: discovery names the engine tcp://[addr]:port, and the SUB socket must be IPv6-enabled
    # to connect there (ZeroMQ refuses an IPv6 endpoint on a socket without ZMQ_IPV6)
    from fuyao.kvcache.discovery import source_of

    events_port, _ = ports
    pod = {"metadata": {"uid": "u6", "name": "vllm-6", "annotations": {
        "inference.openfuyao.com/kv-events-port": str(events_port)}},
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8000}]}]},
        "status": {"phase": "Running", "podIP": "::1"}}
    source = source_of(pod)
    assert source is not None and source.name == "http://[::1]:8000" and source.events == f"tcp://[::1]:{events_port}"
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.IPV6, 1)
    pub.bind(f"tcp://[::1]:{events_port}")
    try:
        subscriber.add(source)
        seq = iter(range(1000))
        wait_for(lambda: pub.send_multipart(_frames(next(seq), 7)) or time.sleep(0.02) or 7 in subscriber.index.blocks,
                 5, "a batch over IPv6")
        assert subscriber.stats[source.name].decode_errors == 0
    finally:
        pub.close(linger=0)


def test_an_endpoint_zeromq_cannot_use_is_reported_and_the_others_are_still_followed(
        subscriber: Subscriber, ports: tuple[int, int]) -> None:
    from fuyao.kvcache.config import ConfigError
    from fuyao.kvcache.config import build_config as build_kv_config

    events_port, other_port = ports
    subscriber.add(Source("bad", "tcp://10.0.0.5"))  # no port: ZeroMQ refuses it when connecting
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{events_port}")
    try:
        subscriber.add(Source("good", f"tcp://127.0.0.1:{events_port}"))
        seq = iter(range(1000))
        wait_for(lambda: pub.send_multipart(_frames(next(seq), 9)) or time.sleep(0.02) or 9 in subscriber.index.blocks,
                 5, "the good endpoint's batch")
        assert "cannot connect to tcp://10.0.0.5" in (subscriber.stats["bad"].error or "")
        assert "bad" in subscriber.index.endpoints  # listed, with its error, in /v1/endpoints
        # added after the bad one: still followed (the thread did not die)
        pub2 = zmq.Context.instance().socket(zmq.PUB)
        pub2.setsockopt(zmq.LINGER, 0)
        pub2.bind(f"tcp://127.0.0.1:{other_port}")
        try:
            subscriber.add(Source("later", f"tcp://127.0.0.1:{other_port}"))
            wait_for(lambda: pub2.send_multipart(_frames(next(seq), 11)) or time.sleep(0.02)
                     or 11 in subscriber.index.blocks, 5, "the later endpoint's batch")
        finally:
            pub2.close(linger=0)
    finally:
        pub.close(linger=0)
    # and the config names such an address before anything starts
    with pytest.raises(ConfigError, match="events"):
        build_kv_config({"kvCache": {"events": {"endpoints": [{"name": "e", "events": "tcp://10.0.0.5"}]}}})


class _Relay:
    """A TCP relay between the subscriber and an engine that can go silent without closing anything (a node that
    vanished, a partition): ``freeze`` stops moving bytes both ways and keeps both connections open."""

    def __init__(self, target: int):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.target = target
        self.frozen = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.held += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            while self.frozen.is_set():
                time.sleep(0.05)  # hold the bytes: nothing arrives, nothing is closed
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for s in self.held:
            s.close()


def test_an_engine_that_vanishes_without_closing_is_dropped_after_the_heartbeat_timeout(
        monkeypatch: pytest.MonkeyPatch, ports: tuple[int, int]) -> None:
    from fuyao.kvcache import subscriber as module

    monkeypatch.setattr(module, "HEARTBEAT_IVL_MS", 200)
    monkeypatch.setattr(module, "HEARTBEAT_TIMEOUT_MS", 600)
    events_port, _ = ports
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{events_port}")
    relay = _Relay(events_port)
    sub = Subscriber(KvIndex(block_size=4)).start()
    try:
        sub.add(Source("engine", f"tcp://127.0.0.1:{relay.port}"))
        seq = iter(range(1000))
        wait_for(lambda: pub.send_multipart(_frames(next(seq), 5)) or time.sleep(0.02) or 5 in sub.index.blocks, 5,
                 "the engine's batch through the relay")
        relay.frozen.set()  # the engine's node is gone: no FIN, no RST, no bytes
        wait_for(lambda: not sub.stats["engine"].connected and 5 not in sub.index.blocks, 10,
                 "the silent engine dropped")
        assert sub.stats["engine"].disconnects >= 1
    finally:
        sub.stop()
        relay.close()
        pub.close(linger=0)


def test_an_engine_whose_handling_failed_is_followed_again_after_a_while(monkeypatch: pytest.MonkeyPatch,
                                                                       ports: tuple[int, int]) -> None:
    # one failure (a bug, a ZeroMQ error in a replay) left the engine unfollowed for good; its entries go at once
    # and it is followed again after RETRY_S
    from fuyao.kvcache import subscriber as module

    monkeypatch.setattr(module, "RETRY_S", 0.3)
    failures = [RuntimeError("a passing failure")]
    handle = Subscriber._handle

    def flaky(self: Subscriber, name: str, frames: list[bytes]) -> None:
        if failures:
            raise failures.pop()
        handle(self, name, frames)

    monkeypatch.setattr(Subscriber, "_handle", flaky)
    events_port, _ = ports
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{events_port}")
    sub = Subscriber(KvIndex(block_size=4)).start()
    try:
        sub.add(Source("engine", f"tcp://127.0.0.1:{events_port}"))
        seq = iter(range(10_000))
        wait_for(lambda: pub.send_multipart(_frames(next(seq), 3)) or time.sleep(0.02) or not failures, 5,
                 "the failure")
        wait_for(lambda: pub.send_multipart(_frames(next(seq), 4)) or time.sleep(0.02) or 4 in sub.index.blocks, 5,
                 "the engine followed again")
    finally:
        sub.stop()
        pub.close(linger=0)
