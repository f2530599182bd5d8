"""deploy.local.stack: the printed commands, process stopping, and a real up/status/down."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from deploy.local.stack import (
    Ports,
    StackError,
    _group_alive,
    _proc_stat,
    _running,
    _spawn,
    _stop,
    client_env,
    free_port,
    job_env,
    ray_token,
    stack_keys,
    submit_line,
    up,
    write_credentials,
)
from services.ray_procs import start_time

REPO = Path(__file__).resolve().parents[2]


def _state(ray_tmpdir: str = "") -> dict:
    return {
        "ports": {"s3": 9100, "mlflow": 5100, "dashboard": 8300, "gcs": 40000},
        "bucket": "gans",
        "ray_tmpdir": ray_tmpdir,
        "processes": {},
        "credentials_file": "/st/aws-credentials",
        "config_file": "/st/aws-config",
    }


KEY_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def test_client_env_and_submit_line() -> None:
    # The head's environment (and so every job's): endpoints and the credentials file, no key.
    settings = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9100",
        "AWS_SHARED_CREDENTIALS_FILE": "/st/aws-credentials",
        "AWS_CONFIG_FILE": "/st/aws-config",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5100",
    }
    assert job_env(_state()) == settings
    assert client_env(_state()) == {
        **settings,
        "RAY_ADDRESS": "http://127.0.0.1:8300",
        "RAY_AUTH_MODE": "token",
    }
    assert client_env(_state("/tmp/rg1"))["RAY_TMPDIR"] == "/tmp/rg1"
    assert not set(KEY_NAMES) & set(client_env(_state("/tmp/rg1")))

    # No --runtime-env-json: nothing of the stack's travels in the job's metadata.
    words = shlex.split(submit_line(_state("/tmp/rg1")))
    assert words == [
        *("ray", "job", "submit", "--working-dir", ".", "--"),
        *("python", "-m", "services.train", "--config", "ring8", "storage.uri=s3://gans/runs"),
    ]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_credentials_file_is_private_from_its_creation(tmp_path: Path) -> None:
    old = tmp_path / "aws-credentials"
    old.write_text("old")
    old.chmod(0o644)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not ours")
    (tmp_path / "aws-config").symlink_to(elsewhere)
    previous = os.umask(0)  # the file's mode must not depend on the caller's umask
    try:
        credentials, config = write_credentials(tmp_path, ("AKIDTEST", "s3cr3t/with+chars"))
    finally:
        os.umask(previous)
    # An existing file of a wider mode and a planted symlink are replaced, not written through.
    assert (_mode(credentials), _mode(config)) == (0o600, 0o600)
    assert not config.is_symlink() and elsewhere.read_text() == "not ours"
    ini = configparser.ConfigParser()
    ini.read(credentials)
    assert dict(ini["default"]) == {
        "aws_access_key_id": "AKIDTEST",
        "aws_secret_access_key": "s3cr3t/with+chars",
    }
    assert "region = us-east-1" in config.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "aws-config",
        "aws-credentials",
        "elsewhere",
    ]
    with pytest.raises(StackError, match="one line"):
        write_credentials(tmp_path, ("AKIDTEST", "two\nlines"))


def test_stack_keys_come_from_the_stack_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STACK_AWS_ACCESS_KEY_ID", "STACK_AWS_SECRET_ACCESS_KEY", *KEY_NAMES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "the shell's own")  # not the stack's
    assert stack_keys() == ("testing", "testing")
    monkeypatch.setenv("STACK_AWS_ACCESS_KEY_ID", "AKIDPLANTED")
    with pytest.raises(StackError, match="both"):
        stack_keys()
    monkeypatch.setenv("STACK_AWS_SECRET_ACCESS_KEY", "planted")
    assert stack_keys() == ("AKIDPLANTED", "planted")


def test_ray_token_is_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    token = ray_token()
    assert len(token) == 64 and int(token, 16) >= 0
    assert _mode(tmp_path / ".ray") == 0o700
    assert _mode(tmp_path / ".ray" / "auth_token") == 0o600
    assert ray_token() == token  # an existing token is used, not replaced


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
    assert start_time(me) is not None
    assert _stop({"pid": me, "start": "1"}, timeout=1) == "not running (its pid is reused)"


def test_a_recorded_process_is_known_by_pid_and_start_time(tmp_path: Path) -> None:
    me = os.getpid()
    # The state file holds the start time as a string: it must compare equal to /proc's.
    assert _running({"pid": me, "start": str(start_time(me))})
    assert _running({"pid": me, "start": None})  # no start recorded: the pid alone
    assert not _running({"pid": me, "start": str(start_time(me) + 1)})
    entry = _python_group(tmp_path, "recorded")
    assert entry["start"] == str(start_time(entry["pid"])) and _running(entry)
    assert _stop(entry, timeout=2) == "stopped (after SIGTERM to its whole group)"
    assert not _running(entry)


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


# What a job's driver and one of its Ray workers see, as one JSON line: the credentials come
# from the stack's file and no key variable is set. It prints a hash of the secret, never the
# secret (the test searches the job's logs for it). Both write through boto3 and through
# raygan's storage (pyarrow's S3FileSystem, as Ray Train's checkpoints do).
PROBE = """
import hashlib, json, os
import boto3, ray
from gan_core.config import StorageConfig
from services.storage import open_storage

KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

def look(where):
    creds = boto3.Session().get_credentials()
    boto3.client("s3").put_object(Bucket="raygan", Key=f"probe/{where}-boto3.txt", Body=b"b")
    open_storage(StorageConfig(uri="s3://raygan/probe")).write_bytes(f"{where}-pyarrow.txt", b"p")
    return {
        "pid": os.getpid(),
        "key_vars": [k for k in os.environ if k in KEYS],
        "credentials_file": os.environ.get("AWS_SHARED_CREDENTIALS_FILE"),
        "method": creds.method,
        "access_key": creds.access_key,
        "secret_sha256": hashlib.sha256(creds.secret_key.encode()).hexdigest(),
    }

driver = look("driver")
ray.init()
worker = ray.get(ray.remote(num_cpus=0)(look).remote("worker"))
print("PROBE " + json.dumps({"driver": driver, "worker": worker}), flush=True)
"""


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    """Every regular file under ``root`` (links not followed) whose bytes contain ``needle``."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if stat.S_ISREG(path.lstat().st_mode) and needle in path.read_bytes():
                found.append(path)
    return sorted(found)


def _proc_file(pid: int, name: str) -> bytes:
    """/proc/PID/NAME, or b"" for a process that has just exited (an idle Ray worker)."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _cmdline(pid: int) -> list[str]:
    return _proc_file(pid, "cmdline").decode(errors="replace").split("\0")


def _environ(pid: int) -> dict[bytes, bytes]:
    raw = _proc_file(pid, "environ")
    return dict(item.partition(b"=")[::2] for item in raw.split(b"\0") if item)


@pytest.mark.integration
def test_up_status_down(tmp_path: Path) -> None:
    import boto3

    # Ray's socket paths live under RAY_TMPDIR and must stay under 108 bytes: keep it short.
    ray_tmp = tempfile.mkdtemp(prefix="rg", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp, AWS_EC2_METADATA_DISABLED="true")
    # A recognisable secret key planted as the stack's (moto accepts any): it must end up in the
    # stack's credentials file and nowhere else. moto records every request it serves (headers
    # included) so that the test can see which key id signed each one.
    key_id, secret = f"AKIDRAYGAN{secrets.token_hex(4).upper()}", f"planted-{secrets.token_hex(12)}"
    recording = tmp_path / "moto-recording.jsonl"
    up_env = {
        **env,
        "STACK_AWS_ACCESS_KEY_ID": key_id,
        "STACK_AWS_SECRET_ACCESS_KEY": secret,
        "MOTO_ENABLE_RECORDING": "true",
        "MOTO_RECORDER_FILEPATH": str(recording),
    }
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
            up_env,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        out = started.stdout
        credentials = stack_dir / "aws-credentials"
        assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{s3}" in out
        assert f"export AWS_SHARED_CREDENTIALS_FILE={credentials}" in out
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in out
        assert f"export RAY_ADDRESS=http://127.0.0.1:{dashboard}" in out
        assert f"export RAY_TMPDIR={ray_tmp}" in out
        # One submit line, without --runtime-env-json: jobs inherit the stack's settings.
        assert [line for line in out.splitlines() if line.startswith("ray job submit")] == [
            "ray job submit --working-dir . -- "
            "python -m services.train --config ring8 storage.uri=s3://raygan/runs"
        ]
        assert secret not in out + started.stderr
        state = json.loads((stack_dir / "stack.json").read_text())
        pids = {name: entry["pid"] for name, entry in state["processes"].items()}
        assert sorted(pids) == ["mlflow", "ray", "s3"]
        assert (stack_dir / ".gitignore").read_text() == "*\n"
        ini = configparser.ConfigParser()
        ini.read(credentials)
        assert dict(ini["default"]) == {
            "aws_access_key_id": key_id,
            "aws_secret_access_key": secret,
        }
        # No process of the head's group (GCS, raylet, dashboard, agents) nor MLflow's server
        # has a key variable or the secret in its environment; the head, the raylet (whose
        # environment every job's driver and workers inherit: see the probe) and MLflow's server
        # (it writes the artifacts to S3) name the credentials file. (Ray processes that set
        # their process title overwrite the environment /proc shows: no file check for those.)
        group = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and (_proc_stat(int(p.name)) or ["", "", ""])[2] == str(pids["ray"])
        ]
        named = {
            Path(_cmdline(pid)[0]).name: pid
            for pid in group
            if Path(_cmdline(pid)[0]).name in ("raylet", "gcs_server")
        }
        assert sorted(named) == ["gcs_server", "raylet"], [_cmdline(pid)[:2] for pid in group]
        for pid in [*group, pids["mlflow"]]:
            environ = _environ(pid)
            assert not [k for k in KEY_NAMES if k.encode() in environ], pid
            assert secret.encode() not in b"\0".join(environ.values()), pid
        for pid in [pids["ray"], *named.values(), pids["mlflow"]]:
            assert _environ(pid)[b"AWS_SHARED_CREDENTIALS_FILE"] == str(credentials).encode()

        s3_client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{s3}",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
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
        ray_bin = str(Path(sys.executable).parent / "ray")
        listed = subprocess.run(
            [ray_bin, "job", "list"], env=ray_env, capture_output=True, text=True, timeout=60
        )
        assert listed.returncode == 0, listed.stderr[-2000:]
        _submit_gan_jobs(ray_env, state, s3_client, mlflow_port)
        # Run beside the sweep job: processes that mostly wait on imports and I/O.
        finish_model_checks = _start_model_checks(env, state, mlflow_port, tmp_path)
        finish_probe = _start_probe(ray_env, state, tmp_path, key_id, secret)
        _submit_sweep_job(ray_env, state, s3_client, mlflow_port, tmp_path)
        finish_model_checks()
        finish_probe()

        _assert_signed_by(recording, key_id)
        _assert_secret_nowhere(secret, ray_env, dashboard, token, s3_client, mlflow_port)
        # Only the credentials file holds the secret (the state file, logs and MLflow database
        # do not), and every file of the stack is its owner's only.
        assert _files_holding(stack_dir, secret.encode()) == [credentials]
        for folder, _, names in os.walk(stack_dir):
            assert _mode(Path(folder)) == 0o700, folder
            assert {name: _mode(Path(folder, name)) for name in names} == dict.fromkeys(
                names, 0o600
            )
        assert {"mlflow.db", "aws-config", "stack.json", ".gitignore"} <= set(os.listdir(stack_dir))
        assert sorted(os.listdir(stack_dir / "logs")) == ["mlflow.log", "ray.log", "s3.log"]
        home_ray = tmp_path / "home" / ".ray"
        assert (_mode(home_ray), _mode(home_ray / "auth_token")) == (0o700, 0o600)

        shown = _stack(["status", *flags], env)
        assert shown.returncode == 0 and shown.stdout.count(" healthy ") == 3, shown.stdout
        again = _stack(["up", *flags, "--s3-port", str(free_port())], env)
        assert again.returncode == 1 and "still running" in again.stderr

        stopped = _stack(["down", *flags], env)
        assert stopped.returncode == 0, stopped.stderr
        assert [line.split()[0] for line in stopped.stdout.splitlines()] == ["ray", "mlflow", "s3"]
        assert "killed" not in stopped.stdout
        assert not [name for name, pid in pids.items() if _group_alive(pid)]
        assert not credentials.exists() and not (stack_dir / "aws-config").exists()
        gone = _stack(["status", *flags], env)
        assert gone.returncode == 1 and "no stack recorded" in gone.stdout
        # Ray's session folder, complete now that the head has stopped: its logs (the job
        # drivers', the runtime env agent's, the GCS's), events and job metadata. The walk does
        # read the job logs: the first job's last line is found.
        assert _files_holding(Path(ray_tmp), secret.encode()) == []
        assert _files_holding(Path(ray_tmp), b"[raygan] done: 20 steps")
    finally:
        if (stack_dir / "stack.json").exists():
            _stack(["down", *flags], env)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _start_probe(ray_env: dict, state: dict, tmp_path: Path, key_id: str, secret: str) -> Any:
    """Submit PROBE the printed way; the returned function checks what it saw."""
    probe = tmp_path / "probe.py"  # the job runs on this machine: an absolute path reaches it
    probe.write_text(PROBE)
    job = subprocess.Popen(
        _submit_args(state, "python", str(probe)),
        env=ray_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )

    def finish() -> None:
        stdout, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
        (line,) = [x for x in stdout.splitlines() if x.startswith("PROBE ")]
        seen = json.loads(line[len("PROBE ") :])
        assert seen["driver"]["pid"] != seen["worker"]["pid"]
        for where in ("driver", "worker"):
            assert {k: v for k, v in seen[where].items() if k != "pid"} == {
                "key_vars": [],
                "credentials_file": state["credentials_file"],
                "method": "shared-credentials-file",
                "access_key": key_id,
                "secret_sha256": hashlib.sha256(secret.encode()).hexdigest(),
            }, where

    return finish


def _assert_signed_by(recording: Path, key_id: str) -> None:
    """Every request moto served on the bucket was signed with the stack's key id: Ray Train's
    checkpoint uploads, raygan's sample and report writes (pyarrow), MLflow's proxied
    artifacts (boto3 in the server, and the URLs it presigns), the probe's writes from a
    driver and a Ray worker."""
    signed: dict[str, list[str]] = {}
    for line in recording.read_text().splitlines():
        entry = json.loads(line)
        url = urllib.parse.urlsplit(entry["url"])
        if url.path.startswith("/raygan/"):
            # A signed header, or a presigned URL (MLflow's server hands those out for reads).
            auth = entry["headers"].get("Authorization", "").partition("Credential=")[2]
            query = urllib.parse.parse_qs(url.query).get("X-Amz-Credential", [""])[0]
            signed.setdefault((auth or query).split("/")[0], []).append(url.path)
    assert list(signed) == [key_id], {k: v[:3] for k, v in signed.items()}
    paths = signed[key_id]
    for where in ("driver", "worker"):
        for client in ("boto3", "pyarrow"):
            assert f"/raygan/probe/{where}-{client}.txt" in paths
    for part in ("/checkpoint_", "/samples/step_0000020.png", "/raygan/mlflow/"):
        assert any(part in p for p in paths), part


def _assert_secret_nowhere(
    secret: str, ray_env: dict, dashboard: int, token: str, s3_client, mlflow_port: int
) -> None:
    """The planted secret is in no job's metadata (`ray job list`, the jobs API), no object of
    the bucket, and no MLflow param or tag."""
    import mlflow

    listed = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "list"],
        env=ray_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and "tuning.sweep" in listed.stdout, listed.stderr[-2000:]
    assert secret not in listed.stdout + listed.stderr
    status, body = _get(f"http://127.0.0.1:{dashboard}/api/jobs/", token)
    jobs = json.loads(body)
    assert status == 200 and len(jobs) == 4  # two GAN jobs, the sweep, the probe
    assert secret not in body
    # Each job's runtime env is the uploaded working dir and nothing else.
    assert [sorted(job["runtime_env"]) for job in jobs] == [["working_dir"]] * 4

    objects = [
        o["Key"]
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket="raygan")
        for o in page.get("Contents", [])
    ]
    assert len(objects) > 20
    holding = [
        key
        for key in objects
        if secret.encode() in s3_client.get_object(Bucket="raygan", Key=key)["Body"].read()
    ]
    assert holding == []

    client = mlflow.MlflowClient(f"http://127.0.0.1:{mlflow_port}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 5  # two GAN runs, the sweep's parent and its two trials
    for run in runs:
        values = {**run.data.params, **run.data.tags}
        assert not [k for k, v in values.items() if secret in k or secret in v], run.info.run_id
    for version in client.search_model_versions(f"name = '{REGISTERED}'"):
        assert secret not in json.dumps(version.tags)


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


def _submit_args(state: dict, *entrypoint: str) -> list[str]:
    """The printed `ray job submit` line with its entrypoint replaced by ``entrypoint``."""
    words = shlex.split(submit_line(state))
    options = words[1 : words.index("--")]
    assert options == ["job", "submit", "--working-dir", "."], options
    ray_bin = str(Path(sys.executable).parent / "ray")
    return [ray_bin, "job", "submit", "--working-dir", str(REPO), "--", *entrypoint]


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
                "python",
                "-m",
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
            "python",
            "-m",
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
