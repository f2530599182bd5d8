"""WGAN with weight clipping (objective wgan, RMSProp), the Wasserstein estimate and the penalty
as metrics of their own, and loss metrics averaged over the steps between two evaluations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from gan_core import steps
from gan_core.config import ConfigError, GanConfig, load_config
from gan_core.loop import GanRun, LoopHooks, format_eval
from gan_core.objectives import wasserstein_estimate, wgan_d_loss, wgan_g_loss
from gan_core.steps import (
    LOSS_METRICS,
    discriminator_loss,
    generator_loss,
    sample_noise,
    train_step,
)

# The tiny nets of the loop tests (batch 8, as test_steps' batches).
from tests.gan_core.test_loop import TINY
from tests.gan_core.test_steps import BATCH, clone_rng, feeder, make, real_batches

WGAN = ["objective.name=wgan", "g_optim.name=rmsprop", "d_optim.name=rmsprop"]


def tiny(*overrides: str, preset: str = "ring8") -> GanConfig:
    return load_config(preset, [*TINY, *overrides])


def linear_critic(w: tuple[float, float]):
    """A hand-made critic f(x) = x . w: its input gradient is w everywhere."""
    weight = torch.tensor(w)

    def critic(x: Tensor, groups: int = 1) -> Tensor:
        return x @ weight

    return critic


REAL = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
FAKE = torch.tensor([[0.0, 0.0], [-1.0, 3.0]])
NO_GENERATOR = torch.zeros(2, dtype=torch.long)


# --- losses and the estimate on hand-made critic outputs ----------------------------------------


def test_wgan_losses_and_estimate_by_hand():
    real, fake = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([-1.0, 0.5])
    # E[f(G(z))] - E[f(x)] = -0.25 - 7/6; -E[f(G(z))] = 0.25; E[f(x)] - E[f(G(z))] = 7/6 + 0.25
    assert wgan_d_loss(real, fake).item() == pytest.approx(-0.25 - 7 / 6)
    assert wgan_g_loss(fake).item() == pytest.approx(0.25)
    assert wasserstein_estimate(real, fake).item() == pytest.approx(7 / 6 + 0.25)


def test_wgan_d_and_g_loss_through_the_step_functions():
    cfg = tiny(*WGAN)
    critic = linear_critic((1.0, 1.0))
    # f(real) = [1, 3] (mean 2), f(fake) = [0, 2] (mean 1)
    loss, logs = discriminator_loss(cfg, critic, REAL, FAKE, NO_GENERATOR)
    assert loss.item() == pytest.approx(1.0 - 2.0)
    assert logs["wasserstein"].item() == pytest.approx(2.0 - 1.0)
    assert (logs["d_real"].item(), logs["d_fake"].item()) == pytest.approx((2.0, 1.0))
    # Clipping is the constraint: no penalty term, whatever gp_weight says.
    assert "gp" not in logs and "penalty" not in logs
    assert generator_loss(cfg, critic, FAKE).item() == pytest.approx(-1.0)


def test_wgan_gp_logs_the_estimate_and_the_penalty_separately():
    cfg = tiny("objective.name=wgan-gp", "objective.gp_weight=10")
    # ||grad f|| = ||(3, 4)|| = 5 at every point: penalty (5 - 1)^2 = 16, weighted 160.
    critic = linear_critic((3.0, 4.0))
    loss, logs = discriminator_loss(cfg, critic, REAL, FAKE, NO_GENERATOR, torch.Generator())
    # f(real) = [3, 10] (mean 6.5), f(fake) = [0, 9] (mean 4.5)
    assert logs["wasserstein"].item() == pytest.approx(2.0)
    assert logs["penalty"].item() == pytest.approx(16.0)
    assert logs["gp"].item() == pytest.approx(160.0)
    assert loss.item() == pytest.approx(160.0 - 2.0)
    # Without a penalty weight there is no penalty metric, only the estimate.
    _, plain = discriminator_loss(
        tiny("objective.name=wgan-gp", "objective.gp_weight=0"), critic, REAL, FAKE, NO_GENERATOR
    )
    assert set(plain) == {"wasserstein", "d_real", "d_fake"}


def test_only_critic_objectives_report_the_estimate():
    for name in ("nonsaturating", "minimax", "dragan"):
        _, logs = discriminator_loss(
            tiny(f"objective.name={name}"),
            linear_critic((1.0, 1.0)),
            REAL,
            FAKE,
            NO_GENERATOR,
            torch.Generator(),
        )
        assert "wasserstein" not in logs and "gp" not in logs, name


# --- clipping, n_critic, RMSProp -----------------------------------------------------------------


def test_clipping_bounds_every_critic_parameter_after_a_step():
    clip = 0.0625  # exact in float32, so the bound is compared without rounding
    cfg = tiny(*WGAN, f"objective.clip={clip}", "d_optim.lr=0.01")
    model = make(cfg)
    with torch.no_grad():
        for p in model.discriminator.parameters():
            p.fill_(1.0)  # far outside [-clip, clip]: one RMSProp step of 0.01 cannot get back
    replay = copy.deepcopy(model)
    (real,) = real_batches(1)
    rng = torch.Generator().manual_seed(3)
    train_step(model, feeder([real]), rng)

    every = torch.cat([p.detach().flatten() for p in model.discriminator.parameters()])
    assert every.abs().max().item() == clip
    assert bool((every == clip).all())  # all started at 1 and moved by about 0.01
    # The step is "RMSProp update, then clamp", replayed here by hand.
    D = replay.discriminator
    with torch.no_grad():
        fake = replay.generator(sample_noise(replay, BATCH, clone_rng(rng), "cpu")).reshape(
            BATCH, 2
        )
    out = D(torch.cat([real, fake]), groups=2)
    loss = out[BATCH:].mean() - out[:BATCH].mean()
    replay.d_opt.zero_grad(set_to_none=True)
    loss.backward()
    replay.d_opt.step()
    with torch.no_grad():
        for p in D.parameters():
            p.clamp_(-clip, clip)
    for got, want in zip(model.discriminator.parameters(), D.parameters(), strict=True):
        assert torch.equal(got, want)


def test_clipping_runs_after_every_critic_update_and_leaves_buffers_alone(monkeypatch):
    cfg = tiny(
        *WGAN,
        "objective.n_critic=3",
        "discriminator.fourier_features=4",
        "discriminator.fourier_scale=5.0",
    )
    model = make(cfg)
    first = next(iter(model.discriminator.parameters()))
    seen: list[int] = []
    clip = steps.clip_critic

    def recording(d: torch.nn.Module, c: float) -> None:
        seen.append(int(model.d_opt.state[first]["step"]))  # updates done when it is called
        clip(d, c)

    monkeypatch.setattr(steps, "clip_critic", recording)
    frequencies = model.discriminator.fourier.frequencies.clone()
    train_step(model, feeder(real_batches(3)), torch.Generator().manual_seed(0))
    assert seen == [1, 2, 3]
    assert all(p.abs().max() <= 0.01 for p in model.discriminator.parameters())
    # The fixed Fourier frequencies are a buffer, not a weight of the critic.
    assert torch.equal(model.discriminator.fourier.frequencies, frequencies)
    assert frequencies.abs().max() > 0.01


def test_other_objectives_are_not_clipped():
    model = make(tiny("objective.name=wgan-gp", "d_optim.lr=0.5"))
    train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))
    assert max(p.abs().max().item() for p in model.discriminator.parameters()) > 0.5


def test_rmsprop_reaches_torch_rmsprop():
    # A wide clip range, so the update rule itself is seen rather than the clamp.
    cfg = tiny(*WGAN, "g_optim.lr=5e-5", "d_optim.lr=2e-4", "d_optim.alpha=0.9", "objective.clip=9")
    model = make(cfg)
    for opt, lr, alpha in ((model.g_opt, 5e-5, 0.99), (model.d_opt, 2e-4, 0.9)):
        assert type(opt) is torch.optim.RMSprop
        group = opt.param_groups[0]
        assert (group["lr"], group["alpha"], group["momentum"]) == (lr, alpha, 0)
        assert (group["eps"], group["centered"], group["weight_decay"]) == (1e-8, False, 0)
    # One step is torch's RMSProp rule (no momentum): p - lr * g / (sqrt((1 - alpha) g^2) + eps).
    weight = model.discriminator.head.weight
    before = weight.detach().clone()
    grads: list[Tensor] = []
    weight.register_hook(lambda g: grads.append(g.detach().clone()))
    train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))
    (g,) = grads
    expected = before - 2e-4 * g / (((1 - 0.9) * g * g).sqrt() + 1e-8)
    assert torch.allclose(weight.detach(), expected, rtol=0, atol=1e-8)
    assert not torch.allclose(weight.detach(), before, rtol=0, atol=1e-5)


def test_default_optimizer_is_the_same_adam():
    for cfg in (load_config("ring8"), tiny()):
        model = make(cfg)
        for opt, optim in ((model.g_opt, cfg.g_optim), (model.d_opt, cfg.d_optim)):
            assert optim.name == "adam" and type(opt) is torch.optim.Adam
            group = opt.param_groups[0]
            assert group["betas"] == (optim.beta1, optim.beta2) and group["eps"] == 1e-8
            assert group["weight_decay"] == 0 and group["amsgrad"] is False


def test_new_keys_leave_every_other_objective_bit_identical():
    """clip and alpha are read by wgan and rmsprop only: a default run is the same bit for bit."""
    unused = ["objective.clip=0.5", "g_optim.alpha=0.5", "d_optim.alpha=0.3"]
    for preset, extra in (("ring8", ()), ("ring8_wgan_gp", ("objective.n_critic=2",))):
        runs = []
        for keys in ((), unused):
            model = make(tiny(*extra, *keys, preset=preset))
            n = model.cfg.objective.n_critic
            rng = torch.Generator().manual_seed(5)
            metrics = [train_step(model, feeder(real_batches(n, seed=s)), rng) for s in range(3)]
            runs.append((metrics, [p.detach().clone() for p in model.discriminator.parameters()]))
        (m_a, w_a), (m_b, w_b) = runs
        assert m_a == m_b
        assert all(torch.equal(a, b) for a, b in zip(w_a, w_b, strict=True))


# --- the Wasserstein estimate as a step metric ---------------------------------------------------


@pytest.mark.parametrize("n_critic", [1, 2])
def test_step_reports_the_estimate_of_its_critic_updates(n_critic):
    cfg = tiny(*WGAN, f"objective.n_critic={n_critic}", "d_optim.lr=0.01")
    model = make(cfg)
    replay = copy.deepcopy(model)
    reals = real_batches(n_critic)
    rng = torch.Generator().manual_seed(9)
    metrics = train_step(model, feeder(reals), clone_rng(rng))

    # By hand: mean(D(x)) - mean(D(G(z))) before each critic update, then the update and clip.
    estimates, losses = [], []
    D = replay.discriminator
    for real in reals:
        with torch.no_grad():
            fake = replay.generator(sample_noise(replay, BATCH, rng, "cpu")).reshape(BATCH, 2)
        out = D(torch.cat([real, fake]), groups=2)
        estimates.append(out[:BATCH].mean() - out[BATCH:].mean())
        losses.append(-estimates[-1])
        replay.d_opt.zero_grad(set_to_none=True)
        losses[-1].backward()
        replay.d_opt.step()
        steps.clip_critic(D, cfg.objective.clip)
    want = torch.stack(estimates).detach().sum() / n_critic
    assert metrics["wasserstein"] == pytest.approx(want.item(), rel=1e-6, abs=1e-9)
    assert metrics["d_loss"] == pytest.approx(-want.item(), rel=1e-6, abs=1e-9)
    assert "gp" not in metrics and "penalty" not in metrics


def test_wgan_gp_step_reports_d_loss_as_gp_minus_estimate():
    model = make(tiny(preset="ring8_wgan_gp"))
    metrics = train_step(model, feeder(real_batches(5)), torch.Generator().manual_seed(0))
    assert metrics["gp"] == pytest.approx(model.cfg.objective.gp_weight * metrics["penalty"])
    assert metrics["d_loss"] == pytest.approx(metrics["gp"] - metrics["wasserstein"], abs=1e-6)
    assert metrics["wasserstein"] == pytest.approx(metrics["d_real"] - metrics["d_fake"], abs=1e-6)


# --- loss metrics averaged over the steps between evaluations ------------------------------------


@pytest.mark.parametrize("extra", [(), ("objective.name=wgan-gp", "objective.n_critic=2")])
def test_evaluation_reports_the_mean_of_the_losses_since_the_last_one(extra):
    run = GanRun(tiny("train.steps=5", "eval.every=3", *extra))
    per_step: list[dict[str, float]] = []
    run.run(LoopHooks(on_step=lambda r, m: per_step.append(dict(m))))
    first, second = run.history
    losses = [k for k in LOSS_METRICS if k in per_step[0]]
    assert {"d_loss", "g_loss", "d_real", "d_fake", "g_adv"} <= set(losses)
    if extra:
        assert {"wasserstein", "gp", "penalty"} <= set(losses)
    for key in losses:
        a, b, c, d, e = (m[key] for m in per_step)
        assert first[key] == (a + b + c) / 3, key
        assert second[key] == (d + e) / 2, key
    # The three losses really differ, so the mean is not any one of them.
    assert len({m["d_loss"] for m in per_step[:3]}) == 3
    # Evaluation and bookkeeping metrics are not averaged.
    assert (first["step"], second["step"]) == (3, 5)


def test_the_estimate_is_in_the_progress_line():
    line = format_eval(5, 8, {"d_loss": -0.5, "g_loss": 0.25, "wasserstein": 0.123456})
    assert "d -0.500 | g 0.250 | W 0.1235" in line
    assert "W " not in format_eval(5, 8, {"d_loss": 1.0, "g_loss": 1.0})


# --- configs: the preset, what composes and what is refused --------------------------------------


def test_ring8_wgan_preset_is_the_paper_recipe():
    cfg = load_config("ring8_wgan")
    o = cfg.objective
    assert (o.name, o.clip, o.n_critic) == ("wgan", 0.01, 5)
    assert cfg.g_optim.name == cfg.d_optim.name == "rmsprop"
    assert cfg.data.name == "ring8"


@pytest.mark.parametrize(
    "extra",
    [
        ("discriminator.pack=2",),
        ("generators.count=4",),
        ("discriminator.minibatch.kernels=4",),
        ("discriminator.batch_norm=true",),
        ("train.ema=0.9",),
        ("g_optim.name=adam", "d_optim.name=adam"),
        ("train.precision=bf16",),
    ],
)
def test_wgan_composes_with_remedies_that_keep_a_scalar_critic(extra):
    model = make(tiny(*WGAN, *extra))
    metrics = train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))
    assert all(p.abs().max() <= 0.01 for p in model.discriminator.parameters())
    assert metrics["d_loss"] == pytest.approx(-metrics["wasserstein"])


@pytest.mark.parametrize(
    ("overrides", "key", "value", "reason"),
    [
        ((*WGAN, "objective.clip=0"), "objective.clip", 0.0, "wgan-gp"),
        (("objective.clip=-0.1",), "objective.clip", -0.1, ">= 0"),
        ((*WGAN, "unroll.steps=2"), "unroll.steps", 2, "does not clip"),
        (("d_optim.name=rmsprop", "unroll.steps=1"), "d_optim.name", "rmsprop", "adam or sgd"),
        (("d_optim.alpha=1.0",), "d_optim.alpha", 1.0, "[0, 1)"),
        (("g_optim.name=adagrad",), "g_optim.name", "adagrad", "rmsprop"),
    ],
)
def test_bad_combinations_are_refused_naming_key_and_value(overrides, key, value, reason):
    with pytest.raises(ConfigError) as err:
        tiny(*overrides)
    assert (err.value.key, err.value.value) == (key, value)
    assert reason in err.value.allowed
    assert f"{key}={value!r}" in str(err.value)


def test_unroll_still_takes_adam_and_sgd_critics():
    for name in ("adam", "sgd"):
        cfg = tiny("objective.name=wgan-gp", f"d_optim.name={name}", "unroll.steps=1")
        assert cfg.unroll.steps == 1
