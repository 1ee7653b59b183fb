"""QoS agent against what the kubelet and the container runtime do on the node: the static CPU manager's exclusive
CPUs (its checkpoint, ``cpu_manager_state``) are never BE pods' under the cpuset policy, and cgroup v2 weights are
converted from shares the way whoever owns the cgroup converts them (pods: the kubelet's linear conversion;
containers: runc >= 1.3.2 / crun >= 1.23's quadratic one, or the linear one of older runtimes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fuyao.qos import cgroups, cpumanager
from fuyao.qos.agent import DEFAULT_CONVERSION, Agent
from fuyao.qos.collect import Collector
from fuyao.qos.config import ConfigError, build_config
from fuyao.qos.metrics import AgentMetrics
from tests.support.cgroups import FakeCgroupTree
from tests.unit.test_qos import CID_A, UID_BE, UID_LS, FakeHost, GiB, _be_raw, _state

CID_LS = "d" * 64
LS_POD_UID_UNRELATED = "0a1b2c3d-0000-4000-8000-0000000000ff"


# --- shares → weight -------------------------------------------------------------------------------------------------
def test_the_quadratic_conversion_meets_its_known_points() -> None:
    """opencontainers/cgroups' TestConvertCPUSharesToCgroupV2Value (min, min+1, default, max-1, max, out of range)
    and the Kubernetes blog's 100m (102 shares) → 17; the linear one keeps KEP-2254's values (1024 → 39)."""
    quadratic = {1: 1, 2: 1, 3: 2, 102: 17, 1024: 100, 262143: 10000, 262144: 10000, 262145: 10000}
    assert {s: cgroups.shares_to_weight(s, "quadratic") for s in quadratic} == quadratic
    linear = {1: 1, 2: 1, 3: 1, 102: 4, 1024: 39, 262143: 9999, 262144: 10000, 262145: 10000}
    assert {s: cgroups.shares_to_weight(s, "linear") for s in linear} == linear
    assert cgroups.shares_to_weight(1024) == 39  # the default stays the kubelet's (pod cgroups)


def test_the_conversion_is_told_by_any_container_with_more_than_two_shares() -> None:
    assert all(cgroups.shares_to_weight(s, "linear") != cgroups.shares_to_weight(s, "quadratic")
               for s in range(3, 262144))
    assert cgroups.detect_conversion([(1024, 100), (102, 17)]) == "quadratic"
    assert cgroups.detect_conversion([(1024, 39)]) == "linear"
    assert cgroups.detect_conversion([(2, 1)]) is None  # both give 1
    assert cgroups.detect_conversion([(1024, 555)]) is None  # someone else's value: no vote
    assert cgroups.detect_conversion([(1024, 39), (1024, 100), (102, 17)]) == "quadratic"  # the majority


def _ls_raw(uid: str, cpu: str) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "name": "web", "namespace": "default", "labels": {}},
            "spec": {"containers": [{"name": "web", "resources": {"requests": {"cpu": cpu}, "limits": {"cpu": cpu}}}]},
            "status": {"containerStatuses": [{"name": "web", "containerID": f"containerd://{CID_LS}"}]}}


def _weight_agent(tmp_path: Path, ls_container_weight: int | None, **config: Any) -> tuple[FakeCgroupTree, Agent]:
    """A cgroup v2 node with a BE pod (container "main": 1500m batch-cpu, 1536 shares) and, unless None, an LS pod
    whose 1000m container (1024 shares) the runtime gave ``ls_container_weight``."""
    tree = FakeCgroupTree(tmp_path, 2, "systemd")
    tree.add_pod(UID_BE, "besteffort", memory=GiB, shares=2)
    tree.add_container(UID_BE, CID_A)
    pods = [_be_raw(UID_BE)]
    if ls_container_weight is not None:
        tree.add_pod(UID_LS, "burstable", memory=GiB)
        (tree.add_container(UID_LS, CID_LS)[0] / "cpu.weight").write_text(f"{ls_container_weight}\n")
        pods.append(_ls_raw(UID_LS, "1"))
    agent = Agent(build_config({"nodeName": "n1", "cpuSuppress": {"policy": "cfsQuota"}, **config}),
                  Collector(cgroups.detect(tmp_path), 3, FakeHost()), AgentMetrics(), _state(*pods))
    agent.cycle()
    agent.cycle()
    return tree, agent


@pytest.mark.parametrize(("ls_weight", "conversion"), [(100, "quadratic"), (39, "linear")])
def test_be_containers_get_weights_converted_as_the_runtime_converts(
        tmp_path: Path, ls_weight: int, conversion: cgroups.WeightConversion) -> None:
    """auto: the runtime's conversion is read off an LS container (1000m: 1024 shares; runc >= 1.3.2 wrote 100,
    older runtimes 39); BE containers follow it, the pod's weight stays the kubelet's linear one."""
    tree, agent = _weight_agent(tmp_path, ls_weight)
    assert tree.file(UID_BE, "cpu.weight", CID_A) == str(cgroups.shares_to_weight(1536, conversion))
    assert tree.file(UID_BE, "cpu.weight") == str(cgroups.shares_to_weight(2150, "linear"))  # 2100m: the kubelet's
    assert tree.file(UID_LS, "cpu.weight", CID_LS) == str(ls_weight)  # an LS container is never written
    assert agent.cycle().cgroup_writes == []  # and it holds


def test_without_an_ls_container_that_tells_the_default_applies_and_a_setting_wins(tmp_path: Path) -> None:
    tree, _ = _weight_agent(tmp_path / "auto", None)
    assert DEFAULT_CONVERSION == "quadratic"
    assert tree.file(UID_BE, "cpu.weight", CID_A) == str(cgroups.shares_to_weight(1536, "quadratic"))  # 138
    tree, _ = _weight_agent(tmp_path / "set", 100, cpuWeightConversion="linear")  # the setting over the node
    assert tree.file(UID_BE, "cpu.weight", CID_A) == str(cgroups.shares_to_weight(1536, "linear"))  # 59
    with pytest.raises(ConfigError, match="cpuWeightConversion"):
        build_config({"cpuWeightConversion": "log"})


# --- the kubelet's CPU manager checkpoint ----------------------------------------------------------------------------
STATIC = {"policyName": "static", "defaultCpuSet": "0-5",
          "entries": {LS_POD_UID_UNRELATED: {"infer": "6-7"}}, "checksum": 1552716370}


def test_the_checkpoint_formats_the_kubelet_writes() -> None:
    """v2 (pod uid → container → CPUs), v1 (container id → CPUs, before 1.17), the none policy (no entries)."""
    assert cpumanager.exclusive_cpus(cpumanager.parse_state(json.dumps(STATIC))) == {6, 7}
    v1 = {"policyName": "static", "defaultCpuSet": "0,3-7", "entries": {"abc123": "1-2"}, "checksum": 1}
    assert cpumanager.exclusive_cpus(cpumanager.parse_state(json.dumps(v1))) == {1, 2}
    none = '{"policyName":"none","defaultCpuSet":"","checksum":3242152201}'
    assert cpumanager.exclusive_cpus(cpumanager.parse_state(none)) == frozenset()
    for garbled, why in (("{", "not the kubelet's"), ("[]", "not the kubelet's"), ('{"defaultCpuSet": ""}',
                                                                                  "policyName"),
                         ('{"policyName": "static", "entries": {"u": {"c": "x"}}}', "u/c is not a CPU list")):
        with pytest.raises(cpumanager.StateError, match=why):
            cpumanager.exclusive_cpus(cpumanager.parse_state(garbled))
    with pytest.raises(cpumanager.StateError, match="no such file"):
        cpumanager.read_exclusive_cpus("/nonexistent/cpu_manager_state")
    assert cpumanager.read_exclusive_cpus("") == frozenset()  # not configured: not read


def _cpuset_agent(tmp_path: Path, state_file: Path) -> tuple[FakeCgroupTree, Agent, FakeHost]:
    tree = FakeCgroupTree(tmp_path / "cg", 1, "cgroupfs")
    tree.add_pod(UID_BE, "besteffort", memory=GiB, shares=2)
    tree.add_container(UID_BE, CID_A)
    host = FakeHost()
    host.cpu_milli = 1_500  # budget 8 x 65% - 1.5 = 3.7 cores: four CPUs
    config = build_config({"nodeName": "n1", "cpuSuppress": {"policy": "cpuset"},
                           "cpuManagerStateFile": str(state_file)})
    agent = Agent(config, Collector(cgroups.detect(tmp_path / "cg"), 3, host), AgentMetrics(), _state(_be_raw(UID_BE)))
    agent.cycle()
    return tree, agent, host


def test_be_pods_never_get_the_cpus_the_static_cpu_manager_gave_a_container(tmp_path: Path) -> None:
    """The tier's cpuset is 0-7 (the kubelet does not narrow QoS tiers), but 6-7 belong to a Guaranteed container:
    BE takes the highest four of the other six."""
    state = tmp_path / "cpu_manager_state"
    state.write_text(json.dumps(STATIC))
    tree, agent, _ = _cpuset_agent(tmp_path, state)
    report = agent.cycle()
    assert tree.cpuset(UID_BE) == tree.cpuset(UID_BE, CID_A) == "2-5"  # not 4-7
    assert not [n for n in report.notes if "CPU manager" in n]
    state.write_text(json.dumps({**STATIC, "entries": {}}))  # that pod went: its CPUs are shared again
    agent.cycle()
    assert tree.cpuset(UID_BE) == "4-7"


@pytest.mark.parametrize("broken", ["missing", "garbled", "all exclusive"])
def test_an_unusable_checkpoint_is_an_error_and_cfs_quotas_stand_in(tmp_path: Path, broken: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Never a guess that could put BE on a container's own CPUs: the cycle notes it, the log says it once (not
    every cycle), pods already pinned go back to the CPUs last known to be BE's, the agent keeps cycling and the
    cpuset policy resumes once the file reads again."""
    state = tmp_path / "cpu_manager_state"
    state.write_text(json.dumps(STATIC))
    tree, agent, _ = _cpuset_agent(tmp_path, state)
    agent.cycle()
    assert tree.cpuset(UID_BE) == "2-5"
    if broken == "missing":
        state.unlink()
    elif broken == "garbled":
        state.write_text('{"policyName": "static", "entries": {"u": {"c": "6-')
    else:
        state.write_text(json.dumps({**STATIC, "entries": {"u": {"c": "0-7"}}}))
    with caplog.at_level(logging.INFO, logger="fuyao.qos.agent"):
        first, second = agent.cycle(), agent.cycle()
    for report in (first, second):
        assert [n for n in report.notes if "CPU manager state is not usable" in n and "CFS quotas" in n]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "CPU manager state" in r.message]
    assert len(errors) == 1
    assert tree.cpuset(UID_BE) == "0-5"  # back to the CPUs last read as BE's, never 0-7
    state.write_text(json.dumps(STATIC))
    with caplog.at_level(logging.INFO, logger="fuyao.qos.agent"):
        resumed = agent.cycle()
    assert not [n for n in resumed.notes if "CPU manager" in n] and tree.cpuset(UID_BE) == "2-5"
    assert [r for r in caplog.records if "readable again" in r.message]
