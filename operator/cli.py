"""The `recsys` command line: one entry point for users, CI and local mode.

Commands are grouped by the package that implements them; this module only
wires them together and holds the API-level commands (crds, validate, render).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml

from recsys_operator import __version__

app = typer.Typer(
    name="recsys",
    help="Run real-time recommender systems on Kubernetes (and locally).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

FilesOption = Annotated[
    list[Path],
    typer.Option(
        "--filename",
        "-f",
        help="Manifest file or folder (YAML, several documents allowed; '-' reads stdin). Repeatable.",
    ),
]


@app.command()
def version() -> None:
    """Print the version of recsys-operator."""
    typer.echo(__version__)


@app.command()
def crds(
    out: Annotated[Path, typer.Option(help="Folder to write the CRD YAML files into.")] = Path(
        "crds"
    ),
    check: Annotated[
        bool, typer.Option("--check", help="Only report whether the files are up to date.")
    ] = False,
) -> None:
    """Generate the CustomResourceDefinitions from the API models."""
    from recsys_operator.crd import stale_crd_files, write_crd_files

    if check:
        stale = stale_crd_files(out)
        if stale:
            typer.echo(f"out of date in {out}/: {', '.join(stale)} (run `recsys crds`)", err=True)
            raise typer.Exit(1)
        typer.echo(f"{out}/ is up to date")
        return
    for path in write_crd_files(out):
        typer.echo(f"wrote {path}")


@app.command()
def validate(filename: FilesOption) -> None:
    """Check manifests against the CRD schemas and the operator's own rules.

    Exits 0 when every recsys.dev document is valid, 1 otherwise; each problem
    is printed with the path of the field it is about.
    """
    from recsys_operator.manifests import load_documents, validate_documents

    report = validate_documents(load_documents(filename))
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def render(
    filename: FilesOption,
    output: Annotated[str, typer.Option("--output", "-o", help="yaml or json.")] = "yaml",
    namespace: Annotated[
        str, typer.Option("--namespace", "-n", help="Namespace for resources that name none.")
    ] = "default",
) -> None:
    """Print the Kubernetes objects the operator would apply for the given manifests.

    Give the RecommenderSystem and, when it references one, its ScalingPolicy.
    """
    from recsys_operator.manifests import load_documents, validate_documents
    from recsys_operator.render import render_system

    report = validate_documents(load_documents(filename), default_namespace=namespace)
    if not report.ok:
        for line in report.lines():
            typer.echo(line, err=True)
        raise typer.Exit(1)
    objects = []
    for system in report.systems:
        policy = report.policy_for(system)
        objects.extend(render_system(system, policy))
    if output == "json":
        typer.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    elif output == "yaml":
        typer.echo(yaml.safe_dump_all(objects, sort_keys=False, width=120), nl=False)
    else:
        raise typer.BadParameter("must be yaml or json", param_hint="--output")


def _register_package_commands() -> None:
    from model_handlers.cli import register as register_model_commands
    from stream_jobs.cli import register as register_stream_commands

    register_model_commands(app)
    register_stream_commands(app)


_register_package_commands()


def main() -> None:
    app(prog_name="recsys")


if __name__ == "__main__":
    main()
