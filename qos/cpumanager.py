"""The kubelet's CPU manager checkpoint (``<kubelet root>/cpu_manager_state``): which CPUs its ``static`` policy
gave containers for their own, so that the cpuset policy never puts BE pods there.

The file is the kubelet's ``CPUManagerCheckpoint`` (pkg/kubelet/cm/cpumanager/state/checkpoint.go), JSON::

    {"policyName": "static", "defaultCpuSet": "0,3-7",
     "entries": {"<pod uid>": {"<container name>": "1-2"}}, "checksum": 1552716370}

``entries`` holds only exclusive assignments (containers of Guaranteed pods with integer CPU requests);
``defaultCpuSet`` is the shared pool everything else runs on. Kubelets before 1.17 wrote ``entries`` as
``{"<container id>": "1-2"}`` (the v1 checkpoint), also read. The ``none`` policy has no entries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from fuyao.inventory import parse_cpu_list

STATIC: Final = "static"


class StateError(Exception):
    """The checkpoint is missing, unreadable or not the kubelet's; the message names the file."""


class CpuManagerState(BaseModel):
    """The checkpoint's fields the agent reads (``checksum`` is the kubelet's own business)."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel)  # the kubelet's JSON names

    policy_name: str
    default_cpu_set: str = ""
    entries: dict[str, dict[str, str] | str] = {}


def parse_state(text: str, source: str = "cpu_manager_state") -> CpuManagerState:
    try:
        return CpuManagerState.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        if isinstance(exc, ValidationError):
            error = exc.errors(include_url=False)[0]
            detail = f"{'.'.join(map(str, error['loc'])) or 'the document'}: {error['msg']}"
        else:
            detail = str(exc)
        raise StateError(f"{source}: not the kubelet's CPU manager checkpoint ({detail})") from None


def exclusive_cpus(state: CpuManagerState, source: str = "cpu_manager_state") -> frozenset[int]:
    """The CPUs the ``static`` policy assigned containers exclusively (none under another policy)."""
    if state.policy_name != STATIC:
        return frozenset()
    cpus: set[int] = set()
    for key, value in state.entries.items():
        for name, text in (value.items() if isinstance(value, dict) else [(key, value)]):
            try:
                cpus.update(parse_cpu_list(text))
            except ValueError:
                raise StateError(f"{source}: entry {key}/{name} is not a CPU list: {text[:40]!r}") from None
    return frozenset(cpus)


def read_exclusive_cpus(path: str) -> frozenset[int]:
    """:func:`exclusive_cpus` of the checkpoint at ``path`` ("": not read, none). Raises :class:`StateError` when
    the file is missing (every kubelet since 1.26 writes it: a wrong path or kubelet root), unreadable or garbled."""
    if not path:
        return frozenset()
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise StateError(f"{path}: no such file (is cpuManagerStateFile the kubelet's --root-dir/cpu_manager_state, "
                         "and is that directory mounted?)") from None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
    return exclusive_cpus(parse_state(text, path), path)
