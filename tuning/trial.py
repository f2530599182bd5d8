"""One Tune trial: a driver function that builds and fits a Ray Train ``TorchTrainer``, or,
for one CPU worker, trains in its own process (``tuning.inprocess``; ``runs_in_process``).

Since Train V2, ``Tuner(TorchTrainer(...))`` is gone: each trial runs ``run_trial`` (0 CPU, see
``TRIAL_RESOURCES``), which trains the trial's config with the same worker code as the training
job and forwards every Train report to Tune.

Why not ``ray.tune.integration.ray_train.TuneReportCallback``: it forwards metrics and the
checkpoint's *path* as a metric, but never registers a Tune checkpoint. PBT then has nothing to
clone ("no checkpoint for trial ... Skip exploit") and a restored trial gets no checkpoint. So
``ForwardToTune`` (a Train callback on the controller) hands each report, checkpoint included,
to the driver, which calls ``tune.report(metrics, checkpoint=...)``; the controller waits for
the driver's acknowledgement, so Train cannot delete that checkpoint (``num_to_keep``) before
Tune has copied it. The workers do not wait: they may train and log (MLflow, sample grids) a
report or two ahead of what Tune has seen, e.g. past the report on which a scheduler stops them.

A stopped or paused trial ends when Tune ends its actor, which owns the Train controller and
workers (so trials must not reuse actors); Train's placement-group cleaner then frees its CPUs
(see ``services.launch.init_ray``).

Where a trial starts: with no Tune checkpoint, a Train run named after the trial (rerunning a
name resumes it, Train's own mechanism). With one (a PBT exploit, or a sweep restored after an
interruption), a Train run named ``<trial>-from-<hash of the checkpoint path>``, started from
that checkpoint through the worker's ``resume_from``: reusing the trial's name would make Train
resume the trial's own latest checkpoint and silently drop the one Tune chose.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.train import (
    Checkpoint,
    UserCallback,
)

from gan_core.config import GanConfig, from_dict
from services.launch import make_trainer
from tuning.objective import with_score
from tuning.plan import SweepPlan
from tuning.runs import child_run_id

log = logging.getLogger("raygan.tuning")

# The driver only waits on its Train run: no CPU, or the workers could never fit on 2 cores; Tune
# rejects {"cpu": 0} alone, hence the token memory (docs/PLATFORM.md, "Ray Tune + Train").
TRIAL_RESOURCES = {"cpu": 0, "memory": 10 * 1024**2}
_POLL_S = 0.5


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a sweep shares; travels to the drivers via ``tune.with_parameters``."""

    sweep: str
    base: dict[str, Any]  # the flattened base config (space's fixed keys and overrides applied)
    runs_uri: str  # storage of the trials' Train runs and sample grids
    tracking_uri: str  # resolved once, so every process logs to the same store
    parent_run_id: str | None
    quiet: bool = True
    verbose: bool = False
    in_process: bool = False  # one CPU worker per trial: trained in the trial (tuning.inprocess)

    def trial_config(self, knobs: dict[str, Any], trial: str) -> GanConfig:
        """The config a trial trains: base + knobs, named after the trial, stored in the sweep."""
        flat = {
            **self.base,
            **knobs,
            "name": trial,
            "storage.uri": self.runs_uri,
            "tracking.uri": self.tracking_uri,
        }
        return from_dict(flat, source=f"trial {trial}")


def trial_name(trial: Any) -> str:
    """Tune's trial and folder name: short and stable across restores (no parameters, no date)."""
    return f"trial_{trial.trial_id}"


def runs_in_process(plan: SweepPlan) -> bool:
    """Whether a sweep's trials train in their own process: ``--trial-runner process``, or
    ``auto`` with one CPU worker per trial and no knob that changes the resources (Tune's
    resource request is fixed per sweep). ``train`` makes every trial a Ray Train job."""
    if plan.trial_runner != "auto":
        return plan.trial_runner == "process"  # "process" was checked against one_cpu_worker
    return plan.one_cpu_worker


def trial_resources(settings: TrialSettings) -> dict[str, float]:
    """What Tune reserves per trial: the worker's CPUs when it trains in the trial's process;
    else none, as its Train workers reserve their own."""
    if settings.in_process:
        return {"cpu": float(settings.base["resources.cpus_per_worker"])}
    return TRIAL_RESOURCES


