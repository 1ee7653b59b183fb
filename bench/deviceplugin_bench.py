#!/usr/bin/env python3
"""Device plugin benchmark: prints one JSON object with the figures of docs/benchmarks.md.

Runs the real ``fuyao-device-plugin`` process against the fake npu-smi and the kubelet stand-in (real unix
sockets, real gRPC). Every figure comes with a baseline measured in the same run, so ratios stay comparable
across machines:

- start → registered: wall time from exec to the kubelet's Register call (baseline: exec → exit of a bare Python
  importing grpc, the floor of any Python plugin start);
- Allocate latency, p50/p99 over N calls (goal p99 ≤ 5 ms) — baseline: an empty RPC (GetDevicePluginOptions)
  on the same channel, so the ratio is the plugin's own work on top of gRPC;
- health change → ListAndWatch update with a 1 s poll interval (goal ≤ 2 s) — baseline: the interval;
- kubelet restart → registered again (goal ≤ 2 s) — baseline: the supervisor's watch interval;
- RSS after start — baseline: RSS of a bare Python process that imported grpc.

Usage: bench/deviceplugin_bench.py [--calls 10000] [--health-trials 5] [--restarts 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots
from bench.report import add_out_argument, emit, quantiles
from fuyao.contracts import RESOURCE_NPU
from fuyao.deviceplugin.daemon import WATCH_INTERVAL_S
from fuyao.kubeletapi.deviceplugin.v1beta1 import api_pb2 as pb
from tests.support.deviceplugin import PluginUnderTest


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def bare_python_baseline() -> tuple[float, int]:
    """(seconds exec → exit, RSS bytes) of a Python process that imports grpc."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import grpc"], check=True)
    elapsed = time.monotonic() - started
    proc = subprocess.Popen([sys.executable, "-c", "import grpc, time; time.sleep(30)"])
    time.sleep(1.0)
    rss = psutil.Process(proc.pid).memory_info().rss
    proc.kill()
    proc.wait()
    return elapsed, rss


def start_to_registered(trials: int) -> list[float]:
    out = []
    for _ in range(trials):
        p = PluginUnderTest("910b4-8", health_interval="5s")
        try:
            p.kubelet.start()
            p.start_kubelet = False
            started = time.monotonic()
            p.start()
            reg = p.kubelet.wait_registered(RESOURCE_NPU, timeout=60)
            out.append(reg.at - started)
        finally:
            p.close()
    return out


def timed_calls(call, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--health-trials", type=int, default=5)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--start-trials", type=int, default=3)
    add_out_argument(parser)
    args = parser.parse_args()

    base_start, base_rss = bare_python_baseline()
    starts = start_to_registered(args.start_trials)

    p = PluginUnderTest("910b4-8", health_interval="1s").start()
    try:
        p.wait_ready(timeout=60)
        time.sleep(1.0)
        assert p.proc is not None
        rss = psutil.Process(p.proc.pid).memory_info().rss

        stub = p.kubelet.plugin(RESOURCE_NPU)
        request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(
            devices_ids=["Ascend910-0", "Ascend910-1"])])
        for _ in range(200):  # warm up both paths
            stub.Allocate(request, timeout=5)
            stub.GetDevicePluginOptions(pb.Empty(), timeout=5)
        empty = timed_calls(lambda: stub.GetDevicePluginOptions(pb.Empty(), timeout=5), args.calls)
        allocate = timed_calls(lambda: stub.Allocate(request, timeout=5), args.calls)

        health_latency = []
        conn = p.kubelet.connections[RESOURCE_NPU]
        for trial in range(args.health_trials):
            target = "Critical" if trial % 2 == 0 else "OK"
            expected = "Unhealthy" if target == "Critical" else "Healthy"
            t0 = time.monotonic()
            p.fake("fake", "set-health", "-i", "5", target)
            p.kubelet.wait(lambda e=expected: conn.lists and
                           {d.ID: d.health for d in conn.lists[-1]}["Ascend910-5"] == e,
                           timeout=30, what=f"Ascend910-5 {expected}")
            health_latency.append(time.monotonic() - t0)
            time.sleep(0.3)

        reregister = []
        for _ in range(args.restarts):
            p.kubelet.restart()
            t0 = time.monotonic()
            reg = p.kubelet.wait_registered(RESOURCE_NPU, timeout=30)
            reregister.append(reg.at - t0)
            p.kubelet.wait_devices(RESOURCE_NPU, lambda ds: len(ds) == 8)
            conn = p.kubelet.connections[RESOURCE_NPU]
    finally:
        p.close()

    result = {
        "benchmark": "deviceplugin",
        "preset": "910b4-8",
        "start_to_registered_s": {"median": round(statistics.median(starts), 3), "trials": len(starts),
                                  "baseline_python_grpc_import_s": round(base_start, 3),
                                  "ratio": round(statistics.median(starts) / base_start, 2)},
        "allocate_ms": {"p50": ms(percentile(allocate, 50)), "p99": ms(percentile(allocate, 99)),
                        "calls": len(allocate), "goal_p99_ms": 5.0,
                        "baseline_empty_rpc_p50": ms(percentile(empty, 50)),
                        "baseline_empty_rpc_p99": ms(percentile(empty, 99)),
                        "ratio_p50": round(percentile(allocate, 50) / percentile(empty, 50), 2),
                        "ratio_p99": round(percentile(allocate, 99) / percentile(empty, 99), 2),
                        "cdf_ms": quantiles(allocate, 1e3), "baseline_empty_rpc_cdf_ms": quantiles(empty, 1e3)},
        "health_change_to_update_s": {"median": round(statistics.median(health_latency), 3),
                                      "max": round(max(health_latency), 3), "trials": len(health_latency),
                                      "interval_s": 1.0, "goal_s": 2.0,
                                      "ratio_max_to_interval": round(max(health_latency) / 1.0, 2)},
        "kubelet_restart_to_registered_s": {"median": round(statistics.median(reregister), 3),
                                            "max": round(max(reregister), 3), "restarts": len(reregister),
                                            "goal_s": 2.0, "watch_interval_s": WATCH_INTERVAL_S,
                                            "ratio_median_to_watch_interval":
                                                round(statistics.median(reregister) / WATCH_INTERVAL_S, 2)},
        "rss_mb": {"plugin": round(rss / 2**20, 1), "baseline_python_grpc": round(base_rss / 2**20, 1),
                   "ratio": round(rss / base_rss, 2)},
    }
    emit(result, args.out, "deviceplugin", charts)


def charts(result: dict[str, Any], out: Path) -> list[Path]:
    allocate = result["allocate_ms"]
    return [
        plots.quantile_cdf(out / "deviceplugin-allocate.png", "Allocate latency (real gRPC over the kubelet socket)",
                           {"Allocate (2 NPUs)": allocate["cdf_ms"],
                            "baseline: empty RPC": allocate["baseline_empty_rpc_cdf_ms"]}, "ms", log_x=True),
        plots.bars(out / "deviceplugin-ratios.png", "device plugin: each figure over its baseline", {
            "start → registered\n/ import grpc": result["start_to_registered_s"]["ratio"],
            "Allocate p50\n/ empty RPC": allocate["ratio_p50"],
            "Allocate p99\n/ empty RPC": allocate["ratio_p99"],
            "health → update\n/ poll interval": result["health_change_to_update_s"]["ratio_max_to_interval"],
            "kubelet restart\n/ watch interval":
                result["kubelet_restart_to_registered_s"]["ratio_median_to_watch_interval"],
            "RSS / python+grpc": result["rss_mb"]["ratio"]}, "ratio"),
    ]


if __name__ == "__main__":
    main()
