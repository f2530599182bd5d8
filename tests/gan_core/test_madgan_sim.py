"""MAD-GAN-Sim: the similarity hinge by hand, its extremes, the shared noise, D's features,
off = bit-identical, and the configs that refuse it."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gan_core.config import PRESET_DIR, ConfigError, load_config
from gan_core.nets import build_discriminator
from gan_core.objectives import madgan_similarity
from gan_core.steps import GanModel, build_model, shared_noise, similarity_term, train_step

# The tiny nets of the loop tests (batch 8, as test_steps' batches).
from tests.gan_core.test_loop import TINY
from tests.gan_core.test_steps import BATCH, POINTS


def make(*overrides: str, preset: str = "ring8_madgan", seed: int = 0) -> GanModel:
    torch.manual_seed(seed)
    return build_model(load_config(preset, [*TINY, *overrides]), POINTS)


def run_steps(model: GanModel, n: int) -> list[dict[str, float]]:
    data = torch.Generator().manual_seed(1)
    rng = torch.Generator().manual_seed(2)
    return [train_step(model, lambda: torch.randn(BATCH, 2, generator=data), rng) for _ in range(n)]


# --- the term on hand-made features ---------------------------------------------------------


def hand_similarity(features: list[list[list[float]]], prob: list[list[float]]) -> float:
    """mean over ordered pairs i != j and samples k of max(0, cos_ijk - p_ik + p_jk)."""
    n, m = len(features), len(features[0])
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            for k in range(m):
                a, b = features[i][k], features[j][k]
                cos = sum(x * y for x, y in zip(a, b, strict=True)) / (
                    math.hypot(*a) * math.hypot(*b)
                )
                total += max(0.0, cos - prob[i][k] + prob[j][k])
    return total / (n * (n - 1) * m)


def test_term_equals_the_hand_formula() -> None:
    features = [
        [[1.0, 0.0], [3.0, 4.0]],
        [[1.0, 1.0], [-4.0, 3.0]],
        [[0.0, 2.0], [3.0, 4.0]],
    ]
    prob = [[0.9, 0.2], [0.1, 0.5], [0.4, 0.6]]
    got = madgan_similarity(torch.tensor(features), torch.tensor(prob))
    # By hand, the 12 (i, j, k) terms: cosines are 1/sqrt(2), 0 or 1; the violated ones sum to
    # 0.3 + 1.4 + (r2 + 0.8) + (r2 + 0.3) + 0.1 + 0.5 + 0.6 + (r2 - 0.3), r2 = 1/sqrt(2)
    # ((0, 1, 0), for one, is 0.7071 - 0.9 + 0.1 < 0: met).
    by_hand = (3.7 + 3 / math.sqrt(2)) / 12
    assert hand_similarity(features, prob) == pytest.approx(by_hand, abs=1e-12)
    assert got.item() == pytest.approx(hand_similarity(features, prob), abs=1e-6)


def test_identical_generators_score_one_separated_ones_zero() -> None:
    same = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    identical = same.expand(4, 2, 2)
    prob = torch.full((4, 2), 0.37)
    assert madgan_similarity(identical, prob).item() == pytest.approx(1.0, abs=1e-6)
    # Orthogonal (pair 0-1) and opposite (pair 0-2, 1-3 ...) features, equally scored: no
    # constraint is violated.
    separated = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, 0.0]], [[0.0, -1.0]]])
    assert madgan_similarity(separated, torch.full((4, 1), 0.5)).item() == 0.0
    assert madgan_similarity(same.unsqueeze(0), prob[:1]).item() == 0.0  # one generator


def test_each_generator_raises_only_its_own_score() -> None:
    # Identical samples, both constraints violated by 1: a generator's gradient comes from its
    # own constraint (-1/2 on its score), none from the other's, where it is a constant.
    features = torch.ones(2, 1, 3, requires_grad=True)
    prob = torch.full((2, 1), 0.5, requires_grad=True)
    madgan_similarity(features, prob).backward()
    assert prob.grad is not None and torch.equal(prob.grad, torch.full((2, 1), -0.5))


# --- D's features and the shared noise ------------------------------------------------------


def test_features_are_the_penultimate_layer_and_leave_outputs_alone() -> None:
    cfg = load_config("ring8_madgan", [*TINY, "discriminator.minibatch.kernels=3"])
    torch.manual_seed(0)
    d = build_discriminator(cfg, POINTS)
    x = torch.randn(6, 2)
    h = d.features(x)
    assert h.shape == (6, 16 + 3)  # body width + minibatch kernels
    assert torch.equal(d(x), d.head(h))


def test_shared_noise_is_one_draw_for_every_generator() -> None:
    model = make()
    z = shared_noise(model, 5, torch.Generator().manual_seed(0), "cpu")
    assert z.shape == (4, 5, 2)
    expected = torch.randn(1, 5, 2, generator=torch.Generator().manual_seed(0))
    for i in range(4):
        assert torch.equal(z[i], expected[0])


class Recorder(nn.Module):
    """Wraps the generator bank and keeps every z it is called with."""

    def __init__(self, bank: nn.Module) -> None:
        super().__init__()
        self.module, self.calls = bank, []

    def forward(self, z: Tensor) -> Tensor:
        self.calls.append(z.detach().clone())
        return self.module(z)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_train_step_feeds_the_same_z_to_every_generator_for_the_term(weight: float) -> None:
    model = make(f"objective.madgan_similarity={weight}")
    recorder = Recorder(model.generator)
    model.generator = recorder
    metrics = run_steps(model, 1)[0]
    d_call, g_call = recorder.calls
    m = BATCH // 4
    assert d_call.shape == (4, m, 2)  # the D phase: independent z per generator, as before
    if weight == 0:
        assert g_call.shape == (4, m, 2) and "similarity" not in metrics
        return
    assert g_call.shape == (4, 2 * m, 2)
    adversarial, same = g_call[:, :m], g_call[:, m:]
    assert all(torch.equal(same[i], same[0]) for i in range(4))
    assert not torch.equal(adversarial[1], adversarial[0])
    assert 0.0 <= metrics["similarity"] <= 2.0
    assert metrics["g_loss"] == pytest.approx(metrics["g_adv"] + metrics["similarity"], abs=1e-5)


def test_similarity_term_reads_d_features_and_real_class() -> None:
    model = make("objective.madgan_similarity=1")
    d = model.discriminator
    samples = torch.randn(4, 3, 2)
    with torch.no_grad():
        h = d.features(samples.reshape(12, 2))
        prob = d(samples.reshape(12, 2)).softmax(1)[:, -1]
        term = similarity_term(model, d, samples)
    assert term.item() == pytest.approx(
        hand_similarity(h.reshape(4, 3, -1).tolist(), prob.reshape(4, 3).tolist()), abs=1e-5
    )


# --- off is bit-identical -------------------------------------------------------------------


def test_off_is_bit_identical_to_a_config_without_the_key() -> None:
    without = make()
    at_zero = make("objective.madgan_similarity=0")
    assert without.cfg == at_zero.cfg
    assert run_steps(without, 3) == run_steps(at_zero, 3)
    for name, net in (("generator", "generator"), ("discriminator", "discriminator")):
        a, b = getattr(without, net).state_dict(), getattr(at_zero, net).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    on = make("objective.madgan_similarity=1")
    run_steps(on, 3)
    assert not torch.equal(
        next(iter(on.generator.parameters())), next(iter(without.generator.parameters()))
    )


# --- configs --------------------------------------------------------------------------------


def test_preset_is_ring8_madgan_plus_the_term() -> None:
    sim, base = load_config("ring8_madgan_sim"), load_config("ring8_madgan")
    assert sim.objective.madgan_similarity == 1.0 and base.objective.madgan_similarity == 0.0
    assert sim.name == "ring8_madgan_sim"
    assert (sim.generators, sim.discriminator, sim.train) == (
        base.generators,
        base.discriminator,
        base.train,
    )


@pytest.mark.parametrize(
    ("preset", "overrides", "value", "allowed"),
    [
        ("ring8_madgan", ["generators.count=1"], 1.0, "0 with generators.count=1"),
        ("ring8", [], 1.0, "0 with generators.count=1"),
        ("ring8", ["generators.count=4"], 1.0, "0 with objective nonsaturating"),
        ("ring8_madgan", ["objective.name=wgan-gp"], 1.0, "0 with objective wgan-gp"),
        ("ring8_madgan", [], -0.5, ">= 0"),
    ],
)
def test_bad_combinations_are_refused(
    preset: str, overrides: list[str], value: float, allowed: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(preset, [*overrides, f"objective.madgan_similarity={value}"])
    err: Any = exc.value
    assert (err.key, err.value) == ("objective.madgan_similarity", value)
    assert allowed in err.allowed
    assert err.source == f"{PRESET_DIR / (preset + '.yaml')} + overrides"
