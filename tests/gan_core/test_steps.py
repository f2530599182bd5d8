"""The composed training step: every objective's losses by hand, phase isolation, unroll, EMA,
learning-rate schedule, MAD-GAN labels, packing and the model's state dict."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from gan_core import steps
from gan_core.config import GanConfig, load_config
from gan_core.steps import (
    GanModel,
    build_model,
    discriminator_loss,
    generator_loss,
    lr_factor,
    sample_noise,
    train_step,
    unwrap,
)

POINTS = (2,)
BATCH = 8
TINY = [
    "generators.width=16",
    "generators.depth=2",
    "discriminator.width=16",
    "discriminator.depth=2",
    "discriminator.maxout_pieces=1",
    "encoder.width=16",
    "encoder.depth=1",
    f"train.batch_size={BATCH}",
]


def tiny(preset: str = "ring8", *overrides: str) -> GanConfig:
    return load_config(preset, [*TINY, *overrides])


def make(cfg: GanConfig, seed: int = 0) -> GanModel:
    torch.manual_seed(seed)
    return build_model(cfg, POINTS)


def real_batches(n: int, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 2, generator=g) for _ in range(n)]


def feeder(batches: list[Tensor]):
    it = iter(batches)
    return lambda: next(it)


def clone_rng(rng: torch.Generator) -> torch.Generator:
    twin = torch.Generator()
    twin.set_state(rng.get_state())
    return twin


def run_steps(cfg: GanConfig, n: int, seed: int = 0) -> GanModel:
    model = make(cfg, seed)
    n_critic = cfg.objective.n_critic
    reals, rng = real_batches(n * n_critic), torch.Generator().manual_seed(7)
    next_real = feeder(reals)
    for _ in range(n):
        train_step(model, next_real, rng)
    return model


def params(net: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def all_equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- losses per objective, on hand-made critics --------------------------------------------------


class Quadratic(nn.Module):
    """Critic ``D(x) = ||x||^2 / 2`` per row, so ``grad_x D = x``; records every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, int]] = []

    def forward(self, x: Tensor, groups: int = 1) -> Tensor:
        self.calls.append((x.detach().clone(), groups))
        return 0.5 * x.pow(2).sum(1, keepdim=True)


class Energy(nn.Module):
    """EBGAN-shaped critic: energy ``||x||^2`` per row and the point itself as the code."""

    def forward(self, x: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
        return x.pow(2).sum(1), x


class Classes(nn.Module):
    """MAD-GAN-shaped critic for two generators: logits ``[x0, x1, x0 + x1]`` (last = real)."""

    def forward(self, x: Tensor, groups: int = 1) -> Tensor:
        return torch.stack([x[:, 0], x[:, 1], x[:, 0] + x[:, 1]], dim=1)


REAL = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [0.5, 0.5]])
FAKE = torch.tensor([[0.2, -0.1], [1.5, 0.0], [0.0, 0.0], [-0.3, 0.4]])
FAKE_GEN = torch.tensor([0, 0, 1, 1])


def d_of(x: Tensor) -> Tensor:
    return 0.5 * x.pow(2).sum(1)


def log_sigmoid(x: Tensor) -> Tensor:
    return torch.log(1.0 / (1.0 + torch.exp(-x)))


def gan_d_by_hand() -> Tensor:
    return -log_sigmoid(d_of(REAL)).mean() - torch.log(1.0 - torch.sigmoid(d_of(FAKE))).mean()


def unit_norm_penalty(x_hat: Tensor) -> Tensor:
    # grad_x of the quadratic critic is x itself
    return ((x_hat.norm(dim=1) - 1.0) ** 2).mean()


def wgan_gp_by_hand(rng: torch.Generator, weight: float) -> Tensor:
    a = torch.rand(4, 1, generator=rng)
    penalty = unit_norm_penalty(a * REAL + (1 - a) * FAKE)
    return d_of(FAKE).mean() - d_of(REAL).mean() + weight * penalty


