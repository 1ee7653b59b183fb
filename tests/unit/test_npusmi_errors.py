"""Bad npu-smi output and misbehaving binaries give typed errors, never a crash or a hang."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fuyao.npusmi import (
    NpuSmi,
    NpuSmiCommandFailed,
    NpuSmiNotFound,
    NpuSmiParseError,
    NpuSmiTimeout,
    NpuSmiUnsupported,
)
from fuyao.npusmi import parse as p
from tests.conftest import sample

GARBAGE = "\x1b[0m\ufffd\ufffd dcmi_get_device_info failed ret=-8005 |||| 0x7f3c\n+--+\n| ?? |\n"


@pytest.mark.parametrize("parser", [p.parse_info, p.parse_topology, p.parse_chip_map, p.parse_template_info,
                                    p.parse_vnpu_info, p.parse_key_values, p.parse_health, p.parse_npu_list])
@pytest.mark.parametrize("text", [GARBAGE, "", "\n\n", "Segmentation fault\n", "\x00\x01\x02"])
def test_garbage_is_a_parse_error(parser, text: str) -> None:
    with pytest.raises(NpuSmiParseError):
        parser(text)


def test_truncated_info_table_names_the_line() -> None:
    lines = sample("S1-info-910b4-8.txt").splitlines()
    for cut in (3, 6, 8, 11):  # inside the header, after it, mid-entry, mid-row
        text = "\n".join(lines[:cut]) + ("\n| 2     910B4   | OK  " if cut == 11 else "")
        with pytest.raises(NpuSmiParseError) as err:
            p.parse_info(text)
        assert "info" in str(err.value)
    with pytest.raises(NpuSmiParseError) as err:
        p.parse_info("\n".join(lines[:10]) + "\n| 1     910B4   | OK   |\n")
    assert err.value.line_no == 11 and "910B4" in (err.value.line or "")


def test_truncated_topology_and_vnpu() -> None:
    with pytest.raises(NpuSmiParseError, match="truncated"):
        p.parse_topology("\n".join(sample("S12-topo-910b-hccs.txt").splitlines()[:5]))
    with pytest.raises(NpuSmiParseError):
        p.parse_vnpu_info("\n".join(sample("V5-info-vnpu-two.txt").splitlines()[:9]))
    with pytest.raises(NpuSmiParseError, match="Total number of vnpu: 2"):
        p.parse_vnpu_info("\n".join(sample("V5-info-vnpu-two.txt").splitlines()[:14]))


def test_hanging_npu_smi_times_out(fake_node) -> None:
    node = fake_node("910b4-8")
    node.run("fake", "inject", "info", "hang", "--seconds", "60")
    client = NpuSmi(node.path, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(NpuSmiTimeout) as err:
        client.info()
    assert time.monotonic() - started < 5
    assert err.value.timeout_s == 0.5 and "info" in str(err.value)
    assert client.topology().link("NPU0", "NPU1") == "HCCS"  # other commands are unaffected


def test_garbage_and_truncated_from_the_binary(fake_node) -> None:
    node = fake_node("910b4-8")
    client = NpuSmi(node.path)
    node.run("fake", "inject", "info", "garbage", "--times", "1")
    with pytest.raises(NpuSmiParseError):
        client.info()
    assert len(client.info().chips) == 8  # the fault was one-shot
    node.run("fake", "inject", "info -t topo", "truncate")
    with pytest.raises(NpuSmiParseError):
        client.topology()


def test_failing_and_missing_binary(fake_node, tmp_path) -> None:
    node = fake_node("910b4-8")
    node.run("fake", "inject", "info -m", "fail")
    with pytest.raises(NpuSmiCommandFailed) as err:
        NpuSmi(node.path).chip_map()
    assert err.value.returncode == 1 and "Failed to get device info." in str(err.value)
    with pytest.raises(NpuSmiNotFound):
        NpuSmi(str(tmp_path / "no-such-npu-smi")).info()


def test_unsupported_is_typed(fake_node) -> None:
    node = fake_node("910b4-8")
    node.run("fake", "inject", "info -t topo", "unsupported")
    with pytest.raises(NpuSmiUnsupported):
        NpuSmi(node.path).topology()


def test_invalid_card_id(fake_node) -> None:
    node = fake_node("910b4-8")
    proc = node.run("info", "-t", "health", "-i", "9", check=False)
    assert proc.returncode == 1 and proc.stdout == "Invalid card id.\nError parameter of -i\n"
    with pytest.raises(NpuSmiCommandFailed, match="Error parameter of -i"):
        NpuSmi(node.path).health(9)


def test_an_info_table_cut_at_a_chips_border_is_read_again_against_the_topology_count(tmp_path: Path) -> None:
    """Cut exactly after a chip's closing border, ``npu-smi info`` still parses (a real npu-smi may print no
    process table), as fewer chips; discovery compares it with the ``-t topo`` matrix, which lists every NPU, and
    reads ``info`` again instead of serving half the node until a restart (a chip that stays missing is served
    without, with a warning: the others still work)."""
    from fuyao.inventory import discover
    from fuyao.npusmi.models import PhyIdRemap

    lines = sample("S1-info-910b4-8.txt").splitlines()
    borders = [i for i, line in enumerate(lines) if line.startswith("+====")]
    short = p.parse_info("\n".join(lines[:borders[4] + 1]) + "\n")  # the header's border, then 4 chips
    full = p.parse_info(sample("S1-info-910b4-8.txt"))
    assert len(short.chips) == 4 and len(full.chips) == 8

    class CutNpuSmi:
        def __init__(self, answers: list[object]) -> None:
            self.answers = answers

        def info(self) -> object:
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

        def topology(self) -> object:
            return p.parse_topology(sample("S12-topo-910b-hccs.txt"))

        def chip_map(self) -> object:
            raise NpuSmiUnsupported("info -m", "not here")

        def common(self, npu_id: int) -> object:
            raise NpuSmiUnsupported("common", "not here")

        def phyid_remap(self, phy_id: int) -> object:  # the host's NPU i is /dev/davinci<i>
            return PhyIdRemap(phy_id=phy_id, logic_id=phy_id, npu_id=phy_id, chip_id=0)

    for i in range(8):
        (tmp_path / f"davinci{i}").touch()
    assert len(discover(CutNpuSmi([short, full]), "/nonexistent", tmp_path).devices) == 8  # type: ignore[arg-type]
    assert len(discover(CutNpuSmi([short]), "/nonexistent", tmp_path).devices) == 4  # type: ignore[arg-type]


def test_close_from_a_signal_handler_inside_a_running_call_does_not_deadlock() -> None:
    # SIGTERM lands on the main thread while it is inside run()'s locked section (starting npu-smi); the handler
    # calls close(), which takes the same lock: a plain Lock deadlocked the plugin until the kubelet's SIGKILL
    import threading

    from fuyao.npusmi.client import NpuSmi

    client = NpuSmi("/bin/true")
    done = threading.Event()

    def handler_inside_run() -> None:
        with client._running_lock:  # what run() holds while it starts the process
            client.close()
        done.set()

    threading.Thread(target=handler_inside_run, daemon=True).start()
    assert done.wait(5), "close() deadlocked on the lock its own thread held"
    with pytest.raises(Exception, match="closed"):
        client.run(["info"])


def test_a_garbled_npu_id_is_named_not_taken_for_a_new_table() -> None:
    # one chip row with a non-numeric NPU id was read as an unknown table's header: every chip after it vanished
    text = sample("S1-info-910b4-8.txt")
    assert len(p.parse_info(text).chips) == 8
    garbled = text.replace("| 3     910B4", "| x     910B4", 1)
    assert garbled != text
    with pytest.raises(NpuSmiParseError) as err:
        p.parse_info(garbled)
    assert "not a number" in str(err.value) and "'x'" in str(err.value) and err.value.line_no
