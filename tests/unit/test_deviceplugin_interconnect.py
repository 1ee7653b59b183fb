"""Interconnect groups the device plugin publishes in the topology annotation: UB (UnifiedBus, Ascend 950) links
make groups of kind ``ub``, not HCCS rings."""

from __future__ import annotations

from fuyao import inventory as inv
from fuyao.contracts import InterconnectGroup, InterconnectKind
from fuyao.npusmi import parse as p
from tests.conftest import sample


def _groups(name: str) -> list[InterconnectGroup]:
    topo = p.parse_topology(sample(name))
    return inv.interconnect_groups(topo, {label: f"dev-{label[3:]}" for label in topo.devices})


def test_ub_pairs_of_the_950_are_ub_groups() -> None:
    groups = _groups("R4d-topo-950-ub.txt")  # Huawei's 950 page: NPU pairs joined by UB, SYS between pairs
    assert [(g.id, g.kind, g.devices) for g in groups] == [
        (f"ub-{i}", InterconnectKind.UB, (f"dev-{2 * i}", f"dev-{2 * i + 1}")) for i in range(4)]
    assert groups[0].model_dump(mode="json")["kind"] == "ub"


def test_hccs_groups_keep_their_kind() -> None:
    [mesh] = _groups("S12-topo-910b-hccs.txt")
    assert (mesh.id, mesh.kind, len(mesh.devices)) == ("hccs-mesh-0", InterconnectKind.HCCS_MESH, 8)
