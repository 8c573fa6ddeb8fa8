"""Why a RecommenderSystem cannot be reconciled, as distinct exception types.

Each is an `InvalidResource` (so it names every field and why); the type says whose
problem it is, and so which condition reason the reconcile reports.
"""

from __future__ import annotations

from recsys_contracts.field_issues import InvalidResource


class InvalidSpec(InvalidResource):
    """The RecommenderSystem's own fields are invalid or cannot be rendered."""


class InvalidPolicy(InvalidResource):
    """The referenced ScalingPolicy itself is invalid."""


class PolicyViolation(InvalidResource):
    """The spec cannot run under its ScalingPolicy: the policy is missing, the spec
    exceeds its bounds, or it uses an autoscaling engine the cluster does not serve."""


class EngineNotServed(InvalidResource):
    """The spec asks for an engine whose API the cluster does not serve (engine RayJob
    without KubeRay's ray.io): reported, never replaced by another engine silently."""
