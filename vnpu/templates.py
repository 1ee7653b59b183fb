"""vNPU templates: how a chip can be carved (AICore, memory, AICPU per slice).

The driver is the authority (``npu-smi info -t template-info``: names and sizes change across driver versions);
the built-in catalog, from Ascend's documentation, is the fallback when the query is not available.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from fuyao.npusmi import NpuSmi, NpuSmiError

log = logging.getLogger(__name__)


class Template(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    aicore: int
    memory_gb: float
    aicpu: int


def _t(name: str, aicore: int, memory_gb: float, aicpu: int) -> Template:
    return Template(name=name, aicore=aicore, memory_gb=memory_gb, aicpu=aicpu)


# Templates per chip model (AICore / memory GB / AICPU), each from a source listed in docs/vnpu.md ("Templates"):
# names and chip mapping from Ascend's documentation and MindCluster, sizes from real ``template-info`` output where
# one was found. The first-generation 910 (A1) is left out: no source gives its templates' memory and AICPUs.
_A2_24_CORES = (_t("vir03_1c_8g", 3, 8, 1), _t("vir06_1c_16g", 6, 16, 1), _t("vir12_3c_32g", 12, 32, 3))
_A2_20_CORES_64G = (_t("vir05_1c_16g", 5, 16, 1), _t("vir10_3c_32g", 10, 32, 3))
BUILTIN: dict[str, tuple[Template, ...]] = {
    "310P3": (_t("vir01", 1, 3, 1), _t("vir02", 2, 6, 2), _t("vir02_1c", 2, 6, 1), _t("vir04", 4, 12, 4),
              _t("vir04_3c", 4, 12, 3), _t("vir04_3c_ndvpp", 4, 12, 3), _t("vir04_4c_dvpp", 4, 12, 4)),
    "910B1": _A2_24_CORES,
    "910B2": _A2_24_CORES,
    "910B2C": _A2_24_CORES,
    "910B3": _A2_20_CORES_64G,
    "910B4-1": _A2_20_CORES_64G,
    "910B4": (_t("vir05_1c_8g", 5, 8, 1), _t("vir10_3c_16g", 10, 16, 3), _t("vir10_3c_16g_nm", 10, 16, 3),
              _t("vir10_4c_16g_m", 10, 16, 4)),
}

AICPU_WITH_VNPUS: dict[str, int] = {"910B3": 7, "910B4": 7, "910B4-1": 7}
"""AICPUs a chip has once it carries a vNPU. Creating the first vNPU turns SR-IOV on, which makes data CPUs AICPUs,
so an uncarved chip reports fewer (a 910B4 or 910B4-1: ``6/6`` uncarved, ``1/7`` after two ``vir10_3c`` vNPUs).
Only models whose figure a source shows (docs/vnpu.md); others are budgeted with what npu-smi reports."""


def _model_key(chip_model: str) -> str:
    return re.sub(r"^Ascend", "", chip_model.strip(), flags=re.IGNORECASE).upper()


def builtin_templates(chip_model: str) -> tuple[Template, ...]:
    """The documented templates of a chip model (``Ascend910B4`` and ``910B4`` both work), or ()."""
    return BUILTIN.get(_model_key(chip_model), ())


def aicpu_with_vnpus(chip_model: str) -> int | None:
    """The AICPUs of a chip of this model once SR-IOV is on (any vNPU exists), None when no source gives it."""
    return AICPU_WITH_VNPUS.get(_model_key(chip_model))


def load_templates(npu_smi: NpuSmi, chip_model: str, npu_id: int | None = None) -> tuple[tuple[Template, ...], str]:
    """Templates from the driver, else the built-in catalog. Returns (templates, source): source is ``npu-smi``,
    ``builtin`` or ``none`` (the chip cannot be carved)."""
    try:
        found = npu_smi.templates(npu_id)
    except NpuSmiError as exc:
        log.info("npu-smi template-info not available (%s); using the built-in catalog for %s", exc, chip_model)
    else:
        if found:
            return tuple(_t(t.name, t.aicore, t.memory_gb, t.aicpu) for t in found), "npu-smi"
    builtin = builtin_templates(chip_model)
    return builtin, ("builtin" if builtin else "none")


def smallest_covering(templates: Sequence[Template], *, aicore: int = 0,
                      memory_gb: float = 0.0) -> list[Template]:
    """Templates with at least ``aicore`` cores and ``memory_gb`` memory, smallest first (cores, memory, AICPU)."""
    fitting = [t for t in templates if t.aicore >= aicore and t.memory_gb + 1e-9 >= memory_gb]
    return sorted(fitting, key=lambda t: (t.aicore, t.memory_gb, t.aicpu, t.name))
