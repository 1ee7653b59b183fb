"""Entry point of `fuyao-scheduler-extender`."""

from fuyao.cli import component_placeholder


def main() -> None:
    component_placeholder(
        "fuyao-scheduler-extender",
        "NPU-aware scheduler extender for kube-scheduler and Volcano.",
        issue=5,
    )
