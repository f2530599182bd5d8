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
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.manifold_speed")
    parser.add_argument("--real", type=int, default=10_000)
    parser.add_argument("--fake", type=int, default=10_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
