"""npu-smi client and parsers: the only place fuyao reads NPU hardware state from."""

from .client import DEFAULT_TIMEOUT_S, NpuSmi
from .errors import (
    NpuSmiClosed,
    NpuSmiCommandFailed,
    NpuSmiError,
    NpuSmiNotFound,
    NpuSmiParseError,
    NpuSmiPhysicalIdUnknown,
    NpuSmiTimeout,
    NpuSmiTruncated,
    NpuSmiUnsupported,
)
from .models import NpuHealthState

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "NpuHealthState",
    "NpuSmi",
    "NpuSmiClosed",
    "NpuSmiCommandFailed",
    "NpuSmiError",
    "NpuSmiNotFound",
    "NpuSmiParseError",
    "NpuSmiPhysicalIdUnknown",
    "NpuSmiTimeout",
    "NpuSmiTruncated",
    "NpuSmiUnsupported",
]
