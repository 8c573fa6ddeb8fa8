"""The routing document: which model versions serve, in what shares, and where events go.

The operator renders it (`recsys_operator.render.gateway`) into a ConfigMap that gateways
in a cluster watch through the Kubernetes API; local mode writes it to a file the gateway
polls. Its JSON shape (camelCase, as the ConfigMap key `routing.json` holds it):

    {"system": "ns.name",
     "stable": {"version": "1", "url": "http://.../predictions/NAME"},
     "canary": null | {"version": "2", "url": "http://.../predictions/NAME/2"},
     "canaryWeight": 0..100, "shadowPercent": 0..100, "salt": "...", "timeoutMs": 250,
     "maxInFlight": 64, "defaultK": 50, "maxK": 50,
     "pulsarServiceUrl": "pulsar://...",
     "interactionsTopic": "persistent://...", "impressionsTopic": "persistent://..."}

Unknown fields are ignored, so an operator that adds a field does not break gateways still
running the previous release.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recsys_contracts.model_version import FALLBACK_MODEL_VERSION, MODEL_VERSION_PATTERN
from recsys_contracts.variant_assignment import Variant, assign_variant

ROUTING_KEY = "routing.json"
"""The key of the routing ConfigMap that holds the document."""


class Endpoint(BaseModel):
    """One model version and the TorchServe URL that serves it."""

    model_config = ConfigDict(frozen=True)

    version: str = Field(pattern=MODEL_VERSION_PATTERN)
    url: str = Field(pattern=r"^https?://\S+$")

    @field_validator("version")
    @classmethod
    def _not_the_fallback_marker(cls, version: str) -> str:
        if version == FALLBACK_MODEL_VERSION:
            raise ValueError(f"{version!r} is reserved for responses from the popularity fallback")
        return version


class Routing(BaseModel):
    """One valid routing file. Field names follow the file (camelCase aliases).

    Unknown fields are ignored, so an operator that adds a field does not break the
    gateways still running the previous release.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    system: str = Field(min_length=1)
    stable: Endpoint
    canary: Endpoint | None = None
    canary_weight: int = Field(default=0, ge=0, le=100, alias="canaryWeight")
    # Share of stable answers mirrored to the canary in a shadow phase (`gateway.shadow`).
    shadow_percent: int = Field(default=0, ge=0, le=100, alias="shadowPercent")
    salt: str = ""
    timeout_ms: int = Field(default=250, ge=1, le=60_000, alias="timeoutMs")
    # Recommend requests one gateway works on at once; past it, 503 at once (admission
    # control, `gateway.admission`).
    max_in_flight: int = Field(default=64, ge=1, le=100_000, alias="maxInFlight")
    default_k: int = Field(default=50, ge=1, alias="defaultK")
    max_k: int = Field(default=50, ge=1, le=1000, alias="maxK")
    pulsar_service_url: str | None = Field(default=None, alias="pulsarServiceUrl")
    interactions_topic: str | None = Field(default=None, alias="interactionsTopic")
    impressions_topic: str | None = Field(default=None, alias="impressionsTopic")

    @model_validator(mode="after")
    def _default_k_within_max(self) -> Self:
        if self.default_k > self.max_k:
            raise ValueError(f"defaultK ({self.default_k}) exceeds maxK ({self.max_k})")
        return self

    @property
    def effective_canary_weight(self) -> int:
        """The canary's share in percent; 0 whenever there is no canary."""
        return self.canary_weight if self.canary is not None else 0

    def variant_for(self, user_id: str) -> Variant:
        return assign_variant(self.salt, user_id, self.effective_canary_weight)

    def endpoint(self, variant: Variant) -> Endpoint:
        if variant is Variant.CANARY and self.canary is not None:
            return self.canary
        return self.stable
