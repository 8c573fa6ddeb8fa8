"""recsys-operator's shared contracts: everything two deployables must agree on.

The event schema and its bounds, the feature-store key layout and endpoint (one Redis or
a cluster), the routing document and sticky variant assignment, the archive layout, the
handler's request, metric names and labels, each deployable's environment variables, the
model-version pattern, the pydantic base of every API and settings model, how a file
store named by URI is opened and written durably (`file_store`), and the project version.

This package is the bottom layer: `stream_jobs`, `gateway`, `model_handlers` and the
operator import it, and it imports none of them (tests/test_layering.py checks).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recsys-operator")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
