"""Building blocks shared by every API model and wire settings model: camelCase fields,
strict input, Kubernetes-style durations and quantities, and errors that name their field."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, StringConstraints, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError


class ApiModel(BaseModel):
    """Base of every spec/status model.

    Fields are snake_case in Python and camelCase on the wire; unknown fields are
    an error (a typo such as `replica:` must not be silently ignored); attribute
    docstrings become the field descriptions, so the CRD and the docs read the
    same text as the code.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
        frozen=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready form with camelCase keys, omitting unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def field_error(field: str | tuple[str, ...], message: str) -> PydanticCustomError:
    """An error about `field`: a dotted path relative to the model that raises it,
    or a tuple of path parts when a part itself contains dots (`nvidia.com/gpu`).

    Cross-field checks live in model validators, whose errors pydantic reports at
    the model's own location; the formatter in `errors.py` appends `field` so the
    user sees e.g. `spec.model.index.ivfpq.m` rather than `spec.model`.
    """
    parts = tuple(field.split(".")) if isinstance(field, str) else field
    return PydanticCustomError("field_error", "{message}", {"field": parts, "message": message})


# --- durations --------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
DURATION_PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration such as `30s`, `5m`, `1h30m` or `250ms`."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration such as 30s, 5m, 1h30m")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def _check_duration(value: Any) -> Any:
    if isinstance(value, str):
        try:
            if parse_duration(value) <= 0:
                raise ValueError(f"{value!r} must be longer than zero")
        except ValueError as exc:
            raise PydanticCustomError("duration", str(exc)) from None
    return value


Duration = Annotated[
    str,
    StringConstraints(pattern=DURATION_PATTERN),
    BeforeValidator(_check_duration),
]
"""A positive Go-style duration string (`30s`, `5m`, `1h30m`)."""


# --- quantities -------------------------------------------------------------------

QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "": 1.0,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
}


def _check_quantity(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError(
            "quantity", "a quantity must be a number or a string like 500m or 2Gi"
        )
    if isinstance(value, int | float):
        if value < 0:
            raise PydanticCustomError("quantity", "a quantity must not be negative")
        return str(value) if isinstance(value, float) else value
    if isinstance(value, str) and _QUANTITY_RE.match(value) and not value.startswith("-"):
        return value
    raise PydanticCustomError(
        "quantity", "{value!r} is not a Kubernetes quantity such as 500m, 2, 4Gi", {"value": value}
    )


def quantity_value(q: str | int) -> float:
    """The numeric value of a Kubernetes quantity (`2Gi` -> 2147483648.0, `500m` -> 0.5)."""
    if isinstance(q, int):
        return float(q)
    for suffix, factor in _BINARY.items():
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    if re.search(r"[eE][+-]?\d", q):
        return float(q)
    suffix = q[-1] if q and q[-1] in _DECIMAL else ""
    number = q[: -len(suffix)] if suffix else q
    return float(number) * _DECIMAL[suffix]


Quantity = Annotated[
    int | str,
    BeforeValidator(_check_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
        }
    ),
]
"""A Kubernetes resource quantity (`500m`, `2`, `4Gi`)."""


# --- names ------------------------------------------------------------------------

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)]
"""A DNS-1123 label: lower-case letters, digits and '-', at most 63 characters."""
