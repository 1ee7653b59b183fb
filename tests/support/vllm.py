"""A real vLLM (the CPU build, from the cached venv ``hack/build-vllm.sh`` makes) serving the tiny generated model of
``fuyao.engine_sim.model_dir`` with random weights, as a process on free loopback ports with its KV events on ZMQ."""

from __future__ import annotations

import json
import os
import tempfile
from functools import cache
from pathlib import Path

from fuyao.engine_sim import model_dir

from .apiserver import free_port
from .engines import Daemon
from .versions import cached_venv_python

REPO = Path(__file__).resolve().parents[2]
MODEL = "fuyao-tiny"
BLOCK_SIZE = 32  # vLLM's CPU attention wants multiples of 32
STARTUP_S = 240.0


def vllm_python() -> str:
    """The cached venv's python (built on first use: a few minutes and ~6 GB, once per machine)."""
    return cached_venv_python("build-vllm.sh")


@cache
def generated_model(size: str = "tiny") -> Path:
    """The generated model directory (``size``: ``model_dir.SHAPES``), cached across runs."""
    name = "tiny-llama" if size == "tiny" else f"{size}-llama"
    return model_dir.write(Path(os.environ.get("FUYAO_CACHE", Path.home() / ".cache" / "fuyao")) / "models" / name,
                           size)


def model_shape(size: str = "tiny") -> dict[str, int]:
    return dict(model_dir.SHAPES[size])


def vllm_engine(*extra: str, hash_algo: str | None = None, env: dict[str, str] | None = None,
                port: int | None = None, events: str | None = None, replay_port: int | None = None,
                model_size: str = "tiny") -> Daemon:
    """``python -m vllm.entrypoints.openai.api_server`` with prefix caching and KV events (``.events``,
    ``.replay``: the ZMQ endpoints to connect to). vLLM binds its PUB socket only on a wildcard or an ipc endpoint,
    and connects to any other: the events go to an ipc socket (this machine only), the replays to loopback TCP.
    The ports and socket can be given to restart an engine where it was."""
    port = port or free_port()
    replay_port = replay_port or free_port()
    events = events or f"ipc://{tempfile.mkdtemp(prefix='vllm-events-')}/events.sock"
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": events,
              "replay_endpoint": f"tcp://127.0.0.1:{replay_port}"}
    args = ["--model", str(generated_model(model_size)), "--served-model-name", MODEL, "--load-format", "dummy",
            "--enforce-eager", "--dtype", "bfloat16", "--block-size", str(BLOCK_SIZE), "--enable-prefix-caching",
            "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port), "--kv-events-config",
            json.dumps(config), "--seed", "0", *extra]
    if hash_algo is not None:
        args += ["--prefix-caching-hash-algo", hash_algo]
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    environment.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                        "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", **(env or {})})
    daemon = Daemon("vllm.entrypoints.openai.api_server", args, port, "/health", python=vllm_python(),
                    env=environment, log_args=(), group=True)
    daemon.events = events  # type: ignore[attr-defined]
    daemon.replay = f"tcp://127.0.0.1:{replay_port}"  # type: ignore[attr-defined]
    daemon.where = {"port": port, "events": events, "replay_port": replay_port,  # type: ignore[attr-defined]
                    "hash_algo": hash_algo}
    return daemon
