"""Parsers for npu-smi output: by headers and keys, never by fixed offsets.

Real output varies by chip and driver (multi-die NPUs with a ``Chip Phy-ID`` header, 310P tables without an HBM
column, ``NA`` and ``-`` cells, TABs shown as spaces). Unknown lines are skipped with a debug log; a table that
cannot be understood raises :class:`NpuSmiParseError` with the offending line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import NpuSmiParseError, NpuSmiTruncated, NpuSmiUnsupported
from .models import (
    ChipMapping,
    ChipStatus,
    Fraction,
    FreeTotal,
    HealthReport,
    KeyValueReport,
    NpuCount,
    NpuHealthState,
    NpuSmiInfo,
    PhyIdRemap,
    ProcessRow,
    SetResult,
    Topology,
    VnpuEntry,
    VnpuInfo,
    VnpuTemplate,
)

log = logging.getLogger(__name__)
_N = TypeVar("_N", int, float)

_MISSING = {"", "NA", "N/A", "-", "--"}
_SEPARATOR = re.compile(r"^\+[-=+]+\+$")
_COLUMN_GAP = re.compile(r"\s{2,}|\t+")
_SLASH = re.compile(r"\s*/\s*")
_KEY_VALUE = re.compile(r"^\s*([^:]*?[^:\s])\s*:\s?(.*?)\s*$")
_UNSUPPORTED = re.compile(r"does not support|not support(ed)?\b", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------------
# Cell values
# ----------------------------------------------------------------------------------------------------------------
def _missing(text: str | None) -> bool:
    return text is None or text.strip().upper() in _MISSING


def _to_number(text: str | None, kind: type[_N]) -> _N | None:
    """A cell as a number; missing markers and non-numbers are None."""
    if text is None or _missing(text):
        return None
    try:
        return kind(text.strip())
    except ValueError:
        return None


def _to_int(text: str | None) -> int | None:
    return _to_number(text, int)


def _to_float(text: str | None) -> float | None:
    return _to_number(text, float)


def _to_fraction(text: str | None) -> Fraction | None:
    if text is None or _missing(text) or "/" not in text:
        return None
    used, _, total = text.partition("/")
    return Fraction(used=_to_float(used), total=_to_float(total))


def _fields(header: str) -> list[str]:
    """Header cell → field names: fields are separated by two or more spaces (or TABs)."""
    return [f for f in _COLUMN_GAP.split(header.strip()) if f]


def _tokens(cell: str) -> list[str]:
    """Value cell → tokens: ``12 / 34`` is one token ``12/34``; otherwise split on white space."""
    return _SLASH.sub("/", cell.strip()).split()


def _assign(fields: Sequence[str], tokens: Sequence[str]) -> dict[str, str | None]:
    """Map tokens onto fields in order; surplus tokens join the last field, missing ones are None."""
    out: dict[str, str | None] = {}
    for i, name in enumerate(fields):
        if i == len(fields) - 1 and len(tokens) > len(fields):
            out[name] = " ".join(tokens[i:])
        else:
            out[name] = tokens[i] if i < len(tokens) else None
    return out


def _first_line(text: str) -> tuple[int | None, str | None]:
    """(line number, line) of the first non-blank line, for errors about output with no recognisable structure."""
    return next(((i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()), (None, None))


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# ----------------------------------------------------------------------------------------------------------------
# Boxed tables (npu-smi info, template-info, info-vnpu)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Row:
    cells: list[str]
    raw: str
    line_no: int


@dataclass
class _Block:
    rows: list[_Row]
    closed_by: str  # "=", "-" or "" (end of text)


def _boxed_blocks(text: str, what: str) -> list[_Block]:
    """Split a boxed table into blocks of bordered rows, each closed by a ``+---+`` or ``+===+`` line. Output that
    stops inside the table (the last row or border cut short, or no closing border after the last row) raises
    :class:`NpuSmiTruncated` naming the last line and what should have followed."""
    lines = text.splitlines()
    last_no = next((i for i in range(len(lines), 0, -1) if lines[i - 1].strip()), 0)
    widths = [len(ln.strip()) for ln in lines if _SEPARATOR.match(ln.strip())]
    if last_no:
        last = lines[last_no - 1].strip()
        if last.startswith("|") and not last.endswith("|"):
            raise NpuSmiTruncated(what, "output ends inside a table row (truncated?): expected the row to end with "
                                        "'|'", lines[last_no - 1], last_no)
        if re.fullmatch(r"\+[-=+]*", last) and widths and len(last) < max(widths):
            raise NpuSmiTruncated(what, f"output ends inside a border line (truncated?): expected {max(widths)} "
                                        f"characters, got {len(last)}", lines[last_no - 1], last_no)
    blocks: list[_Block] = []
    rows: list[_Row] = []
    seen_box = False
    for no, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped:
            continue
        if _SEPARATOR.match(stripped):
            seen_box = True
            blocks.append(_Block(rows, "=" if "=" in stripped else "-"))
            rows = []
        elif re.fullmatch(r"\|=+\|", stripped):
            seen_box = True
            blocks.append(_Block(rows, "="))
            rows = []
        elif stripped.startswith("|"):
            seen_box = True
            inner = stripped[1:-1] if stripped.endswith("|") and len(stripped) > 1 else stripped[1:]
            rows.append(_Row(inner.split("|"), line, no))
        else:
            log.debug("npu-smi %s: skipping unboxed line %d: %r", what, no, line)
    if not seen_box:
        first = _first_line(text)
        raise NpuSmiParseError(what, "no table found", first[1], first[0])
    if rows:
        raise NpuSmiTruncated(what, "table ends without its closing border (truncated output?): expected a "
                                    "'+---+' line after this row", rows[-1].raw, rows[-1].line_no)
    return [b for b in blocks if b.rows or b.closed_by]


def _first_token(row: _Row) -> str:
    tokens = row.cells[0].split() if row.cells else []
    return tokens[0] if tokens else ""


def _is_header(block: _Block) -> bool:
    if block.closed_by != "=" or not block.rows:
        return False
    first = _first_token(block.rows[0])
    return bool(first) and not first.lstrip("-").isdigit() and not block.rows[0].raw.strip("| ").lower().startswith(
        "no running")


_VERSION = re.compile(r"npu-smi\s+(\S+)", re.IGNORECASE)
_DRIVER = re.compile(r"Version:\s*(\S+)", re.IGNORECASE)


def parse_info(text: str) -> NpuSmiInfo:
    """``npu-smi info``: the chip table (one or more row pairs per NPU) and the process table."""
    blocks = _boxed_blocks(text, "info")
    tool_version = driver_version = None
    chips: list[ChipStatus] = []
    processes: list[ProcessRow] = []
    header: list[list[list[str]]] | None = None  # field names per cell, per header row
    kind = ""
    for block in blocks:
        if _is_header(block):
            header = [[_fields(c) for c in row.cells] for row in block.rows]
            names = {_norm(f) for row in header for cell in row for f in cell}
            if "health" in names:
                kind = "chips"
            elif "processid" in names:
                kind = "processes"
            elif kind == "chips":
                # inside the chip table, a block that starts with no number is a chip row pair whose NPU id is
                # garbled, not a new table: taking it for one dropped every chip after it in silence
                first = block.rows[0]
                raise NpuSmiParseError("info", f"a chip row's NPU id is not a number: {_first_token(first)!r}",
                                       first.raw, first.line_no)
            else:
                kind = "unknown"
                log.debug("npu-smi info: unknown table header at line %d", block.rows[0].line_no)
            continue
        for row in block.rows:
            joined = "|".join(row.cells)
            if header is None:
                if m := _VERSION.search(joined):
                    tool_version = m.group(1)
                if m := _DRIVER.search(joined):
                    driver_version = m.group(1)
                if not (tool_version or driver_version):
                    log.debug("npu-smi info: skipping line %d before any header: %r", row.line_no, row.raw)
                continue
        if header is None or kind == "unknown" or not block.rows:
            continue
        if kind == "chips":
            chips.extend(_chip_rows(block, header))
        else:
            processes.extend(_process_rows(block, header))
    if header is None:
        line = next((r for b in blocks for r in b.rows), None)
        raise NpuSmiParseError("info", "no table header (expected 'NPU  Name | Health | ...')",
                               line.raw if line else None, line.line_no if line else None)
    if not chips:
        raise NpuSmiParseError("info", "table has a header but no chip rows (truncated output?)")
    return NpuSmiInfo(tool_version=tool_version, driver_version=driver_version, chips=tuple(chips),
                      processes=tuple(processes))


def _row_values(row: _Row, header_row: list[list[str]]) -> dict[str, str | None]:
    if len(row.cells) != len(header_row):
        raise NpuSmiParseError("info", f"row has {len(row.cells)} cells, header has {len(header_row)}",
                               row.raw, row.line_no)
    values: dict[str, str | None] = {}
    for fields, cell in zip(header_row, row.cells, strict=True):
        for name, value in _assign(fields, _tokens(cell)).items():
            values[_norm(name)] = value
    return values


def _chip_rows(block: _Block, header: list[list[list[str]]]) -> Iterator[ChipStatus]:
    if len(header) < 2:
        raise NpuSmiParseError("info", "chip table header must have two rows", block.rows[0].raw,
                               block.rows[0].line_no)
    rows = block.rows
    if len(rows) % len(header):
        bad = rows[-1]
        raise NpuSmiParseError("info", f"incomplete chip entry ({len(rows)} rows, expected pairs)", bad.raw,
                               bad.line_no)
    for i in range(0, len(rows), len(header)):
        values: dict[str, str | None] = {}
        for row, header_row in zip(rows[i:i + len(header)], header, strict=True):
            values.update(_row_values(row, header_row))
        npu_id, chip_id = _to_int(values.get("npu")), _to_int(values.get("chip"))
        if npu_id is None or chip_id is None:
            raise NpuSmiParseError("info", "NPU and Chip must be integers", rows[i].raw, rows[i].line_no)
        health_raw = values.get("health") or ""
        yield ChipStatus(
            npu_id=npu_id,
            chip_id=chip_id,
            phy_id=_to_int(values.get("phyid")),
            logic_id=_to_int(values.get("device")),  # 310/310P "Device": the logic id (not /dev/davinciN)
            name=values.get("name") or "",
            health=NpuHealthState.parse(health_raw),
            health_raw=health_raw,
            bus_id=None if _missing(values.get("busid")) else values.get("busid"),
            power_w=_to_float(values.get("powerw")),
            temp_c=_to_float(values.get("tempc")),
            hugepages=_to_fraction(values.get("hugepagesusagepage")),
            aicore_percent=_to_float(values.get("aicore")),
            memory_mb=_to_fraction(values.get("memoryusagemb")),
            hbm_mb=_to_fraction(values.get("hbmusagemb")),
        )


def _process_rows(block: _Block, header: list[list[list[str]]]) -> Iterator[ProcessRow]:
    for row in block.rows:
        if row.raw.strip("| ").lower().startswith("no running"):
            continue
        values = _row_values(row, header[0])
        npu_id, chip_id, pid = _to_int(values.get("npu")), _to_int(values.get("chip")), _to_int(
            values.get("processid"))
        if npu_id is None or chip_id is None or pid is None:
            log.debug("npu-smi info: skipping process line %d: %r", row.line_no, row.raw)
            continue
        yield ProcessRow(npu_id=npu_id, chip_id=chip_id, pid=pid, name=values.get("processname"),
                         memory_mb=_process_memory_mb(values))


# ----------------------------------------------------------------------------------------------------------------
# Key : value reports
# ----------------------------------------------------------------------------------------------------------------
def parse_key_values(text: str, what: str = "report") -> KeyValueReport:
    """``Key : Value`` lines in sections separated by blank lines (``-t health``, ``-t memory``, ``-l``...)."""
    _raise_if_unsupported(text, what)
    sections: list[tuple[tuple[str, str], ...]] = []
    current: list[tuple[str, str]] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if current:
                sections.append(tuple(current))
                current = []
            continue
        m = _KEY_VALUE.match(line)
        if m and "|" not in line:
            current.append((m.group(1).strip(), m.group(2).strip()))
        else:
            log.debug("npu-smi %s: skipping line %d: %r", what, no, line)
    if current:
        sections.append(tuple(current))
    if not sections:
        first = _first_line(text)
        raise NpuSmiParseError(what, "no 'Key : Value' lines", first[1], first[0])
    return KeyValueReport(sections=tuple(sections))


def is_unsupported_message(text: str) -> bool:
    """npu-smi's short refusal, e.g. ``This device does not support querying topo.``"""
    stripped = text.strip()
    return bool(stripped) and len(stripped.splitlines()) <= 2 and bool(_UNSUPPORTED.search(stripped))


