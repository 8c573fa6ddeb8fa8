"""The recsys.dev/v1alpha1 API: pydantic models are the single source of truth."""

from recsys_operator.api.base import API_VERSION, GROUP, VERSION, parse_duration
from recsys_operator.api.effective_scaling import EffectiveScaling, resolve_scaling
from recsys_operator.api.errors import FieldIssue, InvalidResource
from recsys_operator.api.recommender_system import RecommenderSystemSpec
from recsys_operator.api.resources import RESOURCE_TYPES, RecommenderSystem, ScalingPolicy
from recsys_operator.api.scaling_policy import ScalingPolicySpec
from recsys_operator.api.status import Condition, RecommenderSystemStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "RESOURCE_TYPES",
    "VERSION",
    "Condition",
    "EffectiveScaling",
    "FieldIssue",
    "InvalidResource",
    "RecommenderSystem",
    "RecommenderSystemSpec",
    "RecommenderSystemStatus",
    "ScalingPolicy",
    "ScalingPolicySpec",
    "parse_duration",
    "resolve_scaling",
]
