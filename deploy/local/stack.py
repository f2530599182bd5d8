"""The local full stack in one command: a Ray head, an S3 endpoint and an MLflow server.

    python -m deploy.local.stack up      [--dir .stack] [--s3-port 9000] [--mlflow-port 5000] ...
    python -m deploy.local.stack status  [--dir .stack]
    python -m deploy.local.stack down    [--dir .stack]

``up`` starts three background processes, each in its own process group, with logs and a state
file (PIDs, ports) under ``--dir``; it waits until each answers, creates the bucket, then prints
the environment to export and a ready ``ray job submit`` line. ``down`` stops exactly the
process groups it recorded (SIGTERM, then SIGKILL after ``--timeout``). It does not run
``ray stop``: that kills every Ray process of the user on the machine, including clusters this
stack did not start (other checkouts, tests). The Ray head runs as ``ray start --block``, which
shuts its own processes down on SIGTERM, so its process group is all of it.

Everything listens on 127.0.0.1 except two Ray components that Ray binds to all interfaces (the
GCS and the raylet; Ray registers the node under the machine's address even when asked for
127.0.0.1). Ray's token authentication stays on: the token is ``$HOME/.ray/auth_token`` (created
here if missing, like ``ray get-auth-token --generate``), and ``ray job`` needs
``RAY_AUTH_MODE=token``. ``RAY_TMPDIR``, if set, is passed to Ray (keep it short: Ray's socket
paths under it must stay below 108 bytes).

The S3 endpoint is moto: in memory, any credentials accepted, gone after ``down``. It is for
development and tests; production points the same code at AWS S3, MinIO or Ceph.

No secret goes into a job's ``runtime_env``: Ray shows its ``env_vars`` to every reader of the
job (``ray job list``, the jobs API) and writes them into its session logs many times. ``up``
writes the S3 keys (``testing``/``testing``, or ``$STACK_AWS_ACCESS_KEY_ID`` /
``$STACK_AWS_SECRET_ACCESS_KEY``) to an AWS shared credentials file in ``--dir`` (mode 0600)
and starts every service with ``AWS_SHARED_CREDENTIALS_FILE`` naming it and no key variable.
Ray's job drivers and workers inherit the head's environment, so the printed submit line needs
no ``--runtime-env-json`` at all: the stack's endpoints are in that environment too, as a
cluster's are in its pods'. Every file ``up`` writes is 0600, every folder it creates 0700, and
the services run with umask 077 (Ray's session logs, the MLflow database).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.ray_procs import process_alive, start_time

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
# An AWS shared credentials file (INI) and an AWS config file, both read by boto3 (MLflow) and by
# the AWS C++ SDK under pyarrow's S3FileSystem (Ray Train storage, services.storage).
CREDENTIALS_FILE = "aws-credentials"
CONFIG_FILE = "aws-config"
REGION = "us-east-1"
# The dev stack's S3 keys: moto accepts any. These variables, when set, replace them (tests plant
# a recognisable secret this way). Not RAYGAN_*: services.launch forwards RAYGAN_* variables to
# Train workers through their runtime_env, where Ray would show them.
KEY_ENV = ("STACK_AWS_ACCESS_KEY_ID", "STACK_AWS_SECRET_ACCESS_KEY")
DUMMY_KEYS = ("testing", "testing")
# Variables no service of the stack inherits from the shell that runs `up`: credentials and
# endpoints of another S3 or MLflow (keys in the environment would beat the credentials file),
# and the planted keys themselves.
INHERITED_NOT = ("AWS_", "MLFLOW_", *KEY_ENV)
# Files and folders the stack creates are readable by their owner only.
PRIVATE_FILE, PRIVATE_DIR, SERVICE_UMASK = 0o600, 0o700, 0o077
# Ray's worker processes take ports 10002-19999 by default; a fixed port in there can collide.
RAY_WORKER_PORTS = range(10002, 20000)


class StackError(RuntimeError):
    """A stack command that cannot go on; the message says why and what to do."""


@dataclass
class Ports:
    s3: int = 9000
    mlflow: int = 5000
    dashboard: int = 8265
    gcs: int = 0  # 0 = a free port
    ray_client: int = 0
    dashboard_agent: int = 0


def free_port() -> int:
    """A port nothing listens on right now (the kernel's ephemeral range, above Ray's ports)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def _bin(name: str) -> str:
    """An executable of this Python's environment (moto_server, mlflow, ray), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(
            f"`{name}` not found beside {sys.executable} or on PATH; "
            "install the dev extras: pip install -e '.[dev]'"
        )
    return found


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in a file that is mode 0600 from its creation on.

    The text goes to a new file created 0600 (O_EXCL: never an existing file or a planted
    symlink), which then replaces ``path`` in one rename: no reader ever sees a wider mode or
    half the text, and no chmod runs after the secret is on disk.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ray_token() -> str:
    """Ray's auth token the way Ray finds it: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.is_file():
        # What `ray get-auth-token --generate` writes, without starting Ray's CLI (seconds).
        # A folder created here is 0700; an existing one (and an existing token) is left as is.
        path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        except FileExistsError:
            pass  # another `up` (or Ray) made it just now: use theirs
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
    return path.read_text().strip()


