"""The recsys.dev/v1alpha1 API: pydantic models are the single source of truth."""

from recsys_contracts.api_base import parse_duration
from recsys_contracts.field_issues import FieldIssue, InvalidResource
from recsys_operator.api.base import API_VERSION, GROUP, VERSION
from recsys_operator.api.effective_scaling import EffectiveScaling, resolve_scaling
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
