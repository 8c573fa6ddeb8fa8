"""The API group and version of the operator's custom resources.

The pydantic base every model builds on lives in `recsys_contracts.api_base`, shared with
the data-plane components.
"""

GROUP = "recsys.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
