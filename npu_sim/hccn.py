"""A stand-in for Huawei's ``hccn_tool`` (the NPU network tool), reading the fake npu-smi's node state.

    hccn_tool -i ID -link -g         → ``link status: UP`` | ``link status: DOWN``
    hccn_tool -i ID -net_health -g   → ``net health status: Success`` (``Fault`` while the link is down)

``ID`` is the chip's logic id (``npu-smi info -m``'s Chip Logic ID). A chip's link is set with ``npu-smi fake
set-link -i N -c C UP|DOWN``. Output formats: tool_ops.c of the Ascend driver (docs/facts/ascend-faults.md §4).
Standard library only.
"""

from __future__ import annotations

import sys

from . import state as st

USAGE = "Usage: hccn_tool -i <device_id> -link -g | -net_health -g\n"


def run(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    if len(argv) != 4 or argv[0] != "-i" or argv[2] not in ("-link", "-net_health") or argv[3] != "-g":
        sys.stdout.write(USAGE)
        return 1
    try:
        s = st.read()
    except (st.StateError, OSError) as exc:
        sys.stderr.write(f"fake hccn_tool: bad state: {exc}\n")
        return 2
    chip = next((c for c in st.chips(s) if str(c["phy"]) == argv[1]), None)
    if chip is None:
        sys.stdout.write(f"device id [{argv[1]}] is invalid.\n")
        return 1
    if argv[2] == "-link":
        sys.stdout.write(f"link status: {chip['link']}\n")
    else:
        sys.stdout.write(f"net health status: {'Success' if chip['link'] == 'UP' else 'Fault'}\n")
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
