"""A stand-in for Huawei's ``npu-smi``: same commands, same output formats, state from a JSON file.

    npu-smi info | info -l | info -m | info -t TYPE [-i N] [-c C]
    npu-smi set -t create-vnpu -i N -c C -f TEMPLATE [-v ID] [-g VGROUP]
    npu-smi set -t destroy-vnpu -i N -c C -v ID
    npu-smi set -t reset -i N -c C          (asks for confirmation on stdin, as the real tool does)
    npu-smi -v

plus ``fake ...`` commands (not in the real tool) that change the simulated node: ``fake init``, ``fake
set-health``, ``fake set-link``, ``fake inject``, ``fake clear-faults``, ``fake bind-vnpu``, ``fake unbind-vnpu``,
``fake show``,
``fake presets``. The node is the JSON file
named by ``FAKE_NPU_SMI_STATE`` (or, read-only, the preset named by ``FAKE_NPU_SMI_PRESET``, default 910b4-8).
With ``FAKE_NPU_SMI_DEV`` set, creating a vNPU also makes ``vdavinci<id>`` in that directory and destroying it
removes it, as the driver does with ``/dev``.

Exit codes: 0 on success; 1 for invalid parameters and failed ``set`` commands (the exit status real npu-smi uses
for these is not documented; its messages are reproduced exactly). Standard library only.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from typing import Any

from . import render
from . import state as st

QUERY_TYPES = ("health", "usages", "memory", "board", "common", "topo", "template-info", "info-vnpu", "phyid-remap")
USAGE = """Usage: npu-smi <Command|-h|-v> [Options...]

npu-smi Command:
        -h            This command's help information
        --help        This command's help information
        -v            Show npu-smi version information
        info          Show hardware details
        set           Modify device configuration properties
"""
GARBAGE = "\x1b[0m\ufffd\ufffd npu-smi: dcmi_get_device_info failed ret=-8005 |||| 0x7f3c \ufffd\n+--+\n| ?? |\n"


class Failure(Exception):
    """Print ``message`` and exit with ``code``."""

    def __init__(self, message: str, code: int = 1):
        self.message = message
        self.code = code
        super().__init__(message)


def _options(args: list[str], allowed: str) -> dict[str, str]:
    """Parse ``-x VALUE`` pairs in any order; an unknown flag or a missing value is npu-smi's parameter error."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("-") or flag[1:] not in allowed or i + 1 >= len(args):
            if flag == "-i":
                raise Failure("Invalid card id.\nError parameter of -i")
            raise Failure(f"Error parameter of {flag}")
        out[flag[1:]] = args[i + 1]
        i += 2
    return out


def _card(s: dict[str, Any], opts: dict[str, str]) -> int:
    raw = opts.get("i")
    index = render.card_index(s, int(raw)) if raw is not None and raw.isdigit() else None
    if index is None:
        raise Failure("Invalid card id.\nError parameter of -i")
    return index


def _chip_id(s: dict[str, Any], opts: dict[str, str], required: bool) -> int | None:
    raw = opts.get("c")
    if raw is None:
        if required:
            raise Failure("Invalid chip id.\nError parameter of -c")
        return None
    if not raw.isdigit() or int(raw) >= s["dies_per_npu"]:
        raise Failure("Invalid chip id.\nError parameter of -c")
    return int(raw)


def info(s: dict[str, Any], args: list[str]) -> str:
    if not args:
        return render.info(s)
    if args == ["-l"]:
        return render.npu_list(s)
    if args == ["-m"]:
        return render.chip_map(s)
    opts = _options(args, "ticp")
    kind = opts.get("t")
    if kind not in QUERY_TYPES:
        raise Failure("Error parameter of -t")
    if kind == "phyid-remap":
        raw = opts.get("p", "")
        text = render.phyid_remap(s, int(raw)) if raw.isdigit() else None
        if text is None:
            raise Failure("Error parameter of -p")
        return text
    if kind == "topo":
        if s["topology"] == "unsupported":
            return "This device does not support querying topo.\n"
        return render.topo(s)
    if kind == "template-info":
        if not s["templates"]:
            return "This device does not support querying template-info.\n"
        if "i" in opts:
            _card(s, opts)
        return render.template_info(s)
    npu = _card(s, opts)
    if kind == "health":
        return render.health(s, npu, _chip_id(s, opts, required=False))
    if kind == "usages":
        return render.usages(s, npu)
    if kind == "memory":
        return render.memory(s, npu)
    if kind == "common":
        return render.common(s, npu)
    if kind == "board":
        return render.board(s, npu, _chip_id(s, opts, required=False))
    if not s["templates"]:
        return "This device does not support querying info-vnpu.\n"
    return render.vnpu_info(s, npu, _chip_id(s, opts, required=True) or 0)


