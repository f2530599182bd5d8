"""services.tracking against a real MLflow: an SQLite store, and a real server for outages."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from gan_core.config import flatten, load_config
from services import tracking
from services.tracking import Tracker, default_tracking_uri
from tests.conftest import copy_mlflow_store

PLANTED = "planted-Secret-Value-0123456789"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path) -> tuple[Path, str]:
    """One SQLite store for the module: a copy of the session's migrated empty store, since
    creating a fresh one runs MLflow's migrations (~7 s)."""
    folder = tmp_path_factory.mktemp("mlflow-store")
    return folder, copy_mlflow_store(_mlflow_template, folder / "mlflow.db")


@pytest.fixture(autouse=True)
def _secret_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _cfg(name: str, experiment: str, *overrides: str):
    return load_config("ring8", [f"name={name}", f"tracking.experiment={experiment}", *overrides])


def _tracking_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "raygan.tracking" and r.levelno == level]


def _history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(path: Path) -> Path:
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)
    return path


def test_default_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri("store") == f"sqlite:///{tmp_path}/store/mlflow.db"
    assert default_tracking_uri(str(tmp_path / "abs")) == f"sqlite:///{tmp_path}/abs/mlflow.db"
    assert default_tracking_uri(f"file://{tmp_path}/f") == f"sqlite:///{tmp_path}/f/mlflow.db"
    # An SQLite file cannot live in S3: remote storage keeps tracking in ./runs.
    assert default_tracking_uri("s3://bucket/runs") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert default_tracking_uri("s3://bucket/runs") == "http://mlflow.example:5000"


def test_params_tags_and_no_secret(store: tuple[Path, str]) -> None:
    folder, uri = store
    # A secret that reached a config value (here in a URL) is masked by services.secrets.redact.
    cfg = _cfg("params-run", "params", f"storage.endpoint=http://minio:9000/?key={PLANTED}")
    tracker = Tracker(cfg, f"s3://raygan/runs?k={PLANTED}", tracking_uri=uri)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(tracker.run_id)

    assert run.info.run_name == "params-run"
    expected = {key: str(value) for key, value in flatten(cfg).items()}
    expected["storage.endpoint"] = "http://minio:9000/?key=***"
    assert run.data.params == expected
    tags = run.data.tags
    assert tags["raygan.storage_uri"] == "s3://raygan/runs?k=***"
    assert tags["raygan.run_name"] == "params-run"
    assert tags["raygan.version.mlflow"] == mlflow.__version__
    assert tags["raygan.version.torch"].startswith("2.")
    assert tags["raygan.version.ray"].count(".") == 2
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=Path(tracking.__file__).parent,
        capture_output=True,
        text=True,
    )
    assert tags["mlflow.source.git.commit"] == (head.stdout.strip() or "unknown")
    everything = " ".join([*run.data.params, *run.data.params.values(), *tags, *tags.values()])
    assert PLANTED not in everything
    # Artifacts sit beside the database, not in ./mlruns of whatever directory the worker ran in.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (folder / "mlartifacts").as_uri()
    assert tracker.ui_hint == f"mlflow ui --backend-store-uri {uri}"
    tracker.finish()


