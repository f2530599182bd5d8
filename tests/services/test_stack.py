"""deploy.local.stack: the printed commands, process stopping, and a real up/status/down."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from deploy.local.stack import (
    Ports,
    StackError,
    _group_alive,
    _proc_stat,
    _spawn,
    _start_time,
    _stop,
    client_env,
    free_port,
    submit_line,
    up,
)

REPO = Path(__file__).resolve().parents[2]


def _state(ray_tmpdir: str = "") -> dict:
    return {
        "ports": {"s3": 9100, "mlflow": 5100, "dashboard": 8300, "gcs": 40000},
        "bucket": "gans",
        "ray_tmpdir": ray_tmpdir,
        "processes": {},
    }


def test_client_env_and_submit_line() -> None:
    assert client_env(_state()) == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9100",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5100",
        "RAY_ADDRESS": "http://127.0.0.1:8300",
        "RAY_AUTH_MODE": "token",
    }
    assert client_env(_state("/tmp/rg1"))["RAY_TMPDIR"] == "/tmp/rg1"

    words = shlex.split(submit_line(_state("/tmp/rg1")))
    assert words[:6] == ["ray", "job", "submit", "--working-dir", ".", "--runtime-env-json"]
    assert words[7:] == [
        "--",
        "python",
        "-m",
        "services.train",
        "--config",
        "ring8",
        "storage.uri=s3://gans/runs",
    ]
    # The job gets the storage and tracking endpoints; Ray's own client settings stay local.
    job_env = json.loads(words[6])["env_vars"]
    assert job_env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9100"
    assert job_env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5100"
    assert not [key for key in job_env if key.startswith("RAY_")]


def test_up_refuses_a_busy_port_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StackError, match=f"port {port} \\(--mlflow-port\\)"):
            up(tmp_path / "stack", Ports(s3=free_port(), mlflow=port, dashboard=free_port()))
    assert not (tmp_path / "stack" / "stack.json").exists()


def _python_group(tmp_path: Path, name: str, prelude: str = "") -> dict:
    """A process group like a service's: a leader running ``prelude`` and one sleeping child."""
    code = (
        prelude + "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "time.sleep(60)"
    )
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    entry = _spawn(name, [sys.executable, "-c", code], dict(os.environ), logs)
    deadline = time.monotonic() + 20
    while _group_size(entry["pid"]) < 2:  # the child exists, so the prelude has run
        assert time.monotonic() < deadline, "the test's process group did not start"
        time.sleep(0.05)
    return entry


