"""npu-smi's output formats, printed from a simulated node state.

Widths and wording follow real captures (docs/npu-smi-formats.md, tests/samples/): the 98-column A2/A3 frame
(910B, 910 A1, 910C with its ``Chip  Phy-ID`` header and full-width dash between dies) and the 106-column 310P
frame (``Chip    Device``, no HBM column, power ``NA``). Key/value reports are ``\\t%-30s : %s``.
"""

from __future__ import annotations

from typing import Any

from . import state as st

KV = "\t{:<30} : {}"

LEGEND = """
Legend:

  X    = Self
  SYS  = Path traversing PCIe and NUMA nodes. Nodes are connected through SMP, such as QPI, UPI.
  PHB  = Path traversing PCIe and the PCIe host bridge of a CPU.
  PIX  = Path traversing a single PCIe switch
  PXB  = Path traversing multipul PCIe switches
  HCCS = Connection traversing HCCS.
  NA   = Unknown relationship.
"""
LEGEND_A3_EXTRA = "  SIO  = Path traversing the SIO bus\n  HCCS_SW = Connection traversing HCCS through a switch\n"


def _kv(pairs: list[tuple[str, Any]]) -> str:
    return "\n".join(KV.format(k, v) for k, v in pairs) + "\n"


def reset_result(status: str, message: str) -> str:
    """``npu-smi set -t reset`` after the prompt (npu_set_print.c): progress, then status and result."""
    return _kv([("Message", "resetting ..."), ("Status", status), ("Message", message)])


def _is_310p(s: dict[str, Any]) -> bool:
    return str(s["chip_model"]).upper().startswith("310")


def _pair(used: Any, total: Any, used_width: int, total_width: int) -> str:
    return f"{used!s:<{used_width}}/ {total!s:<{total_width}}"


# ----------------------------------------------------------------------------------------------------------------
# npu-smi info
# ----------------------------------------------------------------------------------------------------------------
def info(s: dict[str, Any]) -> str:
    return _info_310p(s) if _is_310p(s) else _info_a2(s)


def _info_a2(s: dict[str, Any]) -> str:
    multi_die = s["dies_per_npu"] > 1
    full = "+" + "-" * 96 + "+"
    cols = "+" + "-" * 27 + "+" + "-" * 15 + "+" + "-" * 52 + "+"
    heavy = cols.replace("-", "=")
    version = s["driver_version"]
    lines = [full, "| " + f"npu-smi {version:<24} Version: {version:<52}"[:94].ljust(94) + " |", cols,
             "| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|",
             "| Chip  Phy-ID              | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |"
             if multi_die else
             "| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |",
             heavy]
    for c in st.chips(s):
        power = "-" if c["power_w"] is None else f"{c['power_w']:.1f}"
        hp_used, hp_total = c["hugepages"]
        lines.append(f"| {c['npu']:<5} {_name(s):<19} | {c['health']:<13} | {power:<11} {c['temp_c']:<17} "
                     f"{_pair(hp_used, hp_total, 5, 14)}|")
        ddr_used, ddr_total = c.get("ddr_mb", [0, 0])
        second = f"{c['chip']:<5} {c['phy']:<19}" if multi_die else f"{c['chip']:<25}"
        lines.append(f"| {second} | {c['bus_id']:<13} | {c['aicore_percent']:<11} "
                     f"{_pair(ddr_used, ddr_total, 5, 11)}{_pair(c['memory_used_mb'], s['memory_mb'], 5, 14)}|")
        last_die = c["chip"] == s["dies_per_npu"] - 1
        lines.append(heavy if last_die else full)
    lines += [cols, "| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |",
              heavy]
    lines += _processes(s, heavy, lambda p: f"| {p['npu']:<7} {p['chip']:<17} | {p['pid']:<13} | "
                                            f"{p.get('name', ''):<24} | {p['memory_mb']:<23} |", 94)
    return "\n".join(lines) + "\n"


def _info_310p(s: dict[str, Any]) -> str:
    full = "+" + "-" * 104 + "+"
    cols = "+" + "-" * 31 + "+" + "-" * 17 + "+" + "-" * 54 + "+"
    heavy = cols.replace("-", "=")
    version = s["driver_version"]
    lines = [full, f"| npu-smi {version:<40} Version: {version:<44} |", cols,
             "| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |",
             "| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |",
             heavy]
    for c in st.chips(s):
        hp_used, hp_total = c["hugepages"]
        npu_label = _card_id(s, c["npu"])
        lines.append(f"| {npu_label:<7} {_name(s):<22}| {c['health']:<15} | {'NA':<12} {c['temp_c']:<17} "
                     f"{_pair(hp_used, hp_total, 6, 13)} |")
        lines.append(f"| {c['chip']:<7} {c['phy']:<22}| {c['bus_id']:<15} | {c['aicore_percent']:<12} "
                     f"{_pair(c['memory_used_mb'], s['memory_mb'], 5, 32)} |")
        lines.append(heavy if c["chip"] == s["dies_per_npu"] - 1 else cols)
    lines += [cols,
              "| NPU     Chip                  | Process id      | Process name             | Process memory(MB)        |",
              heavy]
    lines += _processes(s, heavy, lambda p: f"| {_card_id(s, p['npu']):<7} {p['chip']:<22}| {p['pid']:<15} | "
                                            f"{p.get('name', ''):<24} | {p['memory_mb']:<25} |", 102)
    return "\n".join(lines) + "\n"


