"""Which model the operator serves: the spec's, or a candidate that training published.

With `spec.training.autoRollout`, a candidate that passed the gate starts a progressive
rollout by itself. The spec is never edited for it (under GitOps, Argo CD would revert
the edit, or fight the operator over it): the candidate is read from status.training and
takes the place of spec.model's version and archive in memory, for the renderers and the
rollout driver alike. The person who wrote the spec stays in charge: once they change
spec.model.version, the version they name is served again, whatever training said.
The candidate served is the newest that passed (`status.training.rolloutCandidate`): a
later run that is gated out or fails leaves it in place.
"""

from __future__ import annotations

from recsys_operator.api.recommender_system import ModelSpec
from recsys_operator.api.resources import RecommenderSystem


def auto_rollout_candidate(system: RecommenderSystem) -> ModelSpec | None:
    """spec.model with the published candidate's version and archive, when autoRollout
    applies to it (None: serve what the spec says)."""
    training = system.spec.training
    last_run = system.status.training if system.status else None
    if training is None or not training.auto_rollout or last_run is None:
        return None
    candidate = last_run.rollout_candidate
    model = system.spec.model
    if candidate is None or candidate.spec_model_version != model.version:
        return None  # nothing passed yet, or a person changed the spec since
    return model.model_copy(
        update={"version": candidate.version, "archive_uri": candidate.archive_uri}
    )


def serving_system(system: RecommenderSystem) -> RecommenderSystem:
    """`system` as the operator renders and rolls it out: spec.model replaced by an
    autoRollout candidate where one applies, else `system` itself."""
    candidate = auto_rollout_candidate(system)
    if candidate is None:
        return system
    spec = system.spec.model_copy(update={"model": candidate})
    return system.model_copy(update={"spec": spec})
