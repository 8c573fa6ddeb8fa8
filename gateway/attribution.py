"""Request ids that say which variant and model version served a response, signed.

Any gateway replica may receive the click that follows a recommendation served by
another replica, and replicas share no state. So the request id carries what the
click needs to be attributed, and a signature that proves a gateway issued it:

    <32 hex nonce><32 hex signature>.<variant>.<model_version>
    e.g. 5f0c6d1e2a7b4c3d9e8f00112233aabb7c1d...e2.canary.2

The nonce is random (uniqueness); the signature is the first 16 bytes of
HMAC-SHA256(key, "<nonce>.<variant>.<model_version>"). The variant is `stable` or
`canary`, prefixed `pinned-` when a QA header or cookie chose it (`gateway.pinning`: such
clicks are kept out of the analysis); the model version follows the API's version
pattern, may itself contain dots (it is the rest of the id), and is `fallback` when the
response came from the popularity fallback (so the fallback's clicks never count for a
model's CTR). Clients treat the id as opaque and send it back with their events; a click
whose id does not verify (forged, or signed with a key no longer accepted) is refused, so
only verified clicks reach CTR.

Keys rotate without refusing live ids: the gateway signs with the current key and
verifies with the current and the previous one (`GatewayEnv.REQUEST_ID_KEY`,
`GatewayEnv.REQUEST_ID_PREVIOUS_KEY`; in a cluster from the Secret named in
`spec.gateway.requestIdKeys`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from recsys_contracts.env_vars import GatewayEnv
from recsys_contracts.model_version import MODEL_VERSION_PATTERN
from recsys_contracts.variant_assignment import Variant

log = logging.getLogger("gateway.attribution")

REQUEST_ID_PATTERN = (
    r"^[0-9a-f]{64}\.(pinned-)?(stable|canary)\." + MODEL_VERSION_PATTERN.removeprefix("^")
)
PINNED_PREFIX = "pinned-"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
NONCE_HEX = 32
SIGNATURE_BYTES = 16
MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class Attribution:
    """Who served a response, as recovered from its request id."""

    variant: Variant
    model_version: str
    pinned: bool = False  # the variant was chosen by a QA header or cookie


class NonceSource:
    """Random nonces from the OS's CSPRNG, read a few kilobytes at a time.

    `secrets.token_hex` per request is a system call that releases the GIL: each one
    lets the event sink's and Pulsar's threads in, and the event loop then waits to get
    the GIL back. One read per `BATCH` nonces gives the same bytes at a fraction of that."""

    BATCH = 256

    def __init__(self, size: int) -> None:
        self._size = size
        self._pool = b""
        self._at = 0

    def next_hex(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = secrets.token_bytes(self._size * self.BATCH), 0
        start, self._at = self._at, self._at + self._size
        return self._pool[start : self._at].hex()


class UnverifiedRequestId(ValueError):
    """A well-formed request id whose signature no accepted key made."""


def parse_request_id(request_id: str) -> Attribution:
    """The variant and model version inside a request id (its signature unchecked:
    `RequestIds.verify` checks it); ValueError if it is not one."""
    if not _REQUEST_ID.fullmatch(request_id):
        raise ValueError(
            "request_id must be an id this gateway issued: "
            "<64 hex digits>.<stable|canary|pinned-stable|pinned-canary>.<model_version>"
        )
    _, variant, model_version = request_id.split(".", 2)
    pinned = variant.startswith(PINNED_PREFIX)
    return Attribution(Variant(variant.removeprefix(PINNED_PREFIX)), model_version, pinned)


class RequestIds:
    """Issues and verifies the signed request ids with one current and one previous key."""

    def __init__(self, current_key: bytes, previous_key: bytes | None = None) -> None:
        for key in filter(None, (current_key, previous_key)):
            if len(key) < MIN_KEY_BYTES:
                raise ValueError(f"a request-id key needs at least {MIN_KEY_BYTES} bytes")
        self._keys = [HmacSha256(k) for k in (current_key, previous_key) if k]
        self._nonces = NonceSource(NONCE_HEX // 2)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RequestIds:
        """Keys from the environment; without one, a random key of this process alone
        (ids then verify only at this instance, until it restarts)."""
        environ = os.environ if environ is None else environ
        current = environ.get(GatewayEnv.REQUEST_ID_KEY, "").encode()
        previous = environ.get(GatewayEnv.REQUEST_ID_PREVIOUS_KEY, "").encode()
        if not current:
            log.warning(
                "%s is not set: request ids are signed with a random key of this process, "
                "so clicks on answers of other replicas, or of before a restart, are refused",
                GatewayEnv.REQUEST_ID_KEY,
            )
            current = secrets.token_bytes(32)
        return cls(current, previous or None)

    @classmethod
    def with_keys(cls, keys: Sequence[bytes]) -> RequestIds:
        return cls(keys[0], keys[1] if len(keys) > 1 else None)

    def issue(self, variant: Variant, model_version: str, pinned: bool = False) -> str:
        nonce = self._nonces.next_hex()
        body = f"{PINNED_PREFIX if pinned else ''}{variant.value}.{model_version}"
        return f"{nonce}{self._sign(self._keys[0], nonce, body)}.{body}"

    def verify(self, request_id: str) -> Attribution:
        """The attribution of an id this gateway (or a replica sharing its keys) issued;
        ValueError when it is not a request id, UnverifiedRequestId when it is forged."""
        attribution = parse_request_id(request_id)
        head, body = request_id.split(".", 1)
        nonce, signature = head[:NONCE_HEX], head[NONCE_HEX:]
        for key in self._keys:
            if hmac.compare_digest(self._sign(key, nonce, body), signature):
                return attribution
        raise UnverifiedRequestId("request_id: not issued by this gateway (signature mismatch)")

    @staticmethod
    def _sign(key: HmacSha256, nonce: str, body: str) -> str:
        return key.digest(f"{nonce}.{body}".encode())[:SIGNATURE_BYTES].hex()


class HmacSha256:
    """HMAC-SHA256 with one key (RFC 2104), its padded-key hashes computed once.

    The same bytes as `hmac.digest(key, message, "sha256")`, which sets OpenSSL's HMAC
    up anew on every call: measured in the gateway under load, several times the cost
    of the two hash copies here, once per request."""

    BLOCK = 64

    def __init__(self, key: bytes) -> None:
        if len(key) > self.BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(self.BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()
