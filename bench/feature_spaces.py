"""Which feature space should unlabelled images default to? Random conv net vs raw pixels.

    python -m bench.feature_spaces [--n 898]

Protocol: scikit-learn's digits rendered as 32x32 images (bilinear upsampling; 3 channels, the
grey repeated) in two versions: clean, and jittered by up to 3 px with Gaussian noise of std 20
(0..255), so that pixel distances see shifts a feature space should look past. For each version
the real set is ``--n`` of the digits (even rows; jittered with seed 1), and three "generators"
are scored against it in each space: a good one (``--n`` other digits, the odd rows, jittered
with seed 2), a collapsed one (the same, restricted to digits 0, 1 and 2: 3 of 10 modes) and a
blurred one (the good one through a 5x5 box blur: every mode kept, worse fidelity). Spaces:
``random`` (gan_core.features.RandomFeatures, 128-d) and ``pixels8`` (raw pixels average-pooled
to 8x8, 192-d; all 3,072 raw pixels would make the Frechet distance's covariance square roots
cost minutes). Reported per space: coverage and precision of each generator, and the separation
``coverage(good) - coverage(collapsed)`` (the ideal is 1 - 3/10 = 0.7 when good coverage is 1).
Writes bench/out/feature_spaces.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import Tensor, nn

from bench.common import machine, write_json
from gan_core.datasets import digit_images
from gan_core.features import RandomFeatures, batched
from gan_core.files import to_training
from gan_core.metrics import RealFeatures

SIDE = 32


def _draw(seed: int, jitter: int, noise: float, rows: slice) -> tuple[Tensor, np.ndarray]:
    """Digit images (3, SIDE, SIDE) in [-1, 1] and labels: the ``rows`` of one jittered pass
    over the 1,797 digits (the clean pass when jitter and noise are 0)."""
    chunks = list(digit_images("all", SIDE, 2, jitter, noise, seed))
    pixels = np.concatenate([c[0] for c in chunks])[1797:][rows]
    labels = np.concatenate([c[1] for c in chunks])[1797:][rows]
    return to_training(pixels[:, None]).repeat(1, 3, 1, 1), labels


def _spaces() -> dict[str, object]:
    random_net = batched(RandomFeatures(3, SIDE))
    return {
        "random": random_net,
        "pixels8": lambda x: nn.functional.adaptive_avg_pool2d(x, 8).flatten(1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feature_spaces")
    parser.add_argument("--n", type=int, default=898, help="images a side (<= 898)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for version, (jitter, noise) in {"clean": (0, 0.0), "jittered": (3, 20.0)}.items():
        # Disjoint digits on the two sides (even rows real, odd rows generated), each jittered
        # by its own stream: no generated image is a copy of a real one.
        real, _ = _draw(1, jitter, noise, slice(0, 2 * args.n, 2))
        good, labels = _draw(2, jitter, noise, slice(1, 2 * args.n, 2))
        collapsed = good[torch.from_numpy(labels < 3)]
        blurred = nn.functional.avg_pool2d(good, 5, stride=1, padding=2, count_include_pad=False)
        sets = {"good": good, "collapsed": collapsed, "blurred": blurred}
        results[version] = {}
        for name, embed in _spaces().items():
            t0 = time.perf_counter()
            reference = RealFeatures(embed(real))
            row: dict[str, float] = {}
            for label, fake in sets.items():
                got = reference.score(embed(fake))
                row[f"coverage_{label}"] = got["coverage"]
                row[f"precision_{label}"] = got["precision"]
            row["separation"] = row["coverage_good"] - row["coverage_collapsed"]
            row["seconds"] = time.perf_counter() - t0
            results[version][name] = row
            print(
                f"{version:8s} {name:8s} coverage good {row['coverage_good']:.3f} collapsed "
                f"{row['coverage_collapsed']:.3f} blurred {row['coverage_blurred']:.3f} | "
                f"precision good {row['precision_good']:.3f} blurred "
                f"{row['precision_blurred']:.3f} | separation {row['separation']:.3f}",
                flush=True,
            )
    write_json(
        "feature_spaces",
        {
            "machine": machine(),
            "protocol": (
                f"digits at {SIDE}x{SIDE} RGB, {args.n} real vs {args.n} generated; good = "
                "other draws, collapsed = digits 0-2 only, blurred = 5x5 box blur; clean and "
                "jittered (3 px, noise std 20) versions; spaces random (128-d), pixels8 (8x8 "
                "average pool)"
            ),
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
