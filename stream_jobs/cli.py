"""`recsys` commands of the stream jobs: `recsys events send`, `recsys features run` and
`recsys event-log run|compact`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from recsys_contracts.env_vars import PREFIX as ENV_PREFIX
from recsys_contracts.env_vars import EventWireEnv
from recsys_contracts.event_log_settings import EventLogSettings
from recsys_contracts.feature_job_settings import FeatureJobSettings, SubscriptionType
from recsys_contracts.store_endpoint import StoreMode

events_app = typer.Typer(help="Send user events to the interactions topic.", no_args_is_help=True)
features_app = typer.Typer(help="The stream feature job.", no_args_is_help=True)
event_log_app = typer.Typer(
    help="The offline event log: Parquet files of the events, for training.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `recsys` CLI."""
    app.add_typer(events_app, name="events")
    app.add_typer(features_app, name="features")
    app.add_typer(event_log_app, name="event-log")


# --- recsys events send ----------------------------------------------------------


@events_app.command("send")
def send_events(
    source: Annotated[
        str, typer.Argument(help="File of JSON events, one per line; '-' reads stdin.")
    ] = "-",
    service_url: Annotated[
        str | None,
        typer.Option(
            envvar="RECSYS_EVENTS_SERVICE_URL",
            help="Pulsar service URL. Default: the broker of the local system running "
            "(`recsys up`), from its .runs/<system>/state.json.",
            show_default=False,
        ),
    ] = None,
    topic: Annotated[
        str | None,
        typer.Option(
            envvar="RECSYS_EVENTS_TOPIC",
            help="The interactions topic. Default: the running local system's.",
            show_default=False,
        ),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option(help="Which running local system (NS.NAME), when there are several."),
    ] = None,
    timeout: Annotated[
        int, typer.Option(help="Seconds to connect, find the topic and have each send stored.")
    ] = 10,
    token: Annotated[
        str | None,
        typer.Option(envvar="RECSYS_PULSAR_TOKEN", help="Pulsar JWT, if the cluster wants one."),
    ] = None,
    fill_missing: Annotated[
        bool,
        typer.Option(
            "--fill-missing",
            help="Give events without event_id or ts a random id and the current time.",
        ),
    ] = False,
    key_based_batching: Annotated[
        bool,
        typer.Option(
            "--key-based-batching",
            help="Batch per user (for KeyShared subscriptions on a real Pulsar cluster).",
        ),
    ] = False,
    wire_format: Annotated[
        str,
        typer.Option(
            envvar=EventWireEnv.FORMAT,
            help="How events are encoded on the topic: avro, or json for consumers that "
            "read only JSON (the feature job reads both).",
        ),
    ] = "avro",
) -> None:
    """Send events (JSON lines, keyed by user_id) and report invalid lines.

    Exits 1 when any line was not a valid event (the valid ones are still sent), 2 when
    the file cannot be read or the broker or topic cannot be reached. A send that timed out may still have been
    stored: sending the same lines again is safe when they carry their `event_id` (the
    feature job counts an id once); with --fill-missing each run makes new ids.
    """
    import pulsar
    from rich.console import Console
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    from recsys_contracts.event_wire import WireFormat
    from stream_jobs.local_target import LocalTargetError, running_local_target
    from stream_jobs.producer import EventProducer, SendFailed, send_lines

    err = Console(stderr=True)
    try:
        encoding = WireFormat(wire_format.strip().lower())
    except ValueError:
        typer.echo(f"error: --wire-format {wire_format!r}: expected avro or json", err=True)
        raise typer.Exit(2) from None
    try:  # before the broker is looked for: a wrong path is the likelier mistake
        # Bytes that are no UTF-8 become lone surrogates, which the event contract refuses:
        # that line is reported invalid, the others are sent (not a decode error midway).
        if source == "-":
            sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")  # type: ignore[union-attr]
            stream = sys.stdin
        else:
            stream = Path(source).open(encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError as exc:
        why = {IsADirectoryError: "is a folder", FileNotFoundError: "no such file"}.get(
            type(exc), exc.strerror or str(exc)
        )
        typer.echo(f"error: cannot read events from {source}: {why}", err=True)
        raise typer.Exit(2) from None
    if service_url is None or topic is None:
        try:
            target = running_local_target(system)
        except LocalTargetError as exc:
            if stream is not sys.stdin:
                stream.close()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        service_url = service_url or target.service_url
        topic = topic or target.interactions_topic
    try:
        with (
            EventProducer(
                service_url,
                topic,
                token=token,
                key_based_batching=key_based_batching,
                timeout_s=timeout,
                wire_format=encoding,
            ) as producer,
            Progress(
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=err,
                disable=not err.is_terminal,
            ) as progress,
        ):
            task = progress.add_task("sending")

            def show(sent: int, invalid: int) -> None:
                progress.update(task, description=f"{sent} sent, {invalid} invalid")

            report = send_lines(producer, stream, fill=fill_missing, on_progress=show)
    except (pulsar.PulsarException, SendFailed) as exc:
        typer.echo(
            f"error: could not send to {topic} at {service_url} within {timeout}s: "
            f"{type(exc).__name__}: {exc}. Events sent before this may still have been "
            "stored; resending lines that carry an event_id is safe.",
            err=True,
        )
        raise typer.Exit(2) from None
    finally:
        if stream is not sys.stdin:
            stream.close()
    for problem in report.problems:
        err.print(
            f"line {problem.line_number}: {problem.reason}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    typer.echo(f"sent {report.sent} events to {topic}; {len(report.problems)} invalid lines")
    if report.without_id_or_time:
        typer.echo(
            f"{report.without_id_or_time} of the invalid lines have no event_id or ts: "
            "--fill-missing gives them a random id and the current time",
            err=True,
        )
    if report.problems:
        raise typer.Exit(1)


# --- recsys features run ---------------------------------------------------------


def _opt(help_text: str) -> typer.models.OptionInfo:
    return typer.Option(help=help_text, show_default=False)


def _setting_opt(model: type[BaseModel], name: str, help_text: str) -> typer.models.OptionInfo:
    """An option whose default is the settings model's (None here means "not given"):
    the help shows that default, which the environment may override."""
    field = model.model_fields[name]
    if field.is_required():
        return _opt(f"{help_text}  [required: here or {ENV_PREFIX}{name.upper()}]")
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list):
        default = ",".join(map(str, default))
    if default is None:
        return _opt(help_text)
    return _opt(f"{help_text}  [default: {default}]")


def _job_opt(name: str, help_text: str) -> typer.models.OptionInfo:
    return _setting_opt(FeatureJobSettings, name, help_text)


def _log_opt(name: str, help_text: str) -> typer.models.OptionInfo:
    return _setting_opt(EventLogSettings, name, help_text)


# The options `features run` and `features rebuild` share, declared once.
SystemIdOption = Annotated[
    str | None, _job_opt("system_id", "Id in the feature keys: <namespace>.<name>.")
]
PulsarServiceUrlOption = Annotated[
    str | None, _job_opt("pulsar_service_url", "Pulsar service URL.")
]
RedisUrlOption = Annotated[str | None, _job_opt("redis_url", "The feature store.")]
RedisModeOption = Annotated[
    StoreMode | None,
    _job_opt("redis_mode", "single, or cluster: the URL names one node of a Redis Cluster."),
]
EmbeddingsPathOption = Annotated[
    Path | None,
    _job_opt(
        "embeddings_path", "Item embeddings: one model's directory or archive, or one per version."
    ),
]


@features_app.command("run")
def run_features(
    system_id: SystemIdOption = None,
    pulsar_service_url: PulsarServiceUrlOption = None,
    pulsar_admin_url: Annotated[
        str | None, _job_opt("pulsar_admin_url", "Pulsar admin URL (backlog metric).")
    ] = None,
    interactions_topic: Annotated[
        str | None, _job_opt("interactions_topic", "The topic to consume.")
    ] = None,
    subscription: Annotated[str | None, _job_opt("subscription", "Subscription name.")] = None,
    subscription_type: Annotated[
        SubscriptionType | None,
        _job_opt("subscription_type", "KeyShared or Failover in production; Shared locally."),
    ] = None,
    dead_letter_topic: Annotated[
        str | None,
        _job_opt(
            "dead_letter_topic",
            "Topic for malformed events. Default: <interactions-topic>-dead-letter.",
        ),
    ] = None,
    redis_url: RedisUrlOption = None,
    redis_mode: RedisModeOption = None,
    store_ttl_seconds: Annotated[
        int | None, _job_opt("store_ttl_seconds", "Expiry of per-user keys.")
    ] = None,
    last_n: Annotated[int | None, _job_opt("last_n", "Recent items kept per user.")] = None,
    windows: Annotated[
        str | None, _job_opt("windows", "Counting windows, comma-separated, e.g. 1h,24h.")
    ] = None,
    session_gap: Annotated[
        str | None, _job_opt("session_gap", "Inactivity that ends a session, e.g. 30m.")
    ] = None,
    dedup_capacity: Annotated[
        int | None, _job_opt("dedup_capacity", "Event ids remembered per user.")
    ] = None,
    online_updates: Annotated[
        bool | None, typer.Option(help="Update user embeddings online.", show_default=False)
    ] = None,
    learning_rate: Annotated[
        float | None, _job_opt("learning_rate", "Step toward a touched item's embedding.")
    ] = None,
    decay: Annotated[
        float | None, _job_opt("decay", "Decay of the user embedding per interaction.")
    ] = None,
    model_version: Annotated[
        str | None, _job_opt("model_version", "The served model version.")
    ] = None,
    model_archive_uri: Annotated[
        str | None,
        _job_opt("model_archive_uri", "Its archive or directory: path, file:// or http(s)://."),
    ] = None,
    embeddings_path: EmbeddingsPathOption = None,
    embeddings_reload: Annotated[
        str | None, _job_opt("embeddings_reload", "How often embeddings are rescanned.")
    ] = None,
    popular_half_life: Annotated[
        str | None, _job_opt("popular_half_life", "Decay of the popular items, e.g. 7d.")
    ] = None,
    max_future: Annotated[
        str | None, _job_opt("max_future", "Events further ahead are dead-lettered.")
    ] = None,
    batch_size: Annotated[int | None, _job_opt("batch_size", "Messages per batch.")] = None,
    batch_wait: Annotated[
        str | None, _job_opt("batch_wait", "Longest wait for a batch to fill, e.g. 5ms.")
    ] = None,
    drain_timeout: Annotated[
        str | None, _job_opt("drain_timeout", "On SIGTERM, time left for the batch.")
    ] = None,
    resubscribe_idle: Annotated[
        str | None,
        _job_opt("resubscribe_idle", "Reopen the subscription after this long idle (pulsar-lite)."),
    ] = None,
    metrics_address: Annotated[
        str | None,
        _job_opt("metrics_address", "host:port of /metrics (0.0.0.0:PORT in a pod); empty: off."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Python log level.")] = "INFO",
) -> None:
    """Consume interaction events and keep per-user features fresh in Redis.

    Every option can also be set as RECSYS_<OPTION> (e.g. RECSYS_REDIS_URL);
    an option given here wins. Secrets come only from the environment:
    RECSYS_PULSAR_TOKEN, RECSYS_REDIS_PASSWORD.
    """
    # The options are the settings' fields by name; None means "not given here".
    given = {name: value for name, value in locals().items() if name != "log_level"}
    from stream_jobs.features import main

    if windows is not None:
        given["windows"] = [w.strip() for w in windows.split(",") if w.strip()]
    raise typer.Exit(main(_job_settings(given, log_level)))


@features_app.command("rebuild")
def rebuild_features(
    system_id: SystemIdOption = None,
    pulsar_service_url: PulsarServiceUrlOption = None,
    interactions_topic: Annotated[
        str | None, _job_opt("interactions_topic", "The topic to replay.")
    ] = None,
    redis_url: RedisUrlOption = None,
    redis_mode: RedisModeOption = None,
    embeddings_path: EmbeddingsPathOption = None,
    log_level: Annotated[str, typer.Option(help="Python log level.")] = "WARNING",
) -> None:
    """Recompute the feature store from the events the interactions topic still holds.

    Reads every partition from its earliest retained message (no subscription is
    touched) and applies the events as the job does, idempotently by event_id: run it
    on an emptied store, or again on a partial one. The other settings (windows, last_n,
    model archives...) come from RECSYS_* as for `recsys features run`: use the job's.
    """
    given = {name: value for name, value in locals().items() if name != "log_level"}
    from stream_jobs.features import FeatureJob, pulsar_client
    from stream_jobs.rebuild import rebuild

    settings = _job_settings(given, log_level)
    job = FeatureJob(settings)
    client = pulsar_client(settings)
    try:
        if settings.online_updates and job.catalog.has_sources:
            job.catalog.refresh()
        items = job.catalog.versions if settings.online_updates else {}
        report = rebuild(settings, client, job.store, items)
    except Exception as exc:  # the Pulsar and Redis clients raise their own families
        typer.echo(f"rebuild failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()
    typer.echo(report.summary())


def _job_settings(given: dict[str, Any], log_level: str) -> FeatureJobSettings:
    """Logging set up, and the job's settings from the environment with the options given
    here on top; a setting that does not validate is named on stderr (exit 2)."""
    from pydantic import ValidationError

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return FeatureJobSettings.from_env(**given)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            typer.echo(f"{where}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


def features_main() -> None:
    """`python -m stream_jobs.features`: the `run` command on its own."""
    app = typer.Typer(add_completion=False)
    app.command()(run_features)
    app(prog_name="python -m stream_jobs.features")


# --- recsys event-log run | compact ------------------------------------------------


@event_log_app.command("run")
def run_event_log(
    log_uri: Annotated[
        str | None,
        _log_opt("log_uri", "Root of the log: a folder (path, file://) or s3://bucket/prefix."),
    ] = None,
    system_id: Annotated[
        str | None, _log_opt("system_id", "The system, <namespace>.<name> (metrics label).")
    ] = None,
    pulsar_service_url: Annotated[
        str | None, _log_opt("pulsar_service_url", "Pulsar service URL.")
    ] = None,
    interactions_topic: Annotated[
        str | None, _log_opt("interactions_topic", "The interactions topic.")
    ] = None,
    impressions_topic: Annotated[
        str | None,
        _log_opt("impressions_topic", "The gateway's impressions topic (joined with the clicks)."),
    ] = None,
    subscription: Annotated[str | None, _log_opt("subscription", "Subscription name.")] = None,
    subscription_type: Annotated[
        SubscriptionType | None, _log_opt("subscription_type", "Subscription type.")
    ] = None,
    dead_letter_topic: Annotated[
        str | None,
        _log_opt(
            "dead_letter_topic",
            "Topic for malformed events. Default: <interactions-topic>-event-log-dead-letter.",
        ),
    ] = None,
    flush_rows: Annotated[
        int | None, _log_opt("flush_rows", "Buffered events that trigger a write.")
    ] = None,
    flush_interval: Annotated[
        str | None, _log_opt("flush_interval", "Longest wait before a write, e.g. 5s.")
    ] = None,
    click_window: Annotated[
        str | None,
        _log_opt("click_window", "Event time an impression waits for its clicks, e.g. 30m."),
    ] = None,
    max_pending_impressions: Annotated[
        int | None,
        _log_opt(
            "max_pending_impressions",
            "Impressions waiting for clicks past which the oldest are written.",
        ),
    ] = None,
    dedup_horizon: Annotated[
        str | None,
        _log_opt(
            "dedup_horizon", "At start, ids of files written this recently are loaded, e.g. 2h."
        ),
    ] = None,
    compact_min_files: Annotated[
        int | None, _log_opt("compact_min_files", "Files that make a partition merge.")
    ] = None,
    compact_interval: Annotated[
        str | None, _log_opt("compact_interval", "How often partitions are checked.")
    ] = None,
    max_future: Annotated[
        str | None, _log_opt("max_future", "Events further ahead are dead-lettered.")
    ] = None,
    batch_size: Annotated[int | None, _log_opt("batch_size", "Messages per receive.")] = None,
    batch_wait: Annotated[
        str | None, _log_opt("batch_wait", "Longest wait for a receive to fill.")
    ] = None,
    resubscribe_idle: Annotated[
        str | None,
        _log_opt("resubscribe_idle", "Reopen the subscription after this long idle (pulsar-lite)."),
    ] = None,
    drain_timeout: Annotated[
        str | None, _log_opt("drain_timeout", "On SIGTERM, time left to write.")
    ] = None,
    metrics_address: Annotated[
        str | None,
        _log_opt("metrics_address", "host:port of /metrics (0.0.0.0:PORT in a pod); empty: off."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Python log level.")] = "INFO",
) -> None:
    """Append the events of the topics to the offline log (Parquet, by date and hour).

    Interactions land in <log-uri>/interactions/date=YYYY-MM-DD/hour=HH/, impressions
    joined with their clicks in <log-uri>/impressions/... (docs/event-log.md). Messages
    are acknowledged only once the file holding them is durable; redelivered events are
    dropped by event_id. Every option can also be set as RECSYS_<OPTION>. S3 credentials
    and endpoint come from the AWS_* environment (AWS_ENDPOINT_URL for a non-AWS store).
    """
    given = {name: value for name, value in locals().items() if name != "log_level"}
    from stream_jobs.event_log_sink import main

    raise typer.Exit(main(_event_log_settings(EventLogSettings, given, log_level)))


@event_log_app.command("compact")
def compact_event_log(
    log_uri: Annotated[str, typer.Argument(help="Root of the log (path, file://, s3://).")],
    min_files: Annotated[int, typer.Option(help="Merge partitions with this many files.")] = 2,
) -> None:
    """Merge each partition's files into one, dropping duplicate events.

    Safe while a sink runs: the merged file is written before the small ones are deleted.
    """
    from stream_jobs.event_log_sink import compact_log

    if min_files < 2:
        typer.echo("--min-files must be at least 2", err=True)
        raise typer.Exit(2)
    try:
        done = compact_log(log_uri, min_files)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for c in done:
        typer.echo(
            f"{c.table} {'/'.join(c.partition)}: {c.files_in} files -> 1, "
            f"{c.written.rows} rows, {c.duplicates} duplicates dropped"
        )
    typer.echo(f"compacted {len(done)} partitions")


def _event_log_settings(model: Any, given: dict[str, Any], log_level: str) -> Any:
    """As `_job_settings`, for the sink's settings model."""
    from pydantic import ValidationError

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return model.from_env(**given)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            typer.echo(f"{where}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


def event_log_main() -> None:
    """`python -m stream_jobs.event_log_sink`: the `run` command on its own."""
    app = typer.Typer(add_completion=False)
    app.command()(run_event_log)
    app(prog_name="python -m stream_jobs.event_log_sink")
