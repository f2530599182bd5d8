"""The functional look-ahead against real optimizer steps, plain autograd and a hand case."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gan_core.objectives import gan_d_loss, nonsaturating_g_loss, wgan_d_loss, wgan_g_loss
from gan_core.unroll import functional_discriminator, lookahead_params

LR = 0.05
BETAS = (0.5, 0.999)


def make_d() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))


def make_g() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


@pytest.fixture
def nets():
    torch.manual_seed(0)
    d, g = make_d(), make_g()
    real = torch.randn(16, 2) * 2.0
    z = torch.randn(16, 3)
    return d, g, real, z


def d_loss_on(real, fake):
    return lambda call: gan_d_loss(call(real), call(fake))


def g_grads(g, d, params, z):
    """G's gradient of the non-saturating loss against D evaluated at ``params``."""
    g.zero_grad()
    fake = g(z)
    nonsaturating_g_loss(functional_discriminator(d, params)(fake)).backward()
    return [p.grad.clone() for p in g.parameters()]


def unrolled_g_grads(g, d, z, real, steps, second_order, optimizer="adam"):
    g.zero_grad()
    fake = g(z)  # not detached: the second-order look-ahead differentiates D's steps w.r.t. G
    params = lookahead_params(
        d, d_loss_on(real, fake), steps, optimizer, LR, BETAS, second_order=second_order
    )
    nonsaturating_g_loss(functional_discriminator(d, params)(fake)).backward()
    return [p.grad.clone() for p in g.parameters()]


def test_zero_steps_is_d_itself(nets):
    d, g, real, z = nets
    params = lookahead_params(d, d_loss_on(real, g(z)), 0, "adam", LR)
    for name, p in d.named_parameters():
        assert torch.equal(params[name], p)
        assert params[name].requires_grad and params[name].grad_fn is None
    through_functional = g_grads(g, d, params, z)
    g.zero_grad()
    nonsaturating_g_loss(d(g(z))).backward()
    for a, p in zip(through_functional, g.parameters(), strict=True):
        assert torch.equal(a, p.grad)


def test_one_sgd_step_is_p_minus_lr_grad(nets):
    d, g, real, z = nets
    fake = g(z).detach()
    params = lookahead_params(d, d_loss_on(real, fake), 1, "sgd", LR)
    reference = copy.deepcopy(d)
    loss = gan_d_loss(reference(real), reference(fake))
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for (name, p), grad in zip(reference.named_parameters(), grads, strict=True):
        torch.testing.assert_close(params[name], p - LR * grad, rtol=0, atol=1e-7)


def real_adam_steps(d, opt_state_dict, real, fake, steps):
    """``steps`` torch.optim.Adam steps on a copy of ``d`` (and a copy of its optimizer)."""
    reference = copy.deepcopy(d)
    opt = torch.optim.Adam(reference.parameters(), lr=LR, betas=BETAS)
    if opt_state_dict is not None:
        opt.load_state_dict(opt_state_dict)
    for _ in range(steps):
        opt.zero_grad()
        gan_d_loss(reference(real), reference(fake)).backward()
        opt.step()
    return dict(reference.named_parameters())


@pytest.mark.parametrize("fresh_state", [None, {}])
def test_one_adam_step_from_fresh_state_matches_torch_adam(nets, fresh_state):
    d, g, real, z = nets
    fake = g(z).detach()
    params = lookahead_params(
        d, d_loss_on(real, fake), 1, "adam", LR, BETAS, optimizer_state=fresh_state
    )
    expected = real_adam_steps(d, None, real, fake, 1)
    for name, p in expected.items():
        torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=1e-6)
    # and it really moved (Adam's first step is about lr per coordinate)
    assert all((params[n] - p).abs().max() > LR / 2 for n, p in d.named_parameters())


def train_d_with_adam(d, real, fake, steps):
    opt = torch.optim.Adam(d.parameters(), lr=LR, betas=BETAS)
    for _ in range(steps):
        opt.zero_grad()
        gan_d_loss(d(real), d(fake)).backward()
        opt.step()
    return opt


def test_adam_lookahead_continues_the_real_optimizer_trajectory(nets):
    d, g, real, z = nets
    fake = g(z).detach()
    opt = train_d_with_adam(d, real, fake, 3)
    params = lookahead_params(
        d, d_loss_on(real, fake), 2, "adam", LR, BETAS, optimizer_state=opt.state
    )
    expected = real_adam_steps(d, opt.state_dict(), real, fake, 2)
    for name, p in expected.items():
        torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=1e-6)
    # Continuing matters: a look-ahead from fresh moments lands elsewhere.
    fresh = lookahead_params(d, d_loss_on(real, fake), 2, "adam", LR, BETAS)
    assert any((fresh[n] - expected[n]).abs().max() > 1e-3 for n in expected)


