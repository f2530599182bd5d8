"""The single number a sweep optimizes: mode coverage first, distribution balance second.

    score = modes - d / (1 + d),   d = reverse_kl (2D mixtures) or kl (digit images)

``modes`` counts captured modes (an integer) and ``d / (1 + d)`` lies in [0, 1), so any trial
that captures one more mode scores higher whatever its KL, and among trials with equal coverage
the one closer to uniform over the modes wins. Maximize it (the default ``--metric score --mode
max``). A KL that is not finite (no finite sample) counts as the worst, a penalty of 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

DEFAULT_METRIC = "score"
DEFAULT_MODE = "max"
# Keys of the divergence from uniform over the modes, by data kind; the first present is used.
DIVERGENCE_KEYS = ("reverse_kl", "kl")


def divergence_key(metrics: Mapping[str, Any]) -> str | None:
    """``reverse_kl`` for 2D mixtures, ``kl`` for images, None when neither was reported."""
    return next((key for key in DIVERGENCE_KEYS if key in metrics), None)


def score(metrics: Mapping[str, Any]) -> float | None:
    """The score above, or None when the metrics hold no mode count (e.g. Parquet data)."""
    if metrics.get("modes") is None:
        return None
    key = divergence_key(metrics)
    divergence = float(metrics[key]) if key is not None else math.inf
    penalty = divergence / (1.0 + divergence) if math.isfinite(divergence) else 1.0
    return float(metrics["modes"]) - penalty


def with_score(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``metrics`` with ``score`` added when it can be computed."""
    out = dict(metrics)
    value = score(metrics)
    if value is not None:
        out[DEFAULT_METRIC] = value
    return out
