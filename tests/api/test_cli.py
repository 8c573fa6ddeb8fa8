"""The `recsys` command line, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECSYS = [sys.executable, "-m", "recsys_operator.cli"]


def recsys(
    *args: str, stdin: str | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RECSYS, *args], capture_output=True, text=True, input=stdin, cwd=cwd, timeout=120
    )


def test_help_lists_the_commands() -> None:
    result = recsys("--help")
    assert result.returncode == 0
    for command in ("crds", "docs", "validate", "render", "version", "operator"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["crds", "docs", "validate", "render", "version", "operator"])
def test_every_command_has_help(command: str) -> None:
    result = recsys(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_validate_accepts_the_examples() -> None:
    result = recsys("validate", "-f", "examples", "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    examples/quickstart.yaml: RecommenderSystem/quickstart" in result.stdout
    # For a cluster, every example but the local-mode demo (no archive: `recsys up` trains one).
    cluster = [
        arg
        for path in sorted((ROOT / "examples").glob("*.yaml"))
        if path.name != "demo.yaml"
        for arg in ("-f", str(path))
    ]
    assert recsys("validate", *cluster).returncode == 0
    demo = recsys("validate", "-f", "examples/demo.yaml")
    assert demo.returncode == 1 and "spec.model.archiveUri" in demo.stdout


def test_validate_rejects_with_field_paths_and_exit_1(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["rollout"]["steps"] = [50, 20, 100]
    doc["spec"]["serving"]["workers"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = recsys("validate", "-f", str(bad))
    assert result.returncode == 1
    assert "spec.rollout.steps: weights must be strictly increasing" in result.stdout
    assert "spec.serving.workers:" in result.stdout


def test_validate_reads_stdin_and_reports_bad_yaml() -> None:
    result = recsys("validate", "-f", "-", stdin="kind: [unclosed\n")
    assert result.returncode == 1
    assert "not valid YAML" in result.stdout


def test_bad_yaml_is_one_line_naming_where_the_parser_stopped() -> None:
    result = recsys("validate", "-f", "-", stdin="spec:\n  model: 1\n\tversion: 2\n")
    assert result.returncode == 1
    assert result.stdout.splitlines()[1:] == [
        "      not valid YAML at line 3, column 1: found character '\\t' that cannot start "
        "any token (while scanning for the next token)"
    ]


@pytest.mark.parametrize("command", ["validate", "render", "up", "demo"])
def test_a_manifest_path_that_does_not_exist_is_named_without_a_traceback(
    command: str, tmp_path: Path
) -> None:
    result = recsys(command, "-f", "no/such/file.yaml", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "-f no/such/file.yaml: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".runs").exists()


@pytest.mark.parametrize("command", ["validate", "render"])
def test_empty_input_is_not_a_pass(command: str) -> None:
    # `helm template ... | recsys validate -f -` after helm failed must fail CI too.
    result = recsys(command, "-f", "-", stdin="")
    assert result.returncode == 1, result.stdout
    assert "error: -f -: no YAML document to check" in result.stderr


def test_validate_refuses_a_folder_without_manifests(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a manifest")
    result = recsys("validate", "-f", str(tmp_path))
    assert result.returncode == 1
    assert f"-f {tmp_path}: a folder with no .yaml or .yml file" in result.stderr


def test_render_without_the_referenced_policy_says_which_file_is_missing() -> None:
    result = recsys("render", "-f", "examples/quickstart.yaml")
    assert result.returncode == 1, result.stdout
    assert (
        'error RecommenderSystem/quickstart: spec.scalingPolicyRef names ScalingPolicy "default" '
        "in namespace default, which is not among the files: give its manifest with another -f"
    ) in result.stderr
    assert "Traceback" not in result.stderr and not result.stdout
    given = recsys("render", "-f", "examples/quickstart.yaml", "-f", "examples/scaling-policy.yaml")
    assert given.returncode == 0, given.stderr


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        (
            ["render", "-f", "examples/quickstart.yaml", "-o", "xml"],
            "--output: must be yaml or json",
        ),
        (["status", "-o", "yaml"], "--output: must be text or json"),
        (["simulate", "--rate", "0"], "'--rate': Input should be greater than or equal to 0.1"),
        (["up", "-f", "examples/quickstart.yaml", "--rate", "0"], "'--rate'"),
        (["up", "-f", "examples/quickstart.yaml", "--duration", "-1"], "'--duration'"),
    ],
)
def test_an_option_value_out_of_range_is_a_usage_error(
    args: list[str], refusal: str, tmp_path: Path
) -> None:
    result = recsys(*args, cwd=ROOT if args[0] == "render" else tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert refusal in result.stderr
    assert not (tmp_path / ".runs").exists()


def test_crds_regenerates_byte_for_byte(tmp_path: Path) -> None:
    result = recsys("crds", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for generated in sorted(tmp_path.iterdir()):
        assert generated.read_bytes() == (ROOT / "crds" / generated.name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (ROOT / "crds").glob("*.yaml")
    )


def test_crds_check_fails_on_drift(tmp_path: Path) -> None:
    assert recsys("crds", "--out", str(tmp_path)).returncode == 0
    target = next(tmp_path.iterdir())
    target.write_text(
        target.read_text().replace("description: Number of partitions", "description: edited")
    )
    result = recsys("crds", "--check", "--out", str(tmp_path))
    assert result.returncode == 1
    assert target.name in result.stderr


BAD_POLICY = {
    "apiVersion": "recsys.dev/v1alpha1",
    "kind": "ScalingPolicy",
    "metadata": {"name": "default", "namespace": "default"},
    "spec": {
        "engine": "hpa",
        "streamJobs": {"minReplicas": 0},
        "serving": {"targetGpuUtilization": 50},
        "gateway": {"minReplicas": 9, "maxReplicas": 3},
    },
}


def test_validate_refuses_what_only_rendering_finds(tmp_path: Path) -> None:
    # The operator refuses a cluster system without an archive when it renders it.
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    del doc["spec"]["model"]["archiveUri"]
    (tmp_path / "rs.yaml").write_text(yaml.safe_dump(doc))
    result = recsys("validate", "-f", str(tmp_path / "rs.yaml"))
    assert result.returncode == 1, result.stdout
    assert "spec.model.archiveUri: no archive known" in result.stdout


def test_validate_reports_an_invalid_policy_as_invalid_with_every_problem(tmp_path: Path) -> None:
    system = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all([system, BAD_POLICY]))
    result = recsys("validate", "-f", str(tmp_path / "all.yaml"))
    assert result.returncode == 1
    out = result.stdout
    assert 'spec.scalingPolicyRef.name: ScalingPolicy "default" is invalid' in out
    assert "not among the given files" not in out
    for problem in (
        "spec.streamJobs.minReplicas: minReplicas 0 (scale to zero) needs engine keda",
        "spec.gateway.minReplicas: minReplicas 9 exceeds maxReplicas 3",
        "spec.serving.targetGpuUtilization: GPU utilisation targets need engine keda",
    ):
        assert problem in out, out
    assert "spec.spec." not in out


def test_operator_run_help_lists_every_setting_and_its_environment_variable() -> None:
    from recsys_contracts.env_vars import OperatorEnv

    result = recsys("operator", "run", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # help wraps lines
    for option, variable in (
        ("--prometheus-url", OperatorEnv.PROMETHEUS_URL),
        ("--resync-seconds", OperatorEnv.RESYNC_SECONDS),
        ("--rollout-tick-seconds", OperatorEnv.ROLLOUT_TICK_SECONDS),
    ):
        assert option in text and variable in text, (option, text)
    assert "KUBECONFIG" in text


@pytest.mark.parametrize("kubeconfig", ["named", "default"])
def test_operator_run_without_any_kube_config_stops_at_once_saying_so(
    kubeconfig: str, tmp_path: Path
) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")
    }
    env["HOME"] = str(tmp_path)  # no ~/.kube/config there
    if kubeconfig == "named":
        env["KUBECONFIG"] = str(tmp_path / "missing-kubeconfig")
    result = subprocess.run(
        [*RECSYS, "operator", "run", "-n", "default", "--metrics-address", "127.0.0.1:0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    where = (
        f"$KUBECONFIG ({tmp_path / 'missing-kubeconfig'})"
        if kubeconfig == "named"
        else ("~/.kube/config")
    )
    assert f"error: no Kubernetes configuration: not in a pod, and {where} is not a file" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_kopf_timer_runs_are_kept_for_debug_only() -> None:
    import logging

    from recsys_operator.cli import _timer_runs_only_at_debug

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", logging.INFO, "", 0, message, None, None)

    assert not _timer_runs_only_at_debug(record("Timer 'resync_system' succeeded."))
    assert _timer_runs_only_at_debug(record("Handler 'reconcile_system' succeeded."))