def dragan_by_hand(rng: torch.Generator, weight: float, noise: float) -> Tensor:
    u = torch.rand(4, 2, generator=rng)
    a = torch.rand(4, 1, generator=rng)
    perturbed = REAL + noise * REAL.std() * u
    return gan_d_by_hand() + weight * unit_norm_penalty(a * REAL + (1 - a) * perturbed)


@pytest.mark.parametrize("name", ["minimax", "nonsaturating", "mrgan"])
def test_d_loss_gan_family_by_hand_in_one_forward(name):
    cfg = tiny("ring8", f"objective.name={name}")
    critic = Quadratic()
    loss, logs = discriminator_loss(cfg, critic, REAL, FAKE, FAKE_GEN)
    assert loss.item() == pytest.approx(gan_d_by_hand().item(), rel=1e-6)
    assert logs["d_real"].item() == pytest.approx(torch.sigmoid(d_of(REAL)).mean().item())
    assert logs["d_fake"].item() == pytest.approx(torch.sigmoid(d_of(FAKE)).mean().item())
    assert "penalty" not in logs
    # Real and fake go through D together, so minibatch features can keep the two groups apart.
    assert len(critic.calls) == 1
    seen, groups = critic.calls[0]
    assert groups == 2 and torch.equal(seen, torch.cat([REAL, FAKE]))


@pytest.mark.parametrize("weight", [10.0, 0.1])
def test_d_loss_wgan_gp_adds_weighted_penalty(weight):
    cfg = tiny("ring8_wgan_gp", f"objective.gp_weight={weight}")
    rng = torch.Generator().manual_seed(3)
    expected = wgan_gp_by_hand(clone_rng(rng), weight)
    loss, logs = discriminator_loss(cfg, Quadratic(), REAL, FAKE, FAKE_GEN, rng)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["d_real"].item() == pytest.approx(d_of(REAL).mean().item())
    assert logs["d_fake"].item() == pytest.approx(d_of(FAKE).mean().item())
    penalty = (expected - d_of(FAKE).mean() + d_of(REAL).mean()) / weight
    assert logs["penalty"].item() == pytest.approx(penalty.item(), rel=1e-5)


def test_d_loss_dragan_adds_weighted_penalty():
    cfg = tiny("ring8_dragan", "objective.gp_weight=2.0", "objective.dragan_noise=0.3")
    rng = torch.Generator().manual_seed(4)
    expected = dragan_by_hand(clone_rng(rng), 2.0, 0.3)
    loss, logs = discriminator_loss(cfg, Quadratic(), REAL, FAKE, FAKE_GEN, rng)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["penalty"].item() > 0


@pytest.mark.parametrize("preset", ["ring8_wgan_gp", "ring8_dragan"])
def test_penalties_false_or_zero_weight_drops_the_penalty(preset):
    rng = torch.Generator().manual_seed(5)
    before = rng.get_state()
    unpenalised = d_of(FAKE).mean() - d_of(REAL).mean()
    if preset == "ring8_dragan":
        unpenalised = gan_d_by_hand()
    for cfg, penalties in ((tiny(preset), False), (tiny(preset, "objective.gp_weight=0"), True)):
        loss, logs = discriminator_loss(cfg, Quadratic(), REAL, FAKE, FAKE_GEN, rng, penalties)
        assert loss.item() == pytest.approx(unpenalised.item(), rel=1e-6)
        assert "penalty" not in logs
    # No penalty, no random interpolation points: the noise stream is left where it was.
    assert torch.equal(rng.get_state(), before)


