"""Entry point of `fuyao-engine-sim`."""

from fuyao.cli import component_placeholder


def main() -> None:
    component_placeholder(
        "fuyao-engine-sim",
        "vLLM-compatible inference engine simulator (OpenAI API, vLLM metrics and KV events).",
        issue=7,
    )
