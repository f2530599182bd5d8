"""Tests for gan_core.metrics against hand-computed values of the docs/PROTOCOLS.md protocols."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gan_core import metrics as metrics_module
from gan_core.classifier import DigitClassifier
from gan_core.data import StackedDigitsDataset, grid25, load_digits, ring8
from gan_core.features import digit_features
from gan_core.manifold import prdc
from gan_core.metrics import (
    RealFeatures,
    SampleEvaluator,
    digits_metrics,
    evaluate_samples,
    frechet_distance,
    image_frechet_distance,
    mixture_metrics,
    stacked_digits_metrics,
)

RING = ring8()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def on_centers(counts: list[int]) -> torch.Tensor:
    """counts[m] samples exactly on ring center m."""
    return RING.centers.repeat_interleave(torch.tensor(counts), dim=0)


# --- 2D mixtures ---------------------------------------------------------------------------------


def test_samples_on_three_centers_equal_counts() -> None:
    metrics = mixture_metrics(on_centers([10, 0, 10, 0, 0, 10, 0, 0]), RING.centers, RING.std)
    assert metrics == pytest.approx({"modes": 3, "hq_pct": 100.0, "reverse_kl": math.log(8 / 3)})


def test_unequal_counts_reverse_kl_by_hand() -> None:
    # p = (6/8, 2/8) on two of M = 8 modes: 0.75 log(0.75 * 8) + 0.25 log(0.25 * 8).
    metrics = mixture_metrics(on_centers([6, 2, 0, 0, 0, 0, 0, 0]), RING.centers, RING.std)
    assert metrics["modes"] == 2
    assert metrics["reverse_kl"] == pytest.approx(0.75 * math.log(6) + 0.25 * math.log(2))


def test_far_samples_lower_hq_and_capture_nothing() -> None:
    # (0, 0) is at distance 1 = 100 std from every center: assigned to one, but never HQ.
    samples = torch.cat([on_centers([3, 3, 0, 0, 0, 0, 0, 0]), torch.zeros(4, 2)])
    metrics = mixture_metrics(samples, RING.centers, RING.std)
    assert metrics["hq_pct"] == pytest.approx(60.0)
    assert metrics["modes"] == 2


def test_hq_threshold_is_three_std_euclidean() -> None:
    # Offsets along the diagonal: each coordinate alone is < 3 std only for the first.
    direction = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    inside = RING.centers[0] + 2.9 * RING.std * direction
    outside = RING.centers[1] + 3.1 * RING.std * direction
    metrics = mixture_metrics(torch.stack([inside, outside]), RING.centers, RING.std)
    assert metrics["hq_pct"] == pytest.approx(50.0)
    assert metrics["modes"] == 1


@pytest.mark.parametrize("mixture", [ring8(), grid25()], ids=["ring8", "grid25"])
def test_real_mixture_samples_cover_every_mode(mixture) -> None:
    metrics = mixture_metrics(mixture.sample(2500, gen()), mixture.centers, mixture.std)
    assert metrics["modes"] == mixture.num_modes
    # P(|N(0, std^2 I_2)| < 3 std) = 1 - exp(-9/2) = 98.89 %; 2,500 samples: std. error 0.2 %.
    assert metrics["hq_pct"] == pytest.approx(100 * (1 - math.exp(-4.5)), abs=1.0)
    assert 0 <= metrics["reverse_kl"] < 0.02


def test_non_finite_samples_are_not_hq_and_do_not_crash() -> None:
    samples = torch.cat(
        [
            on_centers([1, 1, 1, 1, 0, 0, 0, 0]),
            torch.tensor([[math.nan, 0.0], [math.nan, math.nan], [math.inf, 1.0]]),
        ]
    )
    metrics = mixture_metrics(samples.numpy(), RING.centers.numpy(), RING.std)
    assert metrics["modes"] == 4
    assert metrics["hq_pct"] == pytest.approx(100 * 4 / 7)
    assert metrics["reverse_kl"] == pytest.approx(math.log(2))  # 4 finite samples on 4 of 8


def test_all_nan_samples() -> None:
    metrics = mixture_metrics(torch.full((5, 2), math.nan), RING.centers, RING.std)
    assert metrics["modes"] == 0 and metrics["hq_pct"] == 0.0
    assert math.isnan(metrics["reverse_kl"])


# --- stacked digits and digits -------------------------------------------------------------------


def first_train_image(digit: int, model: DigitClassifier) -> torch.Tensor:
    images, labels = load_digits("train")
    image = images[labels == digit][0]
    assert model(image[None]).argmax().item() == digit  # precondition: a training example fits
    return image[0]


def test_real_stacked_digits_cover_all_modes(digit_classifier: DigitClassifier) -> None:
    # Held-out digits, so classifier mistakes are included: the metric must still see real
    # data as (nearly) uniform over all 1,000 triples. Expected KL from sampling alone is
    # about 999 / (2 * 26,000) = 0.019.
    samples = StackedDigitsDataset("test").sample(26_000, gen())
    metrics = stacked_digits_metrics(samples, digit_classifier)
    assert metrics["modes"] >= 990
    assert metrics["kl"] < 0.1


def test_one_triple_is_one_mode_with_kl_log_1000(digit_classifier: DigitClassifier) -> None:
    three = first_train_image(3, digit_classifier)
    samples = three.expand(50, 3, 8, 8)
    metrics = stacked_digits_metrics(samples, digit_classifier)
    assert metrics == pytest.approx({"modes": 1, "kl": math.log(1000)})


def test_two_equal_triples_give_kl_log_500(digit_classifier: DigitClassifier) -> None:
    three, seven = first_train_image(3, digit_classifier), first_train_image(7, digit_classifier)
    samples = torch.cat(
        [
            torch.stack([three, three, three]).expand(20, 3, 8, 8),
            torch.stack([seven, three, seven]).expand(20, 3, 8, 8),
        ]
    )
    metrics = stacked_digits_metrics(samples, digit_classifier)
    assert metrics == pytest.approx({"modes": 2, "kl": math.log(500)})


def test_digits_metrics(digit_classifier: DigitClassifier) -> None:
    images, _ = load_digits("test")
    real = digits_metrics(images, digit_classifier)
    assert real["modes"] == 10 and real["kl"] < 0.01  # the split is stratified: ~36 per class
    collapsed = digits_metrics(first_train_image(3, digit_classifier).expand(9, 1, 8, 8))
    assert collapsed == pytest.approx({"modes": 1, "kl": math.log(10)})


def test_digit_metrics_reject_wrong_channel_counts(digit_classifier: DigitClassifier) -> None:
    with pytest.raises(ValueError, match=r"\(4, 1, 8, 8\); expected \(n >= 1, 3, 8, 8\)"):
        stacked_digits_metrics(torch.zeros(4, 1, 8, 8), digit_classifier)
    with pytest.raises(ValueError, match="expected"):
        digits_metrics(torch.zeros(4, 3, 8, 8), digit_classifier)


# --- Frechet distance ----------------------------------------------------------------------------


def test_frechet_identical_features_is_zero() -> None:
    feats = np.random.default_rng(0).normal(size=(2000, 5))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_frechet_one_dimensional_gaussians_by_hand() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    # (0 - 3)^2 + 1 + 1 - 2 sqrt(1 * 1) = 9
    assert frechet_distance(rng.normal(0, 1, n), rng.normal(3, 1, n)) == pytest.approx(9, abs=0.05)
    # (0 - 3)^2 + 1 + 4 - 2 sqrt(1 * 4) = 10
    assert frechet_distance(rng.normal(0, 1, n), rng.normal(3, 2, n)) == pytest.approx(10, abs=0.1)


def test_frechet_diagonal_covariances_by_hand() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(100_000, 2)) * [1.0, 2.0]  # cov diag(1, 4)
    b = rng.normal(size=(100_000, 2)) * [2.0, 1.0]  # cov diag(4, 1)
    # 0 + (1 + 4) + (4 + 1) - 2 (sqrt(4) + sqrt(4)) = 2
    assert frechet_distance(a, b) == pytest.approx(2.0, abs=0.05)


def test_frechet_shift_invariance_and_symmetry() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3000, 4)), rng.normal(0.5, 1.5, size=(3000, 4))
    shift = np.array([10.0, -3.0, 0.5, 7.0])
    assert frechet_distance(a + shift, b + shift) == pytest.approx(frechet_distance(a, b))
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b))
    # Same covariance: only the mean term is left, ||shift||^2.
    assert frechet_distance(a + shift, a) == pytest.approx(shift @ shift, rel=1e-6)


def test_frechet_collapsed_features_are_finite() -> None:
    # A constant (collapsed) set has a singular covariance: 0 + 0 + Tr(I_2) - ~0 = 2.
    b = np.random.default_rng(3).normal(size=(50_000, 2))
    assert frechet_distance(np.zeros((100, 2)), b) == pytest.approx(2.0, abs=0.05)


def test_image_frechet_distance_separates_real_from_collapsed(
    digit_classifier: DigitClassifier,
) -> None:
    data = StackedDigitsDataset("all")
    real_a, real_b = data.sample(1000, gen(0)), data.sample(1000, gen(1))
    collapsed = first_train_image(3, digit_classifier).expand(1000, 3, 8, 8)
    same = image_frechet_distance(real_a, real_a, digit_classifier)
    between_real = image_frechet_distance(real_a, real_b, digit_classifier)
    to_collapsed = image_frechet_distance(real_a, collapsed, digit_classifier)
    assert same == pytest.approx(0.0, abs=1e-4)
    assert 0 < between_real < 0.1 * to_collapsed


# --- dispatch ------------------------------------------------------------------------------------


def test_evaluate_samples_dispatches_mixtures() -> None:
    grid = grid25()
    samples = grid.sample(2500, gen())
    # Without a real reference: the mode protocol alone.
    assert evaluate_samples("grid25", samples) == mixture_metrics(samples, grid.centers, grid.std)
    assert evaluate_samples("ring8", on_centers([5] * 8).numpy())["modes"] == 8


def test_evaluate_samples_stacked_digits_with_real(
    digit_classifier: DigitClassifier,
) -> None:
    data = StackedDigitsDataset("all")
    fake, real = data.sample(1000, gen(0)), data.sample(1000, gen(1))
    metrics = evaluate_samples("stacked_digits", fake, real=real)
    expected = stacked_digits_metrics(fake, digit_classifier)
    expected["fd"] = image_frechet_distance(real, fake, digit_classifier)
    # The k-NN measures in the same features: each channel's 64, concatenated.
    expected.update(prdc(digit_features(real), digit_features(fake)))
    assert metrics == pytest.approx(expected)
    assert metrics["coverage"] > 0.8 and metrics["precision"] > 0.8
    assert evaluate_samples("digits", load_digits("test")[0])["modes"] == 10


def test_evaluate_samples_rejects_unknown_names_and_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'parquet'.*allowed: \('ring8', 'grid25'"):
        evaluate_samples("parquet", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"samples for 'ring8' have shape \(3, 3\); expected"):
        evaluate_samples("ring8", torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"shape \(0, 2\)"):
        evaluate_samples("grid25", np.zeros((0, 2)))


# --- label-free measures on the mixtures (raw coordinates) ----------------------------------------


def _ring_draws(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return RING.sample_with_labels(n, gen(seed))


def test_ring8_against_its_own_draws_scores_near_one() -> None:
    real = RING.sample(1500, gen(0))
    got = evaluate_samples("ring8", RING.sample(1500, gen(1)), real=real)
    assert got["modes"] == 8
    for key in ("precision", "recall", "coverage"):
        assert got[key] > 0.9, (key, got)
    assert 0.8 < got["density"] < 1.2
    assert got["fd"] < 0.01
    same = evaluate_samples("ring8", real, real=real)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["fd"] == pytest.approx(0.0, abs=1e-9)


def test_ring8_three_modes_cover_three_eighths_and_off_mode_samples_have_no_precision() -> None:
    real = RING.sample(2000, gen(0))
    draws, labels = _ring_draws(6000, 1)
    collapsed = evaluate_samples("ring8", draws[labels < 3][:1500], real=real)
    assert collapsed["modes"] == 3
    assert collapsed["coverage"] == pytest.approx(3 / 8, abs=0.04)
    assert collapsed["precision"] > 0.95
    off = evaluate_samples("ring8", 0.05 * torch.randn(500, 2, generator=gen(2)), real=real)
    assert off["modes"] == 0 and off["precision"] == 0.0 and off["coverage"] == 0.0


def test_the_evaluator_builds_the_real_side_once(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []

    class Counting(metrics_module.RealManifold):
        def __init__(self, real: torch.Tensor) -> None:
            built.append(len(real))
            super().__init__(real)

    monkeypatch.setattr(metrics_module, "RealManifold", Counting)
    real = RING.sample(600, gen(0))
    evaluator = SampleEvaluator("ring8", real)
    first = evaluator(RING.sample(400, gen(1)))
    second = evaluator(RING.sample(400, gen(2)))
    assert built == [600]
    assert first["coverage"] > 0.8 and second["coverage"] > 0.8 and first != second


def test_duplicate_real_rows_are_dropped_before_the_balls() -> None:
    # Each of 40 ring samples drawn 7 times (a reference sampled with replacement): with the
    # duplicates every 5th-neighbour radius would be 0 and nothing but exact copies covered.
    distinct = RING.sample(40, gen(0))
    reference = RealFeatures(distinct.repeat(7, 1))
    assert len(reference.manifold.real) == 40 and bool((reference.manifold.dc_radii > 0).all())
    got = reference.score(distinct + 1e-4)
    assert got["coverage"] == 1.0 and got["precision"] == 1.0


def test_non_finite_samples_score_nan_fd_and_count_as_in_no_ball() -> None:
    real = RING.sample(500, gen(0))
    fake = RING.sample(400, gen(1))
    fake[:100] = float("nan")
    got = evaluate_samples("ring8", fake, real=real)
    assert math.isnan(got["fd"])
    assert got["precision"] == pytest.approx(0.75, abs=0.05)  # 300 of 400 samples are finite
    everything_nan = evaluate_samples("ring8", torch.full((50, 2), float("nan")), real=real)
    assert everything_nan["coverage"] == 0.0 and everything_nan["precision"] == 0.0
