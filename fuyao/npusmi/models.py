"""What npu-smi reports, as typed values. Missing cells (``NA``, ``-``, absent columns) are ``None``."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class NpuHealthState(StrEnum):
    """npu-smi's health strings (npu_common.c ``health_state_list``)."""

    OK = "OK"
    WARNING = "Warning"
    ALARM = "Alarm"
    CRITICAL = "Critical"
    UNKNOWN = "UNKNOWN"

    @property
    def schedulable(self) -> bool:
        """OK and Warning keep a device in service; Alarm, Critical and UNKNOWN take it out."""
        return self in (NpuHealthState.OK, NpuHealthState.WARNING)

    @classmethod
    def parse(cls, raw: str | None) -> NpuHealthState:
        """Case-insensitive; anything unrecognised is UNKNOWN (fail safe: not schedulable)."""
        if raw:
            for member in cls:
                if member.value.lower() == raw.strip().lower():
                    return member
        return cls.UNKNOWN


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class Fraction(_Model):
    """A ``used / total`` cell."""

    used: float | None
    total: float | None


class ChipStatus(_Model):
    """One chip (die) row pair of the ``npu-smi info`` table."""

    npu_id: int
    chip_id: int
    phy_id: int | None = Field(default=None, description="From the 'Phy-ID' column when printed (A3): the N of "
                                                         "/dev/davinciN")
    logic_id: int | None = Field(default=None, description="From the 'Device' column when printed (310/310P "
                                                           "tables): the chip's logic id, not its physical id")
    name: str
    health: NpuHealthState
    health_raw: str
    bus_id: str | None = None
    power_w: float | None = None
    temp_c: float | None = None
    hugepages: Fraction | None = None
    aicore_percent: float | None = None
    memory_mb: Fraction | None = None
    hbm_mb: Fraction | None = None


class ProcessRow(_Model):
    npu_id: int
    chip_id: int
    pid: int
    name: str | None
    memory_mb: float | None


class NpuSmiInfo(_Model):
    """``npu-smi info``: tool and driver versions, chips, processes."""

    tool_version: str | None
    driver_version: str | None
    chips: tuple[ChipStatus, ...]
    processes: tuple[ProcessRow, ...] = ()


class NpuCount(_Model):
    """One entry of ``npu-smi info -l``."""

    npu_id: int
    chip_count: int
    fields: dict[str, str] = Field(default_factory=dict)


class ChipMapping(_Model):
    """One row of ``npu-smi info -m``: card id, chip id, logic id, optional physical id, chip name."""

    npu_id: int
    chip_id: int
    logic_id: int | None
    phy_id: int | None
    name: str

    @property
    def is_compute_chip(self) -> bool:
        """MCU rows carry no logic id and are not compute dies."""
        return self.logic_id is not None and self.name.lower() != "mcu"


class PhyIdRemap(_Model):
    """``npu-smi info -t phyid-remap -p P``: which card and chip (and logic id) physical id P (``/dev/davinciP``)
    is."""

    phy_id: int
    logic_id: int | None
    npu_id: int
    chip_id: int


class HealthReport(_Model):
    """``npu-smi info -t health -i N [-c C]``."""

    npu_id: int | None
    chip_id: int | None
    health: NpuHealthState
    health_raw: str
    error_codes: tuple[str, ...] = ()
    error_information: tuple[str, ...] = ()


class KeyValueReport(_Model):
    """A ``Key : Value`` report, in sections separated by blank lines, keys in order (keys may repeat)."""

    sections: tuple[tuple[tuple[str, str], ...], ...]

    def first(self, key: str) -> str | None:
        for section in self.sections:
            for k, v in section:
                if k == key:
                    return v
        return None

    def section_with(self, key: str, value: str) -> dict[str, str] | None:
        for section in self.sections:
            if (key, value) in section:
                return dict(section)
        return None


class Topology(_Model):
    """``npu-smi info -t topo``: link kind between every pair, and each NPU's CPU affinity when printed."""

    devices: tuple[str, ...]
    links: dict[str, dict[str, str]]
    cpu_affinity: dict[str, str | None]

    def link(self, a: str, b: str) -> str:
        return self.links[a][b]


class VnpuTemplate(_Model):
    """One template of ``npu-smi info -t template-info``."""

    name: str
    aicore: int
    memory_gb: float
    aicpu: int
    extra: dict[str, str] = Field(default_factory=dict)


class VnpuEntry(_Model):
    vnpu_id: int
    vgroup_id: int | None
    container_id: str | None
    status: str | None
    template: str


class FreeTotal(_Model):
    """A ``free/total`` cell of ``info-vnpu``."""

    free: float | None
    total: float | None


class VnpuInfo(_Model):
    """``npu-smi info -t info-vnpu -i N -c C``: free/total resources of the chip and its vNPUs."""

    resources: dict[str, FreeTotal]
    total_vnpus: int
    vnpus: tuple[VnpuEntry, ...]


class SetResult(_Model):
    """Result of ``npu-smi set ...``."""

    status: str
    message: str
