"""Tests for tuning.report on a hand-made sweep folder: statuses, knob effects, best config."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from gan_core.config import load_config
from tuning import report
from tuning.plan import SweepPlan, make_plan
from tuning.report import (
    TrialRow,
    best_row,
    common_step,
    error_reason,
    marginal_effects,
    trial_row,
    value_at,
)


def row(
    name: str,
    knobs: dict[str, Any],
    modes: float,
    score: float | None = None,
    status: str = "COMPLETED",
) -> TrialRow:
    metrics: dict[str, Any] = {"modes": modes}
    if score is not None:
        metrics["score"] = score
    return TrialRow(trial=name, knobs=knobs, metrics=metrics, status=status)


def test_marginal_effects_by_hand() -> None:
    rows = [
        row("a", {"unroll.steps": 0, "generators.count": 1}, modes=2),
        row("b", {"unroll.steps": 0, "generators.count": 4}, modes=6),
        row("c", {"unroll.steps": 5, "generators.count": 1}, modes=5),
        row("d", {"unroll.steps": 5, "generators.count": 4}, modes=8),
        row("e", {"unroll.steps": 5, "generators.count": 4}, modes=float("nan")),  # left out
        row("f", {"unroll.steps": 10, "generators.count": 1}, modes=7, status="STOPPED"),
    ]
    effects = marginal_effects(rows, ["unroll.steps", "generators.count"])
    assert effects["unroll.steps"] == [(0, 4.0, 2), (5, 6.5, 2), (10, 7.0, 1)]
    assert effects["generators.count"] == [(1, pytest.approx(14 / 3), 3), (4, 7.0, 2)]


def test_marginal_effects_at_the_step_every_trial_reached() -> None:
    """Compared at their last reports, a trial stopped early at step 10 counts with its step-10
    modes against the others' step-30 modes; at the common step, all count at step 10."""

    def hist(*modes: float) -> list[dict[str, Any]]:
        return [{"step": 10 * (i + 1), "modes": m} for i, m in enumerate(modes)]

    rows = [
        TrialRow("a", {"unroll.steps": 0}, hist(1, 4, 8)[-1], "COMPLETED", history=hist(1, 4, 8)),
        TrialRow("b", {"unroll.steps": 0}, hist(3, 6, 6)[-1], "COMPLETED", history=hist(3, 6, 6)),
        TrialRow("c", {"unroll.steps": 5}, hist(5)[-1], "STOPPED", history=hist(5)),
        TrialRow("d", {"unroll.steps": 5}, hist(0, 2)[-1], "STOPPED", history=hist(0, 2)),
        TrialRow("e", {"unroll.steps": 5}, {}, "ERROR"),  # no reports: no say in either
    ]
    assert common_step(rows) == 10
    assert value_at(rows[1], "modes", 20) == 6.0 and value_at(rows[2], "modes", 20) is None
    assert marginal_effects(rows, ["unroll.steps"])["unroll.steps"] == [(0, 7.0, 2), (5, 3.5, 2)]
    at_10 = marginal_effects(rows, ["unroll.steps"], at_step=10)["unroll.steps"]
    assert at_10 == [(0, 2.0, 2), (5, 2.5, 2)]
    assert common_step([TrialRow("x", {}, {}, "ERROR")]) is None


def test_error_reason_is_the_exception_line() -> None:
    trace = (
        "Failure # 1 (occurred at 2026-11-27_00-10-00)\n"
        "ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1)\n"
        '  File "tuning/trial.py", line 220, in _fit_and_forward\n'
        "    raise outcome['error']\n"
        "RuntimeError: t diverged: non-finite loss at step 1; stopped (train.on_nonfinite=stop)\n"
    )
    assert error_reason(trace) == (
        "RuntimeError: t diverged: non-finite loss at step 1; stopped (train.on_nonfinite=stop)"
    )
    assert error_reason("ray.exceptions.RayActorError: The actor died\n\n") == (
        "ray.exceptions.RayActorError: The actor died"
    )
    assert error_reason("something odd\n") == "something odd"
    assert error_reason(None) == "no error recorded"
    errored = trial_row("t", {}, "ERROR", {}, [], 30, error=trace)
    assert errored.error.endswith("stopped (train.on_nonfinite=stop)")
    assert trial_row("t", {}, "TERMINATED", {"step": 30}, [], 30, error=trace).error == ""


