"""Reading a request body the client may have got wrong, as a clear 4xx instead of a 500.

- `Content-Type` must be JSON (`application/json` or `application/<x>+json`); a request
  without one is read as JSON (curl and scripts often omit it). Anything else is a 415.
- `Content-Encoding` may be identity, gzip or deflate; another one is a 415, and a body
  that does not decode as the encoding it claims (a plain body sent as gzip) a 400.
- The body may be at most `max_bytes` (the gateway's 1 MiB), as sent and once decoded:
  a small gzip body can decode to gigabytes (413).
- The body must arrive within `BODY_READ_TIMEOUT_S`: a client that opens a request and
  never finishes it would otherwise hold a connection and a task forever (408).
- A JSON object must not name a key twice: parsers disagree on which one wins, so the
  gateway would read a different request than a proxy or log that looked at it (400).
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from gateway.http_server import BodyIncomplete, BodyTooLarge, Request

BODY_READ_TIMEOUT_S = 10.0
DECODABLE_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


class BodyRefused(Exception):
    """The body cannot be read as the client says it is: answer `status`."""

    def __init__(self, status: int, message: str, *, close_connection: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close_connection = close_connection
        """The rest of the body is unread: answer with `Connection: close`."""


async def read_json_body(
    request: Request, timeout_s: float = BODY_READ_TIMEOUT_S, *, max_bytes: int
) -> bytes:
    """The decoded body bytes of a JSON request (at most `max_bytes`, decoded), or
    BodyRefused."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(request.content_type):
        raise BodyRefused(415, f"Content-Type must be application/json, got {content_type!r}")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in DECODABLE_ENCODINGS:
        raise BodyRefused(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    try:
        raw = await request.body(timeout_s)
    except TimeoutError:
        raise BodyRefused(
            408, f"the body did not arrive within {timeout_s:.0f}s", close_connection=True
        ) from None
    except BodyTooLarge:
        raise _too_large(max_bytes) from None
    except BodyIncomplete:
        raise BodyRefused(
            400, "the body could not be read (the request ended before it)", close_connection=True
        ) from None
    if encoding in ("", "identity"):
        return raw
    return _decoded(raw, encoding, max_bytes)


def _too_large(max_bytes: int) -> BodyRefused:
    return BodyRefused(413, f"the body is larger than {max_bytes} bytes", close_connection=True)


def _decoded(raw: bytes, encoding: str, max_bytes: int) -> bytes:
    """`raw` decompressed; a body that is not what it claims is a 400, one that
    decompresses to more than `max_bytes` a 413 (a small gzip can hold gigabytes)."""
    if encoding == "deflate":
        # zlib-wrapped as RFC 9110 says; raw deflate as some clients send it
        wbits = zlib.MAX_WBITS if raw[:2] and int.from_bytes(raw[:2]) % 31 == 0 else -zlib.MAX_WBITS
    else:
        wbits = 16 + zlib.MAX_WBITS
    decoder = zlib.decompressobj(wbits)
    try:
        decoded = decoder.decompress(raw, max_bytes + 1)
        if len(decoded) > max_bytes or decoder.unconsumed_tail:
            raise _too_large(max_bytes)
        decoded += decoder.flush()
    except zlib.error as exc:
        raise BodyRefused(400, f"the body could not be read (not {encoding}: {exc})") from None
    if not decoder.eof:
        raise BodyRefused(400, f"the body could not be read (the {encoding} stream is cut short)")
    if len(decoded) > max_bytes:
        raise _too_large(max_bytes)
    return decoded


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicates(items: list[tuple[str, Any]]) -> dict[str, Any]:
    seen = set()
    for key, _ in items:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(items)


# Built once: `json.loads(..., object_pairs_hook=...)` builds a decoder on every call,
# which cost more than parsing a recommend request.
_DECODER = json.JSONDecoder(object_pairs_hook=_refuse_duplicates)


def duplicate_key(raw: bytes) -> str | None:
    """The first key some object in the JSON `raw` names twice; None when there is none
    (or `raw` is not JSON: the validation reports that)."""
    try:
        _DECODER.decode(raw.decode("utf-8"))
    except _DuplicateKey as found:
        return found.key
    except ValueError:  # not UTF-8 (UnicodeDecodeError) or not JSON
        return None
    return None