# Processes -------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, pgrp, ...), or None if there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces


def _has_proc() -> bool:
    return Path("/proc/self/stat").exists()


def _running(entry: dict[str, Any]) -> bool:
    """Whether the process recorded in ``entry`` (by ``_spawn``) still runs and its pid was not
    reused (without /proc, as on macOS, only whether the pid exists)."""
    start = entry.get("start")
    # The state file holds the start time as a string (as it always has: a state.json written
    # by an older stack.py stays readable), ray_procs compares ints.
    return process_alive(entry["pid"], None if start is None else int(start))


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid``."""
    if not _has_proc():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[2] == str(pgid) and stat[0] not in "ZX":
                return True
    return False


def _open_log(path: Path) -> int:
    """``path`` opened for appending, 0600 (a log kept from an older stack is narrowed first;
    a symlink there is refused, not followed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, PRIVATE_FILE)
    if os.fstat(fd).st_mode & 0o077:
        os.fchmod(fd, PRIVATE_FILE)
    return fd


def _spawn(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> dict[str, Any]:
    log = logs / f"{name}.log"
    with os.fdopen(_open_log(log), "ab") as out:
        # Its own session: `down` can signal the whole group, and a Ctrl-C in the terminal
        # that ran `up` does not reach the services. umask 077: what the services write (Ray's
        # session folder and logs, which name every job; the MLflow database) is private too.
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            umask=SERVICE_UMASK,
        )
    start = start_time(proc.pid)
    return {
        "pid": proc.pid,
        "start": None if start is None else str(start),
        "cmd": cmd,
        "log": str(log),
    }


def _stop(entry: dict[str, Any], timeout: float) -> str:
    """Stop the recorded process group within ``timeout`` seconds; says what happened.

    SIGTERM goes to the leader first: `ray start --block` then drains and stops its own
    processes in order (signalling them all at once left it waiting on a dead GCS). Whatever is
    left after half the timeout gets SIGTERM, and SIGKILL at the end.
    """
    pid = entry["pid"]
    if not _running(entry):
        if process_alive(pid, None):
            # The pid now names another process, so our group, which had the same id, is gone.
            return "not running (its pid is reused)"
        if not _group_alive(pid):
            return "not running"
    else:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if _wait_group(pid, timeout / 2):
        return "stopped"
    _signal_group(pid, signal.SIGTERM)
    if _wait_group(pid, timeout / 2):
        return "stopped (after SIGTERM to its whole group)"
    _signal_group(pid, signal.SIGKILL)
    _wait_group(pid, 5.0)
    return f"killed (still running {timeout:.0f} s after SIGTERM)"


def _wait_group(pgid: int, seconds: float) -> bool:
    """Wait until process group ``pgid`` is empty; False if it is not after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        _reap(pgid)
        if not _group_alive(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child (when `up` ran in this process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _tail(path: str, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# Health ----------------------------------------------------------------------------------------


def _http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    """The HTTP status ``url`` answers with, or None when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=3) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def _healthy(name: str, state: dict[str, Any]) -> bool:
    ports = state["ports"]
    if name == "s3":
        return _http_status(f"http://{HOST}:{ports['s3']}/") == 200
    if name == "mlflow":
        return _http_status(f"http://{HOST}:{ports['mlflow']}/health") == 200
    # The job API itself, authenticated: what `ray job submit` needs, not just a live socket.
    headers = {"Authorization": f"Bearer {ray_token()}"}
    return _http_status(f"http://{HOST}:{ports['dashboard']}/api/jobs/", headers) == 200


