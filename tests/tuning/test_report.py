"""Tests for tuning.report on a hand-made sweep folder: statuses, knob effects, best config."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from gan_core.config import StorageConfig, load_config
from services.storage import open_storage
from tuning import report
from tuning.plan import SweepPlan, make_plan, save_plan
from tuning.report import TrialRow, best_row, marginal_effects, trial_row


def row(name: str, knobs: dict[str, Any], modes: float, score: float | None = None,
        status: str = "COMPLETED") -> TrialRow:
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


def test_best_row_is_mode_aware() -> None:
    rows = [row("a", {}, 3, score=2.5), row("b", {}, 4, score=3.9), row("c", {}, 1),
            row("d", {}, 2, score=float("nan"))]
    assert best_row(rows, "score", "max").trial == "b"
    assert best_row(rows, "score", "min").trial == "a"
    assert best_row([row("c", {}, 1)], "score", "max") is None


@pytest.mark.parametrize(
    ("results", "errored", "status"),
    [
        ([{"step": 10}, {"step": 40}], False, "COMPLETED"),
        ([{"step": 10}, {"step": 20, "done": True}], False, "STOPPED"),  # a scheduler stopped it
        ([{"step": 10}, {"step": 20}], False, "INCOMPLETE"),  # interrupted sweep
        ([{"step": 10}], True, "ERROR"),
        ([], True, "ERROR"),
    ],
)
def test_trial_status(results: list[dict], errored: bool, status: str) -> None:
    assert trial_row("t", results, total_steps=40, errored=errored).status == status


def test_trial_row_speed_and_knobs() -> None:
    results = [
        {"step": 10, "steps_per_s": 100.0, "config": {"unroll.steps": 1}, "time_total_s": 3.0},
        {"step": 20, "steps_per_s": 300.0, "config": {"unroll.steps": 1}, "time_total_s": 5.5},
    ]
    r = trial_row("t", results, total_steps=20, errored=False)
    assert r.steps_per_s == 200.0 and r.wall_s == 5.5
    assert r.knobs == {"unroll.steps": 1} and r.metrics["step"] == 20


def _result(step: int, modes: float, rkl: float, knobs: dict, done: bool = False,
            speed: float = 100.0) -> dict:
    score = modes - rkl / (1 + rkl)
    return {"step": step, "modes": modes, "hq_pct": 50.0, "reverse_kl": rkl, "score": score,
            "steps_per_s": speed, "config": knobs, "done": done, "time_total_s": step / 10,
            "training_iteration": step // 10}


def make_sweep(tmp_path: Path) -> tuple[SweepPlan, Path]:
    """A finished 4-trial unroll x minibatch sweep folder, as Tune and the sweep leave it."""
    space = tmp_path / "two.yaml"
    space.write_text("grid:\n  unroll.steps: [0, 5]\n  discriminator.minibatch.kernels: [0, 8]\n")
    runs = tmp_path / "runs"
    plan, storage = make_plan("hand", str(space), "ring8",
                              [f"storage.uri={runs}", "train.steps=30", "eval.every=10"])
    save_plan(storage, plan)
    folder = runs / "hand"
    outcomes = {  # trial: (knobs, final modes, final rKL, stopped early, errored)
        "trial_0": ({"unroll.steps": 0, "discriminator.minibatch.kernels": 0}, 3, 0.5, False),
        "trial_1": ({"unroll.steps": 0, "discriminator.minibatch.kernels": 8}, 6, 0.2, False),
        "trial_2": ({"unroll.steps": 5, "discriminator.minibatch.kernels": 0}, 7, 0.1, False),
        "trial_3": ({"unroll.steps": 5, "discriminator.minibatch.kernels": 8}, 1, 1.0, True),
    }
    for name, (knobs, modes, rkl, stopped) in outcomes.items():
        trial = folder / name
        trial.mkdir(parents=True)
        last = 20 if stopped else 30
        lines = [_result(s, modes, rkl, knobs, done=stopped and s == last)
                 for s in range(10, last + 1, 10)]
        (trial / "result.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        (trial / "params.json").write_text(json.dumps(knobs))
    (folder / "runs" / "trial_0").mkdir(parents=True)  # Train runs: not a trial folder
    return plan, folder


def test_report_of_a_sweep_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan, folder = make_sweep(tmp_path)
    assert report.main([str(folder)]) == 0
    out = capsys.readouterr().out
    for name in ("report.md", "trials.csv", "coverage_vs_cost.png", "best.yaml"):
        assert (folder / name).is_file(), name
    text = (folder / "report.md").read_text()
    assert out.startswith(text)
    assert "Trials: 4 (3 completed, 1 stopped)." in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| trial |"))
    assert header == ("| trial | unroll.steps | discriminator.minibatch.kernels | modes | hq_pct "
                      "| reverse_kl | score | step | steps_per_s | wall_s | stopped_early "
                      "| status |")
    first = lines[lines.index(header) + 2]  # best first: 7 - 0.1 / 1.1
    assert first.startswith("| trial_2 | 5 | 0 | 7 | 50 | 0.1 | 6.91 | 30 |")
    assert "| trial_3 | 5 | 8 | 1 | 50 | 1 | 0.5 | 20 | 100 | 2 | yes | STOPPED |" in text
    # Mean modes: unroll 0 -> (3 + 6) / 2, unroll 5 -> (7 + 1) / 2.
    assert "| unroll.steps | 0 | 2 | 4.5 |" in text
    assert "| unroll.steps | 5 | 2 | 4 |" in text
    assert "| discriminator.minibatch.kernels | 8 | 2 | 3.5 |" in text
    with (folder / "trials.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["trial_0", "trial_1", "trial_2", "trial_3"]
    assert table[3]["stopped_early"] == "True" and table[3]["step"] == "20"
    assert (folder / "coverage_vs_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_yaml_loads_and_equals_the_trials_config(tmp_path: Path) -> None:
    plan, folder = make_sweep(tmp_path)
    storage = open_storage(StorageConfig(uri=str(folder)))
    report.write_report(storage, plan, tmp_path / "out")
    best = load_config(str(folder / "best.yaml"))
    expected = plan.trial_config({"unroll.steps": 5, "discriminator.minibatch.kernels": 0,
                                  "name": "hand-best"})
    assert best == expected
    assert (best.unroll.steps, best.discriminator.minibatch.kernels) == (5, 0)
    assert best.train.steps == 30 and best.storage.uri == str(tmp_path / "runs")


def test_report_refuses_a_folder_that_is_not_a_sweep(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(tmp_path)]) == 2
    assert "sweep.json" in capsys.readouterr().err