def test_secret_keys_dropped_and_values_redacted(
    store: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, uri = store
    monkeypatch.setattr(
        tracking,
        "flatten",
        lambda cfg: {
            "train.steps": 10,
            "storage.secret_access_key": PLANTED,
            "db.Password": "hunter2",
            "api.token": "t",
            "aws.credentials_file": "/c",
            "storage.endpoint": f"http://user:{PLANTED}@s3.example",
        },
    )
    tracker = Tracker(_cfg("redact-run", "redact"), f"s3://k:{PLANTED}@b/runs", tracking_uri=uri)
    run = mlflow.MlflowClient(uri).get_run(tracker.run_id)

    assert run.data.params == {
        "train.steps": "10",
        "storage.endpoint": "http://user:***@s3.example",
    }
    assert run.data.tags["raygan.storage_uri"] == "s3://k:***@b/runs"
    tracker.finish()


def test_metrics_by_step_and_filtering(store: tuple[Path, str]) -> None:
    import numpy as np

    _, uri = store
    tracker = Tracker(_cfg("metrics-run", "metrics"), "runs", tracking_uri=uri)
    tracker.log_metrics({"loss": 1.5, "modes": 8, "hq": np.float32(0.25)}, step=0)
    tracker.log_metrics(
        {
            "loss": 0.75,
            "modes": 7,
            "nan": float("nan"),
            "inf": float("inf"),
            "text": "x",
            "none": None,
        },
        step=10,
    )
    client = mlflow.MlflowClient(uri)

    assert _history(client, tracker.run_id, "loss") == [(0, 1.5), (10, 0.75)]
    assert _history(client, tracker.run_id, "modes") == [(0, 8.0), (10, 7.0)]
    assert _history(client, tracker.run_id, "hq") == [(0, 0.25)]
    assert set(client.get_run(tracker.run_id).data.metrics) == {"loss", "modes", "hq"}
    assert tracker.pending == {"metric_points": 0, "artifacts": 0, "tags": 0}
    tracker.finish()


def test_rejected_key_costs_only_its_own_points(
    store: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, uri = store
    tracker = Tracker(_cfg("bad-key-run", "bad-key"), "runs", tracking_uri=uri)
    caplog.set_level(logging.WARNING, "raygan.tracking")
    tracker.log_metrics({"ok": 1.0, "bad$key": 2.0}, step=0)
    tracker.log_metrics({"ok": 3.0}, step=1)

    assert _history(mlflow.MlflowClient(uri), tracker.run_id, "ok") == [(0, 1.0), (1, 3.0)]
    assert tracker.pending["metric_points"] == 0
    (warning,) = _tracking_records(caplog, logging.WARNING)
    assert "'bad$key'" in warning.getMessage()
    tracker.finish()


def test_image_and_directory_artifacts(store: tuple[Path, str], tmp_path: Path) -> None:
    _, uri = store
    tracker = Tracker(_cfg("artifact-run", "artifacts"), "runs", tracking_uri=uri)
    tracker.log_image(_png(tmp_path / "grid_000100.png"))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "state.txt").write_text("step=100")
    tracker.log_artifact(folder, "checkpoints")
    client = mlflow.MlflowClient(uri)

    assert [f.path for f in client.list_artifacts(tracker.run_id, "samples")] == [
        "samples/grid_000100.png"
    ]
    assert [f.path for f in client.list_artifacts(tracker.run_id, "checkpoints")] == [
        "checkpoints/state.txt"
    ]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tracker.log_image(tmp_path / "missing.png")
    tracker.finish()


def test_resume_continues_the_same_run(
    store: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    _, uri = store
    client = mlflow.MlflowClient(uri)
    first = Tracker(_cfg("resume-run", "resume"), "runs", tracking_uri=uri)
    first.log_metrics({"loss": 1.0}, step=0)
    first.log_metrics({"loss": 0.5}, step=1)
    first.finish("KILLED")  # as if the job died and Ray restarted it
    assert client.get_run(first.run_id).info.status == "KILLED"

    caplog.set_level(logging.WARNING, "raygan.tracking")
    second = Tracker(
        _cfg("resume-run", "resume", "train.steps=9000"),
        "runs",
        run_id=first.run_id,
        tracking_uri=uri,
    )
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    # The resume replays step 1 (logged, but its checkpoint was lost with the crash): MLflow
    # keeps one point per step; a key new since the crash starts wherever it starts.
    second.log_metrics({"loss": 0.5, "rollbacks": 1.0}, step=1)
    second.log_metrics({"loss": 0.25}, step=2)
    second.finish()

    run = client.get_run(first.run_id)
    assert _history(client, first.run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert _history(client, first.run_id, "rollbacks") == [(1, 1.0)]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "6000"  # MLflow params are immutable
    (warning,) = _tracking_records(caplog, logging.WARNING)
    assert "train.steps: '6000' -> '9000'" in warning.getMessage()
    experiment = client.get_experiment_by_name("resume")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_resume_of_unknown_run_starts_a_new_one(store: tuple[Path, str]) -> None:
    _, uri = store
    tracker = Tracker(_cfg("lost-run", "lost"), "runs", run_id="0" * 32, tracking_uri=uri)
    assert tracker.run_id is not None and tracker.run_id != "0" * 32
    assert mlflow.MlflowClient(uri).get_run(tracker.run_id).info.run_name == "lost-run"
    tracker.finish()


def test_finish_is_idempotent(store: tuple[Path, str], caplog: pytest.LogCaptureFixture) -> None:
    _, uri = store
    client = mlflow.MlflowClient(uri)
    tracker = Tracker(_cfg("finish-run", "finish"), "runs", tracking_uri=uri)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    with pytest.raises(ValueError, match="'DONE'"):
        tracker.finish("DONE")
    tracker.finish()
    end_time = client.get_run(tracker.run_id).info.end_time
    tracker.finish("FAILED")
    run = client.get_run(tracker.run_id)
    assert (run.info.status, run.info.end_time) == ("FINISHED", end_time)
    caplog.set_level(logging.WARNING, "raygan.tracking")
    tracker.log_metrics({"late": 1.0}, step=5)
    assert client.get_metric_history(tracker.run_id, "late") == []
    assert "after finish" in _tracking_records(caplog, logging.WARNING)[0].getMessage()


@pytest.fixture
def fast_failing_http(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's default HTTP retry budget is minutes per call; a closed port should fail at once.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


@pytest.mark.usefixtures("fast_failing_http")
def test_unreachable_server_buffers_within_a_bound(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "raygan.tracking")
    uri = f"http://127.0.0.1:{_closed_port()}"
    tracker = Tracker(
        _cfg("bound-run", "outage"),
        "runs",
        tracking_uri=uri,
        max_buffered_points=5,
        retry_interval_s=0,
    )
    for step in range(4):
        tracker.log_metrics({"a": float(step), "b": -float(step)}, step=step)

    assert tracker.run_id is None
    assert tracker.pending["metric_points"] == 5
    # The oldest points went first: of steps 0-3 (8 points) the newest 5 are left.
    assert [(m.key, m.step) for m in tracker._metrics] == [
        ("b", 1),
        ("a", 2),
        ("b", 2),
        ("a", 3),
        ("b", 3),
    ]
    unreachable, full = _tracking_records(caplog, logging.WARNING)
    assert uri in unreachable.getMessage() and "unreachable" in unreachable.getMessage()
    assert "buffer full (5 points)" in full.getMessage()
    tracker.finish()
    lost = _tracking_records(caplog, logging.WARNING)[-1].getMessage()
    assert "NOT logged: 5 metric points (a, b)" in lost and "3 metric points" in lost


@pytest.mark.usefixtures("fast_failing_http")
def test_retries_are_spaced_but_flush_retries_now(monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = Tracker(
        _cfg("spaced-run", "outage"),
        "runs",
        tracking_uri=f"http://127.0.0.1:{_closed_port()}",
        retry_interval_s=3600,
    )
    calls = []
    real = tracker._client.get_experiment_by_name
    monkeypatch.setattr(
        tracker._client, "get_experiment_by_name", lambda name: calls.append(name) or real(name)
    )
    tracker.log_metrics({"a": 1.0}, step=0)
    tracker.set_tags({"k": "v"})
    assert calls == []
    assert tracker.flush() is False
    assert calls == ["outage"]


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group and wait until every process of it is gone (its
    workers hold the port a moment longer than the parent)."""
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(proc.pid, 9)


def _start_mlflow_server(port: int, db_uri: str, artifacts: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                db_uri,
                "--artifacts-destination",
                str(artifacts),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120  # a loaded 2-core machine starts it in 10-60 s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return proc
        except OSError:
            time.sleep(0.25)
    os.killpg(proc.pid, 9)
    raise AssertionError(f"mlflow server did not come up:\n{log.read_text()[-3000:]}")


@pytest.mark.integration
@pytest.mark.usefixtures("fast_failing_http")
def test_outage_then_recovery_delivers_everything(
    store: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, db_uri = store
    caplog.set_level(logging.INFO, "raygan.tracking")
    port = _closed_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = _cfg("outage-run", "recovery")
    tracker = Tracker(cfg, "runs", tracking_uri=uri, retry_interval_s=0)  # server down: no raise
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    image = _png(tmp_path / "grid.png")
    tracker.log_image(image)
    image.unlink()  # the caller may delete its file: the tracker kept a copy
    tracker.set_tags({"raygan.checkpoint": "s3://raygan/runs/outage-run/ckpt_3"})
    assert tracker.run_id is None
    assert tracker.pending == {"metric_points": 3, "artifacts": 1, "tags": 7}
    assert len(_tracking_records(caplog, logging.WARNING)) == 1

    server = _start_mlflow_server(port, db_uri, tmp_path / "served", tmp_path / "server.log")
    try:
        assert tracker.flush() is True
        client = mlflow.MlflowClient(uri)
        run = client.get_run(tracker.run_id)
        assert _history(client, tracker.run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
        assert run.data.params == {k: str(v) for k, v in flatten(cfg).items()}
        assert run.data.tags["raygan.checkpoint"] == "s3://raygan/runs/outage-run/ckpt_3"
        assert [f.path for f in client.list_artifacts(tracker.run_id, "samples")] == [
            "samples/grid.png"
        ]
        assert tracker.pending == {"metric_points": 0, "artifacts": 0, "tags": 0}
        assert "reachable again" in _tracking_records(caplog, logging.INFO)[-1].getMessage()
        assert tracker.ui_hint == (
            f"{uri}/#/experiments/{run.info.experiment_id}/runs/{tracker.run_id}"
        )

        # Mid-run: the server dies under a live run, points are buffered, it comes back.
        _stop_group(server)
        for step in (3, 4):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        assert tracker.pending["metric_points"] == 2
        assert len(_tracking_records(caplog, logging.WARNING)) == 2  # one per outage
        server = _start_mlflow_server(port, db_uri, tmp_path / "served", tmp_path / "again.log")
        assert tracker.flush() is True
        assert [s for s, _ in _history(client, tracker.run_id, "loss")] == [0, 1, 2, 3, 4]
        tracker.finish()
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
        assert len(_tracking_records(caplog, logging.WARNING)) == 2
    finally:
        if server.poll() is None:
            _stop_group(server)