def set_command(args: list[str]) -> str:
    opts = _options(args, "ticfvg")
    kind = opts.get("t")
    if kind not in ("create-vnpu", "destroy-vnpu", "reset"):
        raise Failure("Error parameter of -t")
    if kind == "reset":
        return _reset(opts)
    with st.locked_update() as s:
        npu = _card(s, opts)
        chip = _chip_id(s, opts, required=True)
        assert chip is not None
        phy = npu * s["dies_per_npu"] + chip
        if kind == "create-vnpu":
            return _create(s, npu, chip, phy, opts)
        return _destroy(s, npu, chip, opts)


def _create(s: dict[str, Any], npu: int, chip: int, phy: int, opts: dict[str, str]) -> str:
    if not s["templates"]:
        raise Failure("This device does not support setting create-vnpu.")
    template = st.template(s, opts.get("f", ""))
    if template is None:
        raise Failure("create vnpu failed.")
    used = {v["vnpu_id"] for v in s["vnpus"]}
    allowed = st.vnpu_id_range(s, phy)
    if "v" in opts:
        if not opts["v"].isdigit() or int(opts["v"]) not in allowed or int(opts["v"]) in used:
            raise Failure("create vnpu failed.")
        vnpu_id = int(opts["v"])
    else:
        vnpu_id = next((v for v in allowed if v not in used), -1)
        if vnpu_id < 0:
            raise Failure("create vnpu failed.")
    free = st.chip_free(s, npu, chip)
    # what npu-smi checks before asking the driver (npu_chip_set.c): AICores and AICPUs, not memory (the driver
    # gives the vNPU its share of what it does not keep for itself: st.vnpu_takes_gb)
    if template["aicore"] > free["aicore"]:
        raise Failure("Insufficient number of cores available, create vnpu failed.")
    if template["aicpu"] > free["aicpu"]:
        raise Failure("Insufficient number of AICPU available, create vnpu failed.")
    groups = {v.get("vgroup", 0) for v in s["vnpus"] if v["npu"] == npu and v["chip"] == chip}
    vgroup = int(opts["g"]) if opts.get("g", "").isdigit() else next(g for g in range(64) if g not in groups)
    s["vnpus"].append({"npu": npu, "chip": chip, "vnpu_id": vnpu_id, "template": template["name"],
                       "vgroup": vgroup, "container_id": "000000000000", "status": 0})
    st.vnpu_device_node(vnpu_id, present=True)
    return render.set_ok("Create vnpu success")


def _destroy(s: dict[str, Any], npu: int, chip: int, opts: dict[str, str]) -> str:
    raw = opts.get("v", "")
    match = next((v for v in s["vnpus"] if str(v["vnpu_id"]) == raw and v["npu"] == npu and v["chip"] == chip),
                 None)
    if match is None or int(match.get("status", 0)) != 0:
        raise Failure(f"destroy vnpu {raw} failed.")
    s["vnpus"].remove(match)
    st.vnpu_device_node(match["vnpu_id"], present=False)
    return render.set_ok(f"Destroy vnpu {raw} success")


RESET_PROMPT = ("Resetting the standard PCIe card or NPU chip may cause a system hang or abnormal reset during service "
                "running.\nAre you sure you want to continue resetting?(Y/N)")