def _group_size(pgid: int) -> int:
    stats = (_proc_stat(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit())
    return sum(1 for s in stats if s is not None and s[2] == str(pgid) and s[0] not in "ZX")


def test_stop_terminates_a_whole_group(tmp_path: Path) -> None:
    entry = _python_group(tmp_path, "polite")
    # The leader dies on SIGTERM but leaves its child: the group-wide SIGTERM gets that one.
    assert _stop(entry, timeout=2) == "stopped (after SIGTERM to its whole group)"
    assert not _group_alive(entry["pid"])
    assert _stop(entry, timeout=2) == "not running"


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    # SIG_IGN is inherited, so the child shrugs off SIGTERM as well.
    entry = _python_group(
        tmp_path, "stubborn", "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    )
    assert _stop(entry, timeout=1) == "killed (still running 1 s after SIGTERM)"
    assert not _group_alive(entry["pid"])


def test_stop_leaves_a_reused_pid_alone() -> None:
    me = os.getpid()
    assert _start_time(me) is not None
    assert _stop({"pid": me, "start": "1"}, timeout=1) == "not running (its pid is reused)"


def _stack(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.local.stack", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


@pytest.mark.integration
def test_up_status_down(tmp_path: Path) -> None:
    import boto3

    # Ray's socket paths live under RAY_TMPDIR and must stay under 108 bytes: keep it short.
    ray_tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp, AWS_EC2_METADATA_DISABLED="true")
    s3, mlflow_port, dashboard = free_port(), free_port(), free_port()
    stack_dir = tmp_path / "stack"
    flags = ["--dir", str(stack_dir)]
    try:
        started = _stack(
            [
                "up",
                *flags,
                "--s3-port",
                str(s3),
                "--mlflow-port",
                str(mlflow_port),
                "--dashboard-port",
                str(dashboard),
            ],
            env,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        out = started.stdout
        assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{s3}" in out
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in out
        assert f"export RAY_ADDRESS=http://127.0.0.1:{dashboard}" in out
        assert f"export RAY_TMPDIR={ray_tmp}" in out
        assert 'ray job submit --working-dir . --runtime-env-json \'{"env_vars": {' in out
        state = json.loads((stack_dir / "stack.json").read_text())
        pids = {name: entry["pid"] for name, entry in state["processes"].items()}
        assert sorted(pids) == ["mlflow", "ray", "s3"]
        assert (stack_dir / ".gitignore").read_text() == "*\n"

        s3_client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{s3}",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        assert s3_client.head_bucket(Bucket="raygan")["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert _get(f"http://127.0.0.1:{mlflow_port}/health") == (200, "OK")
        # Token auth is on: the job API refuses a request without the token from $HOME/.ray.
        token = (tmp_path / "home" / ".ray" / "auth_token").read_text().strip()
        assert _get(f"http://127.0.0.1:{dashboard}/api/jobs/")[0] == 401
        assert _get(f"http://127.0.0.1:{dashboard}/api/jobs/", token) == (200, "[]")
        # ... and the `ray job` CLI works with exactly the printed environment.
        ray_env = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}", "RAY_AUTH_MODE": "token"}
        listed = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "list"],
            env=ray_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr[-2000:]
        _submit_gan_jobs(ray_env, state, s3_client, mlflow_port)
        # Runs beside the sweep job: two processes that mostly wait on imports and I/O.
        finish_model_checks = _start_model_checks(env, state, mlflow_port, tmp_path)
        _submit_sweep_job(ray_env, state, s3_client, mlflow_port, tmp_path)
        finish_model_checks()

        shown = _stack(["status", *flags], env)
        assert shown.returncode == 0 and shown.stdout.count(" healthy ") == 3, shown.stdout
        again = _stack(["up", *flags, "--s3-port", str(free_port())], env)
        assert again.returncode == 1 and "still running" in again.stderr

        stopped = _stack(["down", *flags], env)
        assert stopped.returncode == 0, stopped.stderr
        assert [line.split()[0] for line in stopped.stdout.splitlines()] == ["ray", "mlflow", "s3"]
        assert "killed" not in stopped.stdout
        assert not [name for name, pid in pids.items() if _group_alive(pid)]
        gone = _stack(["status", *flags], env)
        assert gone.returncode == 1 and "no stack recorded" in gone.stdout
    finally:
        if (stack_dir / "stack.json").exists():
            _stack(["down", *flags], env)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# A ring-8 job small enough for the stack's 2 CPUs, on the stack's S3.
TINY_JOB = [
    "storage.uri=s3://raygan/runs",
    "train.steps=20",
    "eval.every=10",
    "checkpoint.every=10",
    "eval.samples=400",
    "generators.width=32",
    "generators.depth=2",
    "discriminator.width=32",
    "discriminator.maxout_pieces=1",
    "train.batch_size=32",
]


def _submit_args(state: dict, module: str, *args: str) -> list[str]:
    """`ray job submit` of `python -m MODULE ARGS` with the stack's printed runtime env."""
    job_env = json.loads(shlex.split(submit_line(state))[6])
    return [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(job_env),
        "--",
        "python",
        "-m",
        module,
        *args,
    ]


def _submit_gan_jobs(ray_env: dict, state: dict, s3_client, mlflow_port: int) -> None:
    """The README's round trip, twice at once (load: two jobs on one cluster): `ray job submit`
    GAN jobs whose storage is the stack's S3 and whose tracking is the stack's MLflow server;
    then read both back."""
    import mlflow

    # One worker each: both jobs fit the stack's 2 CPUs at the same time.
    common = [*TINY_JOB, "resources.num_workers=1"]
    names = ["submitted", "submitted-2"]
    # The first job's generator is registered too (_start_model_checks reads it back).
    register = {"submitted": [f"tracking.register_as={REGISTERED}"], "submitted-2": []}
    jobs = [
        subprocess.Popen(
            _submit_args(
                state,
                "services.train",
                "--config",
                "ring8",
                f"name={name}",
                *common,
                *register[name],
            ),
            env=ray_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for name in names
    ]
    outputs = [job.communicate(timeout=400) for job in jobs]
    client = mlflow.MlflowClient(f"http://127.0.0.1:{mlflow_port}")
    for name, job, (stdout, stderr) in zip(names, jobs, outputs, strict=True):
        assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
        assert "[raygan] done: 20 steps" in stdout
        assert "[raygan] step 10/20" in stdout, "progress lines reach `ray job` output"
        registered = f" (registered: models:/{REGISTERED}/1)" if register[name] else ""
        assert f"/generator{registered}\n" in stdout, stdout[-2000:]
        keys = [
            o["Key"]
            for o in s3_client.list_objects_v2(Bucket="raygan", Prefix=f"runs/{name}/")["Contents"]
        ]
        assert f"runs/{name}/samples/step_0000020.png" in keys
        assert any(k.endswith("/state.pt") for k in keys)
        runs = client.search_runs(
            [client.get_experiment_by_name("raygan").experiment_id],
            filter_string=f"tags.`raygan.run_name` = '{name}'",
        )
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "modes")] == [
            10,
            20,
        ]


REGISTERED = "stack-gen"