def _processes(s: dict[str, Any], heavy: str, row: Any, width: int) -> list[str]:
    out: list[str] = []
    for npu in range(s["npu_count"]):
        procs = [p for p in s["processes"] if p["npu"] == npu]
        if procs:
            out += [row(p) for p in procs]
        else:
            out.append(f"| {'No running processes found in NPU ' + str(_card_id(s, npu)):<{width}} |")
        out.append(heavy)
    return out


def _name(s: dict[str, Any]) -> str:
    """Name column: the A3 prints 'Ascend910' for both dies; others print the chip model."""
    return str(s.get("table_name") or s["chip_model"])


def _card_id(s: dict[str, Any], npu: int) -> int:
    """310P hosts number cards by PCIe slot (0, 32, 96...); ``card_ids`` overrides the 0..N-1 default."""
    ids = s.get("card_ids")
    return ids[npu] if ids else npu


def card_index(s: dict[str, Any], card_id: int) -> int | None:
    ids = s.get("card_ids") or list(range(s["npu_count"]))
    return ids.index(card_id) if card_id in ids else None


# ----------------------------------------------------------------------------------------------------------------
# Key/value reports
# ----------------------------------------------------------------------------------------------------------------
def npu_list(s: dict[str, Any]) -> str:
    out = [KV.format("Total Count", s["npu_count"]), ""]
    for npu in range(s["npu_count"]):
        out += [KV.format("NPU ID", _card_id(s, npu)), KV.format("Chip Count", s["dies_per_npu"]), ""]
    return "\n".join(out)


def chip_map(s: dict[str, Any]) -> str:
    multi_die = s["dies_per_npu"] > 1
    header = ["NPU ID", "Chip ID", "Chip Logic ID"] + (["Chip Phy-ID"] if multi_die else []) + ["Chip Name"]
    out = ["\t" + " ".join(f"{h:<30}" for h in header)]
    chip_name = s.get("table_name") or f"Ascend {s['chip_model']}"
    for npu in range(s["npu_count"]):
        card = _card_id(s, npu)
        for c in (c for c in st.chips(s) if c["npu"] == npu):
            ids = [card, c["chip"], c["phy"]] + ([c["phy"]] if multi_die else [])
            out.append("\t" + " ".join(f"{v!s:<30}" for v in ids) + " " + chip_name)
        mcu = [card, s["dies_per_npu"], "-"] + (["-"] if multi_die else [])
        out.append("\t" + " ".join(f"{v!s:<30}" for v in mcu) + " " + f"{'Mcu':<30}")
    return "\n".join(out) + "\n"


def phyid_remap(s: dict[str, Any], phy: int) -> str | None:
    """``info -t phyid-remap -p P`` (``\t%-30s:%d`` lines, as Huawei's page shows); None for an unknown id."""
    match = next((c for c in st.chips(s) if c["phy"] == phy), None)
    if match is None:
        return None
    pairs = [("Chip Physical ID", phy), ("Chip Logic ID", phy), ("NPU ID", _card_id(s, match["npu"])),
             ("Chip ID", match["chip"])]
    return "".join(f"\t{k:<30}:{v}\n" for k, v in pairs)


def health(s: dict[str, Any], npu: int, chip: int | None) -> str:
    chips = [c for c in st.chips(s) if c["npu"] == npu and (chip is None or c["chip"] == chip)]
    if chip is None:
        worst = max(chips, key=lambda c: st.HEALTH_VALUES.index(_shown_health(c)))
        return _kv([("NPU ID", _card_id(s, npu)), ("Health", _shown_health(worst)),
                    *_error_lines(worst)])
    c = chips[0]
    return _kv([("Health Status", _shown_health(c)), *_error_lines(c)])


def _shown_health(c: dict[str, Any]) -> str:
    """npu-smi prints OK for Warning/Alarm/Critical when the driver returns no error code."""
    if c["health"] in ("Warning", "Alarm", "Critical") and not c["error_codes"]:
        return "OK"
    return str(c["health"])


