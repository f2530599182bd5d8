"""One writer per run (services/lease.py): on local storage and on a real S3 endpoint (moto)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from gan_core.config import StorageConfig
from services import train
from services.lease import LEASE_FILE, LeaseHeld, acquire, acquire_for, holder_alive
from services.storage import open_storage
from tests.services.test_reliability import spawn_train
from tests.services.test_train_integration import TINY
from tuning import sweep


def _local(tmp_path: Path) -> tuple:
    cfg = StorageConfig(uri=str(tmp_path / "runs"))
    return open_storage(cfg), cfg


def _other_holder(path: Path, renewed_ago: float, host: str = "elsewhere") -> None:
    now = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "token": "theirs",
                "command": "services.train",
                "host": host,
                "boot_id": "b",
                "pid": 4242,
                "pid_start": 1,
                "started_at": now - 600,
                "renewed_at": now - renewed_ago,
            }
        )
    )


def test_a_live_holder_refuses_a_twin_by_name_and_a_release_frees_the_run(
    tmp_path: Path,
) -> None:
    storage, cfg = _local(tmp_path)
    first = acquire_for(storage, cfg, "r", "services.train", force=False)
    try:
        with pytest.raises(LeaseHeld) as err:
            acquire_for(storage, cfg, "r", "services.train", force=False)
        text = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in text
        assert "--force" in text
        assert str(tmp_path / "runs" / "r" / LEASE_FILE) in text
    finally:
        first.release()
    assert not (tmp_path / "runs" / "r" / LEASE_FILE).exists()
    acquire_for(storage, cfg, "r", "services.train", force=False).release()


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage, cfg = _local(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease = acquire_for(storage, cfg, "r", "services.train", force=False)
    lease._stop.set()  # leave it behind as a SIGKILLed driver would
    held = json.loads((tmp_path / "runs" / "r" / LEASE_FILE).read_text())
    path = tmp_path / "runs" / "r" / LEASE_FILE
    path.write_text(json.dumps({**held, "pid": dead.pid}))
    assert not holder_alive({**held, "pid": dead.pid}, timeout_s=3600)
    # Our own PID with another start time: a new process that reused a dead holder's PID.
    assert not holder_alive({**held, "pid_start": 0}, timeout_s=3600)
    assert holder_alive(held, timeout_s=3600)
    with caplog.at_level(logging.WARNING, logger="raygan"):
        taken = acquire_for(storage, cfg, "r", "services.train", force=False)
    assert f"pid {dead.pid}" in caplog.text and "its holder is dead" in caplog.text
    assert json.loads(path.read_text())["token"] == taken._holder["token"]
    taken.release()


def test_another_machines_holder_is_stale_only_after_its_timeout_and_force_takes_over(
    tmp_path: Path,
) -> None:
    storage, cfg = _local(tmp_path)
    path = tmp_path / "runs" / "r" / LEASE_FILE
    _other_holder(path, renewed_ago=10)
    with pytest.raises(LeaseHeld, match="host elsewhere, pid 4242.*wait 60 s without renewal"):
        acquire(storage, "r", "services.train", 60, renew=False)
    assert json.loads(path.read_text())["token"] == "theirs"  # refused: untouched
    forced = acquire(storage, "r", "services.train", 60, force=True, renew=False)
    assert json.loads(path.read_text())["token"] == forced._holder["token"]
    forced.release()
    _other_holder(path, renewed_ago=61)
    acquire(storage, "r", "services.train", 60, renew=False).release()


def test_the_holder_renews_and_stops_its_job_when_taken_over(tmp_path: Path) -> None:
    storage, _ = _local(tmp_path)
    path = tmp_path / "runs" / "r" / LEASE_FILE
    # The holder stops its job as Ctrl+C would, through the SIGINT handler: Python's own here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    lease = acquire(storage, "r", "services.train", 5)  # renewed every 1.25 s
    try:
        first = json.loads(path.read_text())["renewed_at"]
        time.sleep(3)
        assert json.loads(path.read_text())["renewed_at"] > first
        # An operator forces a takeover from elsewhere: the holder must stop (as Ctrl+C would).
        with pytest.raises(KeyboardInterrupt):
            acquire(storage, "r", "services.train", 5, force=True, renew=False)
            time.sleep(10)
        assert lease.lost
    finally:
        lease.release()
        signal.signal(signal.SIGINT, previous)
    assert path.exists()  # a lost lease is the new holder's: the old one leaves it alone


def test_s3_lease_uses_conditional_writes(s3_bucket: str, s3_env: str) -> None:
    cfg = StorageConfig(uri=f"s3://{s3_bucket}/runs", endpoint=s3_env)
    storage = open_storage(cfg)
    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    key = f"runs/r/{LEASE_FILE}"
    first = acquire_for(storage, cfg, "r", "services.train", force=False)
    try:
        with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
            acquire_for(storage, cfg, "r", "services.train", force=False)
        body = json.loads(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        assert body["token"] == first._holder["token"]
        assert first.renew()
        # Another machine's stale lease is replaced only at the version we read (If-Match):
        # a renewal by its holder in between would make our take-over fail, not clobber it.
        assert not first._backend.take('"0123"')
        assert first.renew()
    finally:
        first.release()
    assert "Contents" not in s3.list_objects_v2(Bucket=s3_bucket, Prefix=key)
    stale = {"token": "t", "host": "elsewhere", "pid": 1, "renewed_at": time.time() - 120}
    s3.put_object(Bucket=s3_bucket, Key=key, Body=json.dumps(stale).encode())
    taken = acquire(storage, "r", "services.train", 60, endpoint=(s3_env[7:], "http"), renew=False)
    assert json.loads(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())["pid"] == os.getpid()
    taken.release()


def test_a_twin_train_job_is_refused_and_a_rerun_after_a_sigkill_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    common = [
        *TINY,
        "resources.backend=local",
        "tracking.enabled=false",
        f"storage.uri={runs}",
        "name=twin",
    ]
    proc = spawn_train([*common, "train.steps=100000"], {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "[raygan] step 20/" in line:
                break
        assert train.main(["--config", "ring8", *common, "train.steps=30"]) == 2
        err = capsys.readouterr().err
        assert "twin is being written by another job: services.train on host" in err
        assert f"pid {proc.pid}" in err
    finally:
        proc.kill()
        proc.wait()
    assert (runs / "twin" / LEASE_FILE).exists()  # a SIGKILL leaves its lease behind
    # The first job trained on while the twin was refused: resume from its newest checkpoint.
    saved = max(int(p.name.split("_")[1]) for p in (runs / "twin" / "local_checkpoints").iterdir())
    assert saved >= 10  # the step-20 line comes before that step's checkpoint
    summary = tmp_path / "s.json"
    budget = f"train.steps={saved + 20}"
    rc = train.main(["--config", "ring8", *common, budget, "--summary-json", str(summary)])
    assert rc == 0
    assert f"[raygan] resumed twin at step {saved}" in capsys.readouterr().out
    assert json.loads(summary.read_text())["steps"] == saved + 20
    assert not (runs / "twin" / LEASE_FILE).exists()  # released at the end


def test_a_sweep_held_elsewhere_is_refused_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    _other_holder(runs / "held" / LEASE_FILE, renewed_ago=1)
    space = tmp_path / "steps.yaml"
    space.write_text("grid:\n  train.steps: [10]\n")
    rc = sweep.main(
        ["--name", "held", "--space", str(space), "--config", "ring8", f"storage.uri={runs}"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "held is being written by another job: services.train on host elsewhere" in err
