"""Ray Tune sweeps over the anti-collapse knobs: ``python -m tuning.sweep --space NAME ...``.

    python -m tuning.sweep --space collapse [--config ring8] [--num-samples N]
        [--scheduler fifo|asha|pbt] [--max-concurrent K] [--workers-per-trial W]
        [--name SWEEP] [--metric score --mode max] [--resume] [key=value ...]

Every trial config is validated before Ray starts (tuning.plan). Each trial is a driver function
that fits a Ray Train ``TorchTrainer`` with the training job's own worker code (tuning.trial), in
the same storage as the training job (``storage.uri``, local or ``s3://``): the sweep lives in
``<storage>/<SWEEP>/`` (Tune's files, one folder per trial, ``runs/`` with the trials' Train runs
and sample grids, ``sweep.json``, and at the end the report of tuning.report).

Schedulers, all on Tune's ``training_iteration`` (one per evaluation report): ``fifo`` runs every
trial to the end; ``asha`` stops the hopeless ones early (``--grace-period``,
``--reduction-factor``, ``max_t`` = the reports of a full trial); ``pbt`` copies the better
trials' checkpoints into the worse ones every ``--perturbation-interval`` reports and perturbs
the space's ``mutations`` (learning rates, unroll depth): the trial restarts its Train run from
the cloned checkpoint with the new values, which the worker reports back as ``lr_g``/``lr_d``.

MLflow: one parent run per sweep (the base config as params; at the end the report, table, plot
and best config as artifacts), one nested child run per trial (tuning.runs).

An interrupted sweep (Ctrl+C, a lost driver) resumes with ``--name SWEEP --resume`` (plus the
same ``storage.*`` overrides, if any): ``Tuner.restore`` reruns only the unfinished trials, each
from its last checkpoint. Under ``ray job submit --working-dir . -- python -m tuning.sweep ...``
it joins the job's cluster; standalone it starts a private Ray on 127.0.0.1 (dashboard on: Tune
needs it, docs/PLATFORM.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

from gan_core.config import ConfigError, StorageConfig, load_config
from services.cli import DEFAULT_CONFIG, add_job_args
from services.launch import init_ray
from services.lease import LeaseHeld, RunLease, acquire_for
from services.preflight import DataError, preflight
from services.storage import Storage, StorageError, open_storage, ray_storage_args, redact
from services.tracking import Tracker
from tuning.objective import DEFAULT_METRIC, DEFAULT_MODE
from tuning.plan import (
    RUNS_DIR,
    SCHEDULERS,
    TRIAL_RUNNERS,
    SweepPlan,
    load_plan,
    make_plan,
    plan_path,
    save_plan,
)
from tuning.report import best_row, load_rows, write_report
from tuning.runs import close_children
from tuning.spaces import describe_knobs, pbt_mutations, space_names, tune_param_space
from tuning.trial import TrialSettings, run_trial, runs_in_process, trial_name, trial_resources

log = logging.getLogger("raygan.tuning")


@dataclass
class SweepOutcome:
    name: str
    uri: str  # the sweep's folder
    statuses: dict[str, str]  # trial -> COMPLETED | STOPPED | ERROR | INCOMPLETE
    interrupted: bool
    wall_seconds: float
    best_trial: str | None = None
    best_score: float | None = None
    best_model_uri: str | None = None  # runs:/<best trial's child run>/generator
    registered_model: str | None = None  # models:/NAME/VERSION (tracking.register_as)
    parent_run_id: str | None = None
    mlflow_statuses: dict[str, str] = field(default_factory=dict)
    report: dict[str, str] = field(default_factory=dict)  # file name -> URI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tuning.sweep", description="Ray Tune sweep of GAN trainings."
    )
    parser.add_argument(
        "--space", default="", help=f"named space ({', '.join(space_names())}) or a space YAML path"
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base config: preset or YAML path")
    parser.add_argument(
        "--num-samples", type=int, default=1, help="repeats of the grid / draws of the sampled keys"
    )
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="asha")
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        help="trials at once (default: as many as the CPUs hold)",
    )
    parser.add_argument(
        "--workers-per-trial",
        type=int,
        default=1,
        help="Ray Train workers per trial (resources.num_workers)",
    )
    parser.add_argument(
        "--trial-runner",
        choices=TRIAL_RUNNERS,
        default="auto",
        help="how a trial trains: in its own process (one CPU worker; auto's choice there) or "
        "as a Ray Train job (auto's choice for more workers or a GPU)",
    )
    parser.add_argument("--name", default="", help="sweep name (default: SPACE-SCHEDULER)")
    parser.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help="reported metric to optimize (default: score, see tuning.objective)",
    )
    parser.add_argument("--mode", choices=("max", "min"), default=DEFAULT_MODE)
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA: reports before a stop")
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep 1/this")
    parser.add_argument(
        "--perturbation-interval",
        type=int,
        default=2,
        help="PBT: reports between exploit/explore decisions",
    )
    parser.add_argument(
        "--pbt-synch", action="store_true", help="PBT: decide for the whole population at once"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep --name (its saved settings)",
    )
    add_job_args(
        parser,
        force="take over the sweep's lease from a sweep known to be dead (services/lease.py)",
        quiet="no Tune progress table",
        verbose="Ray's logs, trial progress",
        overrides="key=value overrides of the base config",
        force_first=True,
    )
    return parser.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> tuple[SweepPlan, Storage]:
    """A new sweep's validated plan, or an existing sweep's saved plan (``--resume``)."""
    name = args.name or (f"{Path(args.space).stem}-{args.scheduler}" if args.space else "")
    if args.resume:
        if not name:
            raise ConfigError("--name", "", "the name of the sweep to resume", "<sweep arguments>")
        storage = open_storage(load_config(args.config, args.overrides).storage)
        return load_plan(storage, name), storage
    if not args.space:
        raise ConfigError(
            "--space",
            "",
            f"a named space ({', '.join(space_names())}) or a space YAML path",
            "<sweep arguments>",
        )
    plan, storage = make_plan(
        name,
        args.space,
        args.config,
        args.overrides,
        workers_per_trial=args.workers_per_trial,
        scheduler=args.scheduler,
        metric=args.metric,
        mode=args.mode,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        perturbation_interval=args.perturbation_interval,
        pbt_synch=args.pbt_synch,
        trial_runner=args.trial_runner,
    )
    if storage.exists(plan_path(name)):
        raise ConfigError(
            "--name",
            name,
            f"a new sweep name, or --resume to continue the sweep at {storage.uri}/{name}",
            "<sweep arguments>",
        )
    return plan, storage


def sweep_storage(plan: SweepPlan, storage: Storage) -> Storage:
    """The sweep's own folder as a Storage (what tuning.report reads)."""
    return open_storage(
        StorageConfig(
            uri=f"{storage.uri}/{plan.name}",
            endpoint=plan.base["storage.endpoint"],
            region=plan.base["storage.region"],
        )
    )


