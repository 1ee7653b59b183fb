"""Entry point of `fuyao-vnpu`."""

from fuyao.cli import component_placeholder


def main() -> None:
    component_placeholder(
        "fuyao-vnpu",
        "vNPU manager: static slices from a ConfigMap and dynamic create-on-allocate.",
        issue=4,
    )