def _reset(opts: dict[str, str]) -> str:
    """Hot reset of a chip (npu_chip_set.c): a risk warning and a Y/N question on stdin, then the result. The reset
    clears the chip's health and error codes unless the fault was set with ``--survives-reset`` (the fault comes
    back at once) or ``--reset-fails`` (the driver fails the reset). Every reset is counted in the chip's
    ``resets``."""
    sys.stdout.write(RESET_PROMPT + "\n")
    sys.stdout.flush()
    reply = sys.stdin.readline().strip()
    if reply not in ("Y", "y"):
        return render.reset_result("Fail", "User aborts reset chip by outband.")
    with st.locked_update() as s:
        npu = _card(s, opts)
        chip = _chip_id(s, opts, required=True)
        assert chip is not None
        override = s["chips"].setdefault(f"{npu}-{chip}", {})
        override["resets"] = int(override.get("resets", 0)) + 1
        if override.get("reset_fails"):
            return render.reset_result("Fail", "Failed to reset chip")
        if not override.get("survives_reset"):
            for key in ("health", "error_codes", "error_information"):
                override.pop(key, None)
    return render.reset_result("OK", "Reset chip successfully.")


def _apply_fault(argv: list[str], s: dict[str, Any]) -> dict[str, Any] | None:
    """Act on the first fault whose glob matches the command line (before the command runs). Returns it."""
    line = " ".join(argv)
    fault: dict[str, Any] | None = next((f for f in s["faults"] if fnmatch.fnmatchcase(line, f["command"])), None)
    if fault is None:
        return None
    if fault.get("times") is not None and st.state_path():
        with st.locked_update() as locked:
            for f in locked["faults"]:
                if f == fault:
                    f["times"] -= 1
                    if f["times"] <= 0:
                        locked["faults"].remove(f)
                    break
    mode = fault["mode"]
    if mode == "hang":
        time.sleep(float(fault.get("seconds", 3600)))
    elif mode == "garbage":
        sys.stdout.write(GARBAGE)
    elif mode == "fail":
        raise Failure(fault.get("message", "Failed to get device info."), int(fault.get("exit_code", 1)))
    elif mode == "unsupported":
        sys.stdout.write(f"This device does not support querying {argv[-1] if argv else 'info'}.\n")
    return fault


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] == "fake":
        return fake(argv[1:])
    try:
        s = st.read()
    except (st.StateError, OSError) as exc:
        sys.stderr.write(f"fake npu-smi: bad state: {exc}\n")
        return 2
    try:
        fault = _apply_fault(argv, s)
        mode = fault["mode"] if fault else None
        if mode in ("hang", "garbage", "unsupported"):
            return 0
        if argv[0] == "-v":
            out = f"npu-smi version: {s['driver_version']}\n"
        elif argv[0] == "info":
            out = info(s, argv[1:])
        elif argv[0] == "set":
            out = set_command(argv[1:])
        else:
            raise Failure(f"Error parameter of {argv[0]}")
        if mode == "truncate":
            out = out[: len(out) // 2]
        if mode == "hang-after":  # the command took effect, then the tool hangs (a wedged driver call)
            sys.stdout.write(out)
            sys.stdout.flush()
            time.sleep(float(fault.get("seconds", 3600)) if fault else 0)
            return 0
    except Failure as exc:
        sys.stdout.write(exc.message + "\n")
        return exc.code
    except st.StateError as exc:
        sys.stderr.write(f"fake npu-smi: bad state: {exc}\n")
        return 2
    sys.stdout.write(out)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# fake ...: change the simulated node
# ----------------------------------------------------------------------------------------------------------------
def fake(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="npu-smi fake", description="Change the simulated NPU node.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="write a state file from a preset")
    p.add_argument("--preset", default=st.DEFAULT_PRESET, choices=st.preset_names())
    p.add_argument("--state", help=f"state file (default ${st.STATE_ENV})")
    p = sub.add_parser("set-health", help="set one chip's health (and error codes)")
    p.add_argument("-i", type=int, required=True, help="NPU (card) index")
    p.add_argument("-c", type=int, default=0, help="chip/die index")
    p.add_argument("health", choices=st.HEALTH_VALUES)
    p.add_argument("--code", action="append", default=[], help="error code, e.g. 80E01801 (repeatable)")
    p.add_argument("--survives-reset", action="store_true", help="a hot reset reports success but the fault stays")
    p.add_argument("--reset-fails", action="store_true", help="a hot reset of this chip fails")
    p = sub.add_parser("set-link", help="set one chip's RoCE link (hccn_tool -link -g)")
    p.add_argument("-i", type=int, required=True, help="NPU (card) index")
    p.add_argument("-c", type=int, default=0, help="chip/die index")
    p.add_argument("link", choices=("UP", "DOWN"))
    p = sub.add_parser("inject", help="make commands matching a glob hang (before, or after taking effect: "
                                      "hang-after), print garbage, truncate or fail")
    p.add_argument("command", help="glob over the command line, e.g. 'info -t topo' or 'info*'")
    p.add_argument("mode", choices=st.FAULT_MODES)
    p.add_argument("--times", type=int, help="only the next N matching calls")
    p.add_argument("--seconds", type=float, default=3600.0, help="how long 'hang' sleeps")
    sub.add_parser("clear-faults", help="remove every injected fault")
    p = sub.add_parser("bind-vnpu", help="mark a vNPU as used by a container (npu-smi then refuses to destroy it)")
    p.add_argument("vnpu_id", type=int)
    p.add_argument("--container", default="3f2a9c1d0b7e", help="container id shown by info-vnpu")
    p = sub.add_parser("unbind-vnpu", help="the container using a vNPU went away")
    p.add_argument("vnpu_id", type=int)
    p = sub.add_parser("sysfs", help="write a sysfs tree (bus/pci/devices) with the node's NPUs, for node feature "
                                     "discovery")
    p.add_argument("--root", required=True, help="directory to write under (a fake /sys)")
    sub.add_parser("show", help="print the expanded state as JSON")
    sub.add_parser("presets", help="list the presets")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "presets":
            print("\n".join(st.preset_names()))
        elif args.cmd == "sysfs":
            st.write_sysfs(st.read(), args.root)
        elif args.cmd == "show":
            print(json.dumps(st.read(), indent=2, sort_keys=True))
        elif args.cmd == "init":
            path = args.state or st.state_path()
            if not path:
                parser.error(f"--state or ${st.STATE_ENV} is required")
            st.write(path, st.expand({"preset": args.preset}))
        else:
            with st.locked_update() as s:
                if args.cmd in ("set-health", "set-link"):
                    if not (0 <= args.i < s["npu_count"] and 0 <= args.c < s["dies_per_npu"]):
                        raise st.StateError(f"no chip {args.i}-{args.c} on this node")
                    chip = s["chips"].setdefault(f"{args.i}-{args.c}", {})
                if args.cmd == "set-link":
                    chip["link"] = args.link
                elif args.cmd == "set-health":
                    chip["health"] = args.health
                    chip["error_codes"] = args.code if args.health != "OK" else []
                    for flag in ("survives_reset", "reset_fails"):
                        if getattr(args, flag) and args.health != "OK":
                            chip[flag] = True
                        else:
                            chip.pop(flag, None)
                elif args.cmd == "inject":
                    fault = {"command": args.command, "mode": args.mode, "seconds": args.seconds}
                    if args.times:
                        fault["times"] = args.times
                    s["faults"].append(fault)
                elif args.cmd == "clear-faults":
                    s["faults"] = []
                elif args.cmd in ("bind-vnpu", "unbind-vnpu"):
                    vnpu = next((v for v in s["vnpus"] if v["vnpu_id"] == args.vnpu_id), None)
                    if vnpu is None:
                        raise st.StateError(f"no vNPU {args.vnpu_id}")
                    bound = args.cmd == "bind-vnpu"
                    vnpu["container_id"] = args.container if bound else "000000000000"
                    vnpu["status"] = 1 if bound else 0
    except (st.StateError, OSError) as exc:
        sys.stderr.write(f"npu-smi fake: {exc}\n")
        return 2
    return 0


def main() -> None:
    try:
        code = run(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
