"""Every objective against values (and gradients) worked out by hand with ``math``."""

from __future__ import annotations

import math

import pytest
import torch

from gan_core.objectives import (
    dragan_penalty,
    ebgan_d_loss,
    ebgan_g_loss,
    gan_d_loss,
    gradient_penalty,
    madgan_d_loss,
    madgan_diversity,
    madgan_g_loss,
    minimax_g_loss,
    mrgan_regularizer,
    nonsaturating_g_loss,
    pulling_away_term,
    wgan_d_loss,
    wgan_g_loss,
)


def softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def scalar(t: torch.Tensor) -> float:
    assert t.dim() == 0, f"expected a scalar, got shape {tuple(t.shape)}"
    return t.item()


def test_gan_d_loss_by_hand():
    real = torch.tensor([0.0, 2.0])
    fake = torch.tensor([-1.0, 1.0])
    # -log D(x): -log sigmoid(0) = log 2, -log sigmoid(2) = log(1 + e^-2)
    real_term = (math.log(2.0) + math.log(1.0 + math.exp(-2.0))) / 2
    # -log(1 - D(G(z))) = -log sigmoid(-f) = log(1 + e^f)
    fake_term = (math.log(1.0 + math.exp(-1.0)) + math.log(1.0 + math.exp(1.0))) / 2
    assert scalar(gan_d_loss(real, fake)) == pytest.approx(real_term + fake_term, rel=1e-6)


def test_logit_losses_stay_finite_for_confident_discriminators():
    # In float32 sigmoid(-200) is 0 and sigmoid(200) is 1, so sigmoid-then-log would give
    # log(0) = -inf in each of these; the softplus forms give the exact limits.
    assert scalar(gan_d_loss(torch.tensor([200.0]), torch.tensor([200.0]))) == pytest.approx(200.0)
    assert scalar(nonsaturating_g_loss(torch.tensor([-200.0]))) == pytest.approx(200.0)
    assert scalar(minimax_g_loss(torch.tensor([200.0]))) == pytest.approx(-200.0)


def test_minimax_and_nonsaturating_differ_in_value_and_gradient():
    values = [0.0, -3.0]
    f_mm = torch.tensor(values, requires_grad=True)
    f_ns = torch.tensor(values, requires_grad=True)
    mm = minimax_g_loss(f_mm)
    ns = nonsaturating_g_loss(f_ns)
    assert scalar(mm) == pytest.approx(-(softplus(0.0) + softplus(-3.0)) / 2, rel=1e-6)
    assert scalar(ns) == pytest.approx((softplus(0.0) + softplus(3.0)) / 2, rel=1e-6)
    mm.backward()
    ns.backward()
    # d/df -softplus(f)/n = -sigmoid(f)/n ; d/df softplus(-f)/n = -sigmoid(-f)/n
    expected_mm = [-sigmoid(v) / 2 for v in values]
    expected_ns = [-sigmoid(-v) / 2 for v in values]
    assert f_mm.grad.tolist() == pytest.approx(expected_mm, rel=1e-6)
    assert f_ns.grad.tolist() == pytest.approx(expected_ns, rel=1e-6)
    # Both gradients are negative: descending them raises the fake logit (fools D).
    assert (f_mm.grad < 0).all() and (f_ns.grad < 0).all()
    # Where D confidently rejects (f = -3) the minimax gradient has (nearly) vanished.
    assert abs(f_ns.grad[1].item()) > 15 * abs(f_mm.grad[1].item())


def test_wgan_losses_by_hand():
    real = torch.tensor([1.0, 3.0])
    fake = torch.tensor([-2.0, 0.5])
    assert scalar(wgan_d_loss(real, fake)) == pytest.approx(-0.75 - 2.0)
    assert scalar(wgan_g_loss(fake)) == pytest.approx(0.75)


