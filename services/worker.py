"""``train_loop_per_worker``: the gan_core loop inside one Ray Train worker.

Each worker builds the same ``GanRun`` (identical initial weights, its own data and noise
streams = its shard), wraps G, D, MRGAN's encoder and diffusion D separately in DDP, restores
from the last registered checkpoint when Ray hands one back, and reports at every evaluation.
Every rank calls ``ray.train.report`` the same number of times; only rank 0 attaches a
checkpoint, writes images and talks to MLflow. Loss metrics are averaged over ranks so every
rank reports the same numbers; coverage metrics are computed from the (identical) generator on
every rank.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gan_core.config import GanConfig, from_dict
from gan_core.files import FileData
from gan_core.loop import GanRun, LoopHooks, NonFiniteError, format_eval
from gan_core.steps import LOSS_METRICS
from services.checkpoints import (
    LOCAL_CHECKPOINTS,
    META_FILE,
    RAY_CHECKPOINT_PREFIX,
    CheckpointError,
    checkpoint_folders,
    download_complete,
    listed_complete,
    load_checkpoint,
    save_checkpoint,
)
from services.storage import Storage, StorageError, open_storage

log = logging.getLogger("raygan")
TRACKING_FILE = "tracking.json"
DIVERGED_FILE = "diverged.json"  # written by rank 0 when a run stops on a non-finite value
# Metrics that differ per rank (each rank trains on its own shard) and are averaged for reports:
# every loss metric of the step (means since the last evaluation) and the speed.
_RANK_LOCAL = (*LOSS_METRICS, "steps_per_s")


def _all_reduce_mean(
    metrics: dict[str, float], world_size: int, device: str = "cpu"
) -> dict[str, float]:
    if world_size == 1 or not dist.is_initialized():
        return metrics
    keys = [k for k in _RANK_LOCAL if k in metrics]
    # On the run's device: NCCL (GPU workers) all-reduces CUDA tensors only.
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    out = dict(metrics)
    out.update({k: float(v) / world_size for k, v in zip(keys, values, strict=True)})
    return out


class WorkerSession:
    """The per-worker glue between GanRun and Ray Train; Ray-free parts are usable locally."""

    def __init__(
        self,
        cfg: GanConfig,
        rank: int,
        world_size: int,
        device: str,
        quiet: bool = False,
        batches: Iterator[torch.Tensor] | None = None,
        data: FileData | None = None,
    ) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.quiet = quiet
        # ``data``: file data as the driver's preflight described (and checked) it.
        self.run = GanRun(
            cfg, rank=rank, world_size=world_size, device=device, batches=batches, data=data
        )
        self.storage: Storage = open_storage(cfg.storage)
        self.tracker: Any = None
        self.mlflow_run_id: str | None = None
        self.started = time.perf_counter()
        self.start_step = 0
        self.restored_metrics: dict[str, float] = {}
        self.dedupe_replayed_steps = True

    # -- restore -------------------------------------------------------------------------------
    def restore(self, folder: str | Path) -> None:
        from services.checkpoints import restore_run

        state = load_checkpoint(folder, self.cfg)
        # All or nothing: a tensor that does not fit is a CheckpointError naming its key, and
        # the run keeps its own weights (torch's strict load would copy those that fit first).
        restore_run(folder, state, self.run)
        self.start_step = self.run.model.step
        # The evaluation the checkpoint was written at, what a run with nothing left to train
        # reports: meta.json's "metrics" (load_checkpoint checked the file; None = not finite).
        meta = json.loads((Path(folder) / META_FILE).read_text()).get("metrics") or {}
        self.restored_metrics = {k: v for k, v in meta.items() if v is not None}
        tracking = Path(folder) / TRACKING_FILE
        if tracking.is_file():
            self.mlflow_run_id = json.loads(tracking.read_text()).get("run_id")

    def stored_checkpoints(self, prefix: str) -> dict[str, set[str]]:
        """This run's checkpoint folders in storage whose path starts with ``prefix`` (Ray
        Train's ``checkpoint_`` or the local backend's ``local_checkpoints/``), with the names
        of the files each holds."""
        folders = checkpoint_folders(self.storage.list(self.cfg.name))
        return {folder: files for folder, files in folders.items() if folder.startswith(prefix)}

    def restore_stored(self, folder: str, files: Collection[str]) -> bool:
        """Download the run's stored checkpoint ``folder`` (``files``: its file names) into a
        temporary folder and restore from it. False, with a warning naming it, when the folder
        is incomplete (``download_complete``); a complete one that does not load raises
        CheckpointError."""
        with tempfile.TemporaryDirectory() as tmp:
            if not download_complete(self.storage, f"{self.cfg.name}/{folder}", files, Path(tmp)):
                return False
            self.restore(tmp)
        return True

    def start_tracking(self) -> None:
        if self.rank != 0 or not self.cfg.tracking.enabled:
            return
        from services.tracking import Tracker

        self.tracker = Tracker(
            self.cfg,
            self.storage.run_uri(self.cfg.name),
            run_id=self.mlflow_run_id,
            tracking_uri=self.cfg.tracking.uri or None,
            skip_logged_steps=self.dedupe_replayed_steps,
        )
        self.mlflow_run_id = self.tracker.run_id

    # -- per evaluation ------------------------------------------------------------------------
    def eval_payload(self, metrics: dict[str, float]) -> dict[str, float]:
        metrics = _all_reduce_mean(metrics, self.world_size, self.run.device)
        step = self.run.model.step
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        metrics["eta_s"] = (self.cfg.train.steps - step) * elapsed / max(done, 1)
        metrics["step"] = step
        # The rates the optimizers really used in the last step (base lr x schedule factor): a
        # tuned or PBT-mutated rate that never reached the optimizer would show here.
        metrics["lr_g"] = self.run.model.g_opt.param_groups[0]["lr"]
        metrics["lr_d"] = self.run.model.d_opt.param_groups[0]["lr"]
        return metrics

    def write_outputs(self, metrics: dict[str, float]) -> None:
        """Rank 0: the sample picture to the run's storage, metrics and picture to MLflow."""
        if self.rank != 0:
            return
        step = self.run.model.step
        if not self.quiet:
            # Not print(): Ray Train patches print into its logger, which echoes every line
            # twice on the driver's console.
            sys.stdout.write("[raygan] " + format_eval(step, self.cfg.train.steps, metrics) + "\n")
            sys.stdout.flush()
        with tempfile.TemporaryDirectory() as tmp:
            tag = f"step_{step:07d}"
            (image,) = self.run.save_images(tmp, tag)
            self.storage.write_bytes(f"{self.cfg.name}/samples/{tag}.png", image.read_bytes())
            if self.tracker is not None:
                self.tracker.log_metrics(metrics, step)
                self.tracker.log_image(image)

    def checkpoint_due(self) -> bool:
        step = self.run.model.step
        return step % self.cfg.checkpoint.every == 0 or step >= self.cfg.train.steps

    def write_checkpoint(self, folder: str | Path, metrics: dict[str, float]) -> None:
        if self.tracker is not None and self.tracker.run_id:
            # Read now, not at start: a tracker that found MLflow down creates its run later.
            self.mlflow_run_id = self.tracker.run_id
        # tracking.json goes in before meta.json, which lists it and commits the folder.
        tracking = json.dumps({"run_id": self.mlflow_run_id}).encode()
        save_checkpoint(
            folder, self.run.state_dict(), self.cfg, metrics, extra={TRACKING_FILE: tracking}
        )

    def save_to_storage(
        self, metrics: dict[str, float], report: Callable[[str], None] | None = None
    ) -> str:
        """Write this step's checkpoint and copy it to ``<name>/local_checkpoints/step_N`` in
        the run's storage: the layout of runs trained outside Ray Train (the local backend, a
        one-worker Tune trial), which services.sample and services.model_log read. ``report``
        gets the local folder while it still exists (a Tune trial hands it to ``tune.report``).
        Returns the stored folder's URI. ``meta.json`` is copied last: it commits the folder,
        and a copy cut short (a full disk: StorageFullError) leaves a folder without it or
        with files it does not match, which every reader skips as incomplete."""
        folder = f"{self.cfg.name}/{LOCAL_CHECKPOINTS}/step_{self.run.model.step:07d}"
        with tempfile.TemporaryDirectory() as tmp:
            self.write_checkpoint(tmp, metrics)
            paths = sorted(Path(tmp).iterdir(), key=lambda path: (path.name == META_FILE, path))
            for path in paths:
                self.storage.write_bytes(f"{folder}/{path.name}", path.read_bytes())
            if report is not None:
                report(tmp)
        return self.storage.run_uri(folder)

    def on_rollback(self, run: GanRun, info: dict[str, Any]) -> None:
        """Rank 0: say loudly that the run rolled back, in the log and in MLflow."""
        if self.rank != 0:
            return
        sys.stdout.write(
            f"[raygan] WARNING: non-finite {info['what']} at step {info['detected_at']}; rolled "
            f"back to step {info['resumed_at']} with learning rates x{info['lr_scale']:g} "
            f"(rollback {info['rollbacks']} of {self.cfg.train.nan_retries})\n"
        )
        sys.stdout.flush()
        if self.tracker is not None:
            self.tracker.log_metrics(
                {"rollbacks": float(info["rollbacks"])}, int(info["detected_at"])
            )
            self.tracker.set_tags({"raygan.last_rollback": f"step {info['detected_at']}"})

    def diverged(self, exc: NonFiniteError) -> dict[str, Any]:
        """The final report of a run stopped by a non-finite value; MLflow run marked FAILED."""
        if self.rank == 0:
            sys.stdout.write(f"[raygan] ERROR: {exc}\n")
            sys.stdout.flush()
            if self.tracker is not None:
                self.tracker.set_tags({"raygan.stop_reason": str(exc)})
            # For the driver: Ray's Result carries the metrics of the last checkpoint only.
            marker = {"step": exc.step, "reason": str(exc), "time": time.time()}
            self.storage.write_bytes(
                f"{self.cfg.name}/{DIVERGED_FILE}", json.dumps(marker).encode()
            )
        self.finish("FAILED")
        return {"step": exc.step, "diverged": 1.0, "stop_reason": str(exc)}

    def finish(self, status: str = "FINISHED") -> None:
        if self.tracker is not None:
            self.tracker.finish(status)
            self.mlflow_run_id = self.tracker.run_id or self.mlflow_run_id