def _raise_if_unsupported(text: str, what: str) -> None:
    if is_unsupported_message(text):
        raise NpuSmiUnsupported(f"npu-smi {what}: {text.strip()}")


def parse_npu_list(text: str) -> list[NpuCount]:
    """``npu-smi info -l``."""
    report = parse_key_values(text, "info -l")
    entries: list[NpuCount] = []
    for section in report.sections:
        fields = dict(section)
        npu_id = _to_int(fields.get("NPU ID"))
        if npu_id is None:
            continue
        entries.append(NpuCount(npu_id=npu_id, chip_count=_to_int(fields.get("Chip Count")) or 1, fields=fields))
    if not entries:
        raise NpuSmiParseError("info -l", "no 'NPU ID' entries")
    total = _to_int(report.first("Total Count"))
    if total is not None and total != len(entries):
        log.debug("npu-smi info -l: Total Count %d but %d entries", total, len(entries))
    return entries


def parse_health(text: str) -> HealthReport:
    """``npu-smi info -t health -i N [-c C]``: ``Health`` (card) or ``Health Status`` (chip), error codes."""
    report = parse_key_values(text, "health")
    pairs = [kv for section in report.sections for kv in section]
    raw = next((v for k, v in pairs if k in ("Health", "Health Status")), None)
    if raw is None:
        raise NpuSmiParseError("health", "no 'Health' or 'Health Status' line", text.strip()[:200], 1)
    codes = [c for k, v in pairs if k == "Error Code" for c in v.split() if not _missing(c)]
    infos = [v for k, v in pairs if k == "Error Information" and not _missing(v)]
    infos += _continued(text, "Error Information")
    return HealthReport(
        npu_id=_to_int(report.first("NPU ID")),
        chip_id=_to_int(report.first("Chip ID")),
        health=NpuHealthState.parse(raw),
        health_raw=raw,
        error_codes=tuple(codes),
        error_information=tuple(infos),
    )