def test_best_row_is_mode_aware() -> None:
    rows = [
        row("a", {}, 3, score=2.5),
        row("b", {}, 4, score=3.9),
        row("c", {}, 1),
        row("d", {}, 2, score=float("nan")),
    ]
    assert best_row(rows, "score", "max").trial == "b"
    assert best_row(rows, "score", "min").trial == "a"
    assert best_row([row("c", {}, 1)], "score", "max") is None


@pytest.mark.parametrize(
    ("tune_status", "last", "status"),
    [
        ("TERMINATED", {"step": 40}, "COMPLETED"),
        ("TERMINATED", {"step": 20, "done": True}, "STOPPED"),  # the scheduler ended it early
        ("RUNNING", {"step": 20}, "INCOMPLETE"),  # an interrupted sweep
        ("PENDING", {}, "INCOMPLETE"),
        ("ERROR", {"step": 10}, "ERROR"),
        ("ERROR", {}, "ERROR"),
    ],
)
def test_trial_status(tune_status: str, last: dict, status: str) -> None:
    assert trial_row("t", {}, tune_status, last, [], total_steps=40).status == status


def test_trial_row_speed_and_wall_time() -> None:
    history = [{"step": 10, "steps_per_s": 100.0}, {"step": 20, "steps_per_s": 300.0}]
    last = {"step": 20, "steps_per_s": 300.0, "time_total_s": 5.5}
    r = trial_row("t", {"unroll.steps": 1}, "TERMINATED", last, history, total_steps=20)
    assert r.steps_per_s == 200.0 and r.wall_s == 5.5  # the mean over the reports on file
    assert r.knobs == {"unroll.steps": 1} and r.metrics["step"] == 20
    # A trial whose report history went missing still has its last report's speed.
    assert trial_row("t", {}, "TERMINATED", last, [], 20).steps_per_s == 300.0


def hand_made(tmp_path: Path) -> tuple[SweepPlan, list[TrialRow]]:
    """A 4-trial unroll x minibatch sweep: its plan and its trials as Tune saw them."""
    space = tmp_path / "two.yaml"
    space.write_text("grid:\n  unroll.steps: [0, 5]\n  discriminator.minibatch.kernels: [0, 8]\n")
    plan, _ = make_plan(
        "hand",
        str(space),
        "ring8",
        [f"storage.uri={tmp_path / 'runs'}", "train.steps=30", "eval.every=10"],
    )
    outcomes = {  # trial: (knobs, final modes, final rKL, stopped early)
        "trial_0": ({"unroll.steps": 0, "discriminator.minibatch.kernels": 0}, 3, 0.5, False),
        "trial_1": ({"unroll.steps": 0, "discriminator.minibatch.kernels": 8}, 6, 0.2, False),
        "trial_2": ({"unroll.steps": 5, "discriminator.minibatch.kernels": 0}, 7, 0.1, False),
        "trial_3": ({"unroll.steps": 5, "discriminator.minibatch.kernels": 8}, 1, 1.0, True),
    }
    rows = []
    for name, (knobs, modes, rkl, stopped) in outcomes.items():
        history = [_result(s, modes, rkl, knobs) for s in range(10, 21 if stopped else 31, 10)]
        rows.append(trial_row(name, knobs, "TERMINATED", history[-1], history, 30))
    return plan, rows


def _result(step: int, modes: float, rkl: float, knobs: dict) -> dict:
    return {
        "step": step,
        "modes": modes,
        "hq_pct": 50.0,
        "reverse_kl": rkl,
        "score": modes - rkl / (1 + rkl),
        "steps_per_s": 100.0,
        "config": knobs,
        "time_total_s": step / 10,
        "training_iteration": step // 10,
    }


