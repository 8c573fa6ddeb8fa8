"""The `recsys` command line: one entry point for users, CI and local mode.

Commands are grouped by the package that implements them; this module only
wires them together and holds the API-level commands (crds, validate, render).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from recsys_contracts.env_vars import OperatorEnv
from recsys_operator import __version__
from recsys_operator.render.autoscaling import DEFAULT_PROMETHEUS_URL

if TYPE_CHECKING:
    from recsys_operator.manifests import Document

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
        metavar="<path>",
        help="Manifest file or folder (YAML, several documents allowed; '-' reads stdin). Repeatable.",
    ),
]


@app.command()
def version() -> None:
    """Print the version of recsys-operator."""
    typer.echo(__version__)


DEFAULT_CRD_DIRS = [Path("crds"), Path("charts/recsys-operator/crds")]


@app.command()
def crds(
    out: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="<folder>",
            help="Folder to write the CRD YAML files into (repeatable). Default: crds/ and the chart's crds/.",
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Only report whether the files are up to date.")
    ] = False,
) -> None:
    """Generate the CustomResourceDefinitions from the API models."""
    from recsys_operator.crd import stale_crd_files, write_crd_files

    folders = out or DEFAULT_CRD_DIRS
    if check:
        stale = [f"{folder}/{name}" for folder in folders for name in stale_crd_files(folder)]
        if stale:
            typer.echo(f"out of date: {', '.join(stale)} (run `recsys crds`)", err=True)
            raise typer.Exit(1)
        typer.echo(f"up to date: {', '.join(map(str, folders))}")
        return
    for folder in folders:
        for path in write_crd_files(folder):
            typer.echo(f"wrote {path}")


@app.command()
def rbac(
    check: Annotated[
        bool, typer.Option("--check", help="Only report whether the file is up to date.")
    ] = False,
) -> None:
    """Generate the chart's RBAC rules (templates/_rbac_rules.tpl) from operator/rbac.py."""
    from recsys_operator.rbac import CHART_RULES_FILE, chart_rules_template

    text = chart_rules_template()
    if check:
        if not CHART_RULES_FILE.is_file() or CHART_RULES_FILE.read_text() != text:
            typer.echo(f"out of date: {CHART_RULES_FILE} (run `recsys rbac`)", err=True)
            raise typer.Exit(1)
        typer.echo(f"up to date: {CHART_RULES_FILE}")
        return
    CHART_RULES_FILE.write_text(text)
    typer.echo(f"wrote {CHART_RULES_FILE}")


@app.command()
def docs(
    out: Annotated[Path, typer.Option(help="Where to write the API reference.")] = Path(
        "docs/api-reference.md"
    ),
    check: Annotated[
        bool, typer.Option("--check", help="Only report whether the file is up to date.")
    ] = False,
) -> None:
    """Generate the API reference (docs/api-reference.md) from the API models."""
    from recsys_operator.api_reference import render_api_reference

    text = render_api_reference()
    if check:
        if not out.is_file() or out.read_text() != text:
            typer.echo(f"{out} is out of date (run `recsys docs`)", err=True)
            raise typer.Exit(1)
        typer.echo(f"{out} is up to date")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"wrote {out}")


def _load_manifests(paths: list[Path]) -> list[Document]:
    """The documents of the -f paths; a path with nothing to read, or no document at all,
    is an error (exit 1)."""
    from recsys_operator.manifests import ManifestPathError, load_documents

    try:
        documents = load_documents(paths)
    except ManifestPathError as exc:
        typer.echo(f"error: -f {exc}", err=True)
        raise typer.Exit(1) from None
    if not documents:
        # e.g. `helm template ... | recsys validate -f -` after helm failed: not a pass.
        names = ", ".join(str(p) for p in paths)
        typer.echo(f"error: -f {names}: no YAML document to check", err=True)
        raise typer.Exit(1)
    return documents


