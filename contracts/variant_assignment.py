"""Sticky assignment of users to the stable or the canary model.

Each user gets a fixed *traffic position* in [0, 100) from a hash of the rollout's
salt and the user id; the user is in the canary when the position is below the
canary weight. Consequences the rollout relies on:

- sticky: the same (salt, user, weight) always gives the same variant, on every
  gateway replica, with no shared state;
- monotone: raising the weight only moves users from stable to canary, never back,
  so nobody flips back and forth while a rollout advances;
- a new salt (the operator uses a new one per rollout) gives everyone a new,
  independent position, so the same users are not always the guinea pigs.

This module is pure and cheap to import: rollout tests and simulations use it.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from recsys_contracts.metric_names import ANALYSIS_BUCKETS

# A fixed salt of its own: buckets must not line up with variants (each bucket holds
# canary and stable users alike) and must not change between rollouts.
_BUCKET_SALT = "recsys-analysis-bucket"

# 64 bits of hash give positions far finer than any weight anyone will set.
_HASH_BYTES = 8
_HASH_RANGE = float(1 << (8 * _HASH_BYTES))


class Variant(StrEnum):
    STABLE = "stable"
    CANARY = "canary"


def traffic_position(salt: str, user_id: str) -> float:
    """The user's fixed place in [0, 100) for this salt.

    The salt is length-prefixed so that no (salt, user) pair can collide with another
    by moving characters across the boundary ("ab" + "c" vs "a" + "bc").
    """
    message = f"{len(salt)}:{salt}{user_id}".encode()
    digest = hashlib.blake2b(message, digest_size=_HASH_BYTES).digest()
    return int.from_bytes(digest, "big") / _HASH_RANGE * 100.0


def assign_variant(salt: str, user_id: str, canary_weight: float) -> Variant:
    """`CANARY` for the users whose position is below `canary_weight` (percent, 0..100)."""
    if canary_weight <= 0:
        return Variant.STABLE
    if traffic_position(salt, user_id) < canary_weight:
        return Variant.CANARY
    return Variant.STABLE


def analysis_bucket(user_id: str) -> str:
    """The user's metrics bucket, "0" .. str(ANALYSIS_BUCKETS - 1), the same on every replica.

    Whole users fall into one bucket, so the spread of per-bucket click rates shows how
    much users differ; the rollout analysis computes its variance from it."""
    position = traffic_position(_BUCKET_SALT, user_id)  # uniform in [0, 100)
    return str(min(int(position / 100.0 * ANALYSIS_BUCKETS), ANALYSIS_BUCKETS - 1))