def parse_phyid_remap(text: str) -> PhyIdRemap:
    """``npu-smi info -t phyid-remap -p P``: ``Chip Physical ID``, ``Chip Logic ID``, ``NPU ID``, ``Chip ID``."""
    report = parse_key_values(text, "-t phyid-remap")
    phy, npu, chip = (_to_int(report.first(k)) for k in ("Chip Physical ID", "NPU ID", "Chip ID"))
    if phy is None or npu is None or chip is None or npu < 0:
        first = _first_line(text)
        raise NpuSmiParseError("-t phyid-remap", "expected integer 'Chip Physical ID', 'NPU ID' and 'Chip ID'",
                               first[1], first[0])
    return PhyIdRemap(phy_id=phy, logic_id=_to_int(report.first("Chip Logic ID")), npu_id=npu, chip_id=chip)


_CONTINUATION = re.compile(r"^\s*:\s*(\S.*?)\s*$")
_KEYED = re.compile(r"^\s*([^:\s][^:]*?)\s*:")


def _process_memory_mb(values: Mapping[str, str | None]) -> float | None:
    """A process's memory: ``Process memory(MB)``, or ``Process memory(B)`` (910 A1 drivers) in MB."""
    mb = _to_float(values.get("processmemorymb"))
    if mb is not None:
        return mb
    in_bytes = _to_float(values.get("processmemoryb"))
    return in_bytes / 2**20 if in_bytes is not None else None