def test_d_loss_ebgan_by_hand():
    cfg = tiny("ring8_ebgan", "objective.ebgan_margin=1.5")
    loss, logs = discriminator_loss(cfg, Energy(), REAL, FAKE, FAKE_GEN)
    real_e, fake_e = REAL.pow(2).sum(1), FAKE.pow(2).sum(1)
    # fake energies 0.05, 2.25, 0, 0.25: hinge terms 1.45, 0, 1.5, 1.25
    assert fake_e.tolist() == pytest.approx([0.05, 2.25, 0.0, 0.25])
    expected = real_e.mean().item() + (1.45 + 0.0 + 1.5 + 1.25) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["d_real"].item() == pytest.approx(real_e.mean().item())
    assert logs["d_fake"].item() == pytest.approx(fake_e.mean().item())


def cross_entropy_by_hand(logits: Tensor, target: Tensor) -> Tensor:
    log_z = torch.log(torch.exp(logits).sum(1))
    return (log_z - logits[torch.arange(len(target)), target]).mean()


def test_d_loss_madgan_by_hand():
    cfg = tiny("ring8_madgan", "generators.count=2")
    loss, logs = discriminator_loss(cfg, Classes(), REAL, FAKE, FAKE_GEN)
    real_logits, fake_logits = Classes()(REAL), Classes()(FAKE)
    expected = cross_entropy_by_hand(real_logits, torch.full((4,), 2)) + cross_entropy_by_hand(
        fake_logits, FAKE_GEN
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    p_real = torch.exp(real_logits[:, 2]) / torch.exp(real_logits).sum(1)
    assert logs["d_real"].item() == pytest.approx(p_real.mean().item(), rel=1e-6)


def test_d_loss_packs_pairs_of_samples():
    cfg = tiny("ring8_pacgan")
    critic = Quadratic()
    loss, _ = discriminator_loss(cfg, critic, REAL, FAKE, FAKE_GEN)
    real_packed, fake_packed = REAL.reshape(2, 4), FAKE.reshape(2, 4)
    expected = (
        -log_sigmoid(d_of(real_packed)).mean()
        - torch.log(1.0 - torch.sigmoid(d_of(fake_packed))).mean()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(critic.calls[0][0], torch.cat([real_packed, fake_packed]))


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("ring8", lambda f: -log_sigmoid(f).mean()),
        ("ring8_mrgan", lambda f: -log_sigmoid(f).mean()),
        ("ring8_dragan", lambda f: -log_sigmoid(f).mean()),
        ("ring8_wgan_gp", lambda f: -f.mean()),
        ("minimax", lambda f: torch.log(1.0 - torch.sigmoid(f)).mean()),
    ],
)
def test_g_loss_by_hand_in_one_forward(preset, expected):
    cfg = tiny("ring8", "objective.name=minimax") if preset == "minimax" else tiny(preset)
    critic = Quadratic()
    loss = generator_loss(cfg, critic, FAKE)
    assert loss.item() == pytest.approx(expected(d_of(FAKE)).item(), rel=1e-6)
    assert len(critic.calls) == 1 and critic.calls[0][1] == 1


def test_g_loss_ebgan_energy_plus_pulling_away():
    cfg = tiny("ring8_ebgan", "objective.ebgan_pt_weight=0.3")
    fake = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # squared cosines: 0 for the axes, 1/2 for each axis with the diagonal: PT = 2 * 1 / (3 * 2)
    expected = (1.0 + 1.0 + 2.0) / 3 + 0.3 * (1.0 / 3.0)
    assert generator_loss(cfg, Energy(), fake).item() == pytest.approx(expected, rel=1e-6)


def test_g_loss_madgan_targets_the_real_class():
    cfg = tiny("ring8_madgan", "generators.count=2")
    expected = cross_entropy_by_hand(Classes()(FAKE), torch.full((4,), 2))
    assert generator_loss(cfg, Classes(), FAKE).item() == pytest.approx(expected.item(), rel=1e-6)


# --- the composed step ---------------------------------------------------------------------------