def _start_model_checks(env: dict, state: dict, mlflow_port: int, tmp_path: Path) -> Any:
    """The generator of job `submitted` as an MLflow model on the stack (artifacts proxied to
    S3): its run names it and the registry holds it; then, started now and checked by the
    returned function, (a) a process without raygan loads it as runs:/ and models:/.../latest
    through the server, and (b) `python -m services.sample` draws from the same run on S3. With
    the same noise (seed 0) all three give the same samples."""
    import mlflow
    import numpy as np
    import torch

    from gan_core.config import load_config
    from tests.services.test_model_log import without_raygan

    uri = f"http://127.0.0.1:{mlflow_port}"
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("raygan").experiment_id],
        filter_string="tags.`raygan.run_name` = 'submitted'",
    )
    model_uri = f"runs:/{run.info.run_id}/generator"
    assert run.data.tags["raygan.model_uri"] == model_uri
    version = client.get_model_version(REGISTERED, "1")
    assert version.run_id == run.info.run_id and version.tags["raygan.run_name"] == "submitted"
    assert float(version.tags["modes"]) == run.data.metrics["modes"]

    work = tmp_path / "model-check"
    work.mkdir()
    z_dim = load_config("ring8").generators.z_dim
    noise = torch.randn(200, z_dim, generator=torch.Generator().manual_seed(0))
    np.save(work / "noise.npy", noise.numpy())
    command, loader_env = without_raygan([uri, model_uri, f"models:/{REGISTERED}/latest"], env)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    loader = subprocess.Popen(command, cwd=work, env=loader_env, **pipes)
    sample = subprocess.Popen(
        [sys.executable, "-m", "services.sample", "--run", "s3://raygan/runs/submitted"]
        + ["--n", "200", "--out", str(work / "sampled.npy")],
        cwd=REPO,
        env={**env, **client_env(state)},
        **pipes,
    )

    def finish() -> None:
        for proc in (loader, sample):
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, out[-2000:] + err[-3000:]
        by_run, by_name = np.load(work / "out0.npy"), np.load(work / "out1.npy")
        sampled = np.load(work / "sampled.npy")
        assert sampled.shape == (200, 2) and sampled.dtype == np.float32
        assert np.isfinite(sampled).all()
        np.testing.assert_array_equal(by_run, sampled)
        np.testing.assert_array_equal(by_name, sampled)

    return finish


def _submit_sweep_job(
    ray_env: dict, state: dict, s3_client, mlflow_port: int, tmp_path: Path
) -> None:
    """A Tune sweep submitted as a job, as deploy/README.md shows: its trials are Train jobs on
    the same cluster; the sweep, its report and its MLflow parent/children land in the stack's S3
    and MLflow server."""
    import mlflow

    space = tmp_path / "pack.yaml"  # the job runs on this machine: an absolute path reaches it
    space.write_text("grid:\n  discriminator.pack: [1, 2]\n")
    done = subprocess.run(
        _submit_args(
            state,
            "tuning.sweep",
            "--space",
            str(space),
            "--config",
            "ring8",
            "--name",
            "submitted-sweep",
            "--scheduler",
            "fifo",
            "--max-concurrent",
            "1",
            *TINY_JOB,
        ),
        env=ray_env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[raygan] sweep submitted-sweep done" in done.stdout
    assert "2 completed, 0 stopped early, 0 failed" in done.stdout
    keys = {
        o["Key"]
        for o in s3_client.list_objects_v2(Bucket="raygan", Prefix="runs/submitted-sweep/")[
            "Contents"
        ]
    }
    for name in ("report.md", "best.yaml", "trials.csv", "coverage_vs_cost.png", "sweep.json"):
        assert f"runs/submitted-sweep/{name}" in keys, name
    client = mlflow.MlflowClient(f"http://127.0.0.1:{mlflow_port}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`raygan.sweep` = 'submitted-sweep'",
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.params["discriminator.pack"] for c in children} == {"1", "2"}
    assert all(c.info.status == "FINISHED" for c in children)
    # Both trials ran to the end: each logged its generator into its child run; the report and
    # the job's last line name the best one's.
    models = {c.data.tags.get("raygan.model_uri") for c in children}
    assert models == {f"runs:/{c.info.run_id}/generator" for c in children}
    # Read once: a second read() of the body returns b"" (this once failed the test whenever the
    # best model came second in the set's hash order).
    report = s3_client.get_object(Bucket="raygan", Key="runs/submitted-sweep/report.md")
    text = report["Body"].read().decode()
    best = [m for m in models if f"Model: `{m}`" in text]
    # Each trial noted its model in runs/<trial>/model.json, which the report reads.
    assert sorted(k for k in keys if k.endswith("/model.json")) == [
        f"runs/submitted-sweep/runs/{c.data.tags['raygan.trial']}/model.json"
        for c in sorted(children, key=lambda c: c.data.tags["raygan.trial"])
    ]
    assert len(best) == 1 and f"best model: {best[0]}" in done.stdout, done.stdout[-4000:]
