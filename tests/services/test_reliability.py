"""Faults survived on the real parts (local Ray on 127.0.0.1, moto S3 behind a flaky proxy,
SQLite MLflow): a worker SIGKILLed by PID, S3 dying in the middle of a checkpoint upload,
NaN weights (rollback and stop), MLflow unreachable, the driver interrupted with SIGINT.
Every run's outputs are then searched for the planted credentials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import mlflow
import pytest
import torch

from gan_core.config import load_config
from services import train
from services.checkpoints import load_checkpoint
from tests.services.conftest import PLANTED_SECRETS
from tests.services.faults import FlakyProxy

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

TINY = [
    "generators.width=32",
    "generators.depth=2",
    "discriminator.width=32",
    "discriminator.maxout_pieces=1",
    "train.batch_size=32",
    "train.lr_schedule=constant",
    "eval.samples=400",
    "eval.every=10",
    "checkpoint.every=10",
    "checkpoint.keep=10",
]
# Files every test of this module produced: searched for the planted secrets at the end.
OUTPUTS: list[Path] = []
TEXTS: list[str] = []


def _history(uri: str, run_id: str, key: str = "modes") -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def _wait_for(path: Path, timeout: float = 900.0) -> bool:
    # Generous: it returns as soon as the file is there, and on a loaded 2-core machine a
    # 2-worker job took over 6 minutes to reach step 20 (the killer then gave up at 240 s).
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def spawn_train(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """``python -m services.train --config ring8 ARGS`` from the repository, stdout and stderr
    together as text on ``proc.stdout``."""
    return subprocess.Popen(
        [sys.executable, "-m", "services.train", "--config", "ring8", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _worker_output(ray_root: Path, needle: str, timeout: float = 30.0) -> str:
    """Lines of the Ray workers' stdout files holding ``needle``. Read from the session's log
    files, not the driver's console: Ray forwards worker output asynchronously, so a line may
    reach the console after ``fit()`` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [
            line
            for path in (ray_root / "t").glob("session_*/logs/worker-*.out")
            for line in path.read_text(errors="replace").splitlines()
            if needle in line
        ]
        if lines or time.monotonic() > deadline:
            return "\n".join(lines)
        time.sleep(0.5)


def _state(checkpoint_dir: str) -> dict:
    return torch.load(Path(checkpoint_dir) / "state.pt", weights_only=True)