def replay_d_phase(model: GanModel, reals: list[Tensor], rng: torch.Generator) -> None:
    """D's update(s) of one train_step, done here on their own (same calls, same streams)."""
    cfg = model.cfg
    count = cfg.generators.count
    fake_generator = torch.arange(count).repeat_interleave(BATCH // count)
    for real in reals:
        with torch.no_grad():
            fake = model.generator(sample_noise(model, BATCH, rng, "cpu")).reshape(BATCH, 2)
        loss, _ = discriminator_loss(cfg, model.discriminator, real, fake, fake_generator, rng)
        model.d_opt.zero_grad(set_to_none=True)
        loss.backward()
        model.d_opt.step()


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("ring8", ()),
        ("ring8_unrolled", ("unroll.steps=2",)),
        ("ring8_unrolled", ("unroll.steps=2", "unroll.second_order=false")),
        ("ring8_mrgan", ()),
        ("ring8_wgan_gp", ("objective.n_critic=2",)),
    ],
)
def test_g_phase_leaves_d_untouched(preset, extra):
    model = make(tiny(preset, *extra))
    replay = copy.deepcopy(model)
    n_critic = model.cfg.objective.n_critic
    reals = real_batches(n_critic)
    rng = torch.Generator().manual_seed(11)
    replay_d_phase(replay, reals, clone_rng(rng))
    train_step(model, feeder(reals), rng)
    d, d_ref = model.discriminator, replay.discriminator
    # D's weights and .grad are exactly those of its own phase: G's phase added nothing.
    assert all_equal(params(d), params(d_ref))
    assert all_equal([p.grad for p in d.parameters()], [p.grad for p in d_ref.parameters()])
    assert all(p.requires_grad for p in d.parameters())
    # ...while G did move.
    assert not all_equal(params(model.generator), params(replay.generator))


def test_d_is_unfrozen_even_when_the_g_phase_fails(monkeypatch):
    model = make(tiny())

    def broken(*args, **kwargs):
        assert not any(p.requires_grad for p in model.discriminator.parameters())
        raise RuntimeError("G loss failed")

    monkeypatch.setattr(steps, "generator_loss", broken)
    with pytest.raises(RuntimeError, match="G loss failed"):
        train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))
    assert all(p.requires_grad for p in model.discriminator.parameters())


def test_n_critic_draws_one_real_batch_per_d_update():
    model = make(tiny("ring8_wgan_gp", "objective.n_critic=3"))
    calls = []
    reals = real_batches(6)

    def next_real() -> Tensor:
        calls.append(1)
        return reals[len(calls) - 1]

    rng = torch.Generator().manual_seed(0)
    train_step(model, next_real, rng)
    train_step(model, next_real, rng)
    assert len(calls) == 6
    first = next(iter(model.discriminator.parameters()))
    assert int(model.d_opt.state[first]["step"]) == 6
    assert int(model.g_opt.state[next(iter(model.generator.parameters()))]["step"]) == 2


def test_unroll_zero_is_the_plain_step():
    plain = run_steps(tiny("ring8"), 2)
    zero = run_steps(tiny("ring8_unrolled", "unroll.steps=0"), 2)
    assert all_equal(params(plain.generator), params(zero.generator))
    assert all_equal(params(plain.discriminator), params(zero.discriminator))


def test_unroll_changes_g_but_not_ds_real_update():
    lookahead = ["d_optim.lr=0.05"]
    zero = run_steps(tiny("ring8_unrolled", "unroll.steps=0", *lookahead), 1)
    second = run_steps(tiny("ring8_unrolled", "unroll.steps=3", *lookahead), 1)
    first = run_steps(
        tiny("ring8_unrolled", "unroll.steps=3", "unroll.second_order=false", *lookahead), 1
    )
    assert not all_equal(params(zero.generator), params(second.generator))
    assert not all_equal(params(second.generator), params(first.generator))
    # D's real update is one step whatever the look-ahead: the look-ahead is a pure function.
    for unrolled in (second, first):
        assert all_equal(params(zero.discriminator), params(unrolled.discriminator))
        for p0, p1 in zip(
            zero.discriminator.parameters(), unrolled.discriminator.parameters(), strict=True
        ):
            assert torch.equal(zero.d_opt.state[p0]["exp_avg"], unrolled.d_opt.state[p1]["exp_avg"])


