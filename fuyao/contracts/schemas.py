"""The JSON annotation values: which model each key holds, and their codec (parse names the key and the field of a
bad value; dump is compact and deterministic)."""

from __future__ import annotations

import json
from typing import TypeVar, cast

from pydantic import ValidationError

from .base import ContractError, Schema, from_validation_error
from .devices import ANNOTATION_NODE_FAULTS, ANNOTATION_POD_ASSIGNED, NodeFaults, PodAssignment
from .qos import ANNOTATION_NODE_USAGE, NodeUsage
from .topology import ANNOTATION_NODE_TOPOLOGY, NodeTopology

M = TypeVar("M", bound=Schema)

ANNOTATION_SCHEMAS: dict[str, type[Schema]] = {
    ANNOTATION_NODE_TOPOLOGY: NodeTopology,
    ANNOTATION_POD_ASSIGNED: PodAssignment,
    ANNOTATION_NODE_USAGE: NodeUsage,
    ANNOTATION_NODE_FAULTS: NodeFaults,
}


def parse_annotation(key: str, raw: str | bytes, model: type[M] | None = None) -> M:
    """Parse a JSON annotation value into its model; raise :class:`ContractError` naming key and field."""
    schema = model or ANNOTATION_SCHEMAS.get(key)
    if schema is None:
        raise ContractError(key, "not a JSON annotation known to fuyao")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(key, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ContractError(key, "expected a JSON object", value=data)
    version = data.get("schema_version", 1)
    if version != 1:
        raise ContractError(key, "unsupported schema version (this build reads 1)", "schema_version", version)
    try:
        return cast(M, schema.model_validate(data))  # ``model``'s type, or the key's registered one
    except ValidationError as exc:
        raise from_validation_error(key, exc) from None


def dump_annotation(value: Schema) -> str:
    """Compact, deterministic JSON for an annotation value (so unchanged values compare equal)."""
    return json.dumps(value.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)

