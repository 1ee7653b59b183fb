"""QoS agent on the nodes and configs its first tests did not cover: a 64 KiB-page kernel, BE pods the kubelet puts
in the burstable tier, cpusets that cannot be read or must be given back, LS pods still pulling their images, tier
directories that cannot be listed, config values that cannot work, and what the docs promise about RBAC and
network IO."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from fuyao.contracts import RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY
from fuyao.qos import cgroups, kube, policy
from fuyao.qos.agent import Agent
from fuyao.qos.collect import Collector
from fuyao.qos.config import ConfigError, build_config
from fuyao.qos.kube import pod_facts
from fuyao.qos.metrics import AgentMetrics
from tests.support.cgroups import FakeCgroupTree
from tests.unit.test_qos import (
    CID_A,
    CID_B,
    QUOTA_POLICY,
    UID_BE,
    UID_BE2,
    UID_LS,
    FakeHost,
    GiB,
    _be_raw,
    _raw,
    _state,
)

ROOT = Path(__file__).resolve().parents[2]
PAGE_64K = 65536
UNLIMITED_64K = "9223372036854710272"  # PAGE_COUNTER_MAX (LONG_MAX / 64 KiB) pages, in bytes
CPUSET = {"nodeName": "n1", "cpuSuppress": {"policy": "cpuset"}, "cpuManagerStateFile": ""}  # no kubelet here


def _files(version: int) -> tuple[str, str, str]:
    """The quota, weight and memory limit files of a cgroup version."""
    return ("cpu.max", "cpu.weight", "memory.max") if version == 2 else (
        "cpu.cfs_quota_us", "cpu.shares", "memory.limit_in_bytes")


def _weight(version: int, shares: int) -> str:
    return str(cgroups.shares_to_weight(shares)) if version == 2 else str(shares)


# --- 1. the kernel's page size ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size_from", ["the host", "the layout"])
def test_memory_limits_on_a_64k_page_kernel_are_what_the_agent_wants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    page_size_from: str) -> None:
    """aarch64 RHEL and Kylin kernels use 64 KiB pages: cgroup v1 shows "unlimited" as PAGE_COUNTER_MAX pages
    (9223372036854710272, not 4 KiB's 9223372036854771712) and a 1G limit as 999948288 (whole 64 KiB pages). Both are
    what the agent wants: nothing is written again (each rewrite failed its read-back every cycle). The page size is
    the host's (``SC_PAGE_SIZE``) or one a Layout is given."""
    if page_size_from == "the host":
        real = os.sysconf
        monkeypatch.setattr(os, "sysconf", lambda name: PAGE_64K if name == "SC_PAGE_SIZE" else real(name))
    tree = FakeCgroupTree(tmp_path, 1, "cgroupfs")
    tree.add_pod(UID_BE, "besteffort", memory=GiB, shares=2)
    tree.add_container(UID_BE, CID_A)
    tree.add_container(UID_BE, CID_B)
    layout = cgroups.detect(tmp_path)  # the page size: the host's, as the Layout is made
    if page_size_from == "the layout":
        layout = dataclasses.replace(layout, page_size=PAGE_64K)
    raw = _be_raw(UID_BE)
    raw["spec"]["containers"][0]["resources"] = {"limits": {RESOURCE_BATCH_CPU: "1500", RESOURCE_BATCH_MEMORY: "1G"}}
    del raw["spec"]["containers"][1]["resources"]["limits"][RESOURCE_BATCH_MEMORY]  # "side": unlimited
    memory = tree.memory_dir(UID_BE)
    for directory, shown in ((memory, UNLIMITED_64K), (memory / CID_A, "999948288"), (memory / CID_B, UNLIMITED_64K)):
        (directory / "memory.limit_in_bytes").write_text(f"{shown}\n")  # as the kernel shows them
    agent = Agent(QUOTA_POLICY, Collector(layout, 3, FakeHost()), AgentMetrics(), _state(raw))
    agent.cycle()
    report = agent.cycle()
    assert report.cgroup_writes and all(not w.error for w in report.cgroup_writes)  # the CPU files were written
    assert [w.path for w in report.cgroup_writes if Path(w.path).name.startswith("memory.")] == []
    assert layout.page_size == PAGE_64K


def test_a_write_reads_back_to_the_kernels_page() -> None:
    unlimited = cgroups.Write("/cg/memory.limit_in_bytes", "-1")
    assert cgroups.reads_as(unlimited, UNLIMITED_64K + "\n", PAGE_64K)
    assert cgroups.reads_as(unlimited, "9223372036854771712\n", 4096)
    limit = cgroups.Write("/cg/memory.max", "1000000000")
    assert cgroups.reads_as(limit, "999948288\n", PAGE_64K)
    assert not cgroups.reads_as(limit, "999948288\n", 4096)  # 4 KiB pages keep 999997440
    assert cgroups.unlimited_memory(4096) == 9223372036854771712
    assert cgroups.unlimited_memory(PAGE_64K) == int(UNLIMITED_64K)
    assert cgroups.same_memory(999_948_288, 10**9, PAGE_64K) and not cgroups.same_memory(999_948_288, 10**9, 4096)


# --- 2. BE pods outside the besteffort tier ---------------------------------------------------------------------------
@pytest.mark.parametrize(("version", "driver"), [(1, "cgroupfs"), (2, "systemd")])
def test_a_be_pod_in_the_burstable_tier_weighs_no_more_than_be_cpu_shares(tmp_path: Path, version: int,
                                                                         driver: str) -> None:
    """A BE pod that also requests memory is Burstable to the kubelet: its weight competes with LS pods' there, so
    a 4000m batch-cpu request must not give it 4096 shares (as much as an LS pod with 4 CPUs). In the besteffort
    tier its request still sets its weight (against other BE pods only)."""
    tree = FakeCgroupTree(tmp_path, version, driver)  # type: ignore[arg-type]
    tree.add_pod(UID_BE, "burstable", memory=GiB, shares=2)
    tree.add_pod(UID_BE2, "besteffort", memory=GiB, shares=2)

    def be(uid: str, requests: dict[str, str]) -> dict[str, Any]:
        return {"metadata": {"uid": uid, "name": uid[-1], "namespace": "jobs", "labels": {"volcano.sh/qos": "BE"}},
                "spec": {"containers": [{"name": "main", "resources": {
                    "requests": requests, "limits": {RESOURCE_BATCH_CPU: "4000"}}}]}}

    agent = Agent(QUOTA_POLICY, Collector(cgroups.detect(tmp_path), 3, FakeHost()), AgentMetrics(),
                  _state(be(UID_BE, {"memory": "1Gi", RESOURCE_BATCH_CPU: "4000"}),
                         be(UID_BE2, {RESOURCE_BATCH_CPU: "4000"})))
    agent.cycle()
    agent.cycle()
    assert tree.weight(UID_BE) == _weight(version, QUOTA_POLICY.be_cpu_shares)
    assert tree.weight(UID_BE2) == _weight(version, 4096)
    sample = policy.PodSample(uid="x", known=True, cpu_request_milli=4000)
    assert policy.be_targets(sample, None, 64, in_besteffort_tier=False).pod.cpu_shares == 64
    assert policy.be_targets(sample, None, 8192, in_besteffort_tier=False).pod.cpu_shares == 4096  # a cap only


# --- 3./4. cpusets ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("version", "driver"), [(1, "cgroupfs"), (2, "systemd")])
def test_an_unreadable_cpuset_does_not_hold_back_the_limits(tmp_path: Path, version: int, driver: str) -> None:
    """A container that exits between the listing of the pod's cpuset children and the read of its cpuset.cpus:
    the pod's memory and CPU limits are written all the same, the CPUs wait for the next cycle (reported apart)."""
    tree = FakeCgroupTree(tmp_path, version, driver)  # type: ignore[arg-type]
    tree.add_pod(UID_BE, "besteffort", memory=GiB, shares=2)
    tree.add_container(UID_BE, CID_A)
    tree.add_container(UID_BE, CID_B)
    exited = tree.cpuset_dir(UID_BE) / "exited"
    exited.mkdir()  # listed, but its cpuset.cpus cannot be read
    before = tree.cpuset(UID_BE, CID_A)
    agent = Agent(build_config(CPUSET), Collector(cgroups.detect(tmp_path), 3, FakeHost()), AgentMetrics(),
                  _state(_be_raw(UID_BE)))
    agent.cycle()
    report = agent.cycle()
    quota, weight, memory = _files(version)
    assert tree.file(UID_BE, memory, CID_A) == str(2 * GiB)
    assert tree.file(UID_BE, quota, CID_A) == ("150000 100000" if version == 2 else "150000")
    assert tree.file(UID_BE, weight) == _weight(version, 2_150)
    assert tree.cpuset(UID_BE, CID_A) == before  # the CPUs: next cycle
    assert [n for n in report.notes if "CPUs left as is" in n and "exited" in n]
    assert "fuyao_qos_cgroup_read_errors_total 1.0" in agent.metrics.render()
    exited.rmdir()
    agent.cycle()  # budget 8 x 65% = 5.2 CPUs: the 6 highest
    assert tree.cpuset(UID_BE) == tree.cpuset(UID_BE, CID_A) == tree.cpuset(UID_BE, CID_B) == "2-7"


@pytest.mark.parametrize(("version", "driver"), [(1, "cgroupfs"), (2, "systemd")])
def test_pods_the_cpuset_policy_narrowed_get_the_tiers_cpus_back_once_it_no_longer_applies(
        tmp_path: Path, version: int, driver: str) -> None:
    """Koordinator's recoverCPUSetIfNeed: BE pods pinned by the cpuset policy get the BestEffort tier's CPUs back
    when the policy switches to cfsQuota (an agent restarted with another config: the state file says which pods),
    when cpuSuppress is disabled, and when the tier's cpuset turns unreadable (the CPUs last read)."""
    tree = FakeCgroupTree(tmp_path / "cg", version, driver)  # type: ignore[arg-type]
    tree.add_pod(UID_BE, "besteffort", memory=GiB, shares=2)
    tree.add_container(UID_BE, CID_A)
    sandbox = "5" * 64
    tree.add_container(UID_BE, sandbox)
    state_file = tmp_path / "state" / "state.json"

    def agent(**cpu_suppress: Any) -> Agent:
        config = build_config({"nodeName": "n1", "stateFile": str(state_file), "cpuSuppress": cpu_suppress,
                               "cpuManagerStateFile": ""})
        return Agent(config, Collector(cgroups.detect(tmp_path / "cg"), 3, FakeHost()), AgentMetrics(),
                     _state(_be_raw(UID_BE)))

    def cpusets() -> set[str]:
        return {tree.cpuset(UID_BE), tree.cpuset(UID_BE, CID_A), tree.cpuset(UID_BE, sandbox)}

    def pinned() -> Agent:
        on = agent(policy="cpuset")
        on.cycle()
        on.cycle()
        assert cpusets() == {"2-7"}
        return on

    pinned()
    switched = agent(policy="cfsQuota")
    switched.cycle()
    switched.cycle()
    assert cpusets() == {"0-7"}
    assert switched.cycle().cgroup_writes == [] and '"pinned": []' in state_file.read_text()  # done, forgotten

    pinned()
    disabled = agent(policy="cpuset", enabled=False)
    disabled.cycle()
    disabled.cycle()
    assert cpusets() == {"0-7"}

    on = pinned()
    tier = tree.cpuset_dir(UID_BE).parent
    for name in ("cpuset.cpus", "cpuset.cpus.effective"):
        (tier / name).unlink(missing_ok=True)
    report = on.cycle()
    assert any("not readable" in n for n in report.notes) and cpusets() == {"0-7"}


def test_cpusets_the_agent_never_narrowed_are_left_alone(tmp_path: Path) -> None:
    """Under cfsQuota the agent reads and writes no cpuset (the kubelet's static CPU manager owns them there)."""
    tree = FakeCgroupTree(tmp_path, 2, "cgroupfs")
    tree.add_pod(UID_BE, "besteffort", memory=GiB, shares=2)
    tree.add_container(UID_BE, CID_A)
    (tree.cpuset_dir(UID_BE, CID_A) / "cpuset.cpus").write_text("3\n")  # the static CPU manager's
    agent = Agent(QUOTA_POLICY, Collector(cgroups.detect(tmp_path), 3, FakeHost()), AgentMetrics(),
                  _state(_be_raw(UID_BE)))
    agent.cycle()
    report = agent.cycle()
    assert report.cgroup_writes and not [w for w in report.cgroup_writes if Path(w.path).name == "cpuset.cpus"]
    assert tree.cpuset(UID_BE, CID_A) == "3"


# --- 5. LS pods without a sample --------------------------------------------------------------------------------------
def _requesting(uid: str, phase: str) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "name": f"web-{uid[-1]}", "namespace": "default"},
            "spec": {"containers": [{"name": "main", "resources": {"requests": {"cpu": "2", "memory": "4Gi"}}}]},
            "status": {"phase": phase}}