def _error_lines(c: dict[str, Any]) -> list[tuple[str, Any]]:
    codes = c["error_codes"] if _shown_health(c) != "OK" else []
    if not codes:
        return [("Error Code", "NA"), ("Error Information", "NA")]
    infos = list(c.get("error_information") or []) + ["NA"] * len(codes)
    pairs: list[tuple[str, Any]] = [("Error Code", " ".join(codes)), ("Error Information", infos[0])]
    for extra in infos[1:len(codes)]:
        pairs.append(("\n\t" + " " * 30, extra))
    return pairs


def usages(s: dict[str, Any], npu: int) -> str:
    out = [KV.format("NPU ID", _card_id(s, npu)), KV.format("Chip Count", s["dies_per_npu"]), ""]
    for c in (c for c in st.chips(s) if c["npu"] == npu):
        out.append(_kv([
            ("DDR Capacity(MB)", 0), ("DDR Usage Rate(%)", 0), ("DDR Hugepages Total(page)", 0),
            ("DDR Hugepages Usage Rate(%)", 0), ("HBM Capacity(MB)", s["memory_mb"]),
            ("HBM Usage Rate(%)", round(100 * c["memory_used_mb"] / s["memory_mb"])),
            ("Aicore Usage Rate(%)", c["aicore_percent"]), ("Aicpu Usage Rate(%)", 0),
            ("Ctrlcpu Usage Rate(%)", 0), ("DDR Bandwidth Usage Rate(%)", 0), ("HBM Bandwidth Usage Rate(%)", 0),
            ("Chip ID", c["chip"])]))
    return "\n".join(out)


def memory(s: dict[str, Any], npu: int) -> str:
    return "\n".join(_kv([("NPU ID", _card_id(s, npu)), ("DDR Capacity(MB)", 0), ("DDR Clock Speed(MHz)", 0),
                          ("HBM Capacity(MB)", s["memory_mb"]), ("HBM Clock Speed(MHz)", 1600),
                          ("HBM Temperature(C)", c["temp_c"]), ("HBM Manufacturer ID", "0x57"),
                          ("Chip ID", c["chip"])])
                     for c in st.chips(s) if c["npu"] == npu)


def common(s: dict[str, Any], npu: int) -> str:
    out = [KV.format("NPU ID", _card_id(s, npu)), KV.format("Chip Count", s["dies_per_npu"]), ""]
    for c in (c for c in st.chips(s) if c["npu"] == npu):
        out.append(_kv([
            ("Chip ID", c["chip"]), ("Memory Usage Rate(%)", 0),
            ("HBM Usage Rate(%)", round(100 * c["memory_used_mb"] / s["memory_mb"])),
            ("Aicore Usage Rate(%)", c["aicore_percent"]), ("Aicore Freq(MHZ)", 1800),
            ("Aicore curFreq(MHZ)", 1800), ("Aicore Count", s["aicore"]), ("Temperature(C)", c["temp_c"]),
            ("NPU Real-time Power(W)", "-" if c["power_w"] is None else c["power_w"])]))
    out.append(_kv([("Chip Name", "mcu"), ("Temperature(C)", 40)]))
    return "\n".join(out)


def board(s: dict[str, Any], npu: int, chip: int | None) -> str:
    c = st.chip(s, npu, 0 if chip is None else chip)
    if c is None:
        raise st.StateError(f"no chip {0 if chip is None else chip} on NPU {npu}")
    if chip is None:
        return _kv([("NPU ID", _card_id(s, npu)), ("Software Version", s["driver_version"]),
                    ("Firmware Version", "7.5.0.1.220"), ("Compatibility", "OK"), ("Board ID", "0x02"),
                    ("PCB ID", "A"), ("BOM ID", 1), ("PCIe Bus Info", c["bus_id"]), ("Slot ID", npu),
                    ("Class ID", "NA"), ("PCI Vendor ID", "0x19e5"), ("PCI Device ID", st.pci_device_id(s).upper().replace("0X", "0x")),
                    ("Subsystem Vendor ID", "0x0200"), ("Subsystem Device ID", "0x0100"),
                    ("Chip Count", s["dies_per_npu"])])
    return _kv([("NPU ID", _card_id(s, npu)), ("Chip ID", chip), ("Chip Type", "Ascend"),
                ("Chip Name", s["chip_model"]), ("Chip Version", "V1"), ("Board ID", "0x02"),
                ("PCIe Bus Info", c["bus_id"]), ("Firmware Version", "7.5.0.1.220")])


