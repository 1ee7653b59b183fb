"""``npu-smi info -t phyid-remap`` answers for parsed sample tables, so pure inventory tests can state the physical
ids (the N of ``/dev/davinciN``) the way discovery learns them on a host whose tables print none."""

from __future__ import annotations

from fuyao.npusmi.models import NpuSmiInfo, PhyIdRemap


def remaps_in_table_order(info: NpuSmiInfo) -> list[PhyIdRemap]:
    """The answers of a host with every chip up: physical ids 0..n-1 in table order, each equal to its logic id."""
    return [PhyIdRemap(phy_id=i, logic_id=i, npu_id=c.npu_id, chip_id=c.chip_id) for i, c in enumerate(info.chips)]
