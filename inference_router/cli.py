"""Entry point of `fuyao-router`."""

from fuyao.cli import component_placeholder


def main() -> None:
    component_placeholder(
        "fuyao-router",
        "OpenAI-compatible inference router: load-, prefix-cache- and PD-aware.",
        issue=8,
    )
