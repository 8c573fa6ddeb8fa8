"""Pure functions from (RecommenderSystem, ScalingPolicy) to the objects the operator applies.

`render_system` is the whole desired state of one system's Kubernetes children;
`topic_plan` is its desired Pulsar state. Neither talks to a server: the Kopf
handlers read, call these, and apply the result; `recsys render` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recsys_contracts.field_issues import FieldIssue
from recsys_operator.api.effective_scaling import EffectiveScaling, resolve_scaling
from recsys_operator.api.errors import EngineNotServed, InvalidSpec, PolicyViolation
from recsys_operator.api.resources import RecommenderSystem, ScalingPolicy
from recsys_operator.api.training import TrainingEngine
from recsys_operator.render.autoscaling import (
    DEFAULT_PROMETHEUS_URL,
    build_autoscalers,
    build_disruption_budgets,
    build_pulsar_trigger_authentication,
)
from recsys_operator.render.capacity import serving_capacity
from recsys_operator.render.features import build_feature_job_deployment
from recsys_operator.render.gateway import (
    GATEWAY_PORT,
    build_gateway_configmap,
    build_gateway_deployment,
    build_gateway_role,
    build_gateway_role_binding,
    build_gateway_service,
    build_gateway_service_account,
)
from recsys_operator.render.monitoring import (
    build_features_metrics_service,
    build_prometheus_rule,
    build_service_monitor,
)
from recsys_operator.render.network import build_network_policies
from recsys_operator.render.ray_training import RAY_GROUP, build_training_raycronjob
from recsys_operator.render.serving import (
    INFERENCE_PORT,
    UnsupportedArchiveUri,
    build_serving_configmap,
    build_serving_deployment,
    build_serving_service,
    serving_tracks,
)
from recsys_operator.render.topics import TopicPlan, topic_plan
from recsys_operator.render.traffic import TrafficPlan, traffic_plan
from recsys_operator.render.training import UnsupportedTrainingUri, build_training_cronjob

__all__ = [
    "ALWAYS_RENDERED_KINDS",
    "CHILD_KINDS",
    "PRUNED_FIRST_KINDS",
    "PRUNED_KINDS",
    "RenderOptions",
    "TopicPlan",
    "TrafficPlan",
    "effective_scaling",
    "render_system",
    "topic_plan",
]


# Every (apiVersion, kind) `render_system` can produce: what the operator prunes (deletes
# when no longer desired) and what its RBAC must let it manage.
CHILD_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("apps/v1", "Deployment"),
    ("batch/v1", "CronJob"),
    ("ray.io/v1", "RayCronJob"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
)
# Kinds every system has whatever its spec (the gateway's identity and routing rights,
# the same four NetworkPolicies): never pruned, so the operator needs no right to delete them.
ALWAYS_RENDERED_KINDS: frozenset[tuple[str, str]] = frozenset(
    {
        ("networking.k8s.io/v1", "NetworkPolicy"),
        ("v1", "ServiceAccount"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    }
)
PRUNED_KINDS = tuple(kind for kind in CHILD_KINDS if kind not in ALWAYS_RENDERED_KINDS)
# Pruned before anything is applied: one workload takes one autoscaler, and KEDA's
# admission webhook refuses a ScaledObject for a workload an HPA still scales. (Every
# other kind goes after: a finished canary's Deployment only once the routing has left it.)
PRUNED_FIRST_KINDS = (
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("keda.sh/v1alpha1", "ScaledObject"),
)


@dataclass(frozen=True)
class RenderOptions:
    """What the cluster offers, discovered by the operator at start-up."""

    monitoring: bool = False
    """The cluster serves monitoring.coreos.com (ServiceMonitor, PrometheusRule)."""
    keda: bool = True
    """The cluster serves keda.sh; without it a keda policy is an error."""
    ray: bool = True
    """The cluster serves ray.io/v1 RayCronJob (KubeRay 1.6 or later); without it training
    engine RayJob is an error.
    True by default, as `keda`: offline `recsys render` and `recsys validate` assume it."""
    prometheus_url: str = DEFAULT_PROMETHEUS_URL
    """Prometheus that KEDA's latency trigger queries."""
    prometheus_namespace: str | None = None
    """Namespace whose pods may scrape the metrics ports; None: any source may."""


def effective_scaling(
    system: RecommenderSystem, policy: ScalingPolicy | None
) -> EffectiveScaling | None:
    """The policy as narrowed by the system; None when the system references no policy."""
    ref = system.spec.scaling_policy_ref
    if ref is None:
        return None
    if policy is None or policy.metadata.name != ref.name:
        raise PolicyViolation(
            f'ScalingPolicy "{ref.name}"',
            [
                FieldIssue(
                    "spec.scalingPolicyRef.name",
                    f'ScalingPolicy "{ref.name}" not found in this namespace',
                )
            ],
        )
    return resolve_scaling(system.spec, policy.spec, policy.metadata.name)


