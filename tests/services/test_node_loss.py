"""Node loss on a two-node Ray cluster on this machine (services/waiting.py).

``ray start --head`` and ``ray start --address`` each with one CPU and their own ports; a 2-worker
job puts one worker on each node. The second node's raylet is SIGKILLed by PID mid-run: the job
says in one line what it waits for, resumes when a node comes back, and a job that cannot get its
workers within ``resources.wait_timeout`` stops with exit status 4 and one line.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.test_train_integration import TINY

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.gcs = _free_port()
        home = root / "home"
        (home / ".ray").mkdir(parents=True)
        token = home / ".ray" / "auth_token"
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
        self.env = {
            **os.environ,
            "HOME": str(home),
            "RAY_AUTH_MODE": "token",
            "RAY_TMPDIR": str(root),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.address = f"127.0.0.1:{self.gcs}"

    def _ports(self) -> list[str]:
        names = (
            "node-manager-port",
            "object-manager-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
        low = _free_port()
        workers = range(low, low + 41)
        ports = []
        for name in names:
            port = _free_port()
            while port in workers:  # Ray refuses a port inside the worker range
                port = _free_port()
            ports.append(f"--{name}={port}")
        return [*ports, f"--min-worker-port={low}", f"--max-worker-port={low + 40}"]

    def _start(self, *args: str) -> None:
        common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        # A folder per node, as on separate machines: nodes sharing one session folder each
        # forward every worker's output to the driver (a line per node).
        self.nodes = getattr(self, "nodes", 0) + 1
        out = subprocess.run(
            [RAY, "start", *args, *common, *self._ports(), f"--temp-dir={self.root}/n{self.nodes}"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    def start_head(self) -> None:
        self._start(
            "--head",
            f"--port={self.gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={_free_port()}",
        )

    def add_node(self) -> None:
        self._start(f"--address={self.address}")

    def raylets(self) -> list[int]:
        """PIDs of this cluster's raylets, head first (by start order)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"/raylet") and str(self.root).encode() in b" ".join(cmd):
                pids.append(int(proc.name))
        return sorted(pids)

    def pids(self) -> list[int]:
        """Every process of this cluster: its command line or environment names our root."""
        mine = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
            except OSError:
                continue
            if str(self.root).encode() in blob:
                mine.append(int(proc.name))
        return mine

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    root = Path("/tmp") / f"rgnl{os.getpid()}"  # socket paths must stay short
    root.mkdir()
    c = Cluster(root)
    try:
        c.start_head()
        c.add_node()
        yield c
    finally:
        c.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _job(c: Cluster, runs: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.train",
            "--config",
            "ring8",
            "--address",
            c.address,
            *TINY,
            "name=nodeloss",
            "tracking.enabled=false",
            f"storage.uri={runs}",
            "resources.num_workers=2",
            "resources.cpus_per_worker=1",
            *extra,
        ],
        cwd=REPO,
        env=c.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(proc: subprocess.Popen, marker: str, lines: list[str], timeout: float) -> None:
    deadline = time.time() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return
        assert time.time() < deadline, (
            f"no {marker!r} within {timeout} s:\n{''.join(lines)[-4000:]}"
        )
    raise AssertionError(f"job ended before {marker!r}:\n{''.join(lines)[-4000:]}")


def test_a_lost_node_is_waited_for_said_once_and_resumed_or_given_up(
    cluster: Cluster, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    summary = tmp_path / "s.json"
    # The workers wait at step 25 (services.worker.hold_gate) until raygan says it waits for
    # the lost node: a worker whose raylet was killed runs on until Ray declares its node dead,
    # and without the hold the two could finish the run before that (seen here).
    hold = tmp_path / "hold"
    hold.write_text("25")
    cluster.env["RAYGAN_HOLD_FILE"] = str(hold)
    job = _job(cluster, runs, "train.steps=60", "--summary-json", str(summary))
    lines: list[str] = []
    try:
        _read_until(job, "[raygan] step 20/", lines, timeout=180)
        raylets = cluster.raylets()
        assert len(raylets) == 2, raylets
        os.kill(raylets[-1], signal.SIGKILL)  # the second node's raylet
        _read_until(job, "[raygan] waiting since", lines, timeout=120)
        hold.unlink()  # the restarted workers resume from step 20 and pass 25
        waiting = lines[-1]
        assert "for 2 workers (CPU 2 in all)" in waiting
        assert "free of CPU 1 on 1 node(s), 1 node(s) lost" in waiting
        assert "resumes from its last checkpoint when they come, or stops at" in waiting
        assert "(resources.wait_timeout=1800 s)" in waiting
        cluster.add_node()  # the node comes back
        _read_until(job, "[raygan] the workers are placed again after", lines, timeout=120)
        rest, _ = job.communicate(timeout=240)
    finally:
        job.kill()
        hold.unlink(missing_ok=True)
    output = "".join(lines) + rest
    assert job.returncode == 0, output[-4000:]
    assert json.loads(summary.read_text())["steps"] == 60, output[-6000:]
    assert output.count("[raygan] waiting since") == 1
    # Ray's own retry loop (a traceback every 60 s) is gone: no startup-timeout traceback.
    assert "WorkerGroupStartupTimeoutError" not in output
    # Each evaluation line once, though two nodes' log monitors share this machine.
    evals = [line for line in output.splitlines() if "[raygan] step 30/" in line]
    assert len(evals) == 1, evals

    # The second node is lost again and does not come back: a job that needs two workers
    # stops after resources.wait_timeout with exit 4 and one line.
    os.kill(cluster.raylets()[-1], signal.SIGKILL)
    time.sleep(5)
    started = time.time()
    job = _job(cluster, runs, "train.steps=80", "resources.wait_timeout=20")
    try:
        out, _ = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 4, out[-4000:]
    assert time.time() - started < 150
    assert (
        "raygan: nodeloss: gave up after resources.wait_timeout=20 s waiting for 2 workers "
        "(CPU 2 in all): the cluster has CPU 1 free of CPU 1 on 1 node(s)"
    ) in out
    assert "rerun the same command to resume from the last checkpoint" in out
    assert "Traceback" not in out, out[-4000:]
