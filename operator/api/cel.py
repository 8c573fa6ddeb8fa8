"""CEL rules the API server checks at admission (`x-kubernetes-validations` in the CRDs).

A pydantic validator that compares fields (weights increasing, GPU request = limit,
topK <= numItems, ...) is invisible to the API server; each model declares its CEL twin
beside it with `rules(...)` (on the model) or `field_rules(...)` (on a list field), and
`recsys crds` writes them into the schema. A manifest that breaks one is then refused
by `kubectl apply`, not reported later in status. Only standard CEL is used (no
Kubernetes extension libraries), so tests evaluate the same text with cel-python.
Rules compare what the API server has after defaulting; fields whose parent may be
absent (a nested object without a scalar default) are guarded with `has()`.
"""

from __future__ import annotations

from typing import Any

KEY = "x-kubernetes-validations"


def rule(expression: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One rule; `field_path` (`.minReplicas`) is where the API server reports it."""
    out = {"rule": expression, "message": message}
    if field_path is not None:
        out["fieldPath"] = field_path
    return out


def rules(*items: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` for a model's ConfigDict or a Field."""
    return {KEY: list(items)}


def strictly_increasing(max_items: int) -> str:
    """Standard CEL has no index ranges: spell out the pairs a list of `max_items` can have."""
    indexes = ", ".join(str(i) for i in range(max_items - 1))
    return f"[{indexes}].all(i, i + 1 >= size(self) || self[i] < self[i + 1])"
