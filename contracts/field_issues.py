"""Turning validation failures into messages that name the exact field."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError


@dataclass(frozen=True, order=True)
class FieldIssue:
    """One problem with one field: `path` is dotted from the document root (`spec.model.topK`)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def join_path(*parts: str | int) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "." in part or "/" in part:  # a map key such as nvidia.com/gpu
            out += f'["{part}"]'
        elif part != "":
            out += f".{part}" if out else str(part)
    return out


def issues_from_validation_error(error: ValidationError, prefix: str = "") -> list[FieldIssue]:
    """Flatten a pydantic error into field issues, resolving `field_error` paths."""
    issues = []
    for item in error.errors(include_url=False):
        loc = [p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        ctx = item.get("ctx") or {}
        if item["type"] == "field_error":
            loc.extend(ctx["field"])
            message = str(ctx["message"])
        else:
            message = item["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
        issues.append(FieldIssue(join_path(prefix, *loc), message))
    return issues


class InvalidResource(ValueError):
    """A resource that failed validation; `issues` says which fields and why."""

    def __init__(self, what: str, issues: list[FieldIssue]):
        self.what = what
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{what} is invalid:\n{lines}")

    @property
    def summary(self) -> str:
        """One line for a status condition message."""
        return "; ".join(str(issue) for issue in self.issues)