def _create_bucket(state: dict[str, Any], keys: tuple[str, str]) -> None:
    import boto3

    # The stack's keys, given here: this shell's own AWS_* variables are not the stack's.
    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://{HOST}:{state['ports']['s3']}",
        aws_access_key_id=keys[0],
        aws_secret_access_key=keys[1],
        region_name=REGION,
    )
    bucket = state["bucket"]
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)


# Commands --------------------------------------------------------------------------------------


def stack_keys() -> tuple[str, str]:
    """The S3 keys ``up`` writes to the credentials file: $STACK_AWS_* if set, else dummies."""
    key, secret = (os.environ.get(name, "") for name in KEY_ENV)
    if bool(key) != bool(secret):
        raise StackError(f"set both {KEY_ENV[0]} and {KEY_ENV[1]}, or neither")
    return (key, secret) if key else DUMMY_KEYS


def write_credentials(stack_dir: Path, keys: tuple[str, str]) -> tuple[Path, Path]:
    """The stack's AWS shared credentials file and config file, both 0600; their paths."""
    key, secret = keys
    if any(ch in value for value in keys for ch in "\r\n"):
        raise StackError("an S3 key must be one line")
    credentials = stack_dir / CREDENTIALS_FILE
    config = stack_dir / CONFIG_FILE
    write_private(
        credentials, f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
    )
    # A config file of the stack's own: a default profile in ~/.aws/config (an SSO login, a role
    # to assume) would otherwise come before the credentials file in boto3's chain.
    write_private(config, f"[default]\nregion = {REGION}\n")
    return credentials, config