@app.command()
def validate(
    filename: FilesOption,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Check for local mode (`recsys up`), which trains a model when archiveUri is absent.",
        ),
    ] = False,
) -> None:
    """Check manifests against the CRD schemas and every rule the operator applies.

    Exits 0 when every recsys.dev document is valid, 1 otherwise; each problem
    is printed with the path of the field it is about. Without --local, also what the
    operator finds only when it renders the children (e.g. a missing archiveUri).
    """
    from recsys_operator.manifests import validate_documents

    report = validate_documents(_load_manifests(filename), for_cluster=not local)
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
    from recsys_contracts.field_issues import InvalidResource
    from recsys_operator.manifests import dump_yaml_documents, validate_documents
    from recsys_operator.render import render_system

    if output not in ("yaml", "json"):
        raise typer.BadParameter("must be yaml or json", param_hint="--output")
    report = validate_documents(
        _load_manifests(filename), default_namespace=namespace, for_cluster=True
    )
    if not report.ok:
        for line in report.lines():
            typer.echo(line, err=True)
        raise typer.Exit(1)
    objects = []
    for system in report.systems:
        policy = report.policy_for(system)
        ref = system.spec.scaling_policy_ref
        if ref is not None and policy is None:
            # `validate` may leave the policy to the cluster; the objects depend on it.
            typer.echo(
                f"error RecommenderSystem/{system.metadata.name}: spec.scalingPolicyRef names "
                f'ScalingPolicy "{ref.name}" in namespace {system.metadata.namespace}, which is '
                "not among the files: give its manifest with another -f "
                "(e.g. -f examples/scaling-policy.yaml)",
                err=True,
            )
            raise typer.Exit(1)
        try:
            objects.extend(render_system(system, policy))
        except InvalidResource as exc:
            typer.echo(f"error RecommenderSystem/{system.metadata.name}", err=True)
            for issue in exc.issues:
                typer.echo(f"      {issue}", err=True)
            raise typer.Exit(1) from None
    if output == "json":
        typer.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
    else:
        typer.echo(dump_yaml_documents(objects), nl=False)


operator_app = typer.Typer(help="Run the Kubernetes operator.", no_args_is_help=True)
app.add_typer(operator_app, name="operator")


@operator_app.command("run")
def operator_run(
    namespace: Annotated[
        list[str] | None,
        typer.Option(
            "--namespace",
            "-n",
            metavar="NAMESPACE",
            help="Watch this namespace (repeatable; globs allowed).",
        ),
    ] = None,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="Watch every namespace.")
    ] = False,
    metrics_address: Annotated[
        str, typer.Option(help="host:port serving the operator's /metrics.")
    ] = "127.0.0.1:8080",
    liveness: Annotated[
        str | None, typer.Option(help="Liveness endpoint, e.g. http://0.0.0.0:8081/healthz.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info or warning.")] = "info",
    prometheus_url: Annotated[
        str,
        typer.Option(
            envvar=OperatorEnv.PROMETHEUS_URL,
            show_envvar=True,
            help="Prometheus that rollout analysis and KEDA's latency/GPU triggers query.",
        ),
    ] = DEFAULT_PROMETHEUS_URL,
    prometheus_namespace: Annotated[
        str | None,
        typer.Option(
            envvar=OperatorEnv.PROMETHEUS_NAMESPACE,
            show_envvar=True,
            help="Namespace of the Prometheus that scrapes the systems: the rendered "
            "NetworkPolicies let only its pods reach the metrics ports (default: any source).",
        ),
    ] = None,
    resync_seconds: Annotated[
        float,
        typer.Option(
            envvar=OperatorEnv.RESYNC_SECONDS,
            show_envvar=True,
            min=1,
            help="Seconds between periodic reconciles of every system.",
        ),
    ] = 60.0,
    rollout_tick_seconds: Annotated[
        float,
        typer.Option(
            envvar=OperatorEnv.ROLLOUT_TICK_SECONDS,
            show_envvar=True,
            min=0.1,
            help="Seconds between rollout steps' checks (analysis, promotion, rollback).",
        ),
    ] = 10.0,
) -> None:
    """Reconcile RecommenderSystems and ScalingPolicies.

    Connects with the in-cluster service account, else $KUBECONFIG (or ~/.kube/config)
    and its current context: it runs as well outside the cluster (docs/operations.md,
    "Running the operator outside the cluster"). Every option can also be set by the
    environment variable shown beside it.
    """
    import logging
    import os

    import kopf
    from prometheus_client import start_http_server

    # The handlers module reads these at import.
    os.environ[OperatorEnv.PROMETHEUS_URL] = prometheus_url
    if prometheus_namespace:
        os.environ[OperatorEnv.PROMETHEUS_NAMESPACE] = prometheus_namespace
    os.environ[OperatorEnv.RESYNC_SECONDS] = str(resync_seconds)
    os.environ[OperatorEnv.ROLLOUT_TICK_SECONDS] = str(rollout_tick_seconds)

    if bool(namespace) == all_namespaces:
        raise typer.BadParameter("give either --namespace (one or more) or --all-namespaces")
    level = level_of(log_level)
    if level is None:
        raise typer.BadParameter("must be debug, info or warning", param_hint="--log-level")
    if (missing := _missing_kube_config()) is not None:
        typer.echo(f"error: {missing}", err=True)
        raise typer.Exit(1)
    host, _, port = metrics_address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1")
    kopf.configure(verbose=level <= logging.INFO, debug=level <= logging.DEBUG)
    logging.getLogger().setLevel(level)
    if level > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_timer_runs_only_at_debug)
    import recsys_operator.controller.handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=all_namespaces,
        namespaces=namespace or [],
        standalone=True,  # one replica; no peering objects to install
        liveness_endpoint=liveness,
    )


