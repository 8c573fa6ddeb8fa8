"""What a model version may be called, and the version reserved for fallback answers."""

MODEL_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
"""A model version: in the spec, in TorchServe URLs, in metric labels and in events."""

FALLBACK_MODEL_VERSION = "fallback"
"""`model_version` of answers from the gateway's popularity fallback (never a real version:
the pattern allows it, so the routing refuses it as a model version)."""