def make_scheduler(plan: SweepPlan) -> Any:
    if plan.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=plan.max_reports,
            grace_period=plan.grace_period,
            reduction_factor=plan.reduction_factor,
        )
    if plan.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=plan.perturbation_interval,
            hyperparam_mutations=pbt_mutations(plan.space),
            synch=plan.pbt_synch,
        )
    return FIFOScheduler()


def default_concurrency(plan: SweepPlan) -> int:
    """As many trials as the cluster's CPUs hold (each driver takes none, its workers do)."""
    per_trial = plan.base["resources.num_workers"] * plan.base["resources.cpus_per_worker"]
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


def _open_parent(plan: SweepPlan, storage: Storage) -> Any:
    """The sweep's parent MLflow run (created, or reopened on resume); None without tracking."""
    if not plan.base["tracking.enabled"]:
        return None
    cfg = dataclasses.replace(plan.base_config, name=plan.name)
    tracker = Tracker(
        cfg, f"{storage.uri}/{plan.name}", run_id=plan.parent_run_id, tracking_uri=plan.tracking_uri
    )
    tracker.set_tags(
        {
            "raygan.sweep": plan.name,
            "raygan.sweep.space": plan.space.name,
            "raygan.sweep.scheduler": plan.scheduler,
            "raygan.sweep.trials": str(plan.trials),
            "raygan.sweep.objective": f"{plan.mode} {plan.metric}",
            "raygan.sweep.knobs": ", ".join(plan.space.knobs),
        }
    )
    tracker.flush()
    return tracker