def test_first_order_unroll_is_g_against_d_after_one_more_real_step():
    cfg = tiny(
        "ring8_unrolled",
        "unroll.steps=1",
        "unroll.second_order=false",
        "d_optim.name=sgd",
        "d_optim.lr=0.5",
        "generators.batch_norm=false",
    )
    model = make(cfg)
    replay = copy.deepcopy(model)
    reals = real_batches(1)
    rng = torch.Generator().manual_seed(2)
    replay_rng = clone_rng(rng)
    train_step(model, feeder(reals), rng)

    replay_d_phase(replay, reals, replay_rng)
    fake = replay.generator(sample_noise(replay, BATCH, replay_rng, "cpu")).reshape(BATCH, 2)
    ahead = copy.deepcopy(replay.discriminator)
    sgd = torch.optim.SGD(ahead.parameters(), lr=0.5)
    discriminator_loss(cfg, ahead, reals[0], fake.detach(), torch.zeros(BATCH))[0].backward()
    sgd.step()
    ahead.requires_grad_(False)
    (-log_sigmoid(ahead(fake)).mean()).backward(retain_graph=True)
    expected = [p.grad.clone() for p in replay.generator.parameters()]
    got = [p.grad for p in model.generator.parameters()]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    # The same G gradient against the un-advanced D is different: the look-ahead mattered.
    replay.generator.zero_grad()
    (-log_sigmoid(replay.discriminator(fake)).mean()).backward()
    assert not all(
        torch.allclose(a, p.grad) for a, p in zip(got, replay.generator.parameters(), strict=True)
    )


def test_ema_is_the_hand_moving_average():
    model = make(tiny("ring8", "train.ema=0.75"))
    start = params(model.generator)
    assert all_equal(params(model.ema), start)
    reals, rng = real_batches(2), torch.Generator().manual_seed(0)
    train_step(model, feeder(reals[:1]), rng)
    after_one = params(model.generator)
    ema_one = [0.75 * s + 0.25 * n for s, n in zip(start, after_one, strict=True)]
    for e, want in zip(model.ema.parameters(), ema_one, strict=True):
        torch.testing.assert_close(e, want, rtol=0, atol=1e-7)
    train_step(model, feeder(reals[1:]), rng)
    after_two = params(model.generator)
    for e, prev, g in zip(model.ema.parameters(), ema_one, after_two, strict=True):
        torch.testing.assert_close(e, 0.75 * prev + 0.25 * g, rtol=0, atol=1e-7)
    # BatchNorm running statistics are neither G's nor averaged: sampling recomputes them
    # (tests/gan_core/test_ema_batchnorm.py); training leaves the EMA's untouched.
    assert not all_equal(list(model.ema.buffers()), list(model.generator.buffers()))
    assert not any(p.requires_grad for p in model.ema.parameters())


def test_no_ema_by_default_and_sampler_falls_back_to_g():
    model = make(tiny("ring8"))
    assert model.ema is None and model.sampler() is model.generator