def train_run_name(trial: str, start_path: str | None) -> str:
    if start_path is None:
        return trial
    return f"{trial}-from-{hashlib.sha1(start_path.encode()).hexdigest()[:8]}"


class Mailbox:
    """A one-report rendezvous between a trial's Train controller and its driver (a Ray actor).

    ``send`` returns only once the driver has passed the report to Tune and called ``ack``.
    """

    def __init__(self) -> None:
        self._reports: asyncio.Queue = asyncio.Queue(maxsize=1)
        self._acks: asyncio.Queue = asyncio.Queue(maxsize=1)

    async def send(self, report: tuple[dict[str, Any], Any]) -> None:
        await self._reports.put(report)
        await self._acks.get()

    async def receive(self, timeout_s: float) -> tuple[dict[str, Any], Any] | None:
        try:
            return await asyncio.wait_for(self._reports.get(), timeout_s)
        except TimeoutError:
            return None

    async def ack(self) -> None:
        await self._acks.put(True)


class ForwardToTune(UserCallback):
    """Runs on the Train controller: each report goes to the trial's driver, then waits for it."""

    def __init__(self, mailbox: Any) -> None:
        self._mailbox = mailbox

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        try:
            ray.get(self._mailbox.send.remote((dict(metrics[0]), checkpoint)))
        except ray.exceptions.RayActorError:
            # The driver is gone (Tune stopped the trial); this controller follows it shortly.
            log.debug("trial driver gone; report at step %s not forwarded", metrics[0].get("step"))


def run_trial(config: dict[str, Any], settings: TrialSettings) -> None:
    """Tune's function trainable: ``config`` holds this trial's knobs (dotted config keys)."""
    trial = tune.get_context().get_trial_name()
    cfg = settings.trial_config(config, trial)
    start = tune.get_checkpoint()
    train_config: dict[str, Any] = {
        "quiet": settings.quiet,
        "verbose": settings.verbose,
    }
    if start is not None:
        train_config["resume_from"] = Checkpoint(start.path, start.filesystem)
    if settings.parent_run_id and cfg.tracking.enabled:
        train_config["mlflow_run_id"] = child_run_id(
            settings.tracking_uri, settings.parent_run_id, settings.sweep, trial, config
        )
    if settings.in_process:
        from tuning.inprocess import run_in_process

        run_in_process(cfg, start, train_config.get("mlflow_run_id"), quiet=settings.quiet)
        return
    mailbox = ray.remote(num_cpus=0)(Mailbox).remote()
    trainer = make_trainer(
        cfg,
        train_config,
        run_name=train_run_name(trial, start.path if start is not None else None),
        callbacks=[ForwardToTune(mailbox)],
        verbose=settings.verbose,
    )
    result = _fit_and_forward(trainer, mailbox)
    # Only after a normal end: killed earlier, it would fail a send the controller still waits on.
    ray.kill(mailbox)
    if train_config.get("mlflow_run_id"):
        # Only a trial that ran to its end gets here (a scheduler's stop ends this thread in
        # tune.report): its best kept checkpoint becomes runs:/<child run>/generator.
        from services.model_log import log_result_generator

        log_result_generator(cfg, result, train_config["mlflow_run_id"])


def _fit_and_forward(trainer: Any, mailbox: Any) -> Any:
    """``fit()`` in a helper thread; this (Tune's) thread reports what the controller sends.

    When a scheduler stops the trial, ``tune.report`` never returns here (Tune ends this thread
    and then the actor, and with it the Train controller and workers it owns). Returns what
    ``fit()`` returned (Ray Train's ``Result``).
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in Tune's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="raygan-train-fit", daemon=True)
    thread.start()
    while True:
        # Checked before waiting: fit() returns only after its last report was acknowledged.
        finished = not thread.is_alive()
        report = ray.get(mailbox.receive.remote(_POLL_S))
        if report is None:
            if finished:
                break
            continue
        metrics, checkpoint = report
        if metrics.get("diverged"):
            # The run stopped on a non-finite value: the trial errors with that reason (below)
            # instead of reporting a result without coverage metrics.
            outcome.setdefault("error", RuntimeError(str(metrics.get("stop_reason"))))
            ray.get(mailbox.ack.remote())
            continue
        tune_checkpoint = None
        if checkpoint is not None:
            tune_checkpoint = tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
        tune.report(with_score(metrics), checkpoint=tune_checkpoint)
        ray.get(mailbox.ack.remote())
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
