"""Tests for tuning.objective: the sweep's score, checked on hand-computed values."""

from __future__ import annotations

import math

import pytest

from tuning.objective import divergence_key, score, with_score


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"modes": 8.0, "reverse_kl": 0.0}, 8.0),  # all modes, perfectly balanced
        ({"modes": 5.0, "reverse_kl": 1.0}, 4.5),  # 5 - 1 / 2
        ({"modes": 3.0, "reverse_kl": 3.0}, 2.25),  # 3 - 3 / 4
        ({"modes": 0.0, "reverse_kl": math.log(8)}, -math.log(8) / (1 + math.log(8))),
        ({"modes": 10.0, "kl": 0.25}, 9.8),  # images use "kl": 10 - 0.25 / 1.25
        ({"modes": 2.0, "reverse_kl": math.nan}, 1.0),  # no finite sample: worst penalty, 1
        ({"modes": 2.0}, 1.0),  # no divergence reported: worst penalty too
    ],
)
def test_score_by_hand(metrics: dict[str, float], expected: float) -> None:
    assert score(metrics) == pytest.approx(expected, rel=1e-12)


def test_one_more_mode_beats_any_divergence() -> None:
    # The penalty stays below 1, so coverage always dominates balance.
    assert score({"modes": 4.0, "reverse_kl": 1e9}) > score({"modes": 3.0, "reverse_kl": 0.0})
    assert score({"modes": 4.0, "reverse_kl": 0.1}) > score({"modes": 4.0, "reverse_kl": 0.2})


def test_no_mode_count_means_no_score() -> None:
    assert score({"d_loss": 1.0, "fd": 3.0}) is None
    assert "score" not in with_score({"d_loss": 1.0})


def test_with_score_adds_without_touching_the_rest() -> None:
    metrics = {"modes": 5.0, "reverse_kl": 1.0, "step": 30}
    out = with_score(metrics)
    assert out == {"modes": 5.0, "reverse_kl": 1.0, "step": 30, "score": 4.5}
    assert "score" not in metrics


def test_divergence_key_prefers_reverse_kl() -> None:
    assert divergence_key({"reverse_kl": 1.0, "kl": 2.0}) == "reverse_kl"
    assert divergence_key({"kl": 2.0}) == "kl"
    assert divergence_key({"modes": 1.0}) is None
