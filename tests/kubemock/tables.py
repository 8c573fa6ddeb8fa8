"""Table responses (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), as kubectl asks.

`kubectl get` prints what the server puts in a `meta.k8s.io/v1` Table: for a custom
resource, the name and the CRD's `additionalPrinterColumns`, each cell the value of the
column's JSONPath (dates as ages, like the API server); for built-in kinds, which the
API server prints with per-kind code the emulator does not have, the name and the age.
Rows carry the object as kubectl's `includeObject` parameter asks (default: metadata).
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from .accounting import request_header

Body = dict[str, Any]

NAME_COLUMN = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "description": "Name must be unique within a namespace.",
    "priority": 0,
}
AGE_COLUMN = {
    "name": "Age",
    "type": "date",
    "format": "",
    "description": "CreationTimestamp of the object.",
    "priority": 0,
}
_AGE_PATH = ".metadata.creationTimestamp"


def wants_table(request: Any) -> bool:
    """Whether the request's Accept header asks for a Table (kubectl get, without -o)."""
    return "as=Table" in request_header(request, "Accept")


def table(
    objects: list[Body], printer_columns: list[Body] | None, *, include: str, version: str
) -> Body:
    """The Table of `objects`; `printer_columns` from the CRD (None: a built-in kind)."""
    columns = (
        printer_columns if printer_columns is not None else [AGE_COLUMN | {"jsonPath": _AGE_PATH}]
    )
    definitions = [NAME_COLUMN] + [
        {
            "name": column["name"],
            "type": column.get("type", "string"),
            "format": column.get("format", ""),
            "description": column.get("description", ""),
            "priority": column.get("priority", 0),
        }
        for column in columns
    ]
    rows = [
        {
            "cells": [body["metadata"]["name"]] + [_cell(body, column) for column in columns],
            **_row_object(body, include),
        }
        for body in objects
    ]
    return {
        "apiVersion": "meta.k8s.io/v1",
        "kind": "Table",
        "metadata": {"resourceVersion": version},
        "columnDefinitions": definitions,
        "rows": rows,
    }


def _row_object(body: Body, include: str) -> Body:
    if include == "None":
        return {}
    if include == "Object":
        return {"object": body}
    return {
        "object": {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": body.get("metadata", {}),
        }
    }


def _cell(body: Body, column: Body) -> Any:
    values = evaluate(column["jsonPath"], body)
    if not values:
        return None  # kubectl prints <none>
    value = values[0]
    kind = column.get("type", "string")
    if kind == "date" and isinstance(value, str):
        return _age(value)
    if kind == "integer" and isinstance(value, int | float | str):
        return int(value)
    if kind == "number" and isinstance(value, int | float | str):
        return float(value)
    if kind == "boolean":
        return bool(value)
    return value if isinstance(value, str) else str(value)


def _age(timestamp: str) -> str:
    """The API server's human-readable age: 45s, 12m, 3h, 2d."""
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = max(0, int((datetime.datetime.now(datetime.UTC) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# --- the JSONPath that printer columns use ------------------------------------------------

# `.a.b`, `[0]`, `[?(@.type=="Ready")]`: the subset CRD printer columns are written in.
_STEP = re.compile(
    r"""\.(?P<field>[\w-]+)|\[(?P<index>\d+)\]|\[\?\(@\.(?P<key>[\w.-]+)==["'](?P<value>[^"']*)["']\)\]"""
)


def evaluate(path: str, body: Any) -> list[Any]:
    """The values `path` selects in `body` (empty when a field is missing)."""
    values = [body]
    position = 0
    while position < len(path):
        step = _STEP.match(path, position)
        if step is None:
            raise ValueError(f"the emulator cannot evaluate JSONPath {path!r} at {position}")
        position = step.end()
        selected: list[Any] = []
        for value in values:
            if step["field"] is not None and isinstance(value, dict) and step["field"] in value:
                selected.append(value[step["field"]])
            elif step["index"] is not None and isinstance(value, list):
                if int(step["index"]) < len(value):
                    selected.append(value[int(step["index"])])
            elif step["key"] is not None and isinstance(value, list):
                selected.extend(
                    item for item in value if evaluate("." + step["key"], item) == [step["value"]]
                )
        values = selected
    return values