def test_worker_sigkilled_by_pid_resumes_to_the_uninterrupted_result(
    ray_cluster: Path,
    tmp_path: Path,
    mlflow_db: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    runs = tmp_path / "runs"
    tracking = mlflow_db
    common = [*TINY, f"storage.uri={runs}", f"tracking.uri={tracking}", "train.steps=40"]
    common += ["resources.num_workers=2", "resources.max_failures=2"]
    assert (
        train.main(
            [
                "--config",
                "ring8",
                *common,
                "name=ref",
                "--quiet",
                "--summary-json",
                str(tmp_path / "ref.json"),
            ]
        )
        == 0
    )

    # Same run again; rank 1's process is SIGKILLed from outside once step 20 is on disk.
    monkeypatch.setenv("RAYGAN_PID_DIR", str(tmp_path))
    killed: list[int] = []

    def killer() -> None:
        if _wait_for(runs / "killed" / "samples" / "step_0000020.png"):
            pid = int((tmp_path / "rank1.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    assert (
        train.main(
            [
                "--config",
                "ring8",
                *common,
                "name=killed",
                "--summary-json",
                str(tmp_path / "killed.json"),
            ]
        )
        == 0
    )
    thread.join(timeout=5)
    assert killed, "the worker was never killed: the test proves nothing"
    TEXTS.append(capsys.readouterr().out)
    assert "resumed killed at step" in _worker_output(ray_cluster, "resumed killed at step")
    restarted = int((tmp_path / "rank1.pid").read_text())
    assert restarted != killed[0], "rank 1 was not restarted in a new process"

    ref = json.loads((tmp_path / "ref.json").read_text())
    got = json.loads((tmp_path / "killed.json").read_text())
    assert got["steps"] == ref["steps"] == 40
    # Deterministic math (streams keyed by seed, rank and step; gloo's 2-rank sum): the resumed
    # run ends bit-identical to the uninterrupted one.
    a, b = _state(ref["checkpoint_uri"]), _state(got["checkpoint_uri"])
    for net in ("generator", "discriminator"):
        for key, tensor in a["model"][net].items():
            assert torch.equal(tensor, b["model"][net][key]), f"{net}.{key}"
    assert [h["step"] for h in b["history"]] == [10, 20, 30, 40]
    assert _history(tracking, got["mlflow_run_id"]) == [10, 20, 30, 40]
    client = mlflow.MlflowClient(tracking)
    named = client.search_runs(
        [client.get_experiment_by_name("raygan").experiment_id],
        filter_string="tags.`raygan.run_name` = 'killed'",
    )
    assert [r.info.status for r in named] == ["FINISHED"], "one MLflow run, finished"
    OUTPUTS.extend([runs, tmp_path / "mlflow.db"])


def test_s3_dies_during_a_checkpoint_upload_and_comes_back(
    ray_cluster: Path,
    s3_server: str,
    tmp_path: Path,
    mlflow_db: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Ray Train's default 2 s poll (tests/conftest.py shortens it): each report then holds the
    # worker long enough for the saboteur below, which polls S3, to arm in time.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")
    bucket = "raygan-outage"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    proxy = FlakyProxy(s3_server)
    tracking = mlflow_db
    args = [*TINY, f"storage.uri=s3://{bucket}/runs", f"storage.endpoint={proxy.url}"]
    args += [f"tracking.uri={tracking}", "name=outage", "train.steps=40"]
    args += ["resources.num_workers=1", "resources.max_failures=3"]

    def saboteur() -> None:
        # The step-20 sample is written just before the step-20 checkpoint is uploaded: arm
        # then, and the first request to a checkpoint folder is cut mid-body, 6 s of outage.
        for _ in range(4000):
            listing = s3.list_objects_v2(Bucket=bucket, Prefix="runs/outage/samples/")
            keys = [o["Key"] for o in listing.get("Contents", [])]
            if any(k.endswith("step_0000020.png") for k in keys):
                proxy.arm(rb"(PUT|POST) /[^ ]*/checkpoint_", outage_s=6.0)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=saboteur, daemon=True)
    thread.start()
    try:
        rc = train.main(["--config", "ring8", *args, "--summary-json", str(tmp_path / "s.json")])
    finally:
        proxy.close()
    out = capsys.readouterr()
    TEXTS.extend([out.out, out.err])
    assert rc == 0, out.err[-2000:]
    assert proxy.cut_requests, "no checkpoint upload was cut: the test proves nothing"
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["steps"] == 40
    resumed = _worker_output(ray_cluster, "resumed outage at step", timeout=2)
    print(f"outage: cut {proxy.cut_requests[0][:90]!r}; restarted: {resumed or 'no'}")

    # Every checkpoint folder Ray registered is whole and loads; nothing half-written does.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/outage/")["Contents"]]
    folders = sorted({k.split("/")[2] for k in keys if "/checkpoint_" in k})
    snapshot = [k for k in keys if "checkpoint_manager_snapshot" in k]
    assert snapshot, keys
    registered = json.loads(s3.get_object(Bucket=bucket, Key=snapshot[0])["Body"].read())
    text = json.dumps(registered)
    cfg = load_config("ring8", args)
    steps = []
    for folder in folders:
        if folder not in text:
            continue  # an unregistered (possibly partial) upload: never used for a resume
        local = tmp_path / folder
        local.mkdir()
        for key in keys:
            if key.split("/")[2] == folder:
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
                (local / Path(key).name).write_bytes(body)
        steps.append(int(load_checkpoint(local, cfg)["model"]["step"]))
    assert sorted(steps) == [10, 20, 30, 40]
    assert _history(tracking, summary["mlflow_run_id"]) == [10, 20, 30, 40]
    OUTPUTS.extend([tmp_path / "mlflow.db"])
    TEXTS.extend(s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode("latin-1") for k in keys)


def test_nan_weights_roll_back_with_a_smaller_rate_or_stop_with_a_clear_status(
    ray_cluster: Path,
    tmp_path: Path,
    mlflow_db: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    runs = tmp_path / "runs"
    tracking = mlflow_db
    common = [*TINY, f"storage.uri={runs}", f"tracking.uri={tracking}", "train.steps=30"]
    common += ["resources.num_workers=2"]
    monkeypatch.setenv("RAYGAN_NAN_AT_STEP", "15")
    summary = tmp_path / "rollback.json"
    assert (
        train.main(
            ["--config", "ring8", *common, "name=nan-rollback", "--summary-json", str(summary)]
        )
        == 0
    )
    out = _worker_output(ray_cluster, "WARNING: non-finite weight discriminator.")
    assert "at step 15; rolled back to step 10 with learning rates x0.5 (rollback 1 of 3)" in out
    result = json.loads(summary.read_text())
    assert result["status"] == "finished" and result["steps"] == 30
    base = load_config("ring8", common).g_optim.lr
    assert result["metrics"]["lr_g"] == pytest.approx(base * 0.5)
    assert _history(tracking, result["mlflow_run_id"], "rollbacks") == [15]
    assert _history(tracking, result["mlflow_run_id"]) == [10, 20, 30]

    # Policy stop: exit 3, the reason on stderr, the last good checkpoint kept and finite.
    summary = tmp_path / "stop.json"
    rc = train.main(
        [
            "--config",
            "ring8",
            *common,
            "name=nan-stop",
            "train.on_nonfinite=stop",
            "--summary-json",
            str(summary),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 3
    assert "nan-stop diverged: non-finite weight discriminator." in err
    assert "at step 15; stopped (train.on_nonfinite=stop)" in err
    result = json.loads(summary.read_text())
    assert result["status"] == "diverged"
    state = _state(result["checkpoint_uri"])
    assert state["model"]["step"] == 10
    assert all(bool(torch.isfinite(t).all()) for t in state["model"]["discriminator"].values())
    run = mlflow.MlflowClient(tracking).get_run(result["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "non-finite" in run.data.tags["raygan.stop_reason"]
    OUTPUTS.extend([runs, tmp_path / "mlflow.db"])


def test_mlflow_down_does_not_stop_training_and_says_what_was_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import socket

    caplog.set_level(logging.WARNING, logger="raygan")

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    summary = tmp_path / "s.json"
    rc = train.main(
        [
            "--config",
            "ring8",
            *TINY,
            "train.steps=20",
            "resources.backend=local",
            f"storage.uri={tmp_path / 'runs'}",
            f"tracking.uri=http://127.0.0.1:{dead}",
            "name=no-mlflow",
            "--summary-json",
            str(summary),
        ]
    )
    assert rc == 0
    assert json.loads(summary.read_text())["steps"] == 20
    assert (tmp_path / "runs" / "no-mlflow" / "samples" / "step_0000020.png").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"127.0.0.1:{dead} unreachable" in w and "buffering" in w for w in warnings)
    final = [w for w in warnings if "NOT logged" in w]
    # 2 evaluations x 19 metric keys (14 + fd, precision, recall, density, coverage), the 2
    # sample pictures, the run's tags.
    assert final and "38 metric points (coverage, d_fake, d_loss" in final[0], warnings
    assert "2 artifacts" in final[0]


def test_sigint_stops_the_driver_cleanly_and_a_rerun_resumes(
    ray_cluster: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    ray_tmp = Path("/tmp") / f"rgint{os.getpid()}"  # socket paths must stay short
    # The worker waits at step 35 (services.worker.hold_gate) until the SIGINT has stopped the
    # job: without it a fast worker once trained and checkpointed past step 50 before the
    # signal landed, and the 50-step rerun below had nothing left to do.
    hold = tmp_path / "hold"
    hold.write_text("35")
    env = {
        **os.environ,
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONUNBUFFERED": "1",
        "RAYGAN_HOLD_FILE": str(hold),
    }
    env.pop("RAY_ADDRESS", None)
    common = [*TINY, f"storage.uri={runs}", "tracking.enabled=false", "name=interrupted"]
    common += ["resources.num_workers=1"]
    proc = spawn_train([*common, "train.steps=100000"], env)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "[raygan] step 30/" in line:
            proc.send_signal(signal.SIGINT)
            break
    try:
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        hold.unlink()
    output = "".join(lines) + rest
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted; rerun the same command to resume interrupted" in output
    # The driver's private cluster went with it: no process of that Ray session is left.
    left = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"leftover Ray processes: {left.stdout}"

    summary = tmp_path / "s.json"
    handler = signal.getsignal(signal.SIGINT)
    assert (
        train.main(["--config", "ring8", *common, "train.steps=50", "--summary-json", str(summary)])
        == 0
    )
    # Ray's fit() installs a SIGINT handler for its run; the job puts the caller's back.
    assert signal.getsignal(signal.SIGINT) is handler
    out = _worker_output(ray_cluster, "resumed interrupted at step")
    resumed = [line for line in out.splitlines() if "resumed interrupted at step" in line]
    # The step-20 checkpoint was uploaded before the step-30 line was printed; Ray may not
    # have registered it yet when the abort came, the worker finds it in storage anyway.
    assert resumed and 20 <= int(resumed[-1].rsplit(" ", 1)[1]) <= 30
    assert json.loads(summary.read_text())["steps"] == 50
    # A rerun with a smaller budget has nothing to train: it says so and reports where the run
    # is (step 50, with that evaluation's metrics), not an older registered checkpoint's step.
    assert (
        train.main(["--config", "ring8", *common, "train.steps=40", "--summary-json", str(summary)])
        == 0
    )
    assert "is at step 50 already (train.steps=40): nothing left to train" in _worker_output(
        ray_cluster, "nothing left to train"
    )
    again = json.loads(summary.read_text())
    assert again["steps"] == 50 and "modes" in again["metrics"]
    OUTPUTS.append(runs)
    TEXTS.append(output)


def test_no_planted_secret_in_any_output(ray_cluster: Path) -> None:
    """Runs last in this module: stdout/stderr of every job above, every file they stored
    (checkpoints with their config.yaml, samples, MLflow databases with params and tags) and
    every Ray session log."""
    assert OUTPUTS and TEXTS, "run the whole module: there is nothing to search"
    files = [
        p
        for root in [*OUTPUTS, ray_cluster]
        for p in ([root] if root.is_file() else root.rglob("*"))
        if p.is_file()
    ]
    assert len(files) > 50
    for secret in PLANTED_SECRETS.values():
        for text in TEXTS:
            assert secret not in text
        needle = secret.encode()
        hits = [str(p) for p in files if needle in p.read_bytes()]
        assert not hits, f"{secret} found in {hits[:5]}"
