"""Request ids that say which variant and model version served a response.

Any gateway replica may receive the click that follows a recommendation served by
another replica, and replicas share no state. So the request id carries what the
click needs to be attributed:

    <32 lowercase hex digits>.<variant>.<model_version>
    e.g. 5f0c6d1e2a7b4c3d9e8f00112233aabb.canary.2

The hex part is random (uniqueness); the variant is `stable` or `canary`, prefixed
`pinned-` when a QA header or cookie chose it (`gateway.pinning`: such clicks are kept
out of the analysis); the model
version follows the API's version pattern, may itself contain dots (it is the rest
of the id), and is `fallback` when the response came from the popularity fallback
(so the fallback's clicks never count for a model's CTR). Clients treat the id as
opaque and send it back with their events.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from recsys_contracts.model_version import MODEL_VERSION_PATTERN
from recsys_contracts.variant_assignment import Variant

REQUEST_ID_PATTERN = (
    r"^[0-9a-f]{32}\.(pinned-)?(stable|canary)\." + MODEL_VERSION_PATTERN.removeprefix("^")
)
PINNED_PREFIX = "pinned-"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


@dataclass(frozen=True)
class Attribution:
    """Who served a response, as recovered from its request id."""

    variant: Variant
    model_version: str
    pinned: bool = False  # the variant was chosen by a QA header or cookie


def new_request_id(variant: Variant, model_version: str, pinned: bool = False) -> str:
    prefix = PINNED_PREFIX if pinned else ""
    return f"{secrets.token_hex(16)}.{prefix}{variant.value}.{model_version}"


def parse_request_id(request_id: str) -> Attribution:
    """The variant and model version inside a request id; ValueError if it is not one."""
    if not _REQUEST_ID.fullmatch(request_id):
        raise ValueError(
            "request_id must be an id this gateway issued: "
            "<32 hex digits>.<stable|canary>.<model_version>"
        )
    _, variant, model_version = request_id.split(".", 2)
    pinned = variant.startswith(PINNED_PREFIX)
    return Attribution(Variant(variant.removeprefix(PINNED_PREFIX)), model_version, pinned)
