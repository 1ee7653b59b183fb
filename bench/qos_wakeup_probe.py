"""LS wake-up latency beside CPU burners in sibling cgroups, without Kubernetes (docs/qos.md, issue 22): does the CPU
controller let a waking latency-sensitive thread run ahead of best-effort burners, and does a long EEVDF slice on the
burners (``sched_setattr`` ``sched_runtime``: 100 ms, so any waking normal-slice task preempts them) change it?

A UDP server doing PBKDF2 work per request (``--iterations``) in a group of 512 shares, two ``sh`` busy loops in a
group of 2 shares, both under a ``kubepods``-like parent of 2048 shares (cgroup v1 ``cpu``, as the local cluster's
kubelet lays them out), and an open-loop client in the caller's cgroup at ``--rate`` requests/s. Per round: the
server alone, beside the burners at the default slice, beside the burners at the longest slice; p50/p90/p99.

Usage (root, cgroup v1): python bench/qos_wakeup_probe.py [--rounds 2] [--seconds 25] [--rate 100]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/cpu/fuyao-wakeup-probe")
PORT = 47999
SYS_SCHED_SETATTR = 314  # x86_64
SERVER = f'''
import hashlib, os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", {PORT}))
while True:
    data, addr = s.recvfrom(64)
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", int(os.environ["ITERATIONS"]))
    s.sendto(data, addr)
'''


def set_slice(pid: int, nanoseconds: int) -> None:
    """SCHED_OTHER with a custom slice (struct sched_attr, SCHED_ATTR_SIZE_VER1 = 56 bytes)."""
    attr = ctypes.create_string_buffer(struct.pack("IIQiIQQQII", 56, 0, 0, 0, 0, nanoseconds, 0, 0, 0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_SCHED_SETATTR, pid, attr, 0) != 0:
        raise OSError(ctypes.get_errno(), f"sched_setattr({pid}, sched_runtime={nanoseconds})")


def group(path: Path, shares: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cpu.shares").write_text(str(shares))
    return path


def run(mode: str, seconds: float, rate: float, iterations: int) -> str:
    parent = group(ROOT / "kubepods", 2048)
    ls, be = group(parent / "ls", 512), group(parent / "be", 2)
    procs = [subprocess.Popen([sys.executable, "-c", SERVER], env={**os.environ, "ITERATIONS": str(iterations)})]
    (ls / "cgroup.procs").write_text(str(procs[0].pid))
    try:
        if mode != "alone":
            for _ in range(2):
                burner = subprocess.Popen(["sh", "-c", "while :; do :; done"])
                procs.append(burner)
                (be / "cgroup.procs").write_text(str(burner.pid))
                if mode == "long-slice":
                    set_slice(burner.pid, 100_000_000)
        time.sleep(1)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(1)
        latencies: list[float] = []
        rng = random.Random(1)
        start = time.perf_counter()
        due = start
        while time.perf_counter() - start < seconds:
            due += rng.expovariate(rate)
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            sent = time.perf_counter()
            client.sendto(b"x", ("127.0.0.1", PORT))
            try:
                client.recvfrom(64)
                latencies.append(time.perf_counter() - sent)
            except TimeoutError:
                pass
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for path in (ls, be, parent, ROOT):
            path.rmdir()  # empty once its processes are gone
    latencies.sort()

    def q(x: float) -> float:
        return latencies[int(x * (len(latencies) - 1))] * 1e3

    return f"{mode:10s} n={len(latencies)} p50 {q(.5):.2f} p90 {q(.9):.2f} p99 {q(.99):.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=25.0, help="per phase")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s (open loop)")
    parser.add_argument("--iterations", type=int, default=6000, help="PBKDF2 iterations per request")
    args = parser.parse_args()
    if not Path("/sys/fs/cgroup/cpu/cpu.shares").exists():
        raise SystemExit("needs the cgroup v1 cpu controller at /sys/fs/cgroup/cpu (and root)")
    for r in range(args.rounds):
        for mode in ("alone", "default", "long-slice"):
            print(r + 1, run(mode, args.seconds, args.rate, args.iterations), flush=True)


if __name__ == "__main__":
    main()
