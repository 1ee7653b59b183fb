"""Entry point of `fuyao-qos-agent`."""

from fuyao.cli import component_placeholder


def main() -> None:
    component_placeholder(
        "fuyao-qos-agent",
        "Node agent for LS/BE colocation: batch resources, cgroup limits, eviction.",
        issue=6,
    )
