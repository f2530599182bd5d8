"""MLflow runs of a sweep: one parent run per sweep, one nested child run per trial.

MLflow nests a run under another through the tag ``mlflow.parentRunId``. A trial's driver finds
or creates its child (tagged with the trial name, so a restarted or PBT-exploited trial keeps its
run) and hands the id to the Train worker, whose ``Tracker`` then logs the same params, metrics
and sample grids into it as the training job does.

A trial that a scheduler stops is killed where it stands: code after its last report may never
run (docs/PLATFORM.md): its run would stay RUNNING. ``close_children`` therefore ends the children
from the sweep's side after ``Tuner.fit()``, with the status Tune saw. Tracking never stops a
sweep: MLflow failures here are logged and the trial runs on (its worker then opens a run of its
own, not nested).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag

from services.storage import redact
from services.tracking import bound_http_retries

log = logging.getLogger("raygan.tuning")

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "raygan.sweep"
TRIAL_TAG = "raygan.trial"
# Tune's view of a trial, as an MLflow run status.
MLFLOW_STATUS = {"COMPLETED": "FINISHED", "STOPPED": "FINISHED", "ERROR": "FAILED"}


def _children_filter(parent_run_id: str, trial: str | None = None) -> str:
    text = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if trial is not None:
        text += f" and tags.`{TRIAL_TAG}` = '{trial}'"
    return text


def child_run_id(
    tracking_uri: str, parent_run_id: str, sweep: str, trial: str, knobs: Mapping[str, Any]
) -> str | None:
    """The trial's nested run, created with its knobs as params on first use; None if MLflow
    cannot be reached (the trial then trains with an un-nested run of its own)."""
    bound_http_retries()  # a trial's process: a dead server must cost seconds, not minutes
    client = mlflow.MlflowClient(tracking_uri)
    try:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        found = client.search_runs(
            [experiment_id], filter_string=_children_filter(parent_run_id, trial), max_results=1
        )
        if found:
            return found[0].info.run_id
        run = client.create_run(
            experiment_id,
            run_name=trial,
            tags={
                PARENT_TAG: parent_run_id,
                SWEEP_TAG: sweep,
                TRIAL_TAG: trial,
            },
        )
        params = [Param(key, str(value)) for key, value in knobs.items()]
        client.log_batch(run.info.run_id, params=params, synchronous=True)
        return run.info.run_id
    except Exception as exc:  # tracking must never stop a trial
        log.warning(
            "MLflow at %s: no nested run for trial %s (%s)",
            redact(tracking_uri),
            trial,
            redact(str(exc).splitlines()[0] if str(exc) else repr(exc)),
        )
        return None


def children(tracking_uri: str, parent_run_id: str) -> list[mlflow.entities.Run]:
    """Every run nested under the sweep's parent run."""
    bound_http_retries()
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return list(
        client.search_runs(
            [experiment_id], filter_string=_children_filter(parent_run_id), max_results=10_000
        )
    )


def close_children(
    tracking_uri: str, parent_run_id: str, outcomes: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """End the children Tune is done with; returns ``{trial: MLflow status}`` of every child.

    ``outcomes`` maps a trial name to ``{"status": COMPLETED|STOPPED|ERROR|INCOMPLETE,
    "score": float | None, "error": str}`` (see tuning.report). Finished trials get their final
    score and a ``raygan.stopped_early`` tag, errored ones their reason as ``raygan.error``.
    A trial Tune finished ends FINISHED (completed or stopped by the scheduler) or FAILED
    (error), whatever its worker set; a run still RUNNING of an unfinished trial ends KILLED (an
    interrupted sweep; a resume reopens it).
    """
    client = mlflow.MlflowClient(tracking_uri)
    statuses = {}
    for run in children(tracking_uri, parent_run_id):
        trial = run.data.tags.get(TRIAL_TAG, run.info.run_name)
        outcome = outcomes.get(trial, {"status": "INCOMPLETE"})
        status = MLFLOW_STATUS.get(outcome["status"], "KILLED")
        if outcome["status"] in MLFLOW_STATUS:
            tags = [
                RunTag("raygan.stopped_early", str(outcome["status"] == "STOPPED").lower()),
                RunTag("raygan.tune_status", outcome["status"]),
            ]
            if outcome.get("error"):
                # MLflow caps a tag value at 8,000 characters; the reason line is short.
                tags.append(RunTag("raygan.error", redact(str(outcome["error"]))[:5000]))
            metrics = []
            if outcome.get("score") is not None:
                metrics.append(
                    Metric(
                        "score",
                        float(outcome["score"]),
                        int(time.time() * 1000),
                        int(outcome.get("step", 0)),
                    )
                )
            client.log_batch(run.info.run_id, metrics=metrics, tags=tags, synchronous=True)
        # Tune's view decides a finished trial's status: a scheduler's stop kills the worker
        # wherever it is, and a worker interrupted inside Python ends its own run FAILED.
        decided = outcome["status"] in MLFLOW_STATUS
        if run.info.status == "RUNNING" or (decided and run.info.status != status):
            client.set_terminated(run.info.run_id, status=status)
            statuses[trial] = status
        else:
            statuses[trial] = run.info.status
    return statuses