def test_ls_pods_without_a_cgroup_sample_yet_count_their_requests(tmp_path: Path) -> None:
    """Koordinator's calculateOnNode: an LS pod bound to the node whose cgroup gave no sample (the kubelet is
    pulling its image) uses its requests, not 0. A finished pod and a BE pod do not count."""
    tree = FakeCgroupTree(tmp_path, 2, "cgroupfs")
    tree.add_pod(UID_LS, "burstable", memory=GiB)
    pulling, finished = _requesting("0a1b2c3d-0000-4000-8000-00000000000d", "Pending"), \
        _requesting("0a1b2c3d-0000-4000-8000-00000000000e", "Succeeded")
    agent = Agent(QUOTA_POLICY, Collector(cgroups.detect(tmp_path), 3, FakeHost()), AgentMetrics(),
                  _state(_raw(UID_LS, None), pulling, finished, _be_raw(UID_BE)))
    agent.cycle()
    report = agent.cycle()
    # 8 CPUs x 65% - max(system 0, reserved 1 CPU) - LS: the sampled pod's 0 and the pulling one's 2 CPUs
    assert report.batch[RESOURCE_BATCH_CPU] == 5_200 - 1_000 - 2_000
    # 64Gi x 65% - system (10Gi on the host - 1Gi of pods) - LS (1Gi sampled + 4Gi requested)
    assert report.batch[RESOURCE_BATCH_MEMORY] == int(64 * GiB * 65.0 / 100 - 9 * GiB - 5 * GiB)
    facts = pod_facts(pulling)
    assert facts is not None and facts[1].memory_request_bytes == 4 * GiB and not facts[1].finished
    done = pod_facts(finished)
    assert done is not None and done[1].finished