def ended_status(exc: BaseException) -> str:
    """The MLflow status of a run whose training raised ``exc``. Tune stops a function trial by
    raising SystemExit in its next report (a scheduler's stop, an interrupted sweep), Ctrl+C is
    a KeyboardInterrupt: the run was stopped from outside (KILLED; a resume reopens it), not a
    failure of its own (FAILED)."""
    return "KILLED" if isinstance(exc, (SystemExit, KeyboardInterrupt)) else "FAILED"


def checkpoint_uri(checkpoint: Any) -> str:
    """Where a ``ray.train.Checkpoint`` is stored, as a user would write it (``s3://...``)."""
    filesystem = getattr(checkpoint, "filesystem", None)
    scheme = getattr(filesystem, "type_name", "local")
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def restore_latest_stored(session: WorkerSession, newer_than: int = 0) -> bool:
    """Restore the newest complete, loadable checkpoint folder of this run found in storage
    (Ray's ``checkpoint_*`` folders) if its step is above ``newer_than``; folders that are
    incomplete (an upload cut short: ``incomplete_reason``) or fail to load are skipped with a
    warning naming them. Every rank lists the same storage, so all ranks pick the same folder."""
    storage, name = session.storage, session.cfg.name
    folders = session.stored_checkpoints(RAY_CHECKPOINT_PREFIX)
    candidates = []
    for folder, files in folders.items():
        if listed_complete(files):
            try:
                meta = json.loads(storage.read_bytes(f"{name}/{folder}/{META_FILE}"))
                candidates.append((int(meta["step"]), folder))
            except (ValueError, KeyError, TypeError, StorageError):
                continue
    for step, folder in sorted(candidates, reverse=True):
        if step <= newer_than:
            break
        try:
            if not session.restore_stored(folder, folders[folder]):
                continue
        except CheckpointError as exc:
            log.warning("skipping stored checkpoint %s: %s", folder, exc)
            continue
        if session.rank == 0:
            sys.stdout.write(
                f"[raygan] newest complete checkpoint in storage is newer than Ray's "
                f"registered one ({newer_than or 'none'}): {storage.run_uri(name)}/{folder} "
                f"(step {step})\n"
            )
        return True
    return False