def test_lr_factor_values():
    assert [lr_factor("constant", s, 10) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
    assert lr_factor("cosine", 0, 10) == pytest.approx(1.0)
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 1, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert [lr_factor("linear", s, 4) for s in (0, 1, 3, 4, 9)] == [1.0, 0.75, 0.25, 0.0, 0.0]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_reaches_both_optimizers(schedule):
    cfg = tiny(
        "ring8",
        f"train.lr_schedule={schedule}",
        "train.steps=4",
        "g_optim.lr=0.01",
        "d_optim.lr=0.003",
    )
    model = make(cfg)
    reals, rng = real_batches(3), torch.Generator().manual_seed(0)
    next_real = feeder(reals)
    for k in range(3):
        train_step(model, next_real, rng)
        factor = lr_factor(schedule, k, 4)
        assert model.g_opt.param_groups[0]["lr"] == pytest.approx(0.01 * factor, rel=1e-12)
        assert model.d_opt.param_groups[0]["lr"] == pytest.approx(0.003 * factor, rel=1e-12)
    assert model.step == 3


def test_madgan_labels_each_fake_by_the_generator_that_made_it(monkeypatch):
    model = make(tiny("ring8_madgan"))  # 4 generators, batch 8: 2 fakes each
    before = copy.deepcopy(model.generator)
    seen: dict[str, Tensor] = {}
    outputs: list[tuple[int, ...]] = []
    real_loss, real_noise = steps.discriminator_loss, steps.sample_noise

    def record_loss(cfg, d, real, fake, fake_generator, *args, **kwargs):
        seen["fake"], seen["labels"] = fake.clone(), fake_generator.clone()
        return real_loss(cfg, d, real, fake, fake_generator, *args, **kwargs)

    def record_noise(*args, **kwargs):
        z = real_noise(*args, **kwargs)
        seen.setdefault("z", z.clone())
        return z

    monkeypatch.setattr(steps, "discriminator_loss", record_loss)
    monkeypatch.setattr(steps, "sample_noise", record_noise)
    model.discriminator.register_forward_hook(lambda m, i, o: outputs.append(tuple(o.shape)))
    train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))

    assert seen["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with torch.no_grad():
        for k in range(4):
            made = before.generators[k](seen["z"][k])
            torch.testing.assert_close(seen["fake"][seen["labels"] == k], made)
    assert outputs == [(16, 5), (8, 5)]  # real + fake, then G's fakes: 4 generators + real


def test_composed_unrolled_madgan_with_minibatch_trains():
    cfg = tiny(
        "ring8_madgan",
        "unroll.steps=2",
        "discriminator.minibatch.kernels=4",
        "objective.madgan_diversity=0.5",
    )
    model = make(cfg)
    rng = torch.Generator().manual_seed(0)
    next_real = feeder(real_batches(2))
    start = params(model.generator)
    for _ in range(2):
        metrics = train_step(model, next_real, rng)
        assert {"d_loss", "g_loss", "g_adv", "diversity", "d_real", "d_fake"} <= set(metrics)
        assert all(math.isfinite(v) for v in metrics.values())
        assert all(type(v) is float for v in metrics.values())
    assert not all_equal(start, params(model.generator))
    # The total G loss is its adversarial part plus the weighted diversity penalty.
    assert metrics["g_loss"] == pytest.approx(
        metrics["g_adv"] + 0.5 * metrics["diversity"], rel=1e-5
    )


def test_mrgan_trains_encoder_with_g_and_logs_the_regularizer():
    model = make(tiny("ring8_mrgan"))
    encoder_start = params(model.encoder)
    metrics = train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))
    assert not all_equal(encoder_start, params(model.encoder))
    assert metrics["mode_reg"] > 0
    assert metrics["g_loss"] == pytest.approx(metrics["g_adv"] + metrics["mode_reg"], rel=1e-5)


def test_mrgan_regularizer_pairs_each_real_with_its_reconstruction():
    cfg = tiny("ring8_mrgan", "objective.mrgan_geometric=0.2", "objective.mrgan_mode=0.4")
    model = make(cfg)
    replay = copy.deepcopy(model)
    reals, rng = real_batches(1), torch.Generator().manual_seed(0)
    replay_rng = clone_rng(rng)
    metrics = train_step(model, feeder(reals), rng)

    replay_d_phase(replay, reals, replay_rng)
    sample_noise(replay, BATCH, replay_rng, "cpu")  # G(z)'s draw, before the reconstruction
    with torch.no_grad():
        z_rec = replay.encoder(reals[0]).reshape(1, BATCH, 2)
        # G(E(x)) in its own forward: batch-norm statistics of the codes alone (test_mrgan).
        recon = replay.generator(z_rec)[0]
        logits = replay.discriminator(recon)
    distance = (reals[0] - recon).pow(2).sum(1).mean()
    expected = 0.2 * distance + 0.4 * (-log_sigmoid(logits)).mean()
    assert metrics["mode_reg"] == pytest.approx(expected.item(), rel=1e-5)