def _load_state(stack_dir: Path) -> dict[str, Any] | None:
    path = stack_dir / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _commands(
    state: dict[str, Any], stack_dir: Path, num_cpus: int
) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    ports, bucket = Ports(**state["ports"]), state["bucket"]
    db = (stack_dir / "mlflow.db").resolve()
    commands = {
        "s3": [_bin("moto_server"), "-H", HOST, "-p", str(ports.s3)],
        "mlflow": [
            _bin("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            f"s3://{bucket}/mlflow",
            "--serve-artifacts",
            "--host",
            HOST,
            "--port",
            str(ports.mlflow),
            "--workers",
            "1",
        ],
        "ray": [
            _bin("ray"),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={HOST}",
            f"--port={ports.gcs}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=true",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={ports.dashboard}",
            f"--ray-client-server-port={ports.ray_client}",
            f"--dashboard-agent-listen-port={ports.dashboard_agent}",
            "--disable-usage-stats",
        ],
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_NOT)}
    settings = job_env(state)
    envs = {
        "s3": {**base, "AWS_EC2_METADATA_DISABLED": "true"},
        # The server writes the proxied artifacts to S3 with boto3, which reads the same
        # credentials file. Without MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false it starts ~10
        # processes.
        "mlflow": {
            **base,
            **{k: v for k, v in settings.items() if k != "MLFLOW_TRACKING_URI"},
            "MLFLOW_S3_ENDPOINT_URL": settings["AWS_ENDPOINT_URL"],
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        },
        # Every job driver and worker is a child of the raylet and inherits this environment:
        # the stack's settings reach each job without a runtime_env (see job_env).
        # On SIGTERM the head waits up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S for running work
        # to drain (default 30 s), which is for Serve traffic, not for a local stack being stopped.
        "ray": {
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
            **base,
            **settings,
            "RAY_AUTH_MODE": "token",
            # A job's entrypoint `python` must be the interpreter that has raygan's
            # dependencies: the one running this stack (e.g. .venv), first on the PATH.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        },
    }
    return commands, envs


def job_env(state: dict[str, Any]) -> dict[str, str]:
    """The stack's settings, in the Ray head's environment and so in every job's: where S3 and
    MLflow are, and which file holds the S3 keys. Never a key: boto3 and pyarrow's S3 client
    read them from the file, so no secret is in the environment of any process, nor in a job's
    runtime_env (which Ray shows in `ray job list`, its jobs API and its session logs)."""
    ports = state["ports"]
    return {
        "AWS_ENDPOINT_URL": f"http://{HOST}:{ports['s3']}",
        "AWS_SHARED_CREDENTIALS_FILE": state["credentials_file"],
        "AWS_CONFIG_FILE": state["config_file"],
        "AWS_DEFAULT_REGION": REGION,
        # No client may wait on the cloud metadata address for credentials it will not find.
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{ports['mlflow']}",
    }


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """What a shell needs to use the stack: S3 storage, MLflow, and the `ray job` CLI. The S3
    keys stay in the credentials file here too."""
    env = {
        **job_env(state),
        "RAY_ADDRESS": f"http://{HOST}:{state['ports']['dashboard']}",
        "RAY_AUTH_MODE": "token",
    }
    if state.get("ray_tmpdir"):
        env["RAY_TMPDIR"] = state["ray_tmpdir"]
    return env


def submit_line(state: dict[str, Any], preset: str = "ring8") -> str:
    """A `ray job submit` of a training run storing to the stack's bucket and MLflow. No
    --runtime-env-json: the job inherits the stack's settings from the head (job_env), as a
    job on a cluster does from its pods."""
    return (
        "ray job submit --working-dir . "
        f"-- python -m services.train --config {preset} storage.uri=s3://{state['bucket']}/runs"
    )


def up(
    stack_dir: Path,
    ports: Ports,
    bucket: str = "raygan",
    num_cpus: int = 2,
    timeout: float = 120.0,
    keys: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Start the three services, wait until each answers, create the bucket; returns the state.

    ``keys`` (access key id, secret key) go only into the stack's credentials file; None takes
    $STACK_AWS_ACCESS_KEY_ID / $STACK_AWS_SECRET_ACCESS_KEY, else moto's dummy pair."""
    keys = keys or stack_keys()
    state = _load_state(stack_dir)
    if state and any(_running(p) for p in state["processes"].values()):
        raise StackError(
            f"a stack recorded in {stack_dir / STATE_FILE} is still running: run "
            f"`python -m deploy.local.stack down --dir {stack_dir}` first"
        )
    ports = Ports(**vars(ports))
    for field in ("gcs", "ray_client", "dashboard_agent"):
        if getattr(ports, field) == 0:
            setattr(ports, field, free_port())
    for flag, port in (
        ("--s3-port", ports.s3),
        ("--mlflow-port", ports.mlflow),
        ("--dashboard-port", ports.dashboard),
        ("--ray-port", ports.gcs),
    ):
        if _port_in_use(port):
            raise StackError(f"port {port} ({flag}) is already in use on {HOST}; pick another")
        if flag == "--ray-port" and port in RAY_WORKER_PORTS:
            raise StackError(
                f"--ray-port {port} is inside Ray's worker port range "
                f"{RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}"
            )

    # Folders created here are 0700 (an existing --dir keeps its mode: it may be shared).
    stack_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    logs = stack_dir / "logs"
    logs.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    # Keeps the stack's files out of git and out of `ray job submit --working-dir .` uploads.
    write_private(stack_dir / ".gitignore", "*\n")
    credentials, config = write_credentials(stack_dir, keys)
    ray_token()  # before Ray starts: with RAY_AUTH_MODE=token it refuses to start without one
    state = {
        "ports": vars(ports),
        "bucket": bucket,
        "processes": {},
        "ray_tmpdir": os.environ.get("RAY_TMPDIR", ""),
        "credentials_file": str(credentials.resolve()),
        "config_file": str(config.resolve()),
    }
    commands, envs = _commands(state, stack_dir, num_cpus)
    try:
        for name, cmd in commands.items():
            state["processes"][name] = _spawn(name, cmd, envs[name], logs)
            # Written after each start: a failure halfway still leaves `down` what to stop.
            write_private(stack_dir / STATE_FILE, json.dumps(state, indent=2))
        _wait_healthy(state, keys, timeout)
    except BaseException:
        for entry in reversed(state["processes"].values()):
            _stop(entry, timeout=10)
        raise
    return state


def _wait_healthy(state: dict[str, Any], keys: tuple[str, str], timeout: float) -> None:
    waiting = list(state["processes"])
    deadline = time.monotonic() + timeout
    while waiting:
        for name in list(waiting):
            entry = state["processes"][name]
            if _healthy(name, state):
                if name == "s3":
                    _create_bucket(state, keys)
                waiting.remove(name)
            elif not _running(entry):
                raise StackError(
                    f"{name} exited during start-up; end of {entry['log']}:\n{_tail(entry['log'])}"
                )
        if waiting and time.monotonic() > deadline:
            name = waiting[0]
            log = state["processes"][name]["log"]
            raise StackError(
                f"{', '.join(waiting)} not answering after {timeout:.0f} s; "
                f"end of {log}:\n{_tail(log)}"
            )
        if waiting:
            time.sleep(0.3)


def down(stack_dir: Path, timeout: float = 30.0) -> dict[str, str]:
    """Stop every recorded process group (MLflow first: it writes to S3); name -> outcome.
    The credentials and config files go too: their keys were for this stack's S3 only."""
    state = _load_state(stack_dir)
    if state is None:
        return {}
    outcome = {
        name: _stop(entry, timeout) for name, entry in reversed(list(state["processes"].items()))
    }
    for name in (CREDENTIALS_FILE, CONFIG_FILE, STATE_FILE):
        (stack_dir / name).unlink(missing_ok=True)
    return outcome


def status(stack_dir: Path) -> dict[str, dict[str, Any]]:
    """name -> pid, whether it runs, whether it answers, its log."""
    state = _load_state(stack_dir)
    if state is None:
        return {}
    return {
        name: {
            "pid": entry["pid"],
            "running": _running(entry),
            "healthy": _healthy(name, state),
            "log": entry["log"],
        }
        for name, entry in state["processes"].items()
    }


def _print_ready(state: dict[str, Any], stack_dir: Path) -> None:
    ports = state["ports"]
    print(f"stack up (state and logs in {stack_dir}/):")
    print(f"  S3      http://{HOST}:{ports['s3']}  bucket {state['bucket']} (moto, in memory)")
    print(f"  MLflow  http://{HOST}:{ports['mlflow']}")
    print(f"  Ray     http://{HOST}:{ports['dashboard']}  (dashboard; GCS port {ports['gcs']})")
    print(f"  S3 keys {state['credentials_file']} (0600; in no environment, no runtime_env)")
    print("\n# the environment for this shell (keys exported here would beat the stack's file):")
    print("unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_PROFILE")
    for key, value in client_env(state).items():
        print(f"export {key}={shlex.quote(value)}")
    print("\n# `ray job` reads the token from ~/.ray/auth_token because RAY_AUTH_MODE=token;")
    print('# REST calls need: -H "Authorization: Bearer $(cat ~/.ray/auth_token)"')
    print("# jobs inherit the stack's settings from the head: no --runtime-env-json, no keys")
    print("ray job list")
    print(submit_line(state))
    print(f"\n# stop: python -m deploy.local.stack down --dir {stack_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(".stack"),
        help="where PIDs, logs and the MLflow database live (default .stack)",
    )
    parser.add_argument("--s3-port", type=int, default=9000)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--ray-port", type=int, default=0, help="Ray GCS port (0 = a free one)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--bucket", default="raygan")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds: up waits this long for health (120), down before SIGKILL (30)",
    )
    args = parser.parse_args(argv)
    stack_dir: Path = args.dir.resolve()
    try:
        if args.command == "up":
            ports = Ports(
                s3=args.s3_port,
                mlflow=args.mlflow_port,
                dashboard=args.dashboard_port,
                gcs=args.ray_port,
            )
            state = up(stack_dir, ports, args.bucket, args.num_cpus, args.timeout or 120.0)
            _print_ready(state, stack_dir)
            return 0
        if args.command == "down":
            outcome = down(stack_dir, args.timeout or 30.0)
            if not outcome:
                print(f"no stack recorded in {stack_dir}")
            for name, what in outcome.items():
                print(f"{name:7s} {what}")
            return 0
        rows = status(stack_dir)
        if not rows:
            print(f"no stack recorded in {stack_dir}")
            return 1
        for name, row in rows.items():
            state_word = "healthy" if row["healthy"] else "running" if row["running"] else "down"
            print(f"{name:7s} pid {row['pid']:<8d} {state_word:8s} log {row['log']}")
        return 0 if all(row["healthy"] for row in rows.values()) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