def _wrap_for_ddp(session: WorkerSession) -> None:
    import ray.train.torch

    model = session.run.model
    if session.world_size > 1 and session.cfg.resources.use_gpu:
        # SyncBatchNorm needs GPU tensors; on CPU each worker's BN uses its own shard's statistics.
        model.generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.generator)
    model.wrap(lambda m: ray.train.torch.prepare_model(m, move_to_device=True))


def _quiet_ray_reports() -> None:
    """Ray Train V2 logs every ``ray.train.report`` call at INFO, the whole metrics dict, from
    every rank, on a logger named after its source file (outside ``ray.train``, so
    ``LoggingConfig(log_level=...)`` does not reach it): one long line per rank per evaluation
    drowns raygan's own progress line. Raised to WARNING unless the run is verbose."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point Ray Train runs on every worker; ``config`` = {"gan": GanConfig as a dict}.

    Optional keys: "file_data" (services.launch): the ``FileData`` the driver described, whose
    rows arrive as this worker's Ray Data shard. "scan_storage" (services.train): with no
    checkpoint from Ray, resume from the newest complete checkpoint folder of the run in storage.
    Used by Tune trials (tuning.trial): "resume_from", a ``ray.train.Checkpoint`` to start from
    when this Train run has none of its own (Train V2 has no other way in), and
    "mlflow_run_id", the MLflow run to log into whatever run the checkpoint names.
    """
    import ray.train
    from ray.train import Checkpoint

    if not config.get("verbose"):
        _quiet_ray_reports()
    cfg = from_dict(config["gan"], source="worker")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = str(ray.train.torch.get_device()) if cfg.resources.use_gpu else "cpu"
    data, batches = config.get("file_data"), None
    if data is not None:
        from services.ray_data import shard_batches

        batches = shard_batches(cfg.train.batch_size)
    session = WorkerSession(
        cfg, rank, world, device, quiet=bool(config.get("quiet")), batches=batches, data=data
    )
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            try:
                session.restore(folder)
            except CheckpointError as exc:
                # On S3 the folder is a local download; the user needs the stored checkpoint.
                raise CheckpointError(
                    str(exc).replace(str(folder), checkpoint_uri(checkpoint))
                ) from None
    if config.get("scan_storage"):
        # Ray registers a checkpoint only once its controller has polled every rank's report:
        # a worker lost (or a driver interrupted) within that window, about a second, loses
        # the newest registrations, and if none was registered Ray restarts from scratch. The
        # files are in storage anyway: a newer complete one is the better place to resume.
        restore_latest_stored(session, newer_than=session.start_step)
    if session.start_step > 0:
        if rank == 0:
            sys.stdout.write(f"[raygan] resumed {cfg.name} at step {session.start_step}\n")
            sys.stdout.flush()
    if config.get("mlflow_run_id"):
        # A PBT exploit hands over another trial's checkpoint, whose tracking.json names that
        # trial's MLflow run; the caller's own run must win. Its steps after the clone are a
        # new lineage, not a replay: they are logged even where the run has the step already.
        session.mlflow_run_id = config["mlflow_run_id"]
        session.dedupe_replayed_steps = False
    _wrap_for_ddp(session)
    session.start_tracking()

    def report(payload: dict[str, float], with_checkpoint: bool) -> None:
        # Rank 0 alone writes the checkpoint; every rank reports, so Ray pairs the reports.
        if with_checkpoint and rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                session.write_checkpoint(tmp, payload)
                ray.train.report(payload, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(payload, checkpoint=None)

    if config.get("scan_storage") and session.start_step >= cfg.train.steps:
        # Resumed at or past its budget (say from a checkpoint Ray had not registered yet):
        # nothing to train. Reported, or Ray's result would carry its registered checkpoint's
        # older step and the summary would say the run ended there (a worker group restarted
        # after a failure can find a newer complete folder in storage than Ray registered).
        if rank == 0:
            sys.stdout.write(
                f"[raygan] {cfg.name} is at step {session.start_step} already "
                f"(train.steps={cfg.train.steps}): nothing left to train\n"
            )
            sys.stdout.flush()
        session.finish("FINISHED")  # its MLflow run, left RUNNING or KILLED by a stopped job
        # Re-registered with Ray: fit()'s result carries the latest registered checkpoint's
        # metrics, and a report without one would not change them.
        report({**session.restored_metrics, "step": float(session.start_step)}, True)
        return
    on_step = test_hooks(rank)

    def on_eval(run: GanRun, metrics: dict[str, float]) -> None:
        payload = session.eval_payload(metrics)
        session.write_outputs(payload)
        report(payload, session.checkpoint_due())

    hooks = LoopHooks(on_step=on_step, on_eval=on_eval, on_rollback=session.on_rollback)
    try:
        session.run.run(hooks)
    except NonFiniteError as exc:
        # Not raised to Ray: a restart would replay the same data into the same divergence.
        # Every rank gets here at the same step (GanRun agrees on it), so reports stay paired.
        ray.train.report(session.diverged(exc), checkpoint=None)
        return
    except BaseException as exc:
        session.finish(ended_status(exc))
        raise
    session.finish("FINISHED")


def test_hooks(rank: int) -> Callable[[GanRun, dict[str, float]], None]:
    """The ``on_step`` hook of every process that trains: the test hooks below, each a no-op
    unless its RAYGAN_* variable is set."""
    fail_at = int(os.environ.get("RAYGAN_FAIL_AT_STEP", "0"))
    inject_nan = nan_injector()
    hold = hold_gate()
    if os.environ.get("RAYGAN_PID_DIR"):
        # Test hook: lets a test SIGKILL a given rank's process from outside, by PID.
        Path(os.environ["RAYGAN_PID_DIR"], f"rank{rank}.pid").write_text(str(os.getpid()))

    def on_step(run: GanRun, metrics: dict[str, float]) -> None:
        _maybe_inject_fault(run.model.step, fail_at, rank)
        inject_nan(run, metrics)
        hold(run.model.step)

    return on_step


def _maybe_inject_fault(step: int, fail_at: int, rank: int) -> None:
    """Test hook: RAYGAN_FAIL_AT_STEP=N makes the last rank fail once at step N.

    A marker file under RAYGAN_FAULT_DIR makes it fire once per run, so the restarted worker
    group (which resumes from the last checkpoint) gets past the step. RAYGAN_FAULT_KIND=exit
    kills the process hard instead of raising.
    """
    if not fail_at or step != fail_at:
        return
    marker = Path(os.environ.get("RAYGAN_FAULT_DIR", tempfile.gettempdir())) / f"fault_{fail_at}"
    if rank != int(os.environ.get("RAYGAN_FAULT_RANK", "0")) or marker.exists():
        return
    marker.write_text("fired")
    if os.environ.get("RAYGAN_FAULT_KIND") == "exit":
        os._exit(1)
    raise RuntimeError(f"injected fault at step {step} (RAYGAN_FAIL_AT_STEP)")


def hold_gate() -> Any:
    """Test hook: while the file named by RAYGAN_HOLD_FILE exists and holds a step number N,
    a run that reaches step N waits there until the file is removed. It makes "one trial is
    still running when the other ends" a fact rather than a race on a loaded machine. Returns
    an ``on_step`` hook taking the step (a no-op when unset)."""
    path = os.environ.get("RAYGAN_HOLD_FILE")

    def hook(step: int) -> None:
        if not path:
            return
        try:
            held = int(Path(path).read_text().strip() or 0)
        except (OSError, ValueError):
            return
        while step == held and Path(path).exists():
            time.sleep(0.1)

    return hook


def nan_injector() -> Any:
    """Test hook: RAYGAN_NAN_AT_STEP=N writes a NaN into D's weights on every rank when step N
    first completes in this process (as a diverging optimizer would), to exercise the
    non-finite policy end to end. Returns an ``on_step`` hook (a no-op when unset)."""
    nan_at = int(os.environ.get("RAYGAN_NAN_AT_STEP", "0"))
    fired: list[int] = []

    def hook(run: GanRun, metrics: dict[str, float]) -> None:
        if nan_at and run.model.step == nan_at and not fired:
            fired.append(nan_at)
            params = run.model.discriminator.parameters()
            with torch.no_grad():
                next(params).view(-1)[0] = float("nan")

    return hook