def test_lookahead_leaves_d_its_grads_and_its_optimizer_untouched(nets):
    d, g, real, z = nets
    opt = train_d_with_adam(d, real, g(z).detach(), 2)
    gan_d_loss(d(real), d(g(z).detach())).backward()  # leave a nonzero .grad on D
    params_before = {n: p.detach().clone() for n, p in d.named_parameters()}
    grads_before = {n: p.grad.clone() for n, p in d.named_parameters()}
    state_before = copy.deepcopy(opt.state_dict())

    fake = g(z)
    params = lookahead_params(
        d, d_loss_on(real, fake), 3, "adam", LR, BETAS, optimizer_state=opt.state
    )
    nonsaturating_g_loss(functional_discriminator(d, params)(fake)).backward()

    for n, p in d.named_parameters():
        assert torch.equal(p.detach(), params_before[n])
        assert torch.equal(p.grad, grads_before[n])
    state_after = opt.state_dict()
    assert state_after["state"].keys() == state_before["state"].keys()
    for key, entry in state_before["state"].items():
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state_after["state"][key][field], entry[field])
    assert len(opt.state) == len(list(d.parameters()))


def test_lookahead_works_while_d_is_frozen_for_the_generator_phase(nets):
    d, g, real, z = nets
    fake = g(z).detach()
    expected = lookahead_params(d, d_loss_on(real, fake), 2, "sgd", LR)
    d.requires_grad_(False)
    frozen = lookahead_params(d, d_loss_on(real, fake), 2, "sgd", LR)
    for name in expected:
        assert torch.equal(frozen[name], expected[name])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_unrolling_changes_g_gradient_and_second_order_differs(nets, optimizer):
    d, g, real, z = nets
    k0 = unrolled_g_grads(g, d, z, real, 0, True, optimizer)
    first = unrolled_g_grads(g, d, z, real, 5, False, optimizer)
    second = unrolled_g_grads(g, d, z, real, 5, True, optimizer)
    for grads in (k0, first, second):
        assert all(torch.isfinite(t).all() for t in grads)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(k0, first, strict=True))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(first, second, strict=True))


def test_first_order_detaches_each_step_and_second_order_keeps_the_graph(nets):
    d, g, real, z = nets
    fake = g(z)
    first = lookahead_params(d, d_loss_on(real, fake), 2, "adam", LR, second_order=False)
    second = lookahead_params(d, d_loss_on(real, fake), 2, "adam", LR, second_order=True)
    assert all(p.grad_fn is None and p.requires_grad for p in first.values())
    assert all(p.grad_fn is not None for p in second.values())


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_gradient_by_hand(steps):
    # D(x) = w x, G makes the constant x = theta, WGAN losses, SGD:
    #   L_D(w) = w theta - w r, so w_k = w_0 - k lr (theta - r)
    #   L_G = -w_k theta
    #   first order:  dL_G/dtheta = -w_k
    #   second order: dL_G/dtheta = -w_k + k lr theta   (w_k depends on theta)
    w0, theta0, r, lr = 0.5, 2.0, 1.0, 0.1
    d = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        d.weight.fill_(w0)
    real = torch.tensor([[r]])
    w_k = w0 - steps * lr * (theta0 - r)
    for second_order, expected in [(False, -w_k), (True, -w_k + steps * lr * theta0)]:
        theta = torch.tensor([[theta0]], requires_grad=True)
        params = lookahead_params(
            d,
            lambda call, theta=theta: wgan_d_loss(call(real), call(theta)),
            steps,
            "sgd",
            lr,
            second_order=second_order,
        )
        assert params["weight"].item() == pytest.approx(w_k)
        wgan_g_loss(functional_discriminator(d, params)(theta)).backward()
        assert theta.grad.item() == pytest.approx(expected, rel=1e-6)


def test_second_order_adam_stays_finite_with_exactly_zero_gradients():
    # A dead ReLU unit has exactly zero gradients, so Adam's second moment is exactly 0 there;
    # differentiating sqrt at 0 would hand G a NaN gradient.
    torch.manual_seed(1)
    d = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        d[0].bias[0] = -1e3  # unit 0 never fires on these inputs
    g = make_g()
    z, real = torch.randn(8, 3), torch.randn(8, 2)
    grads = unrolled_g_grads(g, d, z, real, 3, True)
    assert all(torch.isfinite(t).all() for t in grads)
    assert any(t.abs().max() > 0 for t in grads)


def test_unused_parameter_is_left_alone_like_torch_optim(nets):
    d, g, real, z = nets
    d.register_parameter("unused", nn.Parameter(torch.ones(3)))
    fake = g(z).detach()
    params = lookahead_params(d, d_loss_on(real, fake), 2, "adam", LR, BETAS)
    assert torch.equal(params["unused"], torch.ones(3))
    expected = real_adam_steps(d, None, real, fake, 2)
    for name, p in expected.items():
        torch.testing.assert_close(params[name], p.detach(), rtol=0, atol=1e-6)


def test_unknown_optimizer_and_negative_steps_are_refused(nets):
    d, g, real, z = nets
    with pytest.raises(ValueError, match="'rmsprop' is not one of"):
        lookahead_params(d, d_loss_on(real, g(z)), 1, "rmsprop", LR)
    with pytest.raises(ValueError, match="got -1"):
        lookahead_params(d, d_loss_on(real, g(z)), -1, "sgd", LR)


def test_functional_discriminator_passes_kwargs_and_uses_given_params():
    d = nn.Linear(2, 1)
    params = {"weight": torch.tensor([[1.0, -1.0]]), "bias": torch.tensor([0.5])}
    call = functional_discriminator(d, params)
    x = torch.tensor([[3.0, 1.0]])
    assert call(x).item() == pytest.approx(2.5)
    assert call(input=x).item() == pytest.approx(2.5)
