"""`python -m gateway run ...`: the same as `recsys gateway run ...`, for starting the
gateway as a subprocess without the rest of the `recsys` CLI."""

from gateway.cli import gateway_app

gateway_app(prog_name="python -m gateway")
