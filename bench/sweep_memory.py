"""Memory over a long sweep: does anything grow from trial to trial, and what does a trial cost?

    python -m bench.sweep_memory [--trials 32] [--steps 60]

Protocol: one private Ray (2 CPUs) started by this process; a FIFO sweep of ``--trials``
ring-8 trials (the ``ring8`` preset's PacGAN-size nets; distinct seeds; ``--steps`` steps,
evaluations at the half and the end, one checkpoint, MLflow on in an SQLite store), 2 at a
time, each trial trained in its own process (the default for one CPU worker). A thread samples
every 0.5 s: the machine's used memory (MemTotal - MemAvailable) and the USS (private pages, no
double counting of shared ones) of every process below this one, the trials' processes
(``ray::ImplicitFunc``) apart. Reported: the baseline (Ray up, before the sweep), the peak, the
per-trial cost (the largest USS of one trial process), and the growth: the machine's used
memory sampled as each trial ends, fitted by a line over trials 5.., per 10 trials, as MiB and
as a share of the machine (bars of issue 17: a trial under 1 GB; growth under 1 % of the
machine per 10 trials). Writes bench/out/sweep_memory.json.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

from ray import tune

from bench.common import machine, private_ray, write_json
from bench.streaming import descendants, meminfo, memory_of, processes

MIB = 1024**2
TRIAL_TITLE = "ray::ImplicitFunc"  # a Tune function trainable's actor


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()

    def sample(self) -> dict[str, float]:
        info = meminfo()
        table = processes()
        total = trial_max = trial_sum = 0
        trials = 0
        for pid in descendants(os.getpid(), table):
            _, uss, _ = memory_of(pid)
            total += uss
            if table[pid][1].startswith(TRIAL_TITLE):
                trials += 1
                trial_sum += uss
                trial_max = max(trial_max, uss)
        return {
            "t": time.perf_counter(),
            "used": info["MemTotal"] - info["MemAvailable"],
            "uss": total,
            "trials": trials,
            "trial_max": trial_max,
            "trial_sum": trial_sum,
        }

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.sample())
            self.stop.wait(0.5)


class Ends(tune.Callback):
    """Samples as each trial ends. Tune pickles its callbacks with the experiment's state, so
    this one holds no thread: it samples through a fresh Sampler."""

    def __init__(self) -> None:
        self.at_end: list[dict[str, float]] = []

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.at_end.append(Sampler().sample())


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    print(__doc__.split("\n\n", 2)[2].strip(), flush=True)
    from tuning import sweep
    from tuning.plan import make_plan

    sampler = Sampler()
    with private_ray("memory") as root:
        try:
            time.sleep(5)  # Ray's own processes settle
            baseline = sampler.sample()
            sampler.start()
            space = root / "seeds.yaml"
            space.write_text(f"grid:\n  seed: {list(range(args.trials))}\n")
            n = args.steps // 2 * 2
            plan, storage = make_plan(
                "memory",
                str(space),
                "ring8",
                [
                    f"train.steps={n}",
                    f"eval.every={n // 2}",
                    f"checkpoint.every={n}",
                    "train.threads=1",
                    f"storage.uri={root / 'runs'}",
                    f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
                ],
                scheduler="fifo",
                max_concurrent=2,
            )
            ends = Ends()
            started = time.perf_counter()
            outcome = sweep.run_sweep(plan, storage, quiet=True, callbacks=[ends])
            wall = time.perf_counter() - started
        finally:
            sampler.stop.set()
    total = meminfo()["MemTotal"]
    samples = sampler.samples
    used_at_end = [s["used"] for s in ends.at_end]
    later = list(range(4, len(used_at_end)))
    growth = (
        slope([float(i) for i in later], [used_at_end[i] for i in later]) * 10
        if len(later) > 1
        else 0.0
    )
    result = {
        "protocol": vars(args),
        "machine": {**machine(), "mem_total_mib": round(total / MIB)},
        "completed": sum(s == "COMPLETED" for s in outcome.statuses.values()),
        "sweep_wall_s": round(wall, 1),
        "baseline_used_mib": round(baseline["used"] / MIB),
        "baseline_uss_mib": round(baseline["uss"] / MIB),
        "peak_used_mib": round(max(s["used"] for s in samples) / MIB),
        "peak_uss_mib": round(max(s["uss"] for s in samples) / MIB),
        "per_trial_uss_mib": round(max(s["trial_max"] for s in samples) / MIB),
        "used_at_trial_end_mib": [round(u / MIB) for u in used_at_end],
        "growth_per_10_trials_mib": round(growth / MIB, 1),
        "growth_per_10_trials_pct_of_machine": round(100 * growth / total, 3),
    }
    for key in (
        "completed",
        "sweep_wall_s",
        "baseline_used_mib",
        "peak_used_mib",
        "baseline_uss_mib",
        "peak_uss_mib",
        "per_trial_uss_mib",
        "growth_per_10_trials_mib",
        "growth_per_10_trials_pct_of_machine",
    ):
        print(f"{key}: {result[key]}")
    print(f"wrote {write_json('sweep_memory', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