# --- 6./7. config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("values", "field", "says"), [
    ({"metricsAddress": "localhost"}, "metricsAddress", "HOST:PORT"),
    ({"metricsAddress": "127.0.0.1:99999"}, "metricsAddress", "HOST:PORT"),
    ({"interval": "1ms"}, "interval", "at least 100ms"),
    # the extender takes a usage report older than 120 s for a stopped agent (and refuses BE pods there)
    ({"interval": "3m"}, "interval", "at most 60s"),
    ({"usage": {"publishInterval": "2m"}}, "usage.publishInterval", "at most 60s"),
    ({"cgroupRoot": ""}, "cgroupRoot", "at least 1 character"),
    ({"cpuSuppress": {"thresholdPercent": 10, "hysteresisPercent": 20}}, "cpuSuppress",
     "hysteresisPercent (20) must not be above thresholdPercent (10)"),
    ({"cpuSuppress": {"minBeMilli": 10**9}}, "cpuSuppress.minBeMilli", "less than or equal to 1000000"),
])
def test_config_values_that_cannot_work_are_refused_naming_the_field(values: dict[str, Any], field: str,
                                                                     says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)) as err:
        build_config(values)
    assert err.value.field == field


def test_config_values_at_the_bounds_load() -> None:
    config = build_config({"interval": "100ms", "metricsAddress": "", "cpuSuppress": {"minBeMilli": 1_000_000}})
    assert (config.interval, config.metrics_address) == (0.1, "")
    assert build_config({"metricsAddress": "[::1]:9401"}).metrics_address == "[::1]:9401"
    # an unset hysteresis is capped at a low threshold (suppression always on), an explicit one must fit under it
    assert build_config({"cpuSuppress": {"thresholdPercent": 1}}).cpu_suppress.hysteresis_percent == 1
    assert build_config({"cpuSuppress": {"thresholdPercent": 5, "hysteresisPercent": 5}}).cpu_suppress


