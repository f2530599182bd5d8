"""A one-worker trial trained in the Tune trial's own process, without a Ray Train job.

A Train job per trial costs a controller, a worker group, a placement group and their start-up
and teardown, which for the short trials of a sweep over 2D nets is as long as the training
(``bench/trial_startup.py`` measures it). A trial with one CPU worker needs none of it: no DDP,
no gradient all-reduce, no dataset shards. So ``run_in_process`` runs the training job's own
worker code (``services.worker.WorkerSession``) right here, with the trial's CPUs
(``TrialSettings.in_process``, requested through ``tune.with_resources``):

- the same evaluations, sample grids, MLflow child run, test hooks and non-finite policy as a
  Train worker; file data is read by gan_core's pyarrow stream, as by the local backend;
- checkpoints in the local backend's layout (``runs/<trial>/local_checkpoints/step_N``, read by
  services.sample and services.model_log), each also handed to ``tune.report``, so schedulers,
  PBT's cloning and a restored sweep work from Tune's copy exactly as with Train trials;
- a trial Tune restores or PBT clones starts from ``tune.get_checkpoint()``; a crashed one is
  restarted by Tune from its last checkpoint (``resources.max_failures`` times, as Train would
  restart its worker); a diverged one is not restarted into the same divergence.

Trials with more workers, or a GPU, keep the TorchTrainer (``tuning.trial``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch
from ray import tune

from gan_core.config import FILE_DATA, GanConfig
from gan_core.loop import LoopHooks, NonFiniteError
from tuning.objective import with_score


def run_in_process(
    cfg: GanConfig, start: Any, mlflow_run_id: str | None, quiet: bool = True
) -> None:
    """Train ``cfg`` (a trial's config) here, reporting every evaluation to Tune; ``start`` is
    the Tune checkpoint to begin from (None: from scratch). Raises RuntimeError with the reason
    when the run diverges, so the trial errors with it, as a Train trial does."""
    from services.launch import for_workers, worker_threads
    from services.worker import DIVERGED_FILE, WorkerSession, ended_status, test_hooks

    if quiet:
        # Tune's function API logs "Checkpoint successfully created at: ..." at INFO for every
        # reported checkpoint (Ray's ray/train/_internal/storage.py); a Train trial's
        # controller keeps it out of the sweep's output, so this one does too.
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = for_workers(cfg)
    data = None
    if cfg.data.name in FILE_DATA:
        from services.preflight import open_data

        data = open_data(cfg, check=False)  # checked by the sweep's plan
    torch.set_num_threads(worker_threads(cfg))
    session = WorkerSession(cfg, rank=0, world_size=1, device="cpu", quiet=quiet, data=data)
    diverged = f"{cfg.name}/{DIVERGED_FILE}"
    if session.storage.exists(diverged):
        # Tune restarts a failed trial (resources.max_failures), but a divergence is not a
        # crash: the same data into the same weights diverges again. The trial fails as before.
        raise RuntimeError(json.loads(session.storage.read_bytes(diverged))["reason"])
    if start is not None:
        with start.as_directory() as folder:
            session.restore(folder)
    if mlflow_run_id:
        # As in services.worker: the trial's own child run wins over the one a cloned
        # checkpoint names, and steps after a clone are a new lineage, logged even if present.
        session.mlflow_run_id = mlflow_run_id
        session.dedupe_replayed_steps = False
    session.start_tracking()

    def on_eval(run: Any, metrics: dict[str, float]) -> None:
        payload = session.eval_payload(metrics)
        session.write_outputs(payload)
        if session.checkpoint_due():
            # tune.report copies the folder into the trial's Tune storage before it returns.
            session.save_to_storage(
                payload,
                report=lambda folder: tune.report(
                    with_score(payload), checkpoint=tune.Checkpoint.from_directory(folder)
                ),
            )
        else:
            tune.report(with_score(payload))

    hooks = LoopHooks(on_step=test_hooks(0), on_eval=on_eval, on_rollback=session.on_rollback)
    try:
        session.run.run(hooks)
    except NonFiniteError as exc:
        raise RuntimeError(str(session.diverged(exc)["stop_reason"])) from None
    except BaseException as exc:
        session.finish(ended_status(exc))
        raise
    session.finish("FINISHED")
    if mlflow_run_id:
        # Only a trial that ran to its end gets here (a scheduler's stop ends it in
        # tune.report). Registering is the sweep's business (its best trial), not each trial's.
        from services.model_log import log_run_generator

        tracking = dataclasses.replace(cfg.tracking, register_as="")
        log_run_generator(dataclasses.replace(cfg, tracking=tracking), mlflow_run_id)
