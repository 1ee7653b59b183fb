"""fuyao-device-plugin as a process: real unix sockets, the generated gRPC stubs, a kubelet stand-in, the fake
npu-smi. Each test starts its own plugin and kubelet in a private temp directory."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator

import grpc
import psutil
import pytest

from fuyao.contracts import RESOURCE_NPU
from tests.support.deviceplugin import PluginUnderTest


@pytest.fixture
def plugin_factory() -> Iterator:  # type: ignore[type-arg]
    made: list[PluginUnderTest] = []

    def make(preset: str = "910b4-8", **kw) -> PluginUnderTest:  # type: ignore[no-untyped-def]
        p = PluginUnderTest(preset, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def plugin(plugin_factory) -> PluginUnderTest:  # type: ignore[no-untyped-def]
    p = plugin_factory("910b4-8").start()
    p.wait_ready()
    return p


def health(devices) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {d.ID: d.health for d in devices}


def test_advertises_eight_910b_devices_with_numa(plugin: PluginUnderTest, plugin_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg = plugin.kubelet.registrations[-1]
    assert reg.version == "v1beta1" and reg.endpoint == "fuyao-npu.huawei.com-NPU.sock"
    assert reg.preferred_available
    devices = plugin.kubelet.wait_devices(RESOURCE_NPU)
    assert sorted(d.ID for d in devices) == sorted(f"Ascend910-{i}" for i in range(8))
    assert set(health(devices).values()) == {"Healthy"}
    # this host's NUMA nodes do not hold the fake chips' CPU affinity ranges: no NUMA node is made up for the
    # kubelet (its Topology Manager would align CPUs with a node that is not the device's)
    assert all(not d.HasField("topology") for d in devices)
    # a host whose sysfs NUMA nodes hold those ranges (910B4 preset: two NPUs per range): the real node ids
    sysfs = tmp_path / "sys"
    for node, cpus in enumerate(("0-47", "48-95", "96-143", "144-191")):
        (sysfs / f"devices/system/node/node{node}").mkdir(parents=True)
        (sysfs / f"devices/system/node/node{node}/cpulist").write_text(cpus + "\n")
    real = plugin_factory("910b4-8", extra_args=("--sysfs-root", str(sysfs))).start()
    numa = {d.ID: [n.ID for n in d.topology.nodes] for d in real.wait_ready()}
    assert numa["Ascend910-0"] == numa["Ascend910-1"] == [3] and numa["Ascend910-2"] == [2]
    assert numa["Ascend910-4"] == [0] and numa["Ascend910-6"] == [1]


def test_advertises_sixteen_dies_on_910c(plugin_factory) -> None:  # type: ignore[no-untyped-def]
    p = plugin_factory("910c-8").start()
    devices = p.wait_ready()
    assert len(devices) == 16 and len({d.ID for d in devices}) == 16
    response = p.kubelet.allocate(RESOURCE_NPU, ["Ascend910-3", "Ascend910-2"])
    assert response.container_responses[0].envs["ASCEND_VISIBLE_DEVICES"] == "2,3"


def test_chip_goes_critical_then_recovers(plugin: PluginUnderTest) -> None:
    plugin.fake("fake", "set-health", "-i", "3", "Critical", "--code", "80E01801")
    devices = plugin.kubelet.wait_devices(RESOURCE_NPU, lambda ds: health(ds)["Ascend910-3"] == "Unhealthy")
    assert list(health(devices).values()).count("Unhealthy") == 1
    assert 'npu_health{chip="910B4",device="Ascend910-3",node="node-a"} 0.0' in plugin.metrics()
    with pytest.raises(grpc.RpcError) as err:
        plugin.kubelet.allocate(RESOURCE_NPU, ["Ascend910-3"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Critical" in err.value.details()
    plugin.fake("fake", "set-health", "-i", "3", "OK")
    plugin.kubelet.wait_devices(RESOURCE_NPU, lambda ds: set(health(ds).values()) == {"Healthy"})
    assert 'npu_health{chip="910B4",device="Ascend910-3",node="node-a"} 1.0' in plugin.metrics()
    assert plugin.kubelet.allocate(RESOURCE_NPU, ["Ascend910-3"]).container_responses[0].envs


def test_warning_stays_healthy_alarm_does_not(plugin: PluginUnderTest) -> None:
    plugin.fake("fake", "set-health", "-i", "1", "Warning")
    plugin.fake("fake", "set-health", "-i", "2", "Alarm")
    devices = plugin.kubelet.wait_devices(RESOURCE_NPU, lambda ds: health(ds)["Ascend910-2"] == "Unhealthy")
    assert health(devices)["Ascend910-1"] == "Healthy"


def test_hanging_npu_smi_marks_devices_unhealthy_then_recovers(plugin_factory) -> None:  # type: ignore[no-untyped-def]
    p = plugin_factory("910b4-8", extra_args=("--npu-smi-timeout", "0.5s", "--health-failure-threshold", "2"))
    p.start()
    p.wait_ready()
    p.fake("fake", "inject", "info", "hang", "--seconds", "20")
    p.kubelet.wait_devices(RESOURCE_NPU, lambda ds: set(health(ds).values()) == {"Unhealthy"}, timeout=20)
    entry = p.wait_log("reporting every device Unhealthy")
    assert "did not answer within 0.5s" in str(entry["error"])
    p.assert_running()
    p.fake("fake", "clear-faults")
    p.kubelet.wait_devices(RESOURCE_NPU, lambda ds: set(health(ds).values()) == {"Healthy"}, timeout=20)
    assert "fuyao_deviceplugin_npu_smi_failures_total" in p.metrics()


def test_garbage_npu_smi_at_start_keeps_the_daemon_alive_until_it_recovers(plugin_factory) -> None:  # type: ignore[no-untyped-def]
    p = plugin_factory("910b4-8")
    p.fake("fake", "inject", "info", "garbage")
    p.start()
    entry = p.wait_log("NPU discovery failed")
    assert "npu-smi" in str(entry["msg"])
    time.sleep(0.5)
    p.assert_running()
    assert not p.kubelet.registrations
    p.fake("fake", "clear-faults")
    assert len(p.wait_ready()) == 8


def test_garbage_while_running_is_a_counted_failure_not_a_crash(plugin_factory) -> None:  # type: ignore[no-untyped-def]
    p = plugin_factory("910b4-8", extra_args=("--health-failure-threshold", "3"))
    p.start()
    p.wait_ready()
    p.fake("fake", "inject", "info", "garbage")
    p.kubelet.wait_devices(RESOURCE_NPU, lambda ds: set(health(ds).values()) == {"Unhealthy"}, timeout=20)
    p.fake("fake", "clear-faults")
    p.kubelet.wait_devices(RESOURCE_NPU, lambda ds: set(health(ds).values()) == {"Healthy"}, timeout=20)
    p.assert_running()


def test_kubelet_restarts_twenty_times(plugin: PluginUnderTest) -> None:
    kubelet = plugin.kubelet
    for _ in range(20):
        kubelet.restart()  # removes every socket, recreates kubelet.sock
        started = time.monotonic()
        kubelet.wait_registered(RESOURCE_NPU, timeout=10)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"re-registration took {elapsed:.2f}s"
        devices = kubelet.wait_devices(RESOURCE_NPU, lambda ds: len(ds) == 8)
        assert set(health(devices).values()) == {"Healthy"}
    assert len([r for r in kubelet.registrations if r.resource_name == RESOURCE_NPU]) == 21
    assert os.path.exists(plugin.plugin_dir / "fuyao-npu.huawei.com-NPU.sock")
    plugin.assert_running()


def test_kubelet_sock_replaced_without_touching_our_socket(plugin: PluginUnderTest) -> None:
    kubelet = plugin.kubelet
    kubelet.stop()  # grpc removes kubelet.sock; our socket stays
    assert not os.path.exists(kubelet.socket_path)
    assert os.path.exists(plugin.plugin_dir / "fuyao-npu.huawei.com-NPU.sock")
    kubelet.start()
    kubelet.wait_registered(RESOURCE_NPU, timeout=10)
    assert len(kubelet.wait_devices(RESOURCE_NPU)) == 8


def test_lost_stream_leads_to_a_new_registration(plugin: PluginUnderTest) -> None:
    kubelet = plugin.kubelet
    for _ in range(3):
        count = len(kubelet.registrations)
        started = time.monotonic()
        kubelet.drop_streams()  # the kubelet forgets the plugin but keeps its socket
        kubelet.wait(lambda c=count: len(kubelet.registrations) > c, timeout=15, what="a new registration")
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"re-registration after a lost stream took {elapsed:.2f}s"
        assert len(kubelet.wait_devices(RESOURCE_NPU)) == 8
    assert plugin.wait_log("ListAndWatch stream for npu.huawei.com/NPU ended")


def test_stale_kubelet_socket_then_a_new_kubelet(plugin_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket as socketlib

    p = plugin_factory("910b4-8", start_kubelet=False)
    # a crashed kubelet left kubelet.sock behind: it exists but nobody answers
    stale = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    stale.bind(str(p.plugin_dir / "kubelet.sock"))
    stale.close()
    p.start()
    p.wait_log("registration of npu.huawei.com/NPU failed")
    time.sleep(4)  # let the retry backoff grow against the dead socket
    os.unlink(p.plugin_dir / "kubelet.sock")
    started = time.monotonic()
    p.kubelet.start()
    p.kubelet.wait_registered(RESOURCE_NPU, timeout=15)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"registered {elapsed:.2f}s after the new kubelet.sock appeared"


@pytest.mark.parametrize("own_netns", [False, True])
def test_a_second_instance_waits_for_the_first(plugin: PluginUnderTest, own_netns: bool) -> None:
    import shutil
    import subprocess

    # in its own network namespace, as a second plugin pod of the node is (no hostNetwork)
    if own_netns and (os.geteuid() != 0 or shutil.which("unshare") is None):
        pytest.skip("needs root and unshare for a network namespace")
    prefix = ["unshare", "--net"] if own_netns else []
    second = subprocess.Popen([*prefix, *plugin.command()], env=plugin.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, cwd=plugin.root, start_new_session=True)
    try:
        time.sleep(2.0)
        assert second.poll() is None
        assert len([r for r in plugin.kubelet.registrations if r.resource_name == RESOURCE_NPU]) == 1
        assert (plugin.plugin_dir / "fuyao-npu.huawei.com-NPU.sock").exists()
        plugin.assert_running()
    finally:
        second.terminate()
        out = second.communicate(timeout=10)[0].decode()
    assert "another fuyao-device-plugin serves" in out


def test_metrics_port_in_use_is_not_fatal(plugin_factory) -> None:  # type: ignore[no-untyped-def]
    import socket as socketlib

    busy = socketlib.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        p = plugin_factory("910b4-8", extra_args=("--metrics-address", f"127.0.0.1:{busy.getsockname()[1]}"))
        p.start()
        assert len(p.wait_ready()) == 8
        assert p.wait_log("running without metrics")
    finally:
        busy.close()


def test_preferred_allocation_every_size_on_a1_rings(plugin_factory) -> None:  # type: ignore[no-untyped-def]
    p = plugin_factory("910a1-8").start()
    devices = p.wait_ready()
    all_ids = sorted((d.ID for d in devices), key=lambda i: int(i.rsplit("-", 1)[1]))
    ring = {i: int(i.rsplit("-", 1)[1]) // 4 for i in all_ids}
    for size in range(1, 9):
        got = p.kubelet.preferred(RESOURCE_NPU, all_ids, size)
        assert len(got) == size and len(set(got)) == size and set(got) <= set(all_ids)
        if size <= 4:
            assert len({ring[d] for d in got}) == 1, f"size {size} spans rings: {got}"
    assert p.kubelet.preferred(RESOURCE_NPU, all_ids, 8) == all_ids
    # 1 card with ring 0 partly used: take from the ring with 3 free, keep ring 1 whole
    free = [i for i in all_ids if i != "Ascend910-0"]
    assert ring[p.kubelet.preferred(RESOURCE_NPU, free, 1)[0]] == 0
    # 4 cards with ring 0 partly used: the whole ring 1
    assert p.kubelet.preferred(RESOURCE_NPU, free, 4) == [f"Ascend910-{i}" for i in range(4, 8)]
    # must_include is honoured
    assert "Ascend910-6" in p.kubelet.preferred(RESOURCE_NPU, all_ids, 2, must_include=["Ascend910-6"])


def test_allocate_response(plugin_factory) -> None:  # type: ignore[no-untyped-def]
    host_root = None
    p = plugin_factory("910b4-8")
    host_root = p.root / "host"
    (host_root / "usr/local/Ascend/driver/lib64").mkdir(parents=True)
    (host_root / "usr/local/dcmi").mkdir(parents=True)
    p.extra_args = ("--host-root", str(host_root))
    p.start()
    p.wait_ready()
    response = p.kubelet.allocate(RESOURCE_NPU, ["Ascend910-5", "Ascend910-4"], ["Ascend910-0"])
    first, second = response.container_responses
    assert dict(first.envs) == {"ASCEND_VISIBLE_DEVICES": "4,5"}
    assert [d.container_path for d in first.devices] == [
        "/dev/davinci4", "/dev/davinci5", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]
    assert all(os.path.exists(d.host_path) and d.permissions == "rw" for d in first.devices)
    assert [(m.host_path, m.container_path, m.read_only) for m in first.mounts] == [
        ("/usr/local/Ascend/driver/lib64", "/usr/local/Ascend/driver/lib64", True),
        ("/usr/local/dcmi", "/usr/local/dcmi", True)]
    assert first.annotations["npu.openfuyao.com/devices"] == "Ascend910-4,Ascend910-5"
    assert dict(second.envs) == {"ASCEND_VISIBLE_DEVICES": "0"}
    metrics = p.metrics()
    assert re.search(r'fuyao_deviceplugin_allocations_total\{resource="npu.huawei.com/NPU",result="ok"\} 2\.0',
                     metrics)
    assert 'fuyao_deviceplugin_allocate_duration_seconds_count{resource="npu.huawei.com/NPU"} 1.0' in metrics


def test_allocate_unknown_id_is_an_error_and_resends_the_list(plugin: PluginUnderTest) -> None:
    conn = plugin.kubelet.connections[RESOURCE_NPU]
    lists_before = len(conn.lists)
    with pytest.raises(grpc.RpcError) as err:
        plugin.kubelet.allocate(RESOURCE_NPU, ["Ascend910-1", "Ascend910-99"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Ascend910-99" in err.value.details()
    plugin.kubelet.wait(lambda: len(conn.lists) > lists_before, what="a ListAndWatch update after the failure")
    plugin.assert_running()


def test_metrics_cover_every_device(plugin: PluginUnderTest) -> None:
    text = plugin.metrics()
    for name in ("npu_utilization", "npu_temperature_celsius", "npu_power_watts", "npu_hbm_used_bytes",
                 "npu_hbm_total_bytes", "npu_health"):
        series = re.findall(rf'^{name}\{{chip="910B4",device="(Ascend910-\d)",node="node-a"\}} ([0-9.e+]+)$', text,
                            re.MULTILINE)
        assert len(series) == 8, name
    utilization = [float(v) for _, v in re.findall(r'^npu_utilization\{[^}]*device="([^"]+)"[^}]*\} (\S+)$', text,
                                                   re.MULTILINE)]
    assert all(0.0 <= u <= 1.0 for u in utilization)
    total = re.search(r'npu_hbm_total_bytes\{[^}]*device="Ascend910-0"[^}]*\} (\S+)', text)
    assert total and float(total.group(1)) == 32768 * 1024 * 1024
    plugin.wait_log("registered npu.huawei.com/NPU with the kubelet")  # the kubelet answered before we counted
    assert 'fuyao_deviceplugin_registrations_total{resource="npu.huawei.com/NPU",result="ok"} 1.0' in plugin.metrics()


def test_sigterm_removes_sockets_and_exits_quickly(plugin: PluginUnderTest) -> None:
    socket_path = plugin.plugin_dir / "fuyao-npu.huawei.com-NPU.sock"
    assert socket_path.exists()
    code, seconds = plugin.terminate()
    assert code == 0 and seconds < 3.0
    assert not socket_path.exists()
    assert (plugin.plugin_dir / "kubelet.sock").exists()  # the kubelet's socket is not ours to remove


@pytest.mark.parametrize("hung", [
    ("info",),  # the first discovery call
    ("info -t topo", "info -t common*"),  # later discovery calls: none of them may run after SIGTERM
])
def test_sigterm_during_a_hung_npu_smi_exits_quickly_and_leaves_no_process(  # type: ignore[no-untyped-def]
        plugin_factory, hung: tuple[str, ...]) -> None:
    p = plugin_factory("910b4-8", extra_args=("--npu-smi-timeout", "60s"))
    for pattern in hung:
        p.fake("fake", "inject", pattern, "hang", "--seconds", "60")
    p.start()
    assert p.proc is not None
    daemon = psutil.Process(p.proc.pid)
    deadline = time.monotonic() + 15
    while not daemon.children(recursive=True) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the hung call
    children = daemon.children(recursive=True)
    assert children, "npu-smi was never started"
    code, seconds = p.terminate()
    assert code == 0 and seconds < 3.0, f"exit {code} after {seconds:.2f}s"
    _gone, alive = psutil.wait_procs(children, timeout=3)
    assert not alive, f"left behind: {alive}"


def test_runs_without_a_cluster_and_says_so(plugin: PluginUnderTest) -> None:
    assert plugin.wait_log("node publishing is off")


@pytest.mark.parametrize(("flag", "value", "field"), [
    ("--health-interval", "fast", "health.interval"),
    ("--device-plugin-dir", "/tmp/" + "d" * 90, "devicePluginDir"),
    ("--vnpu-mode", "dynamic", None),
])
def test_invalid_flag_value_exits_2_naming_the_field(plugin_factory, flag: str, value: str,  # type: ignore[no-untyped-def]
                                                     field: str | None) -> None:
    import subprocess

    p = plugin_factory("910b4-8", start_kubelet=False)
    command = [*p.command(), flag, value]
    if field is None:  # a valid value: check the parser accepts it by asking for --help instead of running
        command = [*command, "--help"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30, env=p.env)
    if field is None:
        assert proc.returncode == 0
        return
    assert proc.returncode == 2
    assert f"'{field}'" in proc.stderr and "Traceback" not in proc.stderr


def test_product_rules_shape_preferred_allocation_and_refuse_what_the_product_forbids(plugin_factory) -> None:  # type: ignore[no-untyped-def]
    a3 = plugin_factory("910c-8").start()
    dies = [d.ID for d in a3.wait_ready()]
    # A3: a 2-die pod gets both dies of one chip, even when a lone die is offered first
    offered = [dies[1], *dies[2:6]]
    pair = a3.kubelet.preferred(RESOURCE_NPU, offered, 2)
    assert sorted(pair) in ([dies[2], dies[3]], [dies[4], dies[5]])
    assert a3.kubelet.preferred(RESOURCE_NPU, offered, 1) == [dies[1]]  # a lone die first: whole chips stay whole
    with pytest.raises(grpc.RpcError) as err:
        a3.kubelet.allocate(RESOURCE_NPU, [dies[1], dies[2]])  # dies of two chips
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rule 910c-a3/die-pairs" in err.value.details()
    assert a3.kubelet.allocate(RESOURCE_NPU, [dies[2], dies[3]]).container_responses[0].envs
    a1 = plugin_factory("910a1-8").start()
    cards = [d.ID for d in a1.wait_ready()]
    with pytest.raises(grpc.RpcError) as err:
        a1.kubelet.allocate(RESOURCE_NPU, cards[:3])
    assert "rule 910-a1-module/counts" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        a1.kubelet.allocate(RESOURCE_NPU, [cards[0], cards[4]])
    assert "rule 910-a1-module/ring" in err.value.details()
    assert a1.kubelet.preferred(RESOURCE_NPU, [cards[0], *cards[4:8]], 4) == cards[4:8]


def test_sigusr1_dumps_every_threads_stack_and_the_plugin_keeps_serving(plugin: PluginUnderTest) -> None:
    """fuyao.daemon: ``kill -USR1`` shows what a daemon that hangs is doing, and does not stop it."""
    assert plugin.proc is not None
    plugin.proc.send_signal(signal.SIGUSR1)
    assert plugin.wait_log("most recent call first")
    # the main loop's frame, among the stacks (the dump is written frame by frame: wait for it, do not read once)
    deadline = time.monotonic() + 10
    while "deviceplugin/daemon.py" not in plugin.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "deviceplugin/daemon.py" in plugin.log_path.read_text(), plugin.log_path.read_text()[-3000:]
    plugin.assert_running()
    assert plugin.kubelet.allocate(RESOURCE_NPU, ["Ascend910-1"]).container_responses[0].envs
