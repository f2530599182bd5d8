"""Does label-free coverage track mode coverage? (modes, coverage) pairs from short GAN runs.

    python -m bench.coverage_vs_modes [--steps 1200] [--every 200] [--configs ring8 ...]

Protocol: each config of ``--configs`` (presets: the plain GAN, which collapses, and remedies
such as PacGAN and unrolled GANs) trains ``--steps`` steps in one process with gan_core.loop (no
Ray), evaluated every ``--every`` steps with the preset's ``eval.samples``; ``train.steps`` is
overridden, so the cosine learning-rate decay runs over the short budget. Every evaluation gives
one (modes, coverage) pair; the mode counts come from the mixtures' known centres, coverage from
k-NN balls around a real reference sample with no labels (gan_core.manifold). Per data set, the
Pearson and Spearman correlations between the two over all evaluations of all its configs.
Writes bench/out/coverage_vs_modes.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import machine, write_json
from gan_core.config import load_config
from gan_core.loop import GanRun

CONFIGS = ("ring8", "ring8_pacgan", "ring8_unrolled", "grid25", "grid25_best")
# Unrolled GANs cost ~6x a plain step (5 unrolled D steps with second-order gradients).
STEP_SHARE = {"ring8_unrolled": 0.25}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank (what Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def correlations(modes: list[float], coverage: list[float]) -> dict[str, float]:
    """Pearson's r and Spearman's rho of the pairs (NaN when either side is constant)."""
    a, b = np.asarray(modes, float), np.asarray(coverage, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": len(a)}
    pearson = float(np.corrcoef(a, b)[0, 1])
    spearman = float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])
    return {"pearson": pearson, "spearman": spearman, "n": len(a)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coverage_vs_modes")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runs, started = [], time.perf_counter()
    for name in args.configs:
        steps = max(args.every, int(args.steps * STEP_SHARE.get(name, 1.0)))
        every = min(args.every, steps)
        cfg = load_config(
            name,
            [f"train.steps={steps}", f"eval.every={every}", f"seed={args.seed}", "train.threads=1"],
        )
        t0 = time.perf_counter()
        history = GanRun(cfg).run()
        wall = time.perf_counter() - t0
        points = [
            {k: h[k] for k in ("step", "modes", "hq_pct", "coverage", "precision", "recall", "fd")}
            for h in history
        ]
        runs.append({"config": name, "data": cfg.data.name, "wall_s": wall, "evals": points})
        print(
            f"{name}: {steps} steps in {wall:.0f} s; (modes, coverage): "
            + ", ".join(f"({p['modes']:.0f}, {p['coverage']:.2f})" for p in points),
            flush=True,
        )
    per_data: dict[str, dict[str, float]] = {}
    for data_name in dict.fromkeys(r["data"] for r in runs):
        pairs = [p for r in runs if r["data"] == data_name for p in r["evals"]]
        per_data[data_name] = correlations(
            [p["modes"] for p in pairs], [p["coverage"] for p in pairs]
        )
        c = per_data[data_name]
        print(
            f"{data_name}: Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f} "
            f"over {c['n']} evaluations",
            flush=True,
        )
    wall = time.perf_counter() - started
    print(f"total {wall:.0f} s")
    write_json(
        "coverage_vs_modes",
        {
            "machine": machine(),
            "protocol": (
                f"configs {args.configs}, {args.steps} steps each (x{STEP_SHARE} for the costly "
                f"ones), an evaluation every {args.every} steps with each preset's eval.samples, "
                f"seed {args.seed}, one torch thread, gan_core.loop without Ray"
            ),
            "correlations": per_data,
            "runs": runs,
            "wall_s": wall,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
