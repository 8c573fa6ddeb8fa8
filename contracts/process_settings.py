"""The settings a data-plane process reads from its environment, `RECSYS_<FIELD>`.

The operator renders these variables into the pod (and local mode into the process);
the process validates them with its pydantic model, so a bad value fails at start with
the field named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict

from recsys_contracts.env_vars import PREFIX as ENV_PREFIX


class ProcessSettings(BaseModel):
    """Frozen settings with `from_env`; subclasses name their comma-separated fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    list_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields given as comma-separated values in the environment."""

    metrics_address: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Settings from `RECSYS_<FIELD>` variables, then `overrides` (None = not given);
        an empty variable means None."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            if name in cls.list_fields:
                values[name] = [part.strip() for part in raw.split(",") if part.strip()]
            else:
                values[name] = raw if raw != "" else None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    @property
    def metrics_endpoint(self) -> tuple[str, int] | None:
        """(host, port) of /metrics, or None when it is off."""
        if not self.metrics_address:
            return None
        host, _, port = self.metrics_address.rpartition(":")
        return host or "0.0.0.0", int(port)
