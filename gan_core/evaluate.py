"""Score samples from any GAN with this project's protocols, from the command line.

    python -m gan_core.evaluate --data ring8 --samples fake.npy [--real real.npy]

prints the metrics as one JSON object on stdout. Samples are a .npy array: ``(n, 2)`` points for
ring8 / grid25, ``(n, 3, 8, 8)`` for stacked_digits, ``(n, 1, 8, 8)`` for digits (images in
[-1, 1]); ``--real`` images of the same shape add the Frechet distance "fd". Problems with the
inputs print one line on stderr naming the bad value and what is expected, and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from gan_core.metrics import DATA_NAMES, evaluate_samples

USAGE_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gan_core.evaluate", description=__doc__.splitlines()[0]
    )
    # argparse itself rejects an unknown --data with the allowed names and exit code 2.
    parser.add_argument("--data", required=True, choices=DATA_NAMES, help="evaluation protocol")
    parser.add_argument("--samples", required=True, help="generated samples, a .npy file")
    parser.add_argument("--real", help="real images, a .npy file (image data only): adds 'fd'")
    args = parser.parse_args(argv)
    try:
        samples = _load(args.samples, "--samples")
        real = None if args.real is None else _load(args.real, "--real")
        metrics = evaluate_samples(args.data, samples, real)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    print(json.dumps(metrics))
    return 0


def _load(path: str, flag: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{flag} {path!r} cannot be read as a .npy array ({exc})") from None
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{flag} {path!r} holds {array.dtype} values; expected numbers")
    return array.astype(np.float32, copy=False)


if __name__ == "__main__":
    sys.exit(main())
