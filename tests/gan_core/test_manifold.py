"""Precision, recall, density and coverage: hand-made sets with known answers, then ring-8."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gan_core.data import ring8 as Ring8
from gan_core.manifold import RealManifold, kth_neighbour_distances, prdc


def test_kth_neighbour_distances_by_hand() -> None:
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    radii = kth_neighbour_distances(x, (1, 2), block=3)  # a block boundary inside the set
    assert radii[0].tolist() == [1.0, 1.0, 2.0, 4.0]
    assert radii[1].tolist() == [3.0, 2.0, 3.0, 6.0]


def test_a_duplicate_is_a_neighbour_at_distance_zero_but_a_row_is_not_its_own() -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    (first,) = kth_neighbour_distances(x, (1,))
    assert first.tolist() == [0.0, 0.0, 5.0]


def test_four_scores_on_a_hand_made_pair_of_sets() -> None:
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    # k = 1: every real ball has radius 1. 0.5 lies in the balls of 0 and 1, 10 in none:
    # precision 1/2; density (1/k) * (2 + 0) / 2 fakes = 1; balls of 0 and 1 used: coverage 2/4.
    # Fake radius (k = 1): 9.5 each; every real point is within 9.5 of 0.5: recall 1.
    got = prdc(real, fake, pr_k=1, dc_k=1)
    assert got == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


def test_identical_sets_score_one_and_density_k_plus_one_over_k() -> None:
    real = Ring8().sample(2000, torch.Generator().manual_seed(0))
    got = prdc(real, real.clone())
    assert got["precision"] == 1.0 and got["recall"] == 1.0 and got["coverage"] == 1.0
    # Each real ball holds its centre and its k nearest neighbours: k + 1 fakes per ball, so
    # density = N (k + 1) / (k N) = 6 / 5 for identical sets (ties at a radius add a little).
    assert got["density"] == pytest.approx(6 / 5, abs=0.01)


def test_two_draws_of_one_distribution_score_near_one() -> None:
    ring = Ring8()
    real = ring.sample(3000, torch.Generator().manual_seed(0))
    fake = ring.sample(3000, torch.Generator().manual_seed(1))
    got = prdc(real, fake)
    for key in ("precision", "recall", "coverage"):
        assert got[key] > 0.9, (key, got)
    assert 0.8 < got["density"] < 1.2


def test_three_of_eight_modes_cover_three_eighths_at_full_precision() -> None:
    ring = Ring8()
    real = ring.sample(4000, torch.Generator().manual_seed(0))
    draw, labels = ring.sample_with_labels(16000, torch.Generator().manual_seed(1))
    fake = draw[labels < 3][:3000]  # a generator that collapsed onto modes 0, 1 and 2
    got = prdc(real, fake)
    assert got["precision"] > 0.95
    assert got["coverage"] == pytest.approx(3 / 8, abs=0.04)
    assert got["recall"] == pytest.approx(3 / 8, abs=0.06)


def test_samples_off_every_mode_have_no_precision_nor_coverage() -> None:
    real = Ring8().sample(2000, torch.Generator().manual_seed(0))
    # The ring's centre, where no mode is (modes sit on the unit circle with std 0.01).
    fake = 0.05 * torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    got = prdc(real, fake)
    assert got["precision"] == 0.0 and got["density"] == 0.0 and got["coverage"] == 0.0
    assert got["recall"] == 0.0


def test_the_block_size_does_not_change_the_answer() -> None:
    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(300, 4, generator=gen), torch.randn(200, 4, generator=gen) + 0.3
    whole = prdc(real, fake, block=10_000)
    assert prdc(real, fake, block=7) == whole
    manifold = RealManifold(real, block=64)
    assert manifold.score(fake) == whole
    # The real side is computed once: scoring twice reuses the same balls.
    assert manifold.score(fake) == whole


def test_images_are_flattened_to_one_feature_vector_per_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(100, 1, 4, 4, generator=gen)
    assert prdc(real, real.clone())["coverage"] == 1.0


@pytest.mark.parametrize(
    ("real", "fake", "message"),
    [
        (np.zeros((0, 2)), np.zeros((5, 2)), "real samples: no samples"),
        (np.zeros((10, 2)), np.full((5, 2), math.nan), "generated samples: NaN or Inf"),
        (np.random.rand(10, 2), np.zeros((5, 3)), "generated samples have 3 features"),
        (np.random.rand(4, 2), np.zeros((5, 2)), "4 samples: a k-th neighbour with k = 5"),
    ],
)
def test_bad_sets_are_refused_with_what_is_wrong(
    real: np.ndarray, fake: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        prdc(real, fake)
