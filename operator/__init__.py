"""recsys-operator: run real-time recommender systems on Kubernetes."""

from recsys_contracts import __version__

__all__ = ["__version__"]