@pytest.mark.parametrize("sample_shape", [(4,), (1, 2, 2)])
def test_gradient_penalty_of_linear_critic_is_exact_with_its_gradient(sample_shape):
    # f(x) = w . x has gradient w at every point, so every interpolate gives (||w|| - 1)^2.
    w = torch.tensor([3.0, 0.0, 4.0, 0.0], requires_grad=True)

    def critic(x):
        return (x.flatten(1) @ w).unsqueeze(1)  # (n, 1) scores, as an nn.Linear head gives

    gen = torch.Generator().manual_seed(0)
    real = torch.randn((5, *sample_shape), generator=gen)
    fake = torch.randn((5, *sample_shape), generator=gen)
    penalty = gradient_penalty(critic, real, fake, generator=gen)
    assert scalar(penalty) == pytest.approx((5.0 - 1.0) ** 2, rel=1e-6)
    penalty.backward()
    # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    expected = [2 * 4.0 * wi / 5.0 for wi in [3.0, 0.0, 4.0, 0.0]]
    assert w.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_gradient_penalty_interpolates_real_weighted_by_a():
    # f(x) = ||x||^2 / 2 has gradient x, so the penalty reads back ||x_hat||.
    def critic(x):
        return 0.5 * (x**2).sum(dim=1)

    real = torch.tensor([[2.0, 0.0], [0.0, -4.0]])
    fake = torch.zeros(2, 2)
    a = torch.rand(2, generator=torch.Generator().manual_seed(3)).tolist()
    # x_hat = a * real: norms 2 a_0 and 4 a_1
    expected = ((2 * a[0] - 1) ** 2 + (4 * a[1] - 1) ** 2) / 2
    penalty = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(3))
    assert scalar(penalty) == pytest.approx(expected, rel=1e-6)


def test_gradient_penalty_is_a_critic_only_term():
    # The interpolates are detached: the penalty trains the critic, never the generator.
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    fake = theta.expand(3, 2) * 1.0
    penalty = gradient_penalty(lambda x: (x * w).sum(dim=1) ** 2, torch.ones(3, 2), fake)
    grad_theta, grad_w = torch.autograd.grad(penalty, [theta, w], allow_unused=True)
    assert grad_theta is None
    assert grad_w is not None and grad_w.abs().sum() > 0


def test_dragan_penalty_of_linear_critic_is_exact_with_its_gradient():
    w = torch.tensor([[1.0], [2.0], [2.0]], requires_grad=True)  # ||w|| = 3

    def critic(x):
        return x @ w

    real = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    penalty = dragan_penalty(critic, real, 0.5, generator=torch.Generator().manual_seed(2))
    assert scalar(penalty) == pytest.approx((3.0 - 1.0) ** 2, rel=1e-6)
    penalty.backward()
    expected = [2 * 2.0 * wi / 3.0 for wi in [1.0, 2.0, 2.0]]
    assert w.grad.flatten().tolist() == pytest.approx(expected, rel=1e-6)


def test_dragan_penalty_perturbs_by_scaled_std_noise_then_interpolates():
    def critic(x):
        return 0.5 * (x**2).sum(dim=1)

    real = torch.tensor([[2.0, 0.0]])
    c = 0.5
    std = math.sqrt(2.0)  # unbiased std of {2, 0}: mean 1, ((1 + 1) / (2 - 1)) ** 0.5
    gen = torch.Generator().manual_seed(7)
    u = torch.rand(1, 2, generator=gen)[0].tolist()  # drawn first: the perturbation
    a = torch.rand(1, generator=gen).item()  # then the interpolation weight
    # x_hat = a x + (1 - a)(x + c std u) = x + (1 - a) c std u
    x_hat = [2.0 + (1 - a) * c * std * u[0], 0.0 + (1 - a) * c * std * u[1]]
    expected = (math.hypot(*x_hat) - 1.0) ** 2
    penalty = dragan_penalty(critic, real, c, generator=torch.Generator().manual_seed(7))
    assert scalar(penalty) == pytest.approx(expected, rel=1e-6)


def test_ebgan_d_loss_clips_fakes_above_the_margin():
    real = torch.tensor([0.5, 1.5])
    fake = torch.tensor([0.2, 3.0], requires_grad=True)
    loss = ebgan_d_loss(real, fake, margin=1.0)
    # E[real] = 1.0; hinge = [1 - 0.2, max(0, 1 - 3)] = [0.8, 0] -> 0.4
    assert scalar(loss) == pytest.approx(1.4)
    loss.backward()
    assert fake.grad.tolist() == pytest.approx([-0.5, 0.0])


