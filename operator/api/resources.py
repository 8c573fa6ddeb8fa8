"""The custom resources themselves: apiVersion, kind, metadata, spec and status."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from recsys_contracts.api_base import DNS_LABEL_PATTERN, ApiModel
from recsys_operator.api.recommender_system import RecommenderSystemSpec
from recsys_operator.api.scaling_policy import ScalingPolicySpec
from recsys_operator.api.status import RecommenderSystemStatus, ScalingPolicyStatus

# Children are named `<name>-<part>` (longest: `-serving-canary`, 15 characters)
# and Services must be DNS labels of at most 63 characters.
MAX_NAME_LENGTH = 48


class ObjectMeta(BaseModel):
    """The parts of Kubernetes ObjectMeta the operator reads; the rest passes through."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=MAX_NAME_LENGTH)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None


class CustomResource(ApiModel):
    """Common shape of our custom resources (metadata passes through unchecked beyond name)."""

    model_config = ConfigDict(extra="forbid")

    kind_name: ClassVar[str]
    plural: ClassVar[str]
    short_names: ClassVar[list[str]]
    namespaced: ClassVar[bool] = True

    api_version: Literal["recsys.dev/v1alpha1"] = Field(
        default="recsys.dev/v1alpha1", alias="apiVersion"
    )
    metadata: ObjectMeta

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class RecommenderSystem(CustomResource):
    """A real-time recommender system."""

    kind_name: ClassVar[str] = "RecommenderSystem"
    plural: ClassVar[str] = "recommendersystems"
    short_names: ClassVar[list[str]] = ["recsys"]

    kind: Literal["RecommenderSystem"] = "RecommenderSystem"
    spec: RecommenderSystemSpec
    status: RecommenderSystemStatus | None = None


class ScalingPolicy(CustomResource):
    """Autoscaling bounds and targets owned by platform SREs."""

    kind_name: ClassVar[str] = "ScalingPolicy"
    plural: ClassVar[str] = "scalingpolicies"
    short_names: ClassVar[list[str]] = ["scalepol"]

    kind: Literal["ScalingPolicy"] = "ScalingPolicy"
    spec: ScalingPolicySpec = Field(default_factory=ScalingPolicySpec)
    status: ScalingPolicyStatus | None = None


RESOURCE_TYPES: dict[str, type[CustomResource]] = {
    cls.kind_name: cls for cls in (RecommenderSystem, ScalingPolicy)
}
