"""A sweep trial's training speed against the same config trained alone by the plain loop.

    python -m bench.trial_speed [--steps 120]

Protocol: the ``ring8`` preset (PacGAN-size nets) at batch 96, one torch thread per run. Knobs:
``unroll.steps`` 0 / 1 / 5 (one generator) and ``generators.count`` 4 / 8 (no unrolling).
(a) Alone: each config trained by ``gan_core.loop.GanRun`` in this process, one at a time, on an
otherwise idle machine. (b) Swept: each config as a FIFO sweep of two samples of it on a private
2-CPU Ray, 2 trials at a time, each trial trained in its own process (one CPU).
Every run trains ``--steps`` steps of look-ahead-free configs, scaled down by the look-ahead
(``steps / max(1, k)``, at least 20), and evaluates at the half and at the end; its speed is
the last evaluation's ``steps_per_s`` (training only, evaluation excluded). Reported per config:
both speeds and their ratio (bar of issue 17: >= 0.85). Writes bench/out/trial_speed.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, private_ray, table, write_json

KNOBS: dict[str, list[int]] = {"unroll.steps": [0, 1, 5], "generators.count": [4, 8]}


def steps_for(knob: str, value: int, steps: int) -> int:
    look_ahead = value if knob == "unroll.steps" else 0
    return max(20, steps // max(1, look_ahead)) // 2 * 2  # even: one evaluation at the half


def overrides(knob: str, value: int, steps: int) -> list[str]:
    n = steps_for(knob, value, steps)
    return [
        f"train.steps={n}",
        f"eval.every={n // 2}",
        f"checkpoint.every={n}",
        "train.threads=1",
        "train.batch_size=96",  # a multiple of every generator count
    ]


def alone(knob: str, value: int, steps: int) -> float:
    from gan_core.config import load_config
    from gan_core.loop import GanRun

    torch.set_num_threads(1)
    cfg = load_config("ring8", [*overrides(knob, value, steps), f"{knob}={value}"])
    run = GanRun(cfg)
    run.run()
    return float(run.history[-1]["steps_per_s"])


def swept(knob: str, values: list[int], steps: int, root: Path) -> dict[int, float]:
    from ray.tune import ExperimentAnalysis

    from tuning import sweep
    from tuning.plan import make_plan

    space = root / f"{knob}.yaml"
    # One sweep per value, two samples of it at a time: each trial has a core's neighbour.
    out: dict[int, float] = {}
    for value in values:
        space.write_text(f"grid:\n  {knob}: [{value}]\n")
        name = f"speed-{knob.replace('.', '-')}-{value}"
        plan, storage = make_plan(
            name,
            str(space),
            "ring8",
            [
                *overrides(knob, value, steps),
                f"storage.uri={root / 'runs'}",
                "tracking.enabled=false",
            ],
            scheduler="fifo",
            max_concurrent=2,
            num_samples=2,
        )
        sweep.run_sweep(plan, storage, quiet=True)
        analysis = ExperimentAnalysis(str(root / "runs" / name))
        speeds = [float(t.last_result["steps_per_s"]) for t in analysis.trials]
        out[value] = sum(speeds) / len(speeds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args(argv)
    print(__doc__.split("\n\n", 2)[2].strip(), flush=True)
    rows: list[dict[str, Any]] = []
    for knob, values in KNOBS.items():
        for value in values:
            speed = alone(knob, value, args.steps)
            rows.append({"knob": knob, "value": value, "alone_steps_per_s": round(speed, 2)})
            print(f"alone {knob}={value}: {speed:.2f} steps/s", flush=True)
    with private_ray("speed") as root:
        for knob, values in KNOBS.items():
            for value, speed in swept(knob, values, args.steps, root).items():
                row = next(r for r in rows if r["knob"] == knob and r["value"] == value)
                row["trial_steps_per_s"] = round(speed, 2)
                row["ratio"] = round(speed / row["alone_steps_per_s"], 3)
    print(
        table(
            ["knob", "value", "alone steps/s", "trial steps/s (2 at a time)", "ratio"],
            [
                [r["knob"], r["value"], r["alone_steps_per_s"], r["trial_steps_per_s"], r["ratio"]]
                for r in rows
            ],
        )
    )
    path = write_json("trial_speed", {"protocol": vars(args), "machine": machine(), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
