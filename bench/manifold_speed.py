"""The cost of the label-free metrics: one precision/recall/density/coverage evaluation.

    python -m bench.manifold_speed [--real 10000] [--fake 10000] [--dims 2 128] [--repeats 3]

Protocol: ``--real`` real and ``--fake`` generated samples drawn from two Gaussians (shifted by
0.1 std, so every measure is below 1 and every branch runs), for each feature width in
``--dims`` (2: raw coordinates of points; 128: the label classifier's penultimate features);
gan_core.manifold with its default k (3 for precision/recall, 5 for density/coverage) and
block size, float32, on this process's torch threads (``--threads``, default 1: what one Ray
worker gets on a 2-core machine). Timed separately: the real side (its k-NN balls, computed once
per run) and one scoring of a generated set (every evaluation); median of ``--repeats``.
Writes bench/out/manifold_speed.json.

    python -m bench.manifold_speed --demo-eval [--repeats 3]

The cost in a default run instead: the demo config (ring8_pacgan, its ``eval.samples`` and
real reference), one full ``GanRun.evaluate`` (generating the samples included) with the mode
metrics only, as before, and with fd, precision, recall, density and coverage added; the real
side (reference draw, Gaussian fit, k-NN balls) timed once. The share of the demo's wall time
counts one real side plus ``train.steps / eval.every`` evaluations' extra against DEMO_WALL_S,
the demo's measured wall time on this host. Writes bench/out/manifold_eval_cost.json.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import machine, median, table, write_json
from gan_core.manifold import BLOCK_ROWS, DC_K, PR_K, RealManifold


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return median(times), result


# The demo (make demo: ring8_pacgan, 6,000 steps, an evaluation every 1,000) on this host.
DEMO_WALL_S = 338.0


def demo_eval(repeats: int) -> dict[str, object]:
    """One evaluation of the demo config with and without the label-free metrics."""
    # Imported here: the speed protocol above needs no GAN.
    from gan_core import loop
    from gan_core.config import load_config
    from gan_core.metrics import SampleEvaluator

    cfg = load_config("ring8_pacgan", ["train.threads=1"])
    run = loop.GanRun(cfg)
    started = time.perf_counter()
    real = run.real_reference()[0]
    with_metrics = SampleEvaluator(cfg.data.name, real)
    real_side_s = time.perf_counter() - started
    modes_only = SampleEvaluator(cfg.data.name)

    def evaluate(evaluator: SampleEvaluator) -> dict[str, float]:
        run._evaluator = evaluator  # what GanRun.evaluate builds at its first call
        return run.evaluate()

    before_s, before = _timed(lambda: evaluate(modes_only), repeats)
    after_s, after = _timed(lambda: evaluate(with_metrics), repeats)
    evals = cfg.train.steps // cfg.eval.every
    extra_s = real_side_s + evals * (after_s - before_s)
    return {
        "config": cfg.name,
        "eval_samples": cfg.eval.samples,
        "reference_samples": len(real),
        "evaluations_per_run": evals,
        "eval_modes_only_s": before_s,
        "eval_with_new_metrics_s": after_s,
        "real_side_once_s": real_side_s,
        "extra_per_run_s": extra_s,
        "demo_wall_s": DEMO_WALL_S,
        "share_of_demo_wall_pct": 100 * extra_s / DEMO_WALL_S,
        "metrics_before": sorted(before),
        "metrics_after": sorted(after),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.manifold_speed")
    parser.add_argument("--real", type=int, default=10_000)
    parser.add_argument("--fake", type=int, default=10_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--demo-eval", action="store_true", help="the cost in a default run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.demo_eval:
        result = demo_eval(args.repeats)
        for key, value in result.items():
            print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
        # Other processes share the cores: their load is part of what these times mean.
        payload = {
            "machine": machine(),
            "load_average_1_5_15min": os.getloadavg(),
            "args": vars(args),
            "result": result,
        }
        print(f"wrote {write_json('manifold_eval_cost', payload)}")
        return 0
    protocol = (
        f"{args.real} real x {args.fake} generated samples, Gaussian, generated shifted by 0.1 "
        f"std; k = {PR_K} (precision, recall) and {DC_K} (density, coverage); blocks of "
        f"{BLOCK_ROWS} rows; float32; {args.threads} torch thread(s); median of {args.repeats}"
    )
    print(protocol, flush=True)
    rows, results = [], []
    for dims in args.dims:
        gen = torch.Generator().manual_seed(dims)
        real = torch.randn(args.real, dims, generator=gen)
        fake = torch.randn(args.fake, dims, generator=gen) + 0.1
        real_s, manifold = _timed(lambda real=real: RealManifold(real), args.repeats)
        score_s, scores = _timed(lambda m=manifold, f=fake: m.score(f), args.repeats)
        results.append({"dims": dims, "real_side_s": real_s, "score_s": score_s, **scores})
        rows.append([dims, real_s, score_s, *(scores[k] for k in sorted(scores))])
        print(f"  dims {dims}: real side {real_s:.2f} s, one scoring {score_s:.2f} s", flush=True)
    print(
        table(
            ["dims", "real side s", "one scoring s", "coverage", "density", "precision", "recall"],
            rows,
        )
    )
    payload = {"protocol": protocol, "machine": machine(), "args": vars(args), "results": results}
    print(f"wrote {write_json('manifold_speed', payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
