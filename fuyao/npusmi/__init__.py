"""npu-smi client and parsers: the only place fuyao reads NPU hardware state from."""

from .client import DEFAULT_TIMEOUT_S, NpuSmi
from .errors import (
    NpuSmiCommandFailed,
    NpuSmiError,
    NpuSmiNotFound,
    NpuSmiParseError,
    NpuSmiTimeout,
    NpuSmiUnsupported,
)
from .models import NpuHealthState

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "NpuHealthState",
    "NpuSmi",
    "NpuSmiCommandFailed",
    "NpuSmiError",
    "NpuSmiNotFound",
    "NpuSmiParseError",
    "NpuSmiTimeout",
    "NpuSmiUnsupported",
]