def _owner_reference(system: RecommenderSystem) -> dict[str, Any]:
    return {
        "apiVersion": system.api_version,
        "kind": system.kind,
        "name": system.metadata.name,
        "uid": system.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _training_schedule(system: RecommenderSystem, options: RenderOptions) -> dict[str, Any]:
    """The CronJob or, with engine RayJob, the RayCronJob of spec.training."""
    training = system.spec.training
    assert training is not None
    ray = training.engine is TrainingEngine.RAY_JOB
    if ray and not options.ray:
        raise EngineNotServed(
            "training",
            [
                FieldIssue(
                    "spec.training.engine",
                    f"engine RayJob needs KubeRay 1.6 or later, but the cluster does not serve "
                    f"{RAY_GROUP} RayCronJob; install or upgrade KubeRay (then restart the "
                    "operator) or use engine CronJob",
                )
            ],
        )
    try:
        return build_training_raycronjob(system) if ray else build_training_cronjob(system)
    except UnsupportedTrainingUri as exc:
        raise InvalidSpec("training", [FieldIssue(exc.field, str(exc))]) from None


def render_system(
    system: RecommenderSystem,
    policy: ScalingPolicy | None = None,
    options: RenderOptions | None = None,
) -> list[dict[str, Any]]:
    """Every Kubernetes object of one RecommenderSystem, in apply order.

    Raises PolicyViolation for a missing or exceeded ScalingPolicy, InvalidSpec for
    an archive, log or model-store URI a cluster cannot use, and EngineNotServed for a
    training engine whose API the cluster does not serve (all InvalidResource, with
    field paths).
    """
    options = options or RenderOptions()
    scaling = effective_scaling(system, policy)
    if scaling is not None and scaling.engine == "keda" and not options.keda:
        raise PolicyViolation(
            "autoscaling",
            [
                FieldIssue(
                    "spec.scalingPolicyRef.name",
                    f'ScalingPolicy "{scaling.policy_name}" uses engine keda, '
                    "but the cluster does not serve keda.sh",
                )
            ],
        )
    plan = traffic_plan(system)
    autoscaled = scaling is not None
    capacity = serving_capacity(system, plan, scaling)

    objects: list[dict[str, Any]] = []
    gateway_config = build_gateway_configmap(system, plan)
    # The gateway pods' identity and their right to watch the routing: before the
    # Deployment, so its pods never start without them.
    gateway_account = build_gateway_service_account(system)
    gateway_role = build_gateway_role(system, gateway_config)
    objects += [
        gateway_config,
        gateway_account,
        gateway_role,
        build_gateway_role_binding(system, gateway_role, gateway_account),
    ]
    # Before any pod: none runs without its policies (the allow ones come first).
    objects += build_network_policies(
        system,
        gateway_port=GATEWAY_PORT,
        inference_port=INFERENCE_PORT,
        prometheus_namespace=options.prometheus_namespace,
    )
    for track, version in serving_tracks(plan.stable_version, plan.canary_version):
        try:
            configmap = build_serving_configmap(system, track, version)
            replicas = capacity.stable_replicas if track == "stable" else capacity.canary_replicas
            deployment = build_serving_deployment(system, track, version, configmap, replicas)
        except UnsupportedArchiveUri as exc:
            raise InvalidSpec("serving", [FieldIssue("spec.model.archiveUri", str(exc))]) from None
        objects += [configmap, build_serving_service(system, track, version), deployment]
    objects.append(build_gateway_service(system))
    objects.append(
        build_gateway_deployment(
            system,
            gateway_config,
            gateway_account,
            None if autoscaled else system.spec.gateway.replicas,
        )
    )
    objects.append(
        build_feature_job_deployment(system, None if autoscaled else system.spec.features.replicas)
    )
    if system.spec.training is not None:
        objects.append(_training_schedule(system, options))
    if scaling is not None:
        auth = build_pulsar_trigger_authentication(system) if scaling.engine == "keda" else None
        objects += [auth] if auth else []
        assert capacity.scaling is not None
        objects += build_autoscalers(system, capacity.scaling, options.prometheus_url)
        objects += build_disruption_budgets(system, scaling.min_available_percent)
    if options.monitoring:
        objects += [
            build_features_metrics_service(system),
            build_service_monitor(system),
            build_prometheus_rule(system, scaling),
        ]
    if system.metadata.uid:
        for obj in objects:
            obj["metadata"]["ownerReferences"] = [_owner_reference(system)]
    return objects
