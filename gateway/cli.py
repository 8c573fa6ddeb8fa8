"""`recsys gateway run`: the gateway as a process of its own."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

gateway_app = typer.Typer(
    help="The gateway clients call: sticky canary routing, fallback, events, metrics.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@gateway_app.callback()
def gateway() -> None:
    """The gateway clients call: sticky canary routing, fallback, events, metrics."""
    # A callback keeps `run` a subcommand when this app runs alone (`python -m gateway run`).


@gateway_app.command()
def run(
    routing: Annotated[
        Path | None,
        typer.Option(help="Routing JSON file (local mode); re-read when it changes."),
    ] = None,
    routing_configmap: Annotated[
        str | None,
        typer.Option(
            metavar="NAMESPACE/NAME",
            help="ConfigMap holding the routing (key routing.json), watched through the "
            "Kubernetes API: in a pod with its service account, else with $KUBECONFIG. "
            "Exactly one of --routing and --routing-configmap.",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port to listen on. Default: from $RECSYS_GATEWAY_ADDRESS, else 8000."),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to listen on. Default: from $RECSYS_GATEWAY_ADDRESS, else 127.0.0.1."
        ),
    ] = None,
    fallback_items: Annotated[
        Path | None,
        typer.Option(
            help="JSON list of popular item ids (best first) to answer with when serving fails. "
            "Default: learn them from what the models serve."
        ),
    ] = None,
    event_spill: Annotated[
        Path | None,
        typer.Option(
            help="File that events not yet acknowledged by the broker are written to at "
            "shutdown, and sent again from at the next start. Default: none (counted as "
            "dropped)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Serve POST /v1/recommend and POST /v1/events until SIGTERM."""
    from gateway.app import GatewaySettings
    from gateway.fallback import FallbackFileError
    from gateway.routing import RoutingError
    from gateway.routing_configmap import ConfigMapRef
    from gateway.server import listen_address, run_gateway

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if (routing is None) == (routing_configmap is None):
            raise ValueError(
                "give the routing with exactly one of --routing FILE and "
                "--routing-configmap NAMESPACE/NAME"
            )
        settings = GatewaySettings(
            routing_path=routing,
            routing_configmap=ConfigMapRef.parse(routing_configmap) if routing_configmap else None,
            fallback_items_path=fallback_items,
            event_spill_path=event_spill,
        )
        listen_host, listen_port = listen_address(host, port)
        run_gateway(settings, host=listen_host, port=listen_port)
    except (RoutingError, FallbackFileError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    """Add `gateway ...` to the `recsys` CLI."""
    app.add_typer(gateway_app, name="gateway")
