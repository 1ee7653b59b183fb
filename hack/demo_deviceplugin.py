#!/usr/bin/env python3
"""Demo part 2: the device plugin serving a kubelet stand-in on a simulated node (run by hack/demo.sh).

Starts ``fuyao-device-plugin`` against the fake npu-smi, with the test suite's kubelet stand-in on a temp
``kubelet.sock`` (the real kubelet arrives with the local-cluster harness), and shows what the kubelet sees.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuyao.contracts import RESOURCE_NPU
from tests.support.deviceplugin import PluginUnderTest


def show(devices) -> str:  # type: ignore[no-untyped-def]
    return "  ".join(f"{d.ID}[numa {d.topology.nodes[0].ID if d.topology.nodes else '-'}]"
                     f"{'' if d.health == 'Healthy' else ' UNHEALTHY'}" for d in devices)


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "910b4-8"
    p = PluginUnderTest(preset, health_interval="0.5s")
    try:
        started = time.monotonic()
        p.start()
        reg = p.kubelet.wait_registered(RESOURCE_NPU, timeout=60)
        devices = p.kubelet.wait_devices(RESOURCE_NPU)
        print(f"registered {reg.resource_name} (endpoint {reg.endpoint}) {reg.at - started:.2f}s after start")
        print(f"ListAndWatch: {len(devices)} devices")
        print("  " + show(devices))
        ids = [d.ID for d in devices]
        for size in (1, 2, 4):
            print(f"GetPreferredAllocation size {size}: {p.kubelet.preferred(RESOURCE_NPU, ids, size)}")
        pick = p.kubelet.preferred(RESOURCE_NPU, ids, 2)
        response = p.kubelet.allocate(RESOURCE_NPU, pick).container_responses[0]
        print(f"Allocate {pick}:")
        print(f"  envs {dict(response.envs)}")
        print(f"  devices {[d.container_path for d in response.devices]}")
        print(f"  annotations {dict(response.annotations)}")
        print("a chip fails (npu-smi health Critical on NPU 1):")
        p.fake("fake", "set-health", "-i", "1", "Critical", "--code", "80E01801")
        devices = p.kubelet.wait_devices(RESOURCE_NPU, lambda ds: any(d.health == "Unhealthy" for d in ds))
        print("  " + show(devices))
        p.fake("fake", "set-health", "-i", "1", "OK")
        p.kubelet.wait_devices(RESOURCE_NPU, lambda ds: all(d.health == "Healthy" for d in ds))
        print("  ...and recovers: all Healthy again")
        t0 = time.monotonic()
        p.kubelet.restart()
        p.kubelet.wait_registered(RESOURCE_NPU)
        print(f"kubelet restarted (all sockets removed): plugin registered again in {time.monotonic() - t0:.2f}s")
        metrics = [line for line in p.metrics().splitlines()
                   if line.startswith(("npu_utilization", "npu_health")) and "-0\"" in line]
        print("metrics (device 0):")
        for line in metrics:
            print("  " + line)
        code, seconds = p.terminate()
        print(f"SIGTERM: exit {code} in {seconds:.2f}s, socket removed: "
              f"{not (p.plugin_dir / reg.endpoint).exists()}")
    finally:
        p.close()


if __name__ == "__main__":
    main()