# --- 8. tier directories ---------------------------------------------------------------------------------------------
def test_a_tier_that_cannot_be_listed_is_reported_not_taken_for_no_pods(tmp_path: Path) -> None:
    tree = FakeCgroupTree(tmp_path, 2, "cgroupfs")
    tree.add_pod(UID_LS, "burstable", memory=GiB)
    tree.add_pod(UID_BE, "besteffort", memory=GiB)
    agent = Agent(build_config({}), Collector(cgroups.detect(tmp_path), 3, FakeHost()), AgentMetrics())
    assert not [n for n in agent.cycle().notes if "cannot list" in n]
    besteffort = tree.dirs[UID_BE].parent
    shutil.rmtree(besteffort)
    besteffort.write_text("")  # not a directory: ENOTDIR
    report = agent.cycle()
    assert [p.uid for p in report.pods] == [UID_LS]
    assert [n for n in report.notes if "cannot list" in n and str(besteffort) in n]
    shutil.rmtree(tmp_path / "kubepods")  # kubepods itself went
    report = agent.cycle()
    assert report.pods == [] and [n for n in report.notes if f"cannot list {tmp_path / 'kubepods'}" in n]
    assert "fuyao_qos_cgroup_read_errors_total 2.0" in agent.metrics.render()


def test_tiers_without_pods_yet_are_not_errors(tmp_path: Path) -> None:
    FakeCgroupTree(tmp_path, 1, "cgroupfs").add_pod(UID_LS, "guaranteed")  # no burstable, besteffort directory
    errors: list[str] = []
    assert set(cgroups.pod_cgroups(cgroups.detect(tmp_path), errors)) == {UID_LS} and errors == []