def level_of(log_level: str) -> int | None:
    """The logging level of --log-level, None when it names none."""
    import logging

    return {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}.get(log_level)


def _missing_kube_config() -> str | None:
    """Why the operator could not connect at all, or None. In a pod the service account
    is used; outside one, without a kubeconfig file, Kopf's startup would only retry the
    same failure (with a traceback) every minute."""
    import os

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    named = os.environ.get("KUBECONFIG")
    files = [Path(p).expanduser() for p in (named or "~/.kube/config").split(os.pathsep) if p]
    if any(f.is_file() for f in files):
        return None
    where = f"$KUBECONFIG ({named})" if named else "~/.kube/config"
    return (
        f"no Kubernetes configuration: not in a pod, and {where} is not a file. Point "
        "$KUBECONFIG at the cluster's kubeconfig (docs/operations.md, \"Running the "
        'operator outside the cluster")'
    )


def _timer_runs_only_at_debug(record: Any) -> bool:
    """Kopf logs every timer run at info ("Timer 'resync_system' succeeded."): at a resync a
    minute per system that is most of the log. Keep them for --log-level debug."""
    message = record.getMessage()
    return not (message.startswith("Timer '") and message.endswith("succeeded."))


def _register_package_commands() -> None:
    from gateway.cli import register as register_gateway_commands
    from model_handlers.cli import register as register_model_commands
    from recsys_operator.local.cli import register as register_local_commands
    from stream_jobs.cli import register as register_stream_commands

    register_model_commands(app)
    register_stream_commands(app)
    register_gateway_commands(app)
    register_local_commands(app)


_register_package_commands()


# Modules that only some commands need, each from a distribution that only the extras
# named here install (pyproject.toml's optional-dependencies; tests/test_images.py checks).
OPTIONAL_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("torch", ("serving",)),
    "faiss": ("faiss-cpu", ("serving",)),
    "ts": ("torchserve", ("serving",)),
    "model_archiver": ("torch-model-archiver", ("serving",)),
    "pulsar": ("pulsar-client", ("stream", "gateway")),
    "fastavro": ("fastavro", ("stream", "gateway")),
    "redis": ("redis", ("stream", "serving")),
    "matplotlib": ("matplotlib", ("demo",)),
    "pyarrow": ("pyarrow", ("eventlog", "serving")),
    "fsspec": ("fsspec", ("eventlog",)),
    "s3fs": ("s3fs", ("eventlog",)),
}


def missing_extra_message(error: ModuleNotFoundError) -> str | None:
    """What to install when a command imports an optional module this installation lacks."""
    module = (error.name or "").partition(".")[0]
    if module not in OPTIONAL_MODULES:
        return None
    distribution, extras = OPTIONAL_MODULES[module]
    return (
        f"this command needs {distribution} (module {module}), which is not installed; "
        f"it comes with the extra {' or '.join(extras)}: pip install 'recsys-operator[{extras[0]}]'"
    )


def main() -> None:
    try:
        app(prog_name="recsys")
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
