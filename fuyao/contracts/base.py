"""What every contract module shares: the error that names a key and a field, the base of the JSON value schemas,
and enum parsing that names the key."""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError


class ContractError(ValueError):
    """A label, annotation or JSON value that does not follow its contract. Names the key and the field."""

    def __init__(self, key: str, message: str, field: str | None = None, value: object = None):
        self.key = key
        self.field = field
        self.value = value
        where = f"{key!r}" + (f" field {field!r}" if field else "")
        shown = "" if value is None else f" (got {short(value)})"
        super().__init__(f"invalid value for {where}: {message}{shown}")


def short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def from_validation_error(key: str, exc: ValidationError) -> ContractError:
    """The first problem pydantic found, as a :class:`ContractError` naming ``key`` and the field."""
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    return ContractError(key, first["msg"], field=field, value=first.get("input"))


class Schema(BaseModel):
    """Base of every JSON contract value: unknown fields from newer writers are ignored, versions are checked."""

    model_config = ConfigDict(extra="ignore", frozen=True)


E = TypeVar("E", bound=StrEnum)


def parse_enum(enum: type[E], key: str, raw: str, *, case_insensitive: bool = False) -> E:
    """``raw`` as a member of ``enum``; a :class:`ContractError` naming ``key`` and the allowed values otherwise."""
    if not isinstance(raw, str):  # a label or annotation from a malformed object
        raise ContractError(key, f"expected a string, one of {[m.value for m in enum]}", value=raw)
    value = raw.strip()
    for member in enum:
        if member.value == value or (case_insensitive and member.value.lower() == value.lower()):
            return member
    raise ContractError(key, f"expected one of {[m.value for m in enum]}", value=raw)