# --- 9./10. what the docs promise ------------------------------------------------------------------------------------
def _chart_rules() -> list[tuple[str, str]]:
    """(resource, verbs) of the chart's ClusterRole, in its order."""
    text = (ROOT / "charts/qos-agent/templates/rbac.yaml").read_text()
    role = next(d for d in text.split("\n---\n") if "kind: ClusterRole" in d.splitlines())
    rules = yaml.safe_load("\n".join(line for line in role.splitlines() if "{{" not in line))["rules"]
    return [(resource, "/".join(rule["verbs"])) for rule in rules for resource in rule["resources"]]


def test_the_rbac_the_docs_state_is_what_the_chart_grants() -> None:
    rules = _chart_rules()
    docs = (ROOT / "docs/qos.md").read_text()
    assert ", ".join(f"{resource} `{verbs}`" for resource, verbs in rules) in docs
    assert ", ".join(f"{resource} {verbs}" for resource, verbs in rules) in " ".join((kube.__doc__ or "").split())
    assert "get/" not in docs and "get/" not in (kube.__doc__ or "")


def test_network_io_is_documented_as_the_agent_pods_own() -> None:
    """psutil reads /proc/net/dev of the agent pod's network namespace (the DaemonSet has no hostNetwork)."""
    help_line = next(line for line in AgentMetrics().render().splitlines()
                     if line.startswith("# HELP fuyao_qos_node_io_bytes_per_second"))
    assert "the agent pod's network namespace" in help_line
    assert "the agent pod's network namespace" in " ".join((ROOT / "docs/qos.md").read_text().split())
