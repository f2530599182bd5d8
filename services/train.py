"""The GAN training job: ``python -m services.train --config PRESET_OR_YAML [key=value ...]``.

Validates the config and the storage before anything starts (a ConfigError or StorageError
exits with status 2 and no Ray worker ever runs), then runs Ray Train's ``TorchTrainer`` with
the config's scaling, failure and checkpoint settings. Runs standalone (starts a local Ray on
127.0.0.1 when none is reachable) and under ``ray job submit --working-dir . -- python -m
services.train ...`` (connects to the job's cluster). ``resources.backend=local`` runs the same
worker code in this process without Ray: for debugging and as the overhead baseline.

Rerunning the same ``name`` on the same storage resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from gan_core.config import (
    ConfigError,
    GanConfig,
    load_config,
    preset_names,
)
from gan_core.files import FileData
from gan_core.loop import LoopHooks, NonFiniteError
from services.checkpoints import LOCAL_CHECKPOINTS, CheckpointError
from services.cli import DEFAULT_CONFIG, add_job_args
from services.launch import init_ray, make_trainer
from services.lease import LeaseHeld, acquire_for
from services.storage import (
    StorageError,
    find_write_failure,
    open_storage,
    redact,
    write_failure,
)
from services.waiting import (
    EXIT_NO_RESOURCES,
    ResourcesUnavailable,
    ResourceWatch,
    is_start_timeout,
)
from services.worker import (
    DIVERGED_FILE,
    TRACKING_FILE,
    WorkerSession,
    ended_status,
    nan_injector,
)
from services.worker import (
    checkpoint_uri as stored_uri,
)

log = logging.getLogger("raygan")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.train", description="Train a GAN with Ray Train (DDP)."
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"preset ({', '.join(preset_names())}) or YAML path",
    )
    parser.add_argument("--summary-json", default="", help="write the final summary here")
    add_job_args(
        parser,
        force="take over the run's lease from a job known to be dead (see services/lease.py)",
        quiet="only the final summary",
        verbose="keep Ray's own logs",
        overrides="key=value config overrides",
    )
    return parser.parse_args(argv)


def _interruptible_trainer_class() -> type:
    from ray.train.torch import TorchTrainer

    class InterruptibleTrainer(TorchTrainer):
        """Remembers a Ctrl-C. Ray Train handles SIGINT itself during ``fit()`` (it aborts the
        controller gracefully, then exits or raises, with status 1); the driver needs to know
        it was an interrupt to say so and exit 130."""

        interrupted = False

        def _register_sigint_handler(self, controller: Any) -> None:
            super()._register_sigint_handler(controller)
            rays = signal.getsignal(signal.SIGINT)

            def handler(signum: int, frame: Any) -> None:
                self.interrupted = True
                if callable(rays):
                    rays(signum, frame)

            signal.signal(signal.SIGINT, handler)

    return InterruptibleTrainer


def run_with_ray(cfg: GanConfig, args: argparse.Namespace) -> dict[str, Any]:
    storage = open_storage(cfg.storage)
    init_ray(args.address, args.verbose)
    trainer = make_trainer(
        cfg,
        {"quiet": args.quiet, "verbose": args.verbose, "scan_storage": True},
        verbose=args.verbose,
        trainer_cls=_interruptible_trainer_class(),
    )
    started, started_at = time.perf_counter(), time.time()
    wait = cfg.resources.wait_timeout
    # fit() installs Ray's SIGINT handler (aborting this run's controller) and leaves it: a
    # later Ctrl+C in the same process (a notebook, a test session) would call into a dead run.
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        with ResourceWatch(wait, out=sys.stdout) as watch:
            result = trainer.fit()
    except (Exception, SystemExit) as exc:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        if isinstance(exc, Exception) and is_start_timeout(exc):
            waited = watch.situation or f"{cfg.resources.num_workers} workers"
            raise ResourcesUnavailable(
                f"{cfg.name}: gave up after resources.wait_timeout={wait:g} s waiting for "
                f"{waited}; rerun the same command to resume from the last checkpoint once the "
                f"cluster has them"
            ) from None
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, sigint)
    if trainer.interrupted:
        raise KeyboardInterrupt
    wall = time.perf_counter() - started
    mlflow_run_id = None
    checkpoint_uri = None
    if result.checkpoint is not None:
        checkpoint_uri = stored_uri(result.checkpoint)
        with result.checkpoint.as_directory() as folder:
            tracking = Path(folder) / TRACKING_FILE
            if tracking.is_file():
                mlflow_run_id = json.loads(tracking.read_text()).get("run_id")
    metrics = dict(result.metrics or {})
    if storage.exists(f"{cfg.name}/{DIVERGED_FILE}"):
        marker = json.loads(storage.read_bytes(f"{cfg.name}/{DIVERGED_FILE}"))
        if marker["time"] >= started_at:  # this run's, not an earlier attempt's
            metrics.update(diverged=1.0, stop_reason=marker["reason"], step=marker["step"])
    return _summary(cfg, storage.run_uri(cfg.name), metrics, wall, mlflow_run_id, checkpoint_uri)


def run_local(
    cfg: GanConfig, args: argparse.Namespace, data: FileData | None = None
) -> dict[str, Any]:
    """The worker loop in this process: no Ray, no DDP; same outputs, checkpoints and resume.
    File data (``data``, as preflight described it) is read by gan_core's pyarrow stream.

    Torch runs on as many threads as a Ray worker of the config would (Ray sets a worker's
    OMP_NUM_THREADS to its whole CPUs, at least 1), unless ``train.threads`` says otherwise:
    another thread count sums in another order, and the two backends would drift apart."""
    from services.launch import for_workers, worker_threads

    # The default MLflow store spelled out as for Ray's workers (<storage>/mlflow.db, where the
    # summary and the model log look), not derived from the run's own folder by the Tracker.
    cfg = for_workers(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(cfg))
    try:
        return _run_local(cfg, args, data)
    finally:
        torch.set_num_threads(threads)


def _run_local(cfg: GanConfig, args: argparse.Namespace, data: FileData | None) -> dict[str, Any]:
    session = WorkerSession(cfg, rank=0, world_size=1, device="cpu", quiet=args.quiet, data=data)
    storage = session.storage
    saved = session.stored_checkpoints(f"{LOCAL_CHECKPOINTS}/")
    # The newest complete folder; incomplete ones (a write cut short by a full disk, say) are
    # skipped with a warning. A complete one that does not load stops the run (exit 2).
    for folder in sorted(saved, reverse=True):
        if session.restore_stored(folder, saved[folder]):
            print(f"[raygan] resumed {cfg.name} at step {session.start_step}", flush=True)
            break
    session.start_tracking()
    last: dict[str, float] = {}
    checkpoint_uri = None

    def on_eval(run: Any, metrics: dict[str, float]) -> None:
        nonlocal last, checkpoint_uri
        last = session.eval_payload(metrics)
        session.write_outputs(last)
        if session.checkpoint_due():
            checkpoint_uri = session.save_to_storage(last)

    started = time.perf_counter()
    hooks = LoopHooks(on_eval=on_eval, on_step=nan_injector(), on_rollback=session.on_rollback)
    try:
        session.run.run(hooks)
    except NonFiniteError as exc:
        last = session.diverged(exc)
    except BaseException as exc:
        session.finish(ended_status(exc))
        raise
    else:
        session.finish("FINISHED")
    wall = time.perf_counter() - started
    if not last and session.run.history:
        last = session.run.history[-1]
    return _summary(
        cfg, storage.run_uri(cfg.name), last, wall, session.mlflow_run_id, checkpoint_uri
    )


def _summary(
    cfg: GanConfig,
    run_uri: str,
    metrics: dict[str, Any],
    wall: float,
    mlflow_run_id: str | None,
    checkpoint_uri: str | None,
) -> dict[str, Any]:
    from services.tracking import default_tracking_uri

    tracking_uri = cfg.tracking.uri or default_tracking_uri(cfg.storage.uri)
    return {
        "name": cfg.name,
        "status": "diverged" if metrics.get("diverged") else "finished",
        "stop_reason": metrics.get("stop_reason"),
        "backend": cfg.resources.backend,
        "num_workers": cfg.resources.num_workers if cfg.resources.backend == "ray" else 1,
        "steps": int(metrics.get("step", 0)),
        "wall_seconds": round(wall, 3),
        "steps_per_s": metrics.get("steps_per_s"),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        "storage_uri": run_uri,
        "samples_uri": f"{run_uri}/samples",
        "checkpoint_uri": checkpoint_uri,
        "mlflow_run_id": mlflow_run_id if cfg.tracking.enabled else None,
        "mlflow_tracking_uri": redact(tracking_uri) if cfg.tracking.enabled else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 finished; 2 a setup to fix (a bad config, data file or storage, a
    checkpoint that cannot be resumed, a write refused for lack of space or quota or on a
    read-only mount: free space or point ``storage.uri`` elsewhere and rerun to resume from the
    last complete checkpoint; a run another live job holds); 3 diverged; 4 the workers could not
    be placed within ``resources.wait_timeout`` (rerun to resume); 130 interrupted."""
    args = parse_args(argv)
    from services.preflight import DataError, preflight

    try:
        cfg = load_config(args.config, args.overrides)
        # Data before storage: open_storage creates a local storage folder, and a run refused
        # for its data must leave nothing behind.
        data = preflight(cfg)
        storage = open_storage(cfg.storage)  # a bad bucket or endpoint: before any worker
        # One writer per run: a twin of a live job is refused here, before it trains.
        lease = acquire_for(storage, cfg.storage, cfg.name, "services.train", args.force)
    except (ConfigError, StorageError, DataError, LeaseHeld) as exc:
        print(f"raygan: {redact(str(exc))}", file=sys.stderr)
        return 2
    try:
        with lease:
            summary = (
                run_with_ray(cfg, args)
                if cfg.resources.backend == "ray"
                else run_local(cfg, args, data)
            )
    except CheckpointError as exc:
        print(f"raygan: cannot resume: {redact(str(exc))}", file=sys.stderr)
        return 2
    except ResourcesUnavailable as exc:
        print(f"raygan: {exc}", file=sys.stderr)
        return EXIT_NO_RESOURCES
    except KeyboardInterrupt:
        if lease.lost:
            print(
                f"raygan: stopped: another job took over {cfg.name}'s lease ({lease.where})",
                file=sys.stderr,
            )
        else:
            print(
                f"raygan: interrupted; rerun the same command to resume {cfg.name}",
                file=sys.stderr,
            )
        return 130
    except Exception as exc:
        # A full disk, here or inside a Ray worker (where Ray restarts the worker group up to
        # resources.max_failures times into the same failure first): one line, not tracebacks.
        full = find_write_failure(exc, f"storage {cfg.storage.uri}")
        if full is None:
            raise
        print(f"raygan: {redact(str(full))}", file=sys.stderr)
        return 2
    # The generator as an MLflow model: finished runs only (a diverged run's MLflow run is
    # FAILED; its last good checkpoint stays in storage). Never fails the run: services/model_log.
    from services.model_log import summary_fields

    finished = summary["status"] == "finished"
    summary.update(summary_fields(cfg, summary if finished else {}))
    if args.summary_json:
        try:
            Path(args.summary_json).write_text(json.dumps(summary, indent=2))
        except OSError as exc:
            full = write_failure(exc, "--summary-json", args.summary_json, "free space there")
            if full is None:
                raise
            print(f"raygan: {full}", file=sys.stderr)
            return 2
    if summary["status"] == "diverged":
        print(
            f"raygan: {cfg.name} diverged: {summary['stop_reason']}; the last good checkpoint "
            f"is kept: {summary['checkpoint_uri']}",
            file=sys.stderr,
        )
        return 3
    m = summary["metrics"]
    coverage = " ".join(
        f"{k}={m[k]:.4g}" for k in ("modes", "hq_pct", "reverse_kl", "kl", "fd") if k in m
    )
    print(f"[raygan] done: {summary['steps']} steps in {summary['wall_seconds']:.1f} s; {coverage}")
    mlflow_part = (
        f" | mlflow: {summary['mlflow_tracking_uri']} run {summary['mlflow_run_id']}"
        if summary["mlflow_run_id"]
        else ""
    )
    if summary.get("model_uri"):
        mlflow_part += f" | model: {summary['model_uri']}"
        if summary.get("registered_model"):
            mlflow_part += f" (registered: {summary['registered_model']})"
    print(
        f"[raygan] checkpoints: {summary['checkpoint_uri']} | samples: {summary['samples_uri']}"
        f"{mlflow_part}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