def _continued(text: str, key: str) -> list[str]:
    """The values npu-smi prints on lines of their own below ``key`` (``\t   : <value>``, one per further error code;
    blank lines may come between), which a key-value parse leaves out for having no key."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if (m := _KEYED.match(line)) is not None:
            inside = m.group(1) == key
        elif inside and (m := _CONTINUATION.match(line)) is not None and not _missing(m.group(1)):
            out.append(m.group(1))
    return out


def parse_set_result(text: str, what: str = "set") -> SetResult:
    """``npu-smi set ...``: ``Status : OK`` / ``Message : ...``, or a bare failure sentence."""
    stripped = text.strip()
    try:
        report = parse_key_values(text, what)
    except NpuSmiParseError:
        return SetResult(status="FAILED", message=stripped or "no output")
    status = report.first("Status")
    message = report.first("Message") or ""
    if status is None:
        return SetResult(status="FAILED", message=stripped)
    return SetResult(status=status, message=message)


_STATUS_LINE = re.compile(r"^\s*(Status|Message)\s+:\s*(.*?)\s*$")


def parse_reset_result(text: str) -> SetResult:
    """``npu-smi set -t reset``: the risk warning and the ``(Y/N)`` prompt, then ``Message : resetting ...``,
    ``Status : OK|Fail`` and the final ``Message`` (``Reset chip successfully.``, ``Failed to reset chip``, ``User
    aborts reset chip by inband.``). The last Status and the last Message decide; a bare sentence (``This device
    does not support setting reset.``) is a failure carrying that sentence."""
    _raise_if_unsupported(text, "reset")
    status: str | None = None
    message = ""
    for line in text.splitlines():
        m = _STATUS_LINE.match(line)
        if m and m.group(1) == "Status":
            status = m.group(2)
        elif m:
            message = m.group(2)
    if status is None:
        return SetResult(status="FAILED", message=text.strip()[:200] or "no output")
    return SetResult(status=status, message=message)


_LINK_STATUS = re.compile(r"^\s*link status\s*:\s*(\S+)\s*$", re.IGNORECASE | re.MULTILINE)


def parse_link_status(text: str) -> bool:
    """``hccn_tool -i N -link -g``: ``link status: UP`` or ``link status: DOWN``; True when UP."""
    m = _LINK_STATUS.search(text)
    if m is None or m.group(1).upper() not in ("UP", "DOWN"):
        first = _first_line(text)
        raise NpuSmiParseError("hccn_tool -link", "expected 'link status: UP' or 'link status: DOWN'", first[1],
                               first[0])
    return m.group(1).upper() == "UP"


# ----------------------------------------------------------------------------------------------------------------
# Plain column tables (info -m, -t topo)
# ----------------------------------------------------------------------------------------------------------------
def parse_chip_map(text: str) -> list[ChipMapping]:
    """``npu-smi info -m``: ``NPU ID  Chip ID  Chip Logic ID  [Chip Phy-ID]  Chip Name``."""
    header: list[str] | None = None
    out: list[ChipMapping] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cols = _fields(line)
        if header is None:
            if cols and _norm(cols[0]) == "npuid":
                header = [_norm(c) for c in cols]
            else:
                log.debug("npu-smi info -m: skipping line %d before header: %r", no, line)
            continue
        if len(cols) < len(header) - 1 or not cols[0].isdigit():
            log.debug("npu-smi info -m: skipping line %d: %r", no, line)
            continue
        values = dict(zip(header, cols, strict=False))
        npu_id, chip_id = _to_int(values.get("npuid")), _to_int(values.get("chipid"))
        if npu_id is None or chip_id is None:
            raise NpuSmiParseError("info -m", "NPU ID and Chip ID must be integers", line, no)
        out.append(ChipMapping(npu_id=npu_id, chip_id=chip_id, logic_id=_to_int(values.get("chiplogicid")),
                               phy_id=_to_int(values.get("chipphyid")), name=values.get("chipname") or ""))
    if header is None:
        first = _first_line(text)
        raise NpuSmiParseError("info -m", "no header (expected 'NPU ID  Chip ID  Chip Logic ID ...')", first[1],
                               first[0])
    return out


_DEVICE_NAME = re.compile(r"^(NPU|GPU|Phy-ID)\d+$")


def parse_topology(text: str) -> Topology:
    """``npu-smi info -t topo``: the NPU-by-NPU link matrix, optional ``CPU Affinity`` column, legend skipped."""
    _raise_if_unsupported(text, "-t topo")
    header: list[str] | None = None
    links: dict[str, dict[str, str]] = {}
    affinity: dict[str, str | None] = {}
    for no, line in enumerate(text.splitlines(), 1):
        cols = _fields(line)
        if not cols:
            continue
        if header is None:
            if _DEVICE_NAME.match(cols[0]) and all(_DEVICE_NAME.match(c) or _norm(c) == "cpuaffinity"
                                                   for c in cols):
                header = cols
            else:
                log.debug("npu-smi topo: skipping line %d before header: %r", no, line)
            continue
        if not _DEVICE_NAME.match(cols[0]):
            if links and cols[0].lower().startswith("legend"):
                break
            log.debug("npu-smi topo: skipping line %d: %r", no, line)
            continue
        devices = tuple(h for h in header if _DEVICE_NAME.match(h))
        has_affinity = len(header) > len(devices)
        row = cols[1:]
        if len(row) != len(devices) + (1 if has_affinity else 0):
            raise NpuSmiParseError("-t topo", f"row has {len(row)} cells, header names {len(devices)} devices",
                                   line, no)
        links[cols[0]] = dict(zip(devices, row[: len(devices)], strict=True))
        affinity[cols[0]] = None if not has_affinity or _missing(row[-1]) else row[-1]
    if header is None:
        first = _first_line(text)
        raise NpuSmiParseError("-t topo", "no header row (expected 'NPU0  NPU1 ...')", first[1], first[0])
    devices = tuple(h for h in header if _DEVICE_NAME.match(h))
    missing = [d for d in devices if d not in links]
    if missing:
        raise NpuSmiParseError("-t topo", f"no rows for {missing} (truncated output?)")
    return Topology(devices=devices, links=links, cpu_affinity=affinity)


# ----------------------------------------------------------------------------------------------------------------
# vNPU tables
# ----------------------------------------------------------------------------------------------------------------
def _field_under(spans: list[tuple[int, int, str]], start: int, end: int) -> str | None:
    """The header field a sub-header token belongs to: the one overlapping it most, else the nearest."""
    best, best_overlap = None, 0
    for s, e, name in spans:
        overlap = min(e, end) - max(s, start)
        if overlap > best_overlap:
            best, best_overlap = name, overlap
    if best is None and spans:
        best = min(spans, key=lambda sp: abs(sp[0] - start))[2]
    return best


def parse_template_info(text: str) -> list[VnpuTemplate]:
    """``npu-smi info -t template-info``: template name, AICORE, Memory (GB), AICPU, and media engines."""
    _raise_if_unsupported(text, "-t template-info")
    blocks = _boxed_blocks(text, "-t template-info")
    header_idx = next((i for i, b in enumerate(blocks) if _header_names(b) & {"name", "aicore"} == {"name",
                                                                                                     "aicore"}),
                      None)
    if header_idx is None:
        row = next((r for b in blocks for r in b.rows), None)
        raise NpuSmiParseError("-t template-info", "no header with 'Name' and 'AICORE'", row.raw if row else None,
                               row.line_no if row else None)
    header_rows = [r for r in blocks[header_idx].rows if _fields(r.cells[0]) and
                   _norm(_fields(r.cells[0])[0]) != "npuinstancetemplateinfois"]
    main = header_rows[0].cells[0]
    main_fields = _fields(main)
    spans = [(m.start(), m.end(), m.group(0)) for m in re.finditer(r"\S+", main)]
    # Second header row: units ("GB") and second-line engines, each under a main field.
    sub_fields: list[str] = []
    units: dict[str, str] = {}
    if len(header_rows) > 1:
        sub = header_rows[1].cells[0]
        for m in re.finditer(r"\S+", sub):
            owner = _field_under(spans, m.start(), m.end())
            if m.group(0).upper() in ("GB", "MB") and owner:
                units[owner] = m.group(0).upper()
            else:
                sub_fields.append(m.group(0))
    templates: list[VnpuTemplate] = []
    for block in blocks[header_idx + 1:]:
        rows = block.rows
        if not rows:
            continue
        first = _tokens(rows[0].cells[0])
        if len(first) < 4:
            raise NpuSmiParseError("-t template-info", f"template row has {len(first)} cells, expected "
                                   f"{len(main_fields)}", rows[0].raw, rows[0].line_no)
        values = _assign(main_fields, first)
        extra = {k: v for k, v in values.items() if v is not None}
        if len(rows) > 1:
            extra.update({k: v for k, v in _assign(sub_fields, _tokens(rows[1].cells[0])).items() if v})
        by_norm = {_norm(k): v for k, v in values.items()}
        aicore, aicpu, memory = _to_int(by_norm.get("aicore")), _to_int(by_norm.get("aicpu")), _to_float(
            by_norm.get("memory"))
        name = by_norm.get("name")
        if not name or aicore is None or aicpu is None or memory is None:
            raise NpuSmiParseError("-t template-info", "Name, AICORE, Memory and AICPU are required",
                                   rows[0].raw, rows[0].line_no)
        if units.get("Memory") == "MB":
            memory = memory / 1024
        for key in ("Name", "AICORE", "Memory", "AICPU"):
            extra.pop(key, None)
        templates.append(VnpuTemplate(name=name, aicore=aicore, memory_gb=memory, aicpu=aicpu, extra=extra))
    if not templates:
        raise NpuSmiParseError("-t template-info", "header but no templates")
    return templates


def _header_names(block: _Block) -> set[str]:
    return {_norm(f) for r in block.rows for c in r.cells for f in _fields(c)}


_TOTAL_VNPU = re.compile(r"Total number of vnpu:\s*(\d+)", re.IGNORECASE)


def parse_vnpu_info(text: str) -> VnpuInfo:
    """``npu-smi info -t info-vnpu -i N -c C``: Free/Total resources, the vNPU count, one row per vNPU."""
    _raise_if_unsupported(text, "-t info-vnpu")
    blocks = _boxed_blocks(text, "-t info-vnpu")
    resources: dict[str, FreeTotal] = {}
    total: int | None = None
    vnpus: list[VnpuEntry] = []
    resource_fields: list[str] | None = None
    vnpu_fields: list[str] | None = None
    for block in blocks:
        for row in block.rows:
            joined = "|".join(row.cells)
            if m := _TOTAL_VNPU.search(joined):
                total = int(m.group(1))
                continue
            names = [_norm(c) for c in row.cells]
            if "vnpuid" in names:
                vnpu_fields = names
                continue
            tokens = _fields(row.cells[0]) if len(row.cells) == 1 else []
            if tokens and _norm(tokens[0]) == "aicore":
                resource_fields = tokens
                continue
            if resource_fields and tokens and "/" in tokens[0] and not resources:
                for name, value in _assign(resource_fields, _tokens(row.cells[0])).items():
                    if (cell := _to_fraction(value)) is not None:
                        resources[name] = FreeTotal(free=cell.used, total=cell.total)
                continue
            if vnpu_fields and len(row.cells) == len(vnpu_fields):
                values = dict(zip(vnpu_fields, (c.strip() for c in row.cells), strict=True))
                vnpu_id = _to_int(values.get("vnpuid"))
                if vnpu_id is None:
                    raise NpuSmiParseError("-t info-vnpu", "Vnpu ID must be an integer", row.raw, row.line_no)
                vnpus.append(VnpuEntry(vnpu_id=vnpu_id, vgroup_id=_to_int(values.get("vgroupid")),
                                       container_id=values.get("containerid") or None,
                                       status=values.get("status") or None,
                                       template=values.get("templatename") or ""))
                continue
            log.debug("npu-smi info-vnpu: skipping line %d: %r", row.line_no, row.raw)
    if total is None:
        raise NpuSmiParseError("-t info-vnpu", "no 'Total number of vnpu' line (truncated output?)")
    if total != len(vnpus):
        raise NpuSmiParseError("-t info-vnpu", f"'Total number of vnpu: {total}' but {len(vnpus)} rows listed")
    return VnpuInfo(resources=resources, total_vnpus=total, vnpus=tuple(vnpus))
