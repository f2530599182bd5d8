"""tuning.runs against a real MLflow SQLite store: nested trial runs and how a sweep ends them."""

from __future__ import annotations

import os

import mlflow
import pytest

from services.tracking import HTTP_DEFAULTS
from services.worker import ended_status
from tuning.runs import PARENT_TAG, TRIAL_TAG, child_run_id, close_children


@pytest.fixture
def tracking(mlflow_db: str) -> str:
    return mlflow_db  # a fresh store (tests/conftest.py)


def _parent(tracking: str) -> str:
    client = mlflow.MlflowClient(tracking)
    experiment = client.create_experiment("sweeps")
    return client.create_run(experiment, run_name="sweep").info.run_id


def test_child_run_is_nested_has_knobs_and_is_found_again(tracking: str) -> None:
    parent = _parent(tracking)
    first = child_run_id(tracking, parent, "s", "trial_0", {"unroll.steps": 5})
    assert first is not None
    assert child_run_id(tracking, parent, "s", "trial_0", {"unroll.steps": 5}) == first
    run = mlflow.MlflowClient(tracking).get_run(first)
    assert run.data.tags[PARENT_TAG] == parent and run.data.tags[TRIAL_TAG] == "trial_0"
    assert run.data.params == {"unroll.steps": "5"}


def test_unreachable_tracking_gives_no_child_instead_of_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")  # the user's own setting stays
    # Port 9 (discard) on loopback: nobody listens. MLflow's default retries would take minutes.
    assert child_run_id("http://127.0.0.1:9", "0" * 32, "s", "t", {}) is None
    assert (
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    )
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"


def test_close_children_follows_tunes_view(tracking: str) -> None:
    """(worker's MLflow status, Tune's outcome) -> the status the sweep leaves."""
    parent = _parent(tracking)
    client = mlflow.MlflowClient(tracking)
    cases = {
        # trial: (status its worker left, Tune's outcome, expected MLflow status)
        "done": ("RUNNING", "COMPLETED", "FINISHED"),
        # ASHA's stop reached the worker inside Python (SystemExit): it ended its run KILLED.
        "stopped": ("KILLED", "STOPPED", "FINISHED"),
        "stopped_hard": ("FAILED", "STOPPED", "FINISHED"),  # a worker that raised on its way out
        "errored": ("FINISHED", "ERROR", "FAILED"),
        "interrupted": ("RUNNING", "INCOMPLETE", "KILLED"),
        "left": ("FAILED", "INCOMPLETE", "FAILED"),  # not Tune's to decide yet
    }
    ids = {}
    for trial, (worker_status, _, _) in cases.items():
        ids[trial] = child_run_id(tracking, parent, "s", trial, {})
        if worker_status != "RUNNING":
            client.set_terminated(ids[trial], status=worker_status)
    outcomes = {
        trial: {"status": outcome, "score": 1.5, "step": 30, "error": "RuntimeError: boom"}
        for trial, (_, outcome, _) in cases.items()
        if outcome != "INCOMPLETE"
    }
    statuses = close_children(tracking, parent, outcomes)
    assert statuses == {trial: expected for trial, (_, _, expected) in cases.items()}
    for trial, (_, _, expected) in cases.items():
        run = client.get_run(ids[trial])
        assert run.info.status == expected, trial
    stopped = client.get_run(ids["stopped"]).data
    assert stopped.tags["raygan.stopped_early"] == "true"
    assert stopped.metrics["score"] == 1.5
    assert client.get_run(ids["errored"]).data.tags["raygan.error"] == "RuntimeError: boom"
    assert "raygan.tune_status" not in client.get_run(ids["interrupted"]).data.tags


def test_a_run_stopped_from_outside_ends_killed_not_failed() -> None:
    # Tune stops a function trial by raising SystemExit in its next report; Ctrl+C raises
    # KeyboardInterrupt. Neither is the run's own failure.
    assert ended_status(SystemExit(0)) == "KILLED"
    assert ended_status(KeyboardInterrupt()) == "KILLED"
    assert ended_status(RuntimeError("boom")) == "FAILED"
    assert ended_status(MemoryError()) == "FAILED"
