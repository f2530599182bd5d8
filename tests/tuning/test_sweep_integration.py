"""Sweeps end to end on real parts: a local Ray on 127.0.0.1, Ray Tune driving Ray Train trials,
an MLflow SQLite store. Each trial is a Train ``fit()`` (10-15 s of start-up), so three sweeps
cover it all: ASHA + MLflow + report + best config; an interrupted sweep resumed; PBT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from ray import tune
from ray.tune import ExperimentAnalysis

from gan_core.config import load_config
from gan_core.steps import lr_factor
from services import train
from tuning import report, sweep
from tuning.plan import SweepPlan, make_plan
from tuning.runs import PARENT_TAG, SWEEP_TAG, TRIAL_TAG

pytestmark = pytest.mark.integration

TINY = [
    "generators.width=32",
    "generators.depth=2",
    "discriminator.width=32",
    "discriminator.maxout_pieces=1",
    "train.batch_size=32",
    "eval.samples=400",
    "eval.every=10",
    "train.steps=30",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One private Ray for the module, started as the sweep CLI starts it. RAY_TMPDIR is a short
    fresh folder set BEFORE ray.init, so the raylet and every worker inherit it; HOME is the
    session's (tests/conftest.py): Ray keeps its auth token state per process, so a second
    ray.init in this process under another HOME would start a GCS without a token."""
    import ray

    root = tempfile.mkdtemp(prefix="rgt")
    saved = dict(os.environ)
    # Set before ray.init so that every trial's workers inherit it: services.worker.hold_gate
    # makes a run wait at a step while this file exists (only the resume test writes it).
    os.environ.update({"RAY_TMPDIR": root, "RAYGAN_HOLD_FILE": os.path.join(root, "hold")})
    sweep.init_ray(num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(root, ignore_errors=True)


def results(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Each Tune trial's reports, read straight from its result.json."""
    return {
        trial.parent.name: [json.loads(line) for line in trial.read_text().splitlines()]
        for trial in sorted(folder.glob("trial_*/result.json"))
    }


def trials(folder: Path) -> dict[str, Any]:
    """Tune's own record of each trial (status, final config, last result) by trial name."""
    return {str(t): t for t in ExperimentAnalysis(str(folder)).trials}


def sweep_runs(tracking: str, name: str) -> tuple[Any, list[Any]]:
    """The sweep's parent MLflow run and its nested children."""
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{SWEEP_TAG}` = '{name}'",
    )
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
    )
    return parent, children


def test_asha_sweep_stops_hopeless_trials_nests_mlflow_runs_and_reports(
    ray_cluster: None, tmp_path: Path, mlflow_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    space = tmp_path / "lr_unroll.yaml"
    # A learning rate of 1e30 diverges at once: NaN samples score -1, the lowest score there is.
    # Tune varies the first key (in sorted order) fastest, so both such trials start last, after
    # the first two recorded finite scores at ASHA's first rung: each must be stopped there.
    space.write_text(
        "grid:\n  discriminator.minibatch.kernels: [0, 8]\n  g_optim.lr: [2.0e-3, 1.0e30]\n"
        # No non-finite check (the default rolls back, then errors the trial): here the NaN
        # trials must reach ASHA as the worst scores.
        "fixed:\n  train.on_nonfinite: continue\n"
    )
    runs, tracking = tmp_path / "runs", mlflow_db
    rc = sweep.main(
        [
            "--space",
            str(space),
            "--name",
            "asha",
            "--scheduler",
            "asha",
            "--grace-period",
            "1",
            "--reduction-factor",
            "2",
            "--max-concurrent",
            "2",
            "--quiet",
            *TINY,
            f"storage.uri={runs}",
            f"tracking.uri={tracking}",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    folder = runs / "asha"
    reports = results(folder)
    assert len(reports) == 4
    final = {trial: rows[-1] for trial, rows in reports.items()}
    diverged = {t for t, r in final.items() if r["config"]["g_optim.lr"] > 1}
    assert len(diverged) == 2
    for trial in diverged:
        assert final[trial]["done"] and final[trial]["step"] == 10  # stopped at the first rung
        assert final[trial]["score"] == -1.0
    stopped = {t for t, r in final.items() if r["done"] and r["step"] < 30}
    assert diverged <= stopped and len(stopped) < 4  # the better of the first two runs on

    parent, children = sweep_runs(tracking, "asha")
    assert parent.info.status == "FINISHED"
    client = mlflow.MlflowClient(tracking)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
        f"report/{name}" for name in report.REPORT_FILES
    }
    assert {c.data.tags[TRIAL_TAG] for c in children} == set(final)
    for child in children:
        trial = child.data.tags[TRIAL_TAG]
        assert child.info.status == "FINISHED", trial  # none left RUNNING by a stopped trial
        assert child.info.run_name == trial
        knobs = final[trial]["config"]
        assert child.data.params["discriminator.minibatch.kernels"] == str(
            knobs["discriminator.minibatch.kernels"]
        )
        assert float(child.data.params["g_optim.lr"]) == knobs["g_optim.lr"]
        # The training job's metric keys (a diverged trial's NaN losses are not logged).
        expected = {"modes", "hq_pct", "lr_g", "lr_d", "step", "steps_per_s", "score"}
        if trial not in diverged:
            expected |= {"d_loss", "g_loss", "reverse_kl"}
        assert expected <= set(child.data.metrics), trial
        assert child.data.tags["raygan.stopped_early"] == str(trial in stopped).lower()
        assert client.list_artifacts(child.info.run_id, "samples"), f"{trial}: no sample grid"
        logged = [m.step for m in client.get_metric_history(child.info.run_id, "modes")]
        seen = [r["step"] for r in reports[trial]]
        # A stopped trial's worker may log one more evaluation before Tune's stop reaches it.
        assert logged == seen if trial not in stopped else logged[: len(seen)] == seen, trial

    # The report: printed, written beside the sweep, and reproducible by the report CLI.
    text = (folder / "report.md").read_text()
    assert text in out and "## Marginal effect of each knob" in text
    assert all(trial in text for trial in final)
    assert f"Trials: 4 ({4 - len(stopped)} completed, {len(stopped)} stopped)." in text
    assert (folder / "coverage_vs_cost.png").read_bytes()[:4] == b"\x89PNG"
    assert report.main([str(folder)]) == 0
    assert (folder / "report.md").read_text() == text

    # best.yaml is the best trial's config (by its last score), and trains as it is.
    best = max(final, key=lambda t: final[t]["score"])
    plan = SweepPlan.from_json((folder / "sweep.json").read_text())
    best_cfg = load_config(str(folder / "best.yaml"))
    assert best_cfg == plan.trial_config({**final[best]["config"], "name": "asha-best"})
    summary = tmp_path / "best.json"
    assert (
        train.main(
            [
                "--config",
                str(folder / "best.yaml"),
                "resources.backend=local",
                "--quiet",
                "--summary-json",
                str(summary),
            ]
        )
        == 0
    )
    assert json.loads(summary.read_text())["steps"] == 30


class InterruptOnce(tune.Callback):
    """Sends the sweep's process SIGUSR1, Tune's "stop and save" signal (as Ctrl+C would), when
    the first trial completes. Tuner.restore brings callbacks back, hence the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(trial))
            os.kill(os.getpid(), signal.SIGUSR1)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    ray_cluster: None, tmp_path: Path, mlflow_db: str
) -> None:
    space = tmp_path / "steps.yaml"
    # The 60-step trial is still running (with checkpoints) when the 30-step one completes: it
    # waits at step 45 until the hold file goes. Without the hold it could finish while the
    # 30-step trial logs its model, and the interrupt would find nothing left to interrupt.
    space.write_text("grid:\n  train.steps: [30, 60]\n")
    hold = Path(os.environ["RAYGAN_HOLD_FILE"])
    hold.write_text("45")
    runs, tracking = tmp_path / "runs", mlflow_db
    overrides = [*TINY, "checkpoint.every=10", f"storage.uri={runs}", f"tracking.uri={tracking}"]
    plan, storage = make_plan(
        "resume", str(space), "ring8", overrides, scheduler="fifo", max_concurrent=2
    )
    try:
        first = sweep.run_sweep(
            plan, storage, quiet=True, callbacks=[InterruptOnce(str(tmp_path / "interrupted"))]
        )
    finally:
        hold.unlink()
    assert first.interrupted
    assert sorted(first.statuses.values()) == ["COMPLETED", "INCOMPLETE"]
    folder = runs / "resume"
    done = next(t for t, s in first.statuses.items() if s == "COMPLETED")
    running = next(t for t, s in first.statuses.items() if s == "INCOMPLETE")
    done_results = (folder / done / "result.json").read_bytes()
    parent, children = sweep_runs(tracking, "resume")
    assert parent.info.status == "KILLED"
    statuses = {c.data.tags[TRIAL_TAG]: c.info.status for c in children}
    assert statuses[done] == "FINISHED"
    assert statuses[running] == "KILLED"  # held at step 45: it cannot have ended its run

    assert sweep.main(["--name", "resume", "--resume", f"storage.uri={runs}", "--quiet"]) == 0

    assert (folder / done / "result.json").read_bytes() == done_results  # not rerun
    train_runs = sorted(p.name for p in (folder / "runs").iterdir())
    assert train_runs == sorted([done, running])
    # One-worker trials train in the trial's process, their checkpoints in the local layout:
    # the unfinished one went on from step 40 (its last before the hold) to 60.
    stored = sorted(p.name for p in (folder / "runs" / running / "local_checkpoints").iterdir())
    assert stored == [f"step_{s:07d}" for s in (10, 20, 30, 40, 50, 60)]
    last = trials(folder)[running].last_result
    # Its iteration count went on from the checkpoint: a restart from scratch would add 6.
    assert (last["step"], last["training_iteration"]) == (60, 6)
    steps = [r["step"] for r in results(folder)[running]]
    assert steps.count(10) == 1, steps
    parent, children = sweep_runs(tracking, "resume")
    assert parent.info.status == "FINISHED"
    assert {c.data.tags[TRIAL_TAG]: c.info.status for c in children} == {
        done: "FINISHED",
        running: "FINISHED",
    }
    client = mlflow.MlflowClient(tracking)
    done_child = next(c for c in children if c.data.tags[TRIAL_TAG] == done)
    assert [m.step for m in client.get_metric_history(done_child.info.run_id, "modes")] == [
        10,
        20,
        30,
    ]


def test_pbt_mutated_learning_rates_reach_the_optimizer(
    ray_cluster: None, tmp_path: Path, mlflow_db: str
) -> None:
    space = tmp_path / "pbt.yaml"
    space.write_text(
        "grid:\n  g_optim.lr: [2.0e-3, 5.0e-4]\n"
        "mutations:\n  g_optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "  d_optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
    )
    runs, tracking = tmp_path / "runs", mlflow_db
    # Synchronous PBT decides once both trials made report 2 (of 3): the worse one must exploit
    # the better, and both then make report 3 (step 30) with their final learning rates.
    plan, storage = make_plan(
        "pbt",
        str(space),
        "ring8",
        [*TINY, f"storage.uri={runs}", f"tracking.uri={tracking}"],
        scheduler="pbt",
        max_concurrent=2,
        perturbation_interval=2,
        pbt_synch=True,
    )
    outcome = sweep.run_sweep(plan, storage, quiet=True)
    assert not outcome.interrupted
    folder = runs / "pbt"
    assert (folder / "pbt_global.txt").read_text().strip(), "PBT never exploited"
    final = trials(folder)
    exploited = [t for t, trial in final.items() if trial.config["g_optim.lr"] not in (2e-3, 5e-4)]
    assert len(exploited) == 1
    _, children = sweep_runs(tracking, "pbt")
    child = {c.data.tags[TRIAL_TAG]: c for c in children}
    assert set(child) == set(final)
    client = mlflow.MlflowClient(tracking)
    factor = lr_factor("cosine", 29, 30)  # ring8's schedule, in the step before report 3
    for name, trial in final.items():
        last = trial.last_result
        assert last["config"] == trial.config  # reported with its final (mutated) knobs
        # Report 3 at step 30: the exploited trial went on from the cloned step-20 checkpoint
        # (a restart from scratch would have reported step 10 as iteration 3).
        assert (last["step"], last["training_iteration"]) == (30, 3), name
        cfg = plan.trial_config(trial.config)
        assert last["lr_g"] == pytest.approx(cfg.g_optim.lr * factor, rel=1e-9), name
        assert last["lr_d"] == pytest.approx(cfg.d_optim.lr * factor, rel=1e-9), name
        # The worker logged it into this trial's own run, also after cloning the other's.
        run = child[name]
        logged = {(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "lr_g")}
        assert (30, last["lr_g"]) in logged, name
        initial = float(run.data.params["g_optim.lr"])  # the knob it started with
        assert (10, initial * lr_factor("cosine", 9, 30)) in logged, name
        assert run.info.status == "FINISHED"
    assert (
        float(child[exploited[0]].data.params["g_optim.lr"])
        != final[exploited[0]].config["g_optim.lr"]
    )


# One worker per trial trains in the trial's process (tuning.inprocess); two make every trial a
# Ray Train job (tuning.trial's TorchTrainer, ForwardToTune and log_result_generator), here with
# half a CPU per worker so that two trials fit the 2-CPU cluster.
RUNNERS = {
    "in-process": [],
    "train-job": ["--workers-per-trial", "2", "resources.cpus_per_worker=0.5"],
}


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_a_diverged_trial_errors_with_its_reason(
    runner: str,
    ray_cluster: None,
    tmp_path: Path,
    mlflow_db: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``train.on_nonfinite=stop`` in a sweep: the trial that diverges ends as a Tune ERROR whose
    reason reaches Tune's error file, the report and its MLflow run; the other trial is unharmed
    and logs its generator. Both ways a trial can train."""
    space = tmp_path / "nan.yaml"
    space.write_text("grid:\n  g_optim.lr: [2.0e-3, 1.0e30]\nfixed:\n  train.on_nonfinite: stop\n")
    runs, tracking = tmp_path / "runs", mlflow_db
    rc = sweep.main(
        [
            "--space",
            str(space),
            "--name",
            "nan",
            "--scheduler",
            "fifo",
            "--max-concurrent",
            "2",
            "--quiet",
            *RUNNERS[runner],
            *TINY,
            "train.steps=20",
            f"storage.uri={runs}",
            f"tracking.uri={tracking}",
        ]
    )
    assert rc == 0  # the healthy trial gives the sweep its best config
    out = capsys.readouterr().out
    assert "1 completed, 0 stopped early, 1 failed" in out
    folder = runs / "nan"
    final = trials(folder)
    (bad,) = [t for t, trial in final.items() if trial.config["g_optim.lr"] > 1]
    (good,) = set(final) - {bad}
    assert final[bad].status == "ERROR" and final[good].status == "TERMINATED"
    reason = "stopped (train.on_nonfinite=stop)"
    assert reason in Path(final[bad].error_file).read_text()
    text = (folder / "report.md").read_text()
    failed = text.split("## Failed trials", 1)[1].split("##", 1)[0]
    assert f"- {bad}: RuntimeError: " in failed and reason in failed and good not in failed
    _, children = sweep_runs(tracking, "nan")
    child = {c.data.tags[TRIAL_TAG]: c for c in children}
    assert child[bad].info.status == "FAILED"
    assert reason in child[bad].data.tags["raygan.error"]
    assert "non-finite" in child[bad].data.tags["raygan.stop_reason"]  # set by the worker
    assert child[good].info.status == "FINISHED" and child[good].data.metrics["step"] == 20
    model_uri = f"runs:/{child[good].info.run_id}/generator"
    assert child[good].data.tags["raygan.model_uri"] == model_uri
    assert "raygan.model_uri" not in child[bad].data.tags
    assert f"Model: `{model_uri}`" in text
    # Where the trial's checkpoints are: Train's checkpoint folders, or the local layout.
    kept = "checkpoint_*" if runner == "train-job" else "local_checkpoints/step_*"
    assert list((runs / "nan" / "runs" / good).glob(kept))
