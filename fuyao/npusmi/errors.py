"""Typed errors of the npu-smi client, so daemons can tell a hung tool from a garbled table from a refusal."""

from __future__ import annotations


class NpuSmiError(Exception):
    """Base class: something about an npu-smi call went wrong. ``command`` is the argv that was run."""

    def __init__(self, message: str, command: tuple[str, ...] = ()):
        self.command = command
        where = f" [{' '.join(command)}]" if command else ""
        super().__init__(f"{message}{where}")


class NpuSmiNotFound(NpuSmiError):
    """The npu-smi binary does not exist or is not executable."""


class NpuSmiClosed(NpuSmiError):
    """The client was closed (its daemon is shutting down): no new npu-smi call is started."""


class NpuSmiTimeout(NpuSmiError):
    """npu-smi did not finish within the timeout; the process group was killed."""

    def __init__(self, timeout_s: float, command: tuple[str, ...] = ()):
        self.timeout_s = timeout_s
        super().__init__(f"npu-smi did not answer within {timeout_s:g}s and was killed", command)


class NpuSmiCommandFailed(NpuSmiError):
    """npu-smi exited non-zero, or printed a failure status (e.g. ``create vnpu failed.``)."""

    def __init__(self, message: str, returncode: int | None, output: str, command: tuple[str, ...] = ()):
        self.returncode = returncode
        self.output = output
        super().__init__(message, command)


class NpuSmiUnsupported(NpuSmiError):
    """The device or driver does not support the query (e.g. ``This device does not support querying topo.``)."""


class NpuSmiParseError(NpuSmiError):
    """The output could not be understood. ``line`` is the offending line (1-based ``line_no``)."""

    def __init__(self, what: str, reason: str, line: str | None = None, line_no: int | None = None,
                 command: tuple[str, ...] = ()):
        self.what = what
        self.reason = reason
        self.line = line
        self.line_no = line_no
        at = f" at line {line_no}: {line.strip()!r}" if line is not None and line_no is not None else ""
        super().__init__(f"cannot parse npu-smi {what}: {reason}{at}", command)


class NpuSmiTruncated(NpuSmiParseError):
    """The output stops inside a table (a row or border cut short, or no closing border): ``line`` is the last line
    printed and ``reason`` says what was expected after it."""


class NpuSmiPhysicalIdUnknown(NpuSmiError):
    """npu-smi lists chips whose physical id (the N of ``/dev/davinciN``) it does not tell: no ``Phy-ID`` column in
    ``npu-smi info`` or ``info -m``, and no ``info -t phyid-remap -p N`` answer naming them. The logic id is not a
    stand-in (it differs from the physical id once a chip is missing or in a container), so such a chip cannot be
    handed out. ``chips``: (NPU ID, Chip ID) of each."""

    def __init__(self, chips: tuple[tuple[int, int], ...], hint: str = "", command: tuple[str, ...] = ()):
        self.chips = chips
        named = ", ".join(f"NPU {n} chip {c}" for n, c in chips)
        super().__init__(f"no physical id (/dev/davinciN) for {named}{': ' + hint if hint else ''}", command)
