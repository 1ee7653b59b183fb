"""The driver check: each NPU node's driver version (``npu-smi info -t board``'s ``Software Version``, or the
``version.info`` file the driver installs) against the policy's ``driver.version``."""

from __future__ import annotations

import re

from fuyao.npusmi import parse

_VERSION_INFO = re.compile(r"^\s*Version\s*=\s*(\S+)\s*$", re.MULTILINE)


def version_from_board(text: str) -> str | None:
    """``npu-smi info -t board -i N``: its ``Software Version`` line (the driver's version)."""
    return parse.parse_key_values(text, "board").first("Software Version")


def version_from_file(text: str) -> str | None:
    """``/usr/local/Ascend/driver/version.info``: ``Version=24.1.rc2``."""
    m = _VERSION_INFO.search(text)
    return m.group(1) if m else None