def run_sweep(
    plan: SweepPlan,
    storage: Storage,
    *,
    resume: bool = False,
    callbacks: list[Any] | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> SweepOutcome:
    """Run (or continue) the sweep on the connected Ray cluster; ``callbacks`` are Tune callbacks.

    Returns when every trial is done or Tune was interrupted (``SweepOutcome.interrupted``).
    On a resume Tune brings back the callbacks the sweep started with, not these.
    """
    started = time.perf_counter()
    tracker = _open_parent(plan, storage)
    if tracker is not None:
        plan.parent_run_id = tracker.run_id
    save_plan(storage, plan)
    settings = TrialSettings(
        sweep=plan.name,
        base=plan.base,
        runs_uri=f"{storage.uri}/{plan.name}/{RUNS_DIR}",
        tracking_uri=plan.tracking_uri,
        parent_run_id=plan.parent_run_id,
        quiet=not verbose,
        verbose=verbose,
        in_process=runs_in_process(plan),
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, settings=settings), trial_resources(settings)
    )
    experiment = f"{storage.root}/{plan.name}"
    filesystem = storage.filesystem if storage.is_s3 else None
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            # A trial killed with the sweep (the machine ran out of memory, the driver died)
            # errored for reasons outside it: it continues from its last checkpoint.
            resume_errored=True,
            param_space=tune_param_space(plan.space),
            storage_filesystem=filesystem,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_param_space(plan.space),
            tune_config=tune.TuneConfig(
                metric=plan.metric,
                mode=plan.mode,
                scheduler=make_scheduler(plan),
                num_samples=plan.num_samples,
                max_concurrent_trials=plan.max_concurrent or default_concurrency(plan),
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
                reuse_actors=False,  # a trial's Train run ends with its actor (tuning.trial)
            ),
            run_config=tune.RunConfig(
                name=plan.name,
                # PBT may clone any trial's latest checkpoint; the others only resume their own.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=None if plan.scheduler == "pbt" else 2
                ),
                # A Train trial's workers are restarted by Train (resources.max_failures); a
                # trial trained in its own process is restarted by Tune, from its checkpoint.
                failure_config=tune.FailureConfig(
                    max_failures=plan.base["resources.max_failures"] if settings.in_process else 0
                ),
                callbacks=callbacks,
                verbose=0 if quiet else (2 if verbose else 1),
                **ray_storage_args(storage),
            ),
        )
    tuner.fit()
    return _finish(plan, storage, tracker, time.perf_counter() - started)


def _finish(plan: SweepPlan, storage: Storage, tracker: Any, wall: float) -> SweepOutcome:
    """Close the trials' MLflow runs; for a finished sweep, write the report into the parent."""
    folder = sweep_storage(plan, storage)
    rows = load_rows(folder, plan)
    statuses = {row.trial: row.status for row in rows}
    done = sum(status != "INCOMPLETE" for status in statuses.values())
    outcome = SweepOutcome(
        name=plan.name,
        uri=folder.uri,
        statuses=statuses,
        interrupted=done < plan.trials,
        wall_seconds=round(wall, 1),
        parent_run_id=plan.parent_run_id,
    )
    if plan.parent_run_id:
        for row in rows:
            if row.status == "COMPLETED" and not row.model_uri:
                # Its trial ran to the end, so it should have logged its generator: its log
                # says why not (services.model_log warns with the reason).
                log.warning(
                    "trial %s completed but %s/%s/model.json names no logged generator",
                    row.trial,
                    folder.uri,
                    f"{RUNS_DIR}/{row.trial}",
                )
        outcomes = {
            row.trial: {
                "status": row.status,
                "score": row.value(plan.metric),
                "step": int(row.metrics.get("step", 0)),
                "error": row.error,
            }
            for row in rows
        }
        try:
            outcome.mlflow_statuses = close_children(
                plan.tracking_uri, plan.parent_run_id, outcomes
            )
        except Exception as exc:  # tracking must never lose the sweep's results
            log.warning("could not close the trials' MLflow runs: %s", redact(str(exc)))
    if outcome.interrupted:
        if tracker is not None:
            tracker.finish("KILLED")
        return outcome
    with tempfile.TemporaryDirectory() as tmp:
        files = write_report(folder, plan, Path(tmp))
        outcome.report = {name: f"{folder.uri}/{name}" for name in files}
        if tracker is not None:
            for path in files.values():
                tracker.log_artifact(path, "report")
    best = best_row(rows, plan.metric, plan.mode)
    if best is not None:
        outcome.best_trial, outcome.best_score = best.trial, best.value(plan.metric)
        outcome.best_model_uri = best.model_uri
        outcome.registered_model = _register_best(plan, best)
    if tracker is not None:
        counts = {
            f"trials_{s.lower()}": float(sum(v == s for v in statuses.values()))
            for s in ("COMPLETED", "STOPPED", "ERROR")
        }
        if best is not None:
            counts[f"best_{plan.metric}"] = float(best.value(plan.metric))
            tracker.set_tags(
                {
                    "raygan.sweep.best_trial": best.trial,
                    "raygan.sweep.best_knobs": describe_knobs(best.knobs),
                    **({"raygan.sweep.best_model": best.model_uri} if best.model_uri else {}),
                }
            )
        tracker.log_metrics(counts, step=0)
        tracker.finish("FINISHED")
    return outcome