def test_report_files(tmp_path: Path) -> None:
    plan, rows = hand_made(tmp_path)
    files = report.build_report(plan, rows, tmp_path / "out")
    assert sorted(files) == sorted(report.REPORT_FILES)
    text = files["report.md"].read_text()
    assert "Trials: 4 (3 completed, 1 stopped)." in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| trial |"))
    assert header == (
        "| trial | unroll.steps | discriminator.minibatch.kernels | modes | hq_pct "
        "| reverse_kl | score | step | steps_per_s | wall_s | stopped_early "
        "| status |"
    )
    first = lines[lines.index(header) + 2]  # best first: 7 - 0.1 / 1.1
    assert first.startswith("| trial_2 | 5 | 0 | 7 | 50 | 0.1 | 6.91 | 30 |")
    assert "| trial_3 | 5 | 8 | 1 | 50 | 1 | 0.5 | 20 | 100 | 2 | yes | STOPPED |" in text
    # Mean modes: unroll 0 -> (3 + 6) / 2, unroll 5 -> (7 + 1) / 2.
    assert "| unroll.steps | 0 | 2 | 4.5 |" in text
    assert "| unroll.steps | 5 | 2 | 4 |" in text
    assert "| discriminator.minibatch.kernels | 8 | 2 | 3.5 |" in text
    assert "trial_2: unroll.steps=5, discriminator.minibatch.kernels=0; score = 6.91" in text
    # trial_3 was stopped at step 20: the effects are also shown at step 20 for every trial.
    assert "The same at step 20, which every trial reached" in text
    assert "## Failed trials" not in text
    with files["trials.csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["trial_0", "trial_1", "trial_2", "trial_3"]
    assert table[3]["stopped_early"] == "True" and table[3]["step"] == "20"
    assert files["coverage_vs_cost.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_yaml_loads_and_equals_the_trials_config(tmp_path: Path) -> None:
    plan, rows = hand_made(tmp_path)
    files = report.build_report(plan, rows, tmp_path / "out")
    best = load_config(str(files["best.yaml"]))
    expected = plan.trial_config(
        {"unroll.steps": 5, "discriminator.minibatch.kernels": 0, "name": "hand-best"}
    )
    assert best == expected
    assert (best.unroll.steps, best.discriminator.minibatch.kernels) == (5, 0)
    assert best.train.steps == 30 and best.storage.uri == str(tmp_path / "runs")


def test_report_refuses_a_folder_that_is_not_a_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report.main([str(tmp_path)]) == 2
    assert "sweep.json" in capsys.readouterr().err


def test_unlabelled_sweep_reports_its_metric_per_knob_value(tmp_path: Path) -> None:
    """Unlabelled data reports coverage, not modes: every knob value still gets its row and
    the plot draws the sweep's metric."""
    import dataclasses

    plan, _ = hand_made(tmp_path)
    plan = dataclasses.replace(plan, metric="coverage", mode="max")
    rows = [
        TrialRow(f"t{i}", knobs, {"coverage": cov, "steps_per_s": 10.0}, "COMPLETED")
        for i, (knobs, cov) in enumerate(
            [
                ({"unroll.steps": 0, "discriminator.minibatch.kernels": 0}, 0.2),
                ({"unroll.steps": 0, "discriminator.minibatch.kernels": 8}, 0.4),
                ({"unroll.steps": 5, "discriminator.minibatch.kernels": 0}, 0.6),
                ({"unroll.steps": 5, "discriminator.minibatch.kernels": 8}, 0.8),
            ]
        )
    ]
    table = report._effects_table(plan, rows, None)
    # Mean coverage: unroll 0 -> (0.2 + 0.4) / 2, unroll 5 -> (0.6 + 0.8) / 2; no modes: "-".
    assert "| unroll.steps | 0 | 2 | - | 0.3 |" in table
    assert "| unroll.steps | 5 | 2 | - | 0.7 |" in table
    assert "| discriminator.minibatch.kernels | 8 | 2 | - | 0.6 |" in table
    png = report.plot_coverage_vs_cost(plan, rows, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
