"""recsys-operator: run real-time recommender systems on Kubernetes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recsys-operator")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