def test_ebgan_d_loss_all_fakes_beyond_margin_cost_only_real_energy():
    loss = ebgan_d_loss(torch.tensor([2.0]), torch.tensor([5.0, 10.0]), margin=4.0)
    assert scalar(loss) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]], 0.0),  # orthogonal
        ([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], 1.0),  # identical
        ([[1.0, 0.0], [-2.0, 0.0]], 1.0),  # opposite: cos^2 = 1
        ([[1.0, 0.0], [1.0, 1.0]], 0.5),  # cos = 1/sqrt 2 for both ordered pairs
        # pairs (0,1) 0, (0,2) 1/2, (1,2) 1/2: 2 * 1 over 3 * 2 ordered pairs
        ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], 1.0 / 3.0),
    ],
)
def test_pulling_away_term(codes, expected):
    assert scalar(pulling_away_term(torch.tensor(codes))) == pytest.approx(expected, abs=1e-6)


def test_pulling_away_term_of_one_code_is_zero():
    assert scalar(pulling_away_term(torch.tensor([[1.0, 2.0]]))) == 0.0


def test_ebgan_g_loss_by_hand():
    loss = ebgan_g_loss(torch.tensor([0.5, 1.5]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]), 0.1)
    assert scalar(loss) == pytest.approx(1.0 + 0.1 * 0.5)


def log_softmax(row: list[float], c: int) -> float:
    return row[c] - math.log(sum(math.exp(z) for z in row))


def test_madgan_d_loss_against_manual_log_softmax():
    real = [[0.0, 1.0, 2.0], [1.0, 1.0, -1.0]]
    fake = [[1.0, 0.0, 0.0], [0.0, 0.5, 3.0], [2.0, -1.0, 0.0]]
    made_by = [0, 1, 1]
    real_term = -sum(log_softmax(r, 2) for r in real) / 2  # REAL is the last class, N = 2
    fake_term = -sum(log_softmax(f, g) for f, g in zip(fake, made_by, strict=True)) / 3
    loss = madgan_d_loss(torch.tensor(real), torch.tensor(fake), torch.tensor(made_by))
    assert scalar(loss) == pytest.approx(real_term + fake_term, rel=1e-6)


def test_madgan_d_loss_refuses_mismatched_class_counts():
    with pytest.raises(ValueError, match="3 classes but fake_logits have 2"):
        madgan_d_loss(torch.zeros(1, 3), torch.zeros(1, 2), torch.tensor([0]))


def test_madgan_g_loss_targets_the_real_class():
    fake = [[1.0, 0.0, 0.0], [0.0, 0.5, 3.0]]
    expected = -(log_softmax(fake[0], 2) + log_softmax(fake[1], 2)) / 2
    assert scalar(madgan_g_loss(torch.tensor(fake))) == pytest.approx(expected, rel=1e-6)


def test_madgan_diversity_identical_and_opposite_generators():
    base = torch.randn(1, 4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    assert scalar(madgan_diversity(base.expand(3, -1, -1, -1, -1))) == pytest.approx(1.0)
    assert scalar(madgan_diversity(torch.cat([base, -base]))) == pytest.approx(-1.0)


def test_madgan_diversity_single_generator_is_zero():
    assert scalar(madgan_diversity(torch.ones(1, 5, 2))) == 0.0


def test_madgan_diversity_by_hand_pairs_same_batch_index():
    # k = 0: cos(g0, g1) = 0, cos(g0, g2) = cos(g1, g2) = 1/sqrt 2 ; k = 1: all identical -> 1
    samples = torch.tensor(
        [
            [[1.0, 0.0], [5.0, 5.0]],
            [[0.0, 1.0], [1.0, 1.0]],
            [[1.0, 1.0], [2.0, 2.0]],
        ]
    ).unsqueeze(-1)  # (N=3, m=2, 2, 1): features are flattened
    expected = (0.0 + 2 / math.sqrt(2.0) + 3 * 1.0) / 6
    assert scalar(madgan_diversity(samples)) == pytest.approx(expected, rel=1e-6)


def test_mrgan_regularizer_by_hand():
    real = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    reconstruction = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    logits = torch.tensor([0.0, 2.0])
    # squared distances summed over features: 1 and 2 -> mean 1.5
    # -log D(G(E(x))) = softplus(-logit): log 2 and log(1 + e^-2)
    mode_term = (math.log(2.0) + math.log(1.0 + math.exp(-2.0))) / 2
    loss = mrgan_regularizer(real, reconstruction, logits, geometric=0.2, mode=0.4)
    assert scalar(loss) == pytest.approx(0.2 * 1.5 + 0.4 * mode_term, rel=1e-6)
