"""Entry point of `fuyao-kvcache`."""

from fuyao.cli import component_placeholder


def main() -> None:
    component_placeholder(
        "fuyao-kvcache",
        "Global KV-cache index fed by vLLM KV events, and a shared block tier.",
        issue=7,
    )
