"""Tests for tuning.plan: what a sweep is decided to be, and what it refuses, before Ray starts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gan_core.config import ConfigError, StorageConfig
from services.storage import open_storage
from tuning.plan import SweepPlan, load_plan, make_plan, save_plan
from tuning.sweep import parse_args, plan_from_args


def storage_args(tmp_path: Path) -> list[str]:
    return [f"storage.uri={tmp_path / 'runs'}"]


def test_base_is_preset_then_space_fixed_then_overrides_then_workers(tmp_path: Path) -> None:
    plan, storage = make_plan(
        "g", "generators", "ring8", storage_args(tmp_path), workers_per_trial=2
    )
    assert plan.base["train.batch_size"] == 96  # the space's fixed value over ring8's 100
    assert plan.base["resources.num_workers"] == 2
    assert plan.base["g_optim.lr"] == 2.0e-3  # from the preset
    assert storage.uri == str(tmp_path / "runs")
    assert plan.tracking_uri == f"sqlite:///{tmp_path / 'runs'}/mlflow.db"
    plan, _ = make_plan(
        "g", "generators", "ring8", [*storage_args(tmp_path), "train.batch_size=64"]
    )
    assert plan.base["train.batch_size"] == 64  # the user's override wins over fixed
    assert plan.trials == 4


def test_trial_config_is_base_plus_knobs(tmp_path: Path) -> None:
    plan, _ = make_plan("c", "collapse", "ring8", storage_args(tmp_path))
    cfg = plan.trial_config(
        {"unroll.steps": 5, "generators.count": 4, "discriminator.minibatch.kernels": 32}
    )
    assert (cfg.unroll.steps, cfg.generators.count, cfg.discriminator.minibatch.kernels) == (
        5,
        4,
        32,
    )
    assert cfg.train.batch_size == 96 and cfg.discriminator.maxout_pieces == 5


def test_max_reports_is_a_full_trials_evaluations(tmp_path: Path) -> None:
    plan, _ = make_plan(
        "u", "unroll", "ring8", [*storage_args(tmp_path), "train.steps=45", "eval.every=10"]
    )
    assert plan.max_reports == 5  # evaluations at 10, 20, 30, 40 and the last step, 45


def test_pbt_checkpoints_every_report_and_needs_mutable_keys(tmp_path: Path) -> None:
    plan, _ = make_plan(
        "p", "lr", "ring8", [*storage_args(tmp_path), "eval.every=250"], scheduler="pbt"
    )
    assert plan.base["checkpoint.every"] == 250  # PBT clones a trial at its latest report
    with pytest.raises(ConfigError) as err:
        make_plan("p", "unroll", "ring8", storage_args(tmp_path), scheduler="pbt")
    assert err.value.key == "--scheduler" and "mutations" in err.value.allowed
    space = tmp_path / "arch.yaml"
    space.write_text("mutations:\n  discriminator.minibatch.kernels: {choice: [0, 8]}\n")
    with pytest.raises(ConfigError) as err:
        make_plan("p", str(space), "ring8", storage_args(tmp_path), scheduler="pbt")
    assert err.value.key == "discriminator.minibatch.kernels"
    assert "architecture" in err.value.allowed
    assert err.value.source == f"{space} (mutations)"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"scheduler": "hyperband"}, "--scheduler"),
        ({"mode": "maximize"}, "--mode"),
        ({"num_samples": 0}, "--num-samples"),
        ({"reduction_factor": 1}, "--reduction-factor"),
        ({"workers_per_trial": 0}, "--workers-per-trial"),
        ({"trial_runner": "thread"}, "--trial-runner"),
        ({"trial_runner": "process", "workers_per_trial": 2}, "--trial-runner"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_plan("s", "unroll", "ring8", storage_args(tmp_path), **kwargs)
    assert err.value.key == key


def test_bad_name_and_unscorable_data_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        make_plan("a/b", "unroll", "ring8", storage_args(tmp_path))
    assert err.value.key == "--name"
    # best.yaml's "<name>-best" must be a valid config name: 95 characters is the most.
    make_plan("s" * 95, "unroll", "ring8", storage_args(tmp_path))
    with pytest.raises(ConfigError) as err:
        make_plan("s" * 96, "unroll", "ring8", storage_args(tmp_path))
    assert err.value.key == "--name" and "at most 95" in err.value.allowed
    assert err.value.value == "s" * 80 + "..."
    with pytest.raises(ConfigError) as err:
        make_plan(
            "s",
            "unroll",
            "ring8",
            [*storage_args(tmp_path), "data.name=parquet", "data.path=/data/points.parquet"],
        )
    assert err.value.key == "--metric" and "Parquet" in err.value.allowed
    plan, _ = make_plan(
        "s",
        "unroll",
        "ring8",
        [*storage_args(tmp_path), "data.name=parquet", "data.path=/data/points.parquet"],
        metric="d_loss",
        mode="min",
    )
    assert (plan.metric, plan.mode) == ("d_loss", "min")


def test_bad_override_fails_under_its_own_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        make_plan("s", "unroll", "ring8", [*storage_args(tmp_path), "train.stepz=3"])
    assert err.value.key == "train.stepz" and err.value.source == "overrides"


def test_plan_round_trips_and_is_found_again(tmp_path: Path) -> None:
    plan, storage = make_plan(
        "rt", "lr", "ring8", storage_args(tmp_path), scheduler="pbt", num_samples=3, pbt_synch=True
    )
    plan.parent_run_id = "abc123"
    save_plan(storage, plan)
    again = load_plan(storage, "rt")
    assert again == plan
    assert again.space.knobs == plan.space.knobs  # file order kept, not sorted
    assert SweepPlan.from_json(plan.to_json()) == plan
    with pytest.raises(ConfigError) as err:
        load_plan(open_storage(StorageConfig(uri=str(tmp_path / "runs"))), "nope")
    assert err.value.key == "--name" and "no sweep.json" in err.value.allowed


def _args(argv: list[str]) -> argparse.Namespace:
    return parse_args(argv)


def test_cli_refuses_to_overwrite_and_resumes_by_name(tmp_path: Path) -> None:
    argv = ["--space", "unroll", "--scheduler", "fifo", *storage_args(tmp_path)]
    plan, storage = plan_from_args(_args(argv))
    assert plan.name == "unroll-fifo" and plan.scheduler == "fifo"
    save_plan(storage, plan)
    with pytest.raises(ConfigError) as err:
        plan_from_args(_args(argv))
    assert err.value.key == "--name" and "--resume" in err.value.allowed
    resumed, _ = plan_from_args(
        _args(["--name", "unroll-fifo", "--resume", *storage_args(tmp_path)])
    )
    assert resumed == plan
    with pytest.raises(ConfigError):
        plan_from_args(_args(["--resume", *storage_args(tmp_path)]))


@pytest.mark.parametrize(
    ("runner", "workers", "overrides", "in_process"),
    [
        ("auto", 1, [], True),
        ("auto", 2, [], False),
        ("auto", 1, ["resources.use_gpu=true"], False),
        ("train", 1, [], False),
        ("process", 1, [], True),
    ],
)
def test_where_a_trial_trains(
    tmp_path: Path, runner: str, workers: int, overrides: list[str], in_process: bool
) -> None:
    """One CPU worker trains in the trial's process unless told otherwise; the rest are Train
    jobs. Tune reserves the worker's CPUs for an in-process trial and none for a Train trial's
    driver (its workers reserve their own)."""
    from tuning.trial import TRIAL_RESOURCES, TrialSettings, runs_in_process, trial_resources

    plan, _ = make_plan(
        "w",
        "unroll",
        "ring8",
        [*storage_args(tmp_path), "resources.cpus_per_worker=1.5", *overrides],
        workers_per_trial=workers,
        trial_runner=runner,
    )
    assert runs_in_process(plan) is in_process
    settings = TrialSettings("w", plan.base, "", "", None, in_process=in_process)
    assert trial_resources(settings) == ({"cpu": 1.5} if in_process else TRIAL_RESOURCES)


def test_a_plan_saved_before_trial_runners_loads_as_auto(tmp_path: Path) -> None:
    plan, storage = make_plan("old", "unroll", "ring8", storage_args(tmp_path))
    data = json.loads(plan.to_json())
    del data["trial_runner"]
    assert SweepPlan.from_json(json.dumps(data)).trial_runner == "auto"
