"""`recsys up | status | down | rollout | simulate`: the system on one machine.

`up` validates the manifest, prepares the model archive (training one on synthetic data
when needed), and starts the supervisor (`recsys_operator.local.supervisor`), which
starts every part on 127.0.0.1 and drives rollouts. The other commands read its
state.json or edit the desired state in the run folder, as kubectl would a resource.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from recsys_operator.local.report import DEGRADED_EXIT_CODE
from recsys_operator.local.run_folder import (
    RUNS_ROOT,
    SUPERVISOR_MODULE,
    RunFolder,
    find_run_folders,
    same_process,
    signal_group,
)

UP_TIMEOUT_S = 600.0
# Simulated users: below this a run shows nothing (0 would wait forever for its first visit).
MIN_RATE = 0.1
DOWN_TIMEOUT_S = 90.0

FilesOption = Annotated[
    list[Path],
    typer.Option(
        "--filename",
        "-f",
        metavar="<path>",
        help="Manifest with one RecommenderSystem (YAML; '-' is stdin); a ScalingPolicy "
        "beside it is validated, not applied. Repeatable.",
    ),
]
RunDirOption = Annotated[
    Path | None,
    typer.Option(
        help="Run folder. Default: the running system under .runs/ (up: .runs/<namespace>.<name>)."
    ),
]
ArchiveOption = Annotated[
    Path | None,
    typer.Option(help="Model archive (.mar) to serve instead of spec.model.archiveUri."),
]
TrainOption = Annotated[
    bool, typer.Option("--train", help="Ignore spec.model.archiveUri; train on synthetic data.")
]
RandomOption = Annotated[
    bool,
    typer.Option(
        "--random-embeddings",
        help="Serve a deliberately broken model (random item vectors) to see a rollback.",
    ),
]


def fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(1)


def resolve_folder(run_dir: Path | None) -> RunFolder:
    if run_dir is not None:
        return RunFolder(run_dir)
    folders = find_run_folders(RUNS_ROOT)
    if not folders:
        raise fail("no local system here (.runs/ is empty); start one with `recsys up -f FILE`")
    running = [f for f in folders if f.supervisor_running()]
    if len(running) == 1:
        return running[0]  # the one that is up is the one meant
    if len(folders) > 1:
        names = ", ".join(str(f.root) for f in folders)
        raise fail(f"several local systems ({names}); choose one with --run-dir")
    return folders[0]


# -- up -------------------------------------------------------------------------------


def up(
    filename: FilesOption,
    run_dir: RunDirOption = None,
    archive: ArchiveOption = None,
    train: TrainOption = False,
    random_embeddings: RandomOption = False,
    foreground: Annotated[
        bool, typer.Option(help="Stay in the foreground; Ctrl-C stops everything.")
    ] = False,
    simulate: Annotated[
        bool,
        typer.Option(
            help="Then run simulated users with a live dashboard (see `recsys simulate`)."
        ),
    ] = False,
    rate: Annotated[
        float, typer.Option(min=MIN_RATE, help="--simulate: requests per second.")
    ] = 20.0,
    duration: Annotated[
        float, typer.Option(min=0.0, help="--simulate: seconds to run (0: until Ctrl-C).")
    ] = 0.0,
    features: Annotated[
        bool, typer.Option(help="Run the stream feature job (off: user state stays static).")
    ] = True,
    redis_cluster: Annotated[
        bool,
        typer.Option(
            help="The feature store is a 3-primary Redis Cluster on loopback (one node otherwise)."
        ),
    ] = False,
    retrain_every: Annotated[
        str,
        typer.Option(
            help="With spec.training: retrain from the local event log this often (e.g. 3m, "
            "90s; 0: never). The cron schedule is for clusters; a local system lives minutes."
        ),
    ] = "5m",
) -> None:
    """Run the RecommenderSystem of the -f manifest on this machine, every part on 127.0.0.1.

    Starts pulsar-lite, Redis, TorchServe (configured by the operator's renderer), the
    stream feature job, the gateway and Prometheus; logs and PIDs go to the run folder.
    Running `up` again with a new spec.model.version starts a rollout instead. With
    spec.training, retraining runs every --retrain-every against the run folder's event
    log; with autoRollout a candidate that passes the gate is rolled out by itself.
    """
    from recsys_contracts.api_base import parse_duration
    from recsys_operator.local.desired_state import (
        ManifestError,
        load_system_manifest,
        parse_system,
        write_manifest,
    )
    from recsys_operator.local.model_source import ModelSourceError, prepare_model
    from recsys_operator.render.naming import system_id

    try:
        retrain_every_s = 0.0 if retrain_every.strip() == "0" else parse_duration(retrain_every)
    except ValueError as exc:
        raise fail(f"--retrain-every {retrain_every!r}: {exc}") from None
    try:
        body = load_system_manifest(filename)
        system = parse_system(body)
    except ManifestError as exc:
        raise fail(f"the manifest cannot run:\n{exc}") from None
    folder = RunFolder(run_dir) if run_dir is not None else RunFolder.for_system(system_id(system))
    model = system.spec.model
    try:
        prepared = prepare_model(
            folder,
            model,
            archive=archive,
            train=train,
            random_embeddings=random_embeddings,
            say=typer.echo,
        )
    except ModelSourceError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"model {model.name} version {model.version}: {prepared.origin}")

    if folder.supervisor_running():
        state = folder.read_state() or {}
        write_manifest(folder.manifest, body)
        stable = (state.get("rollout") or {}).get("stableVersion")
        if stable and stable != model.version:
            typer.echo(
                f"{folder.root}: rollout of version {model.version} started "
                f"(steps {system.spec.rollout.steps}, every {system.spec.rollout.interval}); "
                "follow it with `recsys status`"
            )
        else:
            typer.echo(f"{folder.root}: already running; spec updated")
    else:
        _clean_previous_run(folder)
        write_manifest(folder.manifest, body)
        args = [str(folder.root)] + ([] if features else ["--no-features"])
        args += ["--redis-cluster"] if redis_cluster else []
        args += ["--retrain-every", str(retrain_every_s)]
        if foreground:
            from recsys_operator.local.supervisor import main as supervise

            raise typer.Exit(supervise(args))
        _start_supervisor(folder, args)
        _wait_until_up(folder)
        _print_endpoints(folder)
    if simulate:
        simulate_command(run_dir=folder.root, rate=rate, duration=duration)


def _clean_previous_run(folder: RunFolder) -> None:
    """A fresh start: drop the previous run's state and data, keep models and trained ones."""
    import shutil

    for stale in (folder.state_file, folder.action_file, folder.routing):
        stale.unlink(missing_ok=True)
    for data in ("pulsar", "redis", "prometheus", "torchserve"):
        shutil.rmtree(folder.root / data, ignore_errors=True)
    for node in folder.root.glob("redis-cluster-*"):  # a stale nodes.conf would not join
        shutil.rmtree(node, ignore_errors=True)


def _start_supervisor(folder: RunFolder, args: list[str]) -> None:
    folder.logs.mkdir(parents=True, exist_ok=True)
    with open(folder.supervisor_log, "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", SUPERVISOR_MODULE, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives this terminal; `recsys down` stops it
        )


def _wait_until_up(folder: RunFolder) -> None:
    from recsys_operator.launchers.process import log_tail

    deadline = time.monotonic() + UP_TIMEOUT_S
    shown: set[str] = set()
    started = time.monotonic()
    while time.monotonic() < deadline:
        state = folder.read_state() or {}
        for name, part in (state.get("parts") or {}).items():
            if part.get("status") == "running" and name not in shown:
                shown.add(name)
                typer.echo(
                    f"  {name:<16} ready on 127.0.0.1:{part['port']}  "
                    f"({time.monotonic() - started:.0f}s)"
                )
        phase = state.get("phase")
        if phase == "running":
            return
        supervisor_gone = state and not folder.supervisor_running()
        if phase in ("failed", "stopped") or supervisor_gone:
            typer.secho("the local system failed to start:", err=True, fg="red")
            typer.echo(state.get("error") or log_tail(folder.supervisor_log), err=True)
            raise typer.Exit(1)
        time.sleep(0.5)
    raise fail(
        f"not up after {UP_TIMEOUT_S:.0f}s; see {folder.supervisor_log} (`recsys down` stops it)"
    )


def _print_endpoints(folder: RunFolder) -> None:
    state = folder.read_state() or {}
    urls = state.get("urls", {})
    typer.echo(f"\n{state.get('system')} is up (run folder {folder.root})")
    typer.echo(f"  gateway     {urls.get('gateway')}")
    typer.echo(f"  prometheus  {urls.get('prometheus')}")
    typer.echo(
        f"\ntry:  curl -s {urls.get('gateway')}/v1/recommend -H 'content-type: application/json' "
        """-d '{"user_id": "u1", "k": 5}'"""
    )
    typer.echo(
        "then: recsys status | recsys simulate | recsys rollout start --version 2 | recsys down"
    )


# -- status ---------------------------------------------------------------------------


def status(
    run_dir: RunDirOption = None,
    output: Annotated[str, typer.Option("--output", "-o", help="text or json.")] = "text",
) -> None:
    """Show every part of the local system and the rollout.

    Exits 0 when every part runs, 3 when the supervisor is not running, 4 when the system
    is degraded: a part was given up after its restarts or fails its health probes."""
    if output not in ("text", "json"):
        raise typer.BadParameter("must be text or json", param_hint="--output")
    folder = resolve_folder(run_dir)
    state = folder.read_state()
    if state is None:
        raise fail(f"{folder.root} has no state.json; start the system with `recsys up`")
    alive = folder.supervisor_running()
    if output == "json":
        typer.echo(json.dumps({**state, "supervisorAlive": alive}, indent=2))
    else:
        typer.echo(render_status(state, alive))
        if not alive:
            raise typer.Exit(3)
    if alive and state.get("degraded"):
        raise typer.Exit(DEGRADED_EXIT_CODE)


def render_status(state: dict[str, Any], supervisor_alive: bool) -> str:
    phase = (
        state.get("phase") if supervisor_alive else f"{state.get('phase')} (supervisor not running)"
    )
    if supervisor_alive and state.get("degraded"):
        phase = f"{phase}, DEGRADED"
    lines = [f"system  {state.get('system')}   phase {phase}"]
    for name, why in (state.get("failedParts") or {}).items():
        lines.append(f"failed  {name}: {why}")
    if state.get("error"):
        lines.append(f"error   {state['error'].splitlines()[0]}")
    lines.append("")
    lines.append(f"{'PART':<18}{'STATUS':<14}{'PID':<9}{'ADDRESS':<18}LOG")
    for name, part in (state.get("parts") or {}).items():
        status_text = part.get("status", "?")
        if not supervisor_alive or not same_process(part.get("pid"), part.get("startTime")):
            status_text = "not running" if status_text == "running" else status_text
        lines.append(
            f"{name:<18}{status_text:<14}{part.get('pid') or '-'!s:<9}"
            f"127.0.0.1:{part.get('port')!s:<8}{part.get('log')}"
        )
    rollout = state.get("rollout") or {}
    lines.append("")
    canary = rollout.get("canary")
    desired = state.get("desiredVersion")
    lines.append(
        f"stable  {rollout.get('stableVersion')}   desired {desired}   "
        + (
            f"canary {canary['version']} at {canary['weight']}% (step {canary.get('step', 0) + 1}, "
            f"{canary.get('phase', 'Progressing')})"
            if canary
            else "no canary"
        )
    )
    health = rollout.get("health") or {}
    if health:
        lines.append(f"rollout {health.get('reason')}: {health.get('message')}")
    last = rollout.get("lastRollout")
    if last:
        lines.append(
            f"last    version {last.get('version')} {last.get('outcome')}: {last.get('reason')}"
        )
    lines += _training_lines(state.get("training"))
    events = state.get("events") or []
    if events:
        lines.append("\nrecent events:")
        for event in events[-8:]:
            mark = "!" if event.get("warning") else " "
            lines.append(f" {mark} {event['time'][11:19]} {event['reason']}: {event['message']}")
    return "\n".join(lines)


def _training_lines(training: dict[str, Any] | None) -> list[str]:
    """Retraining: the schedule, and the last run's verdict (status.training)."""
    if not training:
        return []
    if training.get("running"):
        when = f"run {training.get('runs')} going for {training.get('runningForSeconds')}s"
    else:
        when = f"next run in {training.get('nextRunInSeconds')}s"
    lines = [f"training every {training.get('everySeconds'):.0f}s, {when}"]
    last = training.get("status")
    if last:
        lines.append(
            f"        last run {last.get('result')}: candidate {last.get('candidateVersion')}, "
            f"{last.get('reason')}"
        )
    return lines


# -- down -----------------------------------------------------------------------------


def down(run_dir: RunDirOption = None) -> None:
    """Stop everything the local system started (by the PIDs it recorded), cleanly."""
    folder = resolve_folder(run_dir)
    state = folder.read_state()
    if state is None:
        raise fail(f"{folder.root} has no state.json; nothing to stop")
    supervisor = state.get("supervisor") or {}
    pid, start_time = supervisor.get("pid"), supervisor.get("startTime")
    if same_process(pid, start_time):
        typer.echo(f"stopping {state.get('system')} (supervisor pid {pid})")
        signal_group(pid, start_time, signal.SIGTERM)
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        while same_process(pid, start_time) and time.monotonic() < deadline:
            time.sleep(0.2)
    # Whatever is left (a supervisor killed with -9, or one that did not finish in time).
    leftovers = 0
    for name, part in ((folder.read_state() or state).get("parts") or {}).items():
        part_pid, part_start = part.get("pid"), part.get("startTime")
        if signal_group(part_pid, part_start, signal.SIGTERM):
            leftovers += 1
            deadline = time.monotonic() + 20
            while same_process(part_pid, part_start) and time.monotonic() < deadline:
                time.sleep(0.2)
            if signal_group(part_pid, part_start, signal.SIGKILL):
                typer.echo(f"  {name}: killed (did not stop within 20 s)")
    signal_group(pid, start_time, signal.SIGKILL)
    typer.echo(
        f"stopped{f' ({leftovers} part(s) stopped directly)' if leftovers else ''}; logs in {folder.logs}"
    )


# -- rollout --------------------------------------------------------------------------

rollout_app = typer.Typer(
    help="Start and steer a rollout of the local system.", no_args_is_help=True
)


def _running_folder(run_dir: Path | None) -> RunFolder:
    folder = resolve_folder(run_dir)
    if not folder.supervisor_running():
        raise fail(f"the local system in {folder.root} is not running; start it with `recsys up`")
    return folder


def _edit_spec(folder: RunFolder, edit: Any) -> dict[str, Any]:
    from recsys_operator.local.desired_state import parse_system, read_manifest, write_manifest

    body = read_manifest(folder.manifest)
    edit(body["spec"])
    parse_system(body)  # never write a spec the supervisor would reject
    write_manifest(folder.manifest, body)
    return body


@rollout_app.command("start")
def rollout_start(
    version: Annotated[str, typer.Option(help="The new spec.model.version.")],
    run_dir: RunDirOption = None,
    archive: ArchiveOption = None,
    random_embeddings: RandomOption = False,
) -> None:
    """Roll out a new model version (trains one on synthetic data unless --archive)."""
    from recsys_operator.local.desired_state import ManifestError, parse_system, read_manifest
    from recsys_operator.local.model_source import ModelSourceError, prepare_model

    folder = _running_folder(run_dir)
    body = read_manifest(folder.manifest)
    if str(body["spec"]["model"]["version"]) == version:
        raise fail(f"spec.model.version is already {version!r}: roll out another version")
    # Checked before training: a version the spec refuses must not cost a model first.
    fields = {k: v for k, v in body["spec"]["model"].items() if k != "archiveUri"}
    body["spec"]["model"] = {**fields, "version": version}
    try:
        system = parse_system(body)
    except ManifestError as exc:
        raise fail(f"--version {version!r} cannot run:\n{exc}") from None
    model = system.spec.model
    try:
        prepared = prepare_model(
            folder, model, archive=archive, random_embeddings=random_embeddings, say=typer.echo
        )
    except ModelSourceError as exc:
        raise fail(str(exc)) from None

    def set_version(spec: dict[str, Any]) -> None:
        spec["model"]["version"] = version
        spec["model"]["archiveUri"] = f"file://{prepared.archive.resolve()}"

    _edit_spec(folder, set_version)
    rollout = system.spec.rollout
    typer.echo(
        f"rollout of version {version} ({prepared.origin}) started: steps {rollout.steps}, "
        f"analysis every {rollout.interval}; follow it with `recsys status`"
    )


def _action(run_dir: Path | None, action: str) -> None:
    folder = _running_folder(run_dir)
    folder.action_file.write_text(action)
    typer.echo(f"{action} requested; `recsys status` shows the outcome")


@rollout_app.command("abort")
def rollout_abort(run_dir: RunDirOption = None) -> None:
    """Send all traffic back to stable and remove the canary now."""
    _action(run_dir, "abort")


@rollout_app.command("promote")
def rollout_promote(run_dir: RunDirOption = None) -> None:
    """Make the canary stable now, skipping the remaining steps; also confirms a canary
    awaiting promotion (rollout.confirmPromotion). Pre-promotion webhooks still run."""
    _action(run_dir, "promote")


def _set_paused(run_dir: Path | None, paused: bool) -> None:
    def set_paused(spec: dict[str, Any]) -> None:
        spec.setdefault("rollout", {})["paused"] = paused

    _edit_spec(_running_folder(run_dir), set_paused)
    typer.echo("rollout paused (weights hold)" if paused else "rollout resumed")


@rollout_app.command("pause")
def rollout_pause(run_dir: RunDirOption = None) -> None:
    """Hold the current weight; no analysis decides until `resume`."""
    _set_paused(run_dir, True)


@rollout_app.command("resume")
def rollout_resume(run_dir: RunDirOption = None) -> None:
    """Continue a paused rollout."""
    _set_paused(run_dir, False)


# -- simulate -------------------------------------------------------------------------


def simulate_command(
    run_dir: RunDirOption = None,
    rate: Annotated[
        float, typer.Option(min=MIN_RATE, help="Recommendation requests per second.")
    ] = 20.0,
    duration: Annotated[
        float, typer.Option(min=0.0, help="Seconds to run (0: until Ctrl-C).")
    ] = 0.0,
    dashboard: Annotated[bool, typer.Option(help="Show the live dashboard.")] = True,
    record: Annotated[
        Path | None, typer.Option(help="Write per-second figures per model version to this CSV.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the simulated users.")] = 1,
) -> None:
    """Simulated users (synthetic ground truth, drifting interests) against the gateway,
    with a live dashboard: req/s, latency and CTR per model version, events, freshness
    and the rollout."""
    from recsys_operator.local.simulation import run_simulation

    folder = _running_folder(run_dir)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    summary = run_simulation(
        folder,
        rate=rate,
        duration=duration,
        stop=stop,
        dashboard=dashboard,
        record=record,
        seed=seed,
    )
    typer.echo(f"\n{summary}")


def demo(
    filename: Annotated[Path, typer.Option("--filename", "-f", help="The demo manifest.")] = Path(
        "examples/demo.yaml"
    ),
    rate: Annotated[
        float, typer.Option(min=MIN_RATE, help="Simulated requests per second.")
    ] = 30.0,
    dashboard: Annotated[bool, typer.Option(help="Show the live dashboard.")] = True,
) -> None:
    """Run the continuous-learning demo: a stale model, drifting users, retraining
    from the logged events, a gated-out run, a passing one rolled out by itself, stop.

    Leaves summary.md, timeline.csv and demo.png in .runs/default.demo/demo/.
    Exits 0 only when a run was gated out and a retrained candidate was promoted.
    """
    from recsys_operator.local.demo import run_demo
    from recsys_operator.local.desired_state import ManifestError

    try:
        code = run_demo(filename, rate=rate, dashboard=dashboard)
    except ManifestError as exc:
        raise fail(f"the manifest cannot run:\n{exc}") from None
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add the local-mode commands to the `recsys` CLI."""
    app.command("up")(up)
    app.command("status")(status)
    app.command("down")(down)
    app.add_typer(rollout_app, name="rollout")
    app.command("simulate")(simulate_command)
    app.command("demo")(demo)
