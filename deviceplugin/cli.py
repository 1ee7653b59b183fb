"""Entry point of `fuyao-device-plugin`."""

from fuyao.cli import component_placeholder


def main() -> None:
    component_placeholder(
        "fuyao-device-plugin",
        "Kubelet device plugin for Huawei Ascend NPUs (npu.huawei.com/NPU, vNPU slices).",
        issue=3,
    )
