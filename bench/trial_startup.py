"""What a Tune trial costs besides its training: a Ray Train job per trial vs the trial's process.

    python -m bench.trial_startup [--trials 4] [--steps 10]

Protocol: one private Ray (2 CPUs); two FIFO sweeps of ``--trials`` ring-8 trials each (the
``ring8`` preset's PacGAN-size nets, ``--steps`` steps, one evaluation and one checkpoint at
the end, MLflow on in an SQLite store, one trial at a time), identical but for
``--trial-runner``: ``train`` (every trial a Ray Train job with one worker: controller, worker
group, placement group) and ``process`` (the trial trains in its own process). A Tune callback
on the driver timestamps each trial's start, first report and end. Reported per runner, as
medians over trials: start-up (trial start to its first report, minus the training that report
covers at the trial's own steps/s), teardown (last report to the trial's end: model logging
included, the same in both), and the sweep's wall time per trial. Writes
bench/out/trial_startup.json. The two runners train the same steps; their difference is what a
Train job costs a trial.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ray import tune

from bench.common import machine, median, private_ray, table, write_json


class Clock(tune.Callback):
    """Driver-side timestamps of each trial's start, first report and end."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.first: dict[str, tuple[float, dict[str, Any]]] = {}
        self.last: dict[str, float] = {}
        self.end: dict[str, float] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.start[str(trial)] = time.perf_counter()

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        now = time.perf_counter()
        self.first.setdefault(str(trial), (now, dict(result)))
        self.last[str(trial)] = now

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.end[str(trial)] = time.perf_counter()


def run_sweep(runner: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from tuning import sweep
    from tuning.plan import make_plan

    space = root / f"{runner}.yaml"
    # Distinct seeds, so the trials are separate grid points of one space.
    space.write_text(f"grid:\n  seed: {list(range(args.trials))}\n")
    overrides = [
        f"train.steps={args.steps}",
        f"eval.every={args.steps}",
        f"checkpoint.every={args.steps}",
        "train.threads=1",
        f"storage.uri={root / 'runs'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
    ]
    plan, storage = make_plan(
        f"startup-{runner}",
        str(space),
        "ring8",
        overrides,
        scheduler="fifo",
        max_concurrent=1,
        trial_runner=runner,
    )
    clock = Clock()
    started = time.perf_counter()
    outcome = sweep.run_sweep(plan, storage, quiet=True, callbacks=[clock])
    wall = time.perf_counter() - started
    startup, teardown = [], []
    for trial, begun in clock.start.items():
        first_at, result = clock.first[trial]
        training = result["step"] / result["steps_per_s"] if result.get("steps_per_s") else 0.0
        startup.append(first_at - begun - training)
        teardown.append(clock.end[trial] - clock.last[trial])
    return {
        "runner": runner,
        "trials": len(clock.start),
        "statuses": sorted(outcome.statuses.values()),
        "startup_s": round(median(startup), 2),
        "startup_each_s": [round(v, 2) for v in startup],
        "teardown_s": round(median(teardown), 2),
        "wall_per_trial_s": round(wall / max(1, len(clock.start)), 2),
        "sweep_wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    print(__doc__.split("\n\n", 2)[2].strip(), flush=True)
    with private_ray("startup") as root:
        rows = [run_sweep(runner, args, root) for runner in ("train", "process")]
    by = {row["runner"]: row for row in rows}
    saved = {
        key: round(by["train"][key] - by["process"][key], 2)
        for key in ("startup_s", "teardown_s", "wall_per_trial_s")
    }
    print(
        table(
            ["runner", "start-up s", "teardown s", "wall per trial s", "sweep wall s"],
            [
                [
                    r["runner"],
                    r["startup_s"],
                    r["teardown_s"],
                    r["wall_per_trial_s"],
                    r["sweep_wall_s"],
                ]
                for r in rows
            ],
        )
    )
    print(f"a Train job per trial costs (train - process): {saved}")
    path = write_json(
        "trial_startup",
        {
            "protocol": vars(args),
            "machine": machine(),
            "runners": rows,
            "train_minus_process": saved,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