def _register_best(plan: SweepPlan, best: Any) -> str | None:
    """With ``tracking.register_as=NAME``: the best trial's model as a new version of NAME (the
    trials log their models but register none: one version per sweep)."""
    name = plan.base.get("tracking.register_as")
    if not name or not best.model.get("model_id"):
        return None
    from services.model_log import LoggedGenerator, register

    try:
        version = register(plan.tracking_uri, name, LoggedGenerator(**best.model), best.trial)
    except Exception as exc:  # the sweep's results stand without the registry
        log.warning("could not register %s as %s: %s", best.model_uri, name, redact(str(exc)))
        return None
    return f"models:/{name}/{version}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan, storage = plan_from_args(args)
        # The trials share the base config's data: checked once, before any trial starts.
        preflight(plan.base_config)
        # One sweep per name: a twin (say a second --resume while the first runs) is refused.
        lease = acquire_for(
            storage, plan.base_config.storage, plan.name, "tuning.sweep", args.force
        )
    except (ConfigError, StorageError, DataError, LeaseHeld) as exc:
        print(f"raygan: {redact(str(exc))}", file=sys.stderr)
        return 2
    with lease:
        return _run(args, plan, storage, lease)


def _run(args: argparse.Namespace, plan: SweepPlan, storage: Storage, lease: RunLease) -> int:
    verb = "resuming" if args.resume else "starting"
    print(
        f"[raygan] {verb} sweep {plan.name}: {plan.trials} trials, space {plan.space.name} "
        f"({', '.join(plan.space.knobs)}), scheduler {plan.scheduler}, objective {plan.mode} "
        f"{plan.metric}; folder {storage.uri}/{plan.name}",
        flush=True,
    )
    init_ray(args.address, args.verbose)
    try:
        outcome = run_sweep(
            plan, storage, resume=args.resume, quiet=args.quiet, verbose=args.verbose
        )
    except KeyboardInterrupt:
        outcome = None
    if outcome is None or outcome.interrupted:
        if lease.lost:
            print(f"raygan: stopped: another sweep took over {lease.where}", file=sys.stderr)
        done = 0 if outcome is None else sum(s != "INCOMPLETE" for s in outcome.statuses.values())
        storage_args = " ".join(a for a in args.overrides if a.startswith("storage."))
        print(
            f"raygan: sweep {plan.name} interrupted with {done} of {plan.trials} trials done; "
            f"resume with: python -m tuning.sweep --name {plan.name} --resume "
            f"--config {args.config} {storage_args}".rstrip(),
            file=sys.stderr,
        )
        return 130
    report_md = outcome.report.get("report.md")
    if report_md:
        print(sweep_storage(plan, storage).read_bytes("report.md").decode(), end="")
    counts = {
        s: sum(v == s for v in outcome.statuses.values()) for s in ("COMPLETED", "STOPPED", "ERROR")
    }
    best = (
        f"best {outcome.best_trial} ({plan.metric} {outcome.best_score:.4g})"
        if outcome.best_trial
        else f"no trial reported {plan.metric}"
    )
    print(
        f"[raygan] sweep {plan.name} done in {outcome.wall_seconds:.0f} s: "
        f"{counts['COMPLETED']} completed, {counts['STOPPED']} stopped early, "
        f"{counts['ERROR']} failed; {best}"
    )
    parent = (
        f" | mlflow parent run {outcome.parent_run_id} at {redact(plan.tracking_uri)}"
        if outcome.parent_run_id
        else ""
    )
    if outcome.best_model_uri:
        parent += f" | best model: {outcome.best_model_uri}"
        if outcome.registered_model:
            parent += f" (registered: {outcome.registered_model})"
    print(
        f"[raygan] report: {report_md} | best config: {outcome.report.get('best.yaml')}{parent}",
        flush=True,
    )
    return 0 if outcome.best_trial else 1


if __name__ == "__main__":
    sys.exit(main())