def test_pacgan_d_sees_packed_inputs():
    model = make(tiny("ring8_pacgan"))
    seen: list[tuple[tuple[int, ...], int]] = []
    model.discriminator.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((tuple(args[0].shape), kwargs["groups"])),
        with_kwargs=True,
    )
    train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))
    # D phase: 8 real + 8 fake in pairs, in one call; G phase: the 8 fakes in pairs.
    assert seen == [((BATCH, 4), 2), ((BATCH // 2, 4), 1)]


def test_sample_noise_shares_the_batch_equally():
    model = make(tiny("ring8_madgan", "generators.z_dim=3"))
    z = sample_noise(model, BATCH, torch.Generator().manual_seed(0), "cpu")
    assert z.shape == (4, 2, 3)
    again = sample_noise(model, BATCH, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(z, again)


def test_sample_uses_eval_mode_and_restores_training():
    model = make(tiny("ring8", "train.ema=0.9"))
    train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))
    z = torch.randn(1, 5, 2)
    out = model.sample(z)
    assert out.shape == (5, 2) and model.ema.training
    with torch.no_grad():
        model.ema.eval()
        want = model.ema(z).reshape(5, 2)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(model.sample(z, use_ema=False), out)


class Wrapper(nn.Module):
    """Stands in for DDP: holds the network as ``.module``, so its own keys say ``module.``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_state_dict_is_unwrapped_and_round_trips():
    model = make(tiny("ring8_mrgan", "train.ema=0.9"))
    plain_keys = {k: set(v) for k, v in model.state_dict().items() if isinstance(v, dict)}
    model.wrap(Wrapper)
    assert isinstance(model.generator, Wrapper) and isinstance(model.encoder, Wrapper)
    assert all(k.startswith("module.") for k in model.discriminator.state_dict())
    train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))
    state = model.state_dict()
    assert set(state) == {"generator", "discriminator", "encoder", "ema", "g_opt", "d_opt", "step"}
    for net in ("generator", "discriminator", "encoder", "ema"):
        assert set(state[net]) == plain_keys[net]
        assert not any(k.startswith("module.") for k in state[net])
    assert state["step"] == 1

    fresh = make(tiny("ring8_mrgan", "train.ema=0.9"), seed=5)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.step == 1
    for net in ("generator", "discriminator", "encoder"):
        assert all_equal(params(getattr(fresh, net)), params(unwrap(getattr(model, net))))
    assert all_equal(params(fresh.ema), params(model.ema))
    assert fresh.g_opt.state_dict()["state"][0]["step"] == 1
    assert fresh.d_opt.state_dict()["state"][0]["step"] == 1


def test_load_state_dict_refuses_another_variant():
    with_ema = make(tiny("ring8", "train.ema=0.9")).state_dict()
    model = make(tiny("ring8"))
    with pytest.raises(ValueError, match="ema"):
        model.load_state_dict(with_ema)
    state = model.state_dict()
    del state["d_opt"]
    with pytest.raises(ValueError, match="d_opt"):
        model.load_state_dict(state)
    untouched = params(model.generator)
    with pytest.raises(ValueError):
        model.load_state_dict({**model.state_dict(), "extra": 1})
    assert all_equal(untouched, params(model.generator))


def test_unwrap():
    inner = nn.Linear(2, 2)
    assert unwrap(Wrapper(inner)) is inner and unwrap(inner) is inner