# ----------------------------------------------------------------------------------------------------------------
# Topology
# ----------------------------------------------------------------------------------------------------------------
def link(s: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> str:
    """Link kind between two dies for the node's topology kind."""
    if a["phy"] == b["phy"]:
        return "X"
    kind = s["topology"]
    if kind == "hccs-mesh":
        if s["dies_per_npu"] > 1 and a["npu"] == b["npu"]:
            return "SIO"
        return "HCCS"
    if kind == "hccs-ring":
        return "HCCS" if a["npu"] // 4 == b["npu"] // 4 else "SYS"
    if kind == "hccs-halves":  # 16-NPU 910B servers: two HCCS meshes of 8
        return "HCCS" if a["npu"] // 8 == b["npu"] // 8 else "SYS"
    if kind == "pcie":
        affinity = s.get("cpu_affinity") or []
        same_numa = not affinity or affinity[a["npu"]] == affinity[b["npu"]]
        if a["npu"] // 2 == b["npu"] // 2:
            return "PIX"
        return "PHB" if same_numa else "SYS"
    return "NA"


def topo(s: dict[str, Any]) -> str:
    chips = st.chips(s)
    multi_die = s["dies_per_npu"] > 1
    label = (lambda c: f"Phy-ID{c['phy']:<5}") if multi_die else (lambda c: f"NPU{c['phy']:<8}")
    affinity = s.get("cpu_affinity")
    header = "\t   " + "".join(label(c) for c in chips) + ("CPU Affinity" if affinity else "")
    lines = [header.rstrip()]
    for a in chips:
        row = label(a) + "".join(f"{link(s, a, b):<11}" for b in chips)
        lines.append((row + affinity[a["npu"]]) if affinity else row.rstrip())
    legend = LEGEND + (LEGEND_A3_EXTRA if multi_die else "")
    return "\n".join(lines) + "\n" + legend


# ----------------------------------------------------------------------------------------------------------------
# vNPU
# ----------------------------------------------------------------------------------------------------------------
def template_info(s: dict[str, Any]) -> str:
    bar = "+" + "-" * 90 + "+"
    out = [bar, f"|{'NPU instance template info is:':<90}|",
           "|Name                AICORE    Memory    AICPU     VPC            VENC           JPEGD     |",
           "|                               GB                 PNGD           VDEC           JPEGE     |",
           "|" + "=" * 90 + "|"]
    for t in s["templates"]:
        media = t.get("media", [0, 0, 0, 0, 0, 0])
        memory = int(t["memory_gb"]) if float(t["memory_gb"]).is_integer() else t["memory_gb"]
        out.append(f"|{t['name']:<19} {t['aicore']:<9} {memory:<9} {t['aicpu']:<9} {media[0]:<14} "
                   f"{media[1]:<14} {media[2]:<10}|")
        out.append(f"|{'':<49} {media[3]:<14} {media[4]:<14} {media[5]:<10}|")
        out.append(bar)
    return "\n".join(out) + "\n"


def vnpu_info(s: dict[str, Any], npu: int, chip: int) -> str:
    bar = "+" + "-" * 79 + "+"
    free = st.chip_free(s, npu, chip)

    def ft(f: float, t: float) -> str:
        return f"{int(f)}/{int(t)}"

    values = [ft(free["aicore"], s["aicore"]), ft(free["memory_gb"], st.vnpu_memory_gb(s)),
              ft(free["aicpu"], s["aicpu"]), "9/9", "0/0", "2/2", "24/24", "4/4", "NA/NA"]
    row = "| {:<9} {:<9} {:<8} {:<6} {:<7} {:<7} {:<8} {:<8} {:<8}|".format(*values)
    vnpus = [v for v in s["vnpus"] if v["npu"] == npu and v["chip"] == chip]
    out = [bar, f"| {'NPU resource static info as follow:':<78}|",
           "| Format:Free/Total                   NA: Currently, query is not supported.    |",
           "| AICORE    Memory    AICPU    VPC    VENC    VDEC    JPEGD    JPEGE    PNGD    |",
           f"|{'            GB':<79}|",
           "|" + "=" * 79 + "|", row, bar,
           f"| Total number of vnpu: {len(vnpus):<2}                                                      |", bar]
    if vnpus:
        out += ["|  Vnpu ID  |  Vgroup ID     |  Container ID  |  Status  |  Template Name       |", bar]
        for v in sorted(vnpus, key=lambda v: v["vnpu_id"]):
            out += [f"|  {v['vnpu_id']:<9}|  {v.get('vgroup', 0):<14}|  {v.get('container_id', '000000000000'):<14}|"
                    f"  {v.get('status', 0):<8}|  {v['template']:<20}|", bar]
    return "\n".join(out) + "\n"


def set_ok(message: str) -> str:
    return _kv([("Status", "OK"), ("Message", message)])
