"""MRGAN (Che et al. 2017): G(z) and G(E(x)) normalised apart, and the manifold-diffusion
schedule (objective.mrgan_diffusion): its four losses and updates by hand on hand-made nets, the
encoder's part in each step, the second discriminator in checkpoints, fp16 and compile, and the
configs that refuse it. Also that the default configs still train as they did before."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from gan_core.config import ConfigError, GanConfig, load_config
from gan_core.nets import Discriminator
from gan_core.steps import (
    GanModel,
    compile_networks,
    frozen_batch_norm_stats,
    make_optimizer,
    sample_noise,
    train_step,
    unwrap,
)
from tests.gan_core.test_loop import checkpoint_round_trip
from tests.gan_core.test_steps import (
    BATCH,
    REAL,
    Wrapper,
    all_equal,
    clone_rng,
    feeder,
    log_sigmoid,
    make,
    params,
    real_batches,
    replay_d_phase,
    tiny,
)

DIFFUSION = "ring8_mrgan_diffusion"


def batch_norms(net: nn.Module) -> list[nn.Module]:
    return [m for m in unwrap(net).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_buffers(net: nn.Module) -> list[Tensor]:
    return [b.detach().clone() for m in batch_norms(net) for b in m.buffers()]


def record_forwards(net: nn.Module) -> list[tuple[Tensor, Tensor, bool]]:
    """(input, output, grad enabled) of every forward of ``net`` from now on."""
    calls: list[tuple[Tensor, Tensor, bool]] = []
    net.register_forward_hook(
        lambda m, args, out: calls.append(
            (args[0].detach().clone(), out.detach().clone(), torch.is_grad_enabled())
        )
    )
    return calls


# --- 1. G(z) and G(E(x)) get batch statistics of their own -----------------------------------


def test_mrgan_g_of_z_is_g_on_z_alone_and_sets_the_running_statistics_alone():
    model = make(tiny("ring8_mrgan"))
    assert batch_norms(model.generator)  # the test means something only with BatchNorm in G
    replay = copy.deepcopy(model)
    reals, rng = real_batches(1), torch.Generator().manual_seed(0)
    replay_rng = clone_rng(rng)
    calls = record_forwards(model.generator)
    metrics = train_step(model, feeder(reals), rng)

    replay_d_phase(replay, reals, replay_rng)
    z = sample_noise(replay, BATCH, replay_rng, "cpu")
    before_g_of_z = copy.deepcopy(replay.generator)
    with torch.no_grad():
        codes = replay.encoder(reals[0]).reshape(1, BATCH, 2)
        alone = replay.generator(z)  # training mode: batch statistics, running ones updated
        joint = copy.deepcopy(before_g_of_z)
        joint(torch.cat([z, codes], dim=1))  # the old single forward, for contrast
        recon = copy.deepcopy(before_g_of_z)(codes)
        logits = replay.discriminator(recon.reshape(BATCH, 2))

    # (a) The G phase's two forwards with a graph: G(z), then G(E(x)), each on its own batch.
    (z_in, g_of_z, _), (codes_in, g_of_codes, _) = [c for c in calls if c[2]]
    assert torch.equal(z_in, z) and torch.equal(codes_in, codes)
    assert torch.equal(g_of_z, alone)
    torch.testing.assert_close(g_of_codes, recon, rtol=0, atol=1e-6)
    # (b) The running statistics are those of the D phase's G(z) and this G(z), nothing else.
    assert all_equal(bn_buffers(model.generator), bn_buffers(replay.generator))
    assert not all_equal(bn_buffers(model.generator), bn_buffers(joint))
    # The regularizer pairs each real with its reconstruction (replaces test_steps'
    # one-forward version of this check).
    recon = recon.reshape(BATCH, 2)
    distance = (reals[0] - recon).pow(2).sum(1).mean()
    expected = 0.2 * distance + 0.4 * (-log_sigmoid(logits)).mean()
    assert metrics["mode_reg"] == pytest.approx(expected.item(), rel=1e-5)


def test_frozen_batch_norm_stats_uses_batch_statistics_and_restores_tracking():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]])
    before = bn_buffers(net)
    with frozen_batch_norm_stats(Wrapper(net)):
        out = net(x)
    h = net[0](x)
    by_hand = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out, by_hand)
    assert all_equal(bn_buffers(net), before)  # num_batches_tracked included
    assert net[1].track_running_stats
    net(x)
    assert int(net[1].num_batches_tracked) == 1


@pytest.mark.parametrize("preset", ["ring8_mrgan", DIFFUSION])
def test_compiled_mrgan_keeps_running_statistics_of_g_of_z_only(preset):
    cfg = tiny(preset)
    eager, fast = make(cfg), make(cfg)
    compile_networks(fast, backend="aot_eager")
    reals = real_batches(2 * cfg.objective.n_critic)
    for model in (eager, fast):
        rng = torch.Generator().manual_seed(3)
        next_real = feeder(list(reals))
        for _ in range(2):
            train_step(model, next_real, rng)
    # A compiled graph that ignored the frozen statistics would count the reconstructions'
    # forwards too (and fold their statistics into the running ones).
    for a, b in zip(bn_buffers(fast.generator), bn_buffers(eager.generator), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Only G(z) counts, twice a step: a no-grad forward before a D update (D_D's, with the
    # schedule) and the G update's.
    assert {int(m.num_batches_tracked) for m in batch_norms(fast.generator)} == {4}


# --- 2. the manifold-diffusion schedule on hand-made nets ------------------------------------


class Affine(nn.Module):
    """G: ``z * scale + shift`` per coordinate, on noise of shape (count, m, 2)."""

    def __init__(self, scale: list[float], shift: list[float]) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.shift = nn.Parameter(torch.tensor(shift))

    def forward(self, z: Tensor) -> Tensor:
        return z * self.scale + self.shift


class Gain(nn.Module):
    """E: ``x * gain`` per coordinate."""

    def __init__(self, gain: list[float]) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class Logit(nn.Module):
    """A linear critic: logit ``x . w + b`` per row, shape (n, 1)."""

    def __init__(self, w: list[float], b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x: Tensor, groups: int = 1) -> Tensor:
        return (x @ self.w + self.b).unsqueeze(1)


G0 = ([1.5, 0.5], [0.1, -0.2])
E0 = [0.5, -1.0]
DM0 = ([0.3, -0.4], 0.1)
DD0 = ([-0.2, 0.6], -0.05)
LR = 0.1


def hand_model(*overrides: str, optimizer: str = "sgd") -> GanModel:
    cfg = tiny(
        DIFFUSION,
        "train.batch_size=4",
        "train.lr_schedule=constant",
        f"g_optim.name={optimizer}",
        f"d_optim.name={optimizer}",
        f"g_optim.lr={LR}",
        f"d_optim.lr={LR}",
        *overrides,
    )
    g, e, dm, dd = Affine(*G0), Gain(E0), Logit(*DM0), Logit(*DD0)
    return GanModel(
        cfg=cfg,
        data_shape=(2,),
        generator=g,
        discriminator=dm,
        encoder=e,
        g_opt=make_optimizer([*g.parameters(), *e.parameters()], cfg.g_optim),
        d_opt=make_optimizer(list(dm.parameters()), cfg.d_optim),
        ema=None,
        diffusion_discriminator=dd,
        dd_opt=make_optimizer(list(dd.parameters()), cfg.d_optim),
    )


def g_of(z: Tensor, g: tuple[list[float], list[float]] = G0) -> Tensor:
    return z * torch.tensor(g[0]) + torch.tensor(g[1])


def logit(x: Tensor, d: tuple[Tensor | list[float], Tensor | float]) -> Tensor:
    return x @ torch.as_tensor(d[0]) + torch.as_tensor(d[1])


def sigmoid(x: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def d_loss_by_hand(real: Tensor, fake: Tensor, d: tuple) -> Tensor:
    """-E log D(real) - E log(1 - D(fake)) for a linear critic."""
    return -log_sigmoid(logit(real, d)).mean() - torch.log(1.0 - sigmoid(logit(fake, d))).mean()


def d_step_by_hand(real: Tensor, fake: Tensor, d: tuple) -> tuple[Tensor, Tensor]:
    """One SGD step of a linear critic on ``d_loss_by_hand``: the gradients written out."""
    pull = -(1.0 - sigmoid(logit(real, d)))  # d/dlogit of -log sigmoid
    push = sigmoid(logit(fake, d))  # d/dlogit of -log(1 - sigmoid)
    grad_w = (pull[:, None] * real).mean(0) + (push[:, None] * fake).mean(0)
    grad_b = pull.mean() + push.mean()
    return torch.as_tensor(d[0]) - LR * grad_w, torch.as_tensor(d[1]) - LR * grad_b


def noise_draws(n: int, seed: int) -> list[Tensor]:
    rng = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, 2, generator=rng).reshape(4, 2) for _ in range(n)]


def test_the_four_losses_by_hand():
    model = hand_model("train.lr_schedule=linear", "train.steps=1")
    model.step = 1  # past the end of a linear schedule every rate is 0: nothing moves
    metrics = train_step(model, feeder([REAL]), torch.Generator().manual_seed(5))
    z1, z2 = noise_draws(2, seed=5)  # D_D's update, then G's diffusion update
    recon = g_of(REAL * torch.tensor(E0))
    dm = d_loss_by_hand(REAL, recon, DM0)
    mode_reg = (
        0.2 * (REAL - recon).pow(2).sum(1).mean() - 0.4 * log_sigmoid(logit(recon, DM0)).mean()
    )
    dd = d_loss_by_hand(recon, g_of(z1), DD0)
    g_diffusion = -log_sigmoid(logit(g_of(z2), DD0)).mean()
    expected = {
        "d_loss": dm,
        "d_real": sigmoid(logit(REAL, DM0)).mean(),
        "d_fake": sigmoid(logit(recon, DM0)).mean(),
        "mode_reg": mode_reg,
        "dd_loss": dd,
        "dd_real": sigmoid(logit(recon, DD0)).mean(),
        "dd_fake": sigmoid(logit(g_of(z1), DD0)).mean(),
        "g_diffusion": g_diffusion,
        "g_loss": mode_reg + g_diffusion,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value.item(), rel=1e-6), key
        assert type(metrics[key]) is float
    assert all_equal(params(model.generator), [torch.tensor(G0[0]), torch.tensor(G0[1])])


def test_each_update_by_hand_and_d_d_learns_from_reconstructions_against_samples():
    # Regularizer weights 0: the manifold step's G/E update is a zero step, so the diffusion
    # step sees G and E as they started and every update below is one SGD step by hand.
    model = hand_model("objective.mrgan_geometric=0", "objective.mrgan_mode=0")
    train_step(model, feeder([REAL]), torch.Generator().manual_seed(5))
    z1, z2 = noise_draws(2, seed=5)
    recon = g_of(REAL * torch.tensor(E0))
    # D_M: real x against G(E(x)).
    dm_w, dm_b = d_step_by_hand(REAL, recon, DM0)
    torch.testing.assert_close(model.discriminator.w.detach(), dm_w)
    torch.testing.assert_close(model.discriminator.b.detach(), dm_b)
    # D_D: G(E(x)) as its real side against G(z); x reaches it only through G(E(x)).
    dd_w, dd_b = d_step_by_hand(recon, g_of(z1), DD0)
    torch.testing.assert_close(model.diffusion_discriminator.w.detach(), dd_w)
    torch.testing.assert_close(model.diffusion_discriminator.b.detach(), dd_b)
    # G: -log D_D(G(z2)) against the UPDATED D_D; d/dq = -(1 - sigmoid(logit)) * w.
    pull = -(1.0 - sigmoid(logit(g_of(z2), (dd_w, dd_b))))
    grad_scale = (pull[:, None] * dd_w * z2).mean(0)
    grad_shift = (pull[:, None] * dd_w).mean(0)
    torch.testing.assert_close(
        model.generator.scale.detach(), torch.tensor(G0[0]) - LR * grad_scale
    )
    torch.testing.assert_close(
        model.generator.shift.detach(), torch.tensor(G0[1]) - LR * grad_shift
    )
    assert torch.equal(model.encoder.gain.detach(), torch.tensor(E0))


def test_manifold_update_moves_e_by_hand():
    model = hand_model()
    train_step(model, feeder([REAL]), torch.Generator().manual_seed(5))
    e, s = torch.tensor(E0), torch.tensor(G0[0])
    recon = g_of(REAL * e)
    dm = d_step_by_hand(REAL, recon, DM0)  # the mode term is judged by the updated D_M
    # d/de of 0.2 ||x - (x e s + t)||^2 + 0.4 softplus(-logit_M(r)), with dr/de = x s.
    pull = -(1.0 - sigmoid(logit(recon, dm)))
    grad = (0.2 * -2.0 * (REAL - recon) * REAL * s + 0.4 * pull[:, None] * dm[0] * REAL * s).mean(0)
    # E moves by that step alone: the diffusion step's G update gives E no gradient.
    torch.testing.assert_close(model.encoder.gain.detach(), e - LR * grad)


def test_diffusion_update_leaves_e_and_its_adam_moments_alone():
    model = make(tiny(DIFFUSION))
    start = params(model.encoder)
    train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))
    assert not all_equal(start, params(model.encoder))
    state = model.g_opt.state
    # Two G updates per step (manifold, diffusion), one of E: a zero gradient instead of none
    # would have let Adam move E a second time on its momentum.
    assert {int(state[p]["step"]) for p in model.generator.parameters()} == {2}
    assert {int(state[p]["step"]) for p in model.encoder.parameters()} == {1}
    assert {int(model.d_opt.state[p]["step"]) for p in model.discriminator.parameters()} == {1}
    dd_state = model.dd_opt.state
    assert {int(dd_state[p]["step"]) for p in model.diffusion_discriminator.parameters()} == {1}


def test_critics_are_frozen_in_g_updates_and_each_d_updates_in_its_own_phase():
    model = make(tiny(DIFFUSION, "objective.n_critic=2"))
    seen: dict[str, list[tuple[Tensor, bool]]] = {"D": [], "DD": []}
    for name, net in (("D", model.discriminator), ("DD", model.diffusion_discriminator)):
        net.register_forward_hook(
            lambda m, args, out, name=name: seen[name].append(
                (args[0].detach().clone(), any(p.requires_grad for p in m.parameters()))
            )
        )
    reals = real_batches(2)
    metrics = train_step(model, feeder(reals), torch.Generator().manual_seed(0))
    # D_M: two updates on [x; G(E(x))] (2 x 8 rows), then, frozen, G/E's mode term on 8
    # reconstructions. D_D: two updates on [G(E(x)); G(z)], then, frozen, G's diffusion loss.
    for name in ("D", "DD"):
        assert [(x.shape[0], trainable) for x, trainable in seen[name]] == [
            (16, True),
            (16, True),
            (8, False),
        ], name
    assert torch.equal(seen["D"][0][0][:BATCH], reals[0])
    assert torch.equal(seen["D"][1][0][:BATCH], reals[1])
    # No real row ever reaches D_D: its real side is the reconstructions.
    for x, _ in seen["DD"]:
        for real in reals:
            assert not (x[:, None, :] == real[None]).all(-1).any()
    assert all(p.requires_grad for p in model.discriminator.parameters())
    assert all(p.requires_grad for p in model.diffusion_discriminator.parameters())
    assert {"dd_loss", "dd_real", "dd_fake", "mode_reg", "g_diffusion"} <= set(metrics)


def test_diffusion_off_is_mrgan_as_before_and_on_changes_the_step():
    off = make(tiny("ring8_mrgan", "objective.mrgan_diffusion=false"))
    plain = make(tiny("ring8_mrgan"))
    on = make(tiny(DIFFUSION))
    assert off.diffusion_discriminator is None and off.dd_opt is None
    results = []
    for model in (off, plain, on):
        results.append(train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0)))
    assert results[0] == results[1]
    assert all_equal(params(off.generator), params(plain.generator))
    assert "dd_loss" not in results[0] and "dd_loss" in results[2]
    # Built last, D_D leaves every other network's initial weights as they were.
    with_dd, without = make(tiny(DIFFUSION)), make(tiny("ring8_mrgan"))
    for net in ("generator", "discriminator", "encoder"):
        assert all_equal(params(getattr(with_dd, net)), params(getattr(without, net)))


# --- checkpoints, wrapping, fp16 -------------------------------------------------------------


def test_checkpoint_round_trip_with_d_d_resumes_bit_identically():
    cfg = tiny(DIFFUSION, "train.ema=0.9")
    model = make(cfg)
    model.wrap(Wrapper)
    assert isinstance(model.diffusion_discriminator, Wrapper)
    reals, rng = real_batches(3), torch.Generator().manual_seed(0)
    next_real = feeder(reals)
    train_step(model, next_real, rng)
    state = checkpoint_round_trip(model.state_dict())
    nets = {"generator", "discriminator", "encoder", "diffusion_discriminator", "ema"}
    assert set(state) == nets | {"g_opt", "d_opt", "dd_opt", "step"}
    assert not any(k.startswith("module.") for k in state["diffusion_discriminator"])
    fresh = make(cfg, seed=5)
    assert not all_equal(
        params(fresh.diffusion_discriminator), params(unwrap(model.diffusion_discriminator))
    )
    fresh.load_state_dict(state)
    assert all_equal(
        params(fresh.diffusion_discriminator), params(unwrap(model.diffusion_discriminator))
    )
    fresh_rng = clone_rng(rng)
    assert train_step(fresh, feeder(reals[1:]), fresh_rng) == train_step(model, next_real, rng)
    for net in ("generator", "discriminator", "encoder", "diffusion_discriminator"):
        assert all_equal(params(getattr(fresh, net)), params(unwrap(getattr(model, net))))


def test_checkpoints_without_d_d_keep_loading_and_the_two_kinds_never_mix():
    plain_state = make(tiny("ring8_mrgan")).state_dict()
    assert set(plain_state) == {"generator", "discriminator", "encoder", "g_opt", "d_opt", "step"}
    make(tiny("ring8_mrgan", "objective.mrgan_diffusion=false")).load_state_dict(plain_state)
    with pytest.raises(ValueError, match="diffusion_discriminator"):
        make(tiny(DIFFUSION)).load_state_dict(plain_state)
    with pytest.raises(ValueError, match="diffusion_discriminator"):
        make(tiny("ring8_mrgan")).load_state_dict(make(tiny(DIFFUSION)).state_dict())


def test_fp16_diffusion_has_a_scaler_for_d_d():
    model = make(tiny(DIFFUSION, "train.precision=fp16"))
    assert model.dd_scaler is not None and model.dd_scaler is not model.d_scaler
    next_real, rng = feeder(real_batches(2)), torch.Generator().manual_seed(0)
    for _ in range(2):
        metrics = train_step(model, next_real, rng)
    assert {"amp_scale_dd", "dd_loss", "g_diffusion"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    state = model.state_dict()
    assert "dd_scaler" in state
    fresh = make(tiny(DIFFUSION, "train.precision=fp16"), seed=3)
    fresh.load_state_dict(state)
    assert fresh.dd_scaler.get_scale() == model.dd_scaler.get_scale()


def test_d_d_has_ds_architecture_and_the_preset_trains_with_packing():
    model = make(tiny(DIFFUSION, "discriminator.pack=2"))
    dd, d = model.diffusion_discriminator, model.discriminator
    assert isinstance(dd, Discriminator) and dd is not d
    assert [p.shape for p in dd.parameters()] == [p.shape for p in d.parameters()]
    metrics = train_step(model, feeder(real_batches(1)), torch.Generator().manual_seed(0))
    assert all(math.isfinite(v) for v in metrics.values())


# --- config ----------------------------------------------------------------------------------


ON = "objective.mrgan_diffusion=true"
REFUSALS = [
    ("ring8", ON, "objective.mrgan_diffusion", "set objective.name=mrgan"),
    ("ring8_madgan", ON, "objective.mrgan_diffusion", "false with objective madgan"),
    (DIFFUSION, "unroll.steps=1", "unroll.steps", f"0 with {ON}"),
    (DIFFUSION, "generators.count=2", "generators.count", f"1 with {ON}"),
]


@pytest.mark.parametrize(("preset", "override", "key", "allowed"), REFUSALS)
def test_configs_that_refuse_the_schedule(preset, override, key, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(preset, [override])
    assert info.value.key == key
    assert allowed in info.value.allowed and allowed in str(info.value)
    assert f"{key}={info.value.value!r}" in str(info.value)


def test_the_preset_is_ring8_mrgan_with_the_schedule_on():
    cfg: GanConfig = load_config(DIFFUSION)
    base = load_config("ring8_mrgan")
    assert cfg.objective.mrgan_diffusion and not base.objective.mrgan_diffusion
    assert cfg.objective.name == "mrgan" and cfg.generators == base.generators
    assert cfg.objective.mrgan_geometric == base.objective.mrgan_geometric


# --- the default configs train exactly as before this change ---------------------------------

# Float64 (sum, ramp-weighted sum, sum of |w|) of every float tensor of G's and D's state after
# 3 steps of test_steps' tiny nets with SGD, and the last step's losses, computed at commit
# 569a01a (before MRGAN's separate G forwards and the schedule). SGD, not the presets' Adam:
# Adam turns rounding noise in an exactly-zero gradient (a bias before BatchNorm) into a full
# step, so Adam's weights are not comparable across machines; SGD keeps rounding at rounding.
BEFORE = {
    "ring8": {
        "generator": (47.139313000832445, 3.466941435900786, 111.02813302445766),
        "discriminator": (3.0203259058180265, -1.3949151756221136, 57.739834547799546),
        "d_loss": 1.4112603664398193,
        "g_loss": 0.5387135744094849,
    },
    "ring8_madgan_sim": {
        "generator": (209.7513949981232, 2.1108821351721554, 457.1507013815056),
        "discriminator": (-4.996560342115117, 7.018236095634391, 60.80847388636903),
        "d_loss": 3.366823673248291,
        "g_loss": 2.522627830505371,
    },
}


@pytest.mark.parametrize("preset", list(BEFORE))
def test_default_configs_train_as_before(preset):
    cfg = tiny(preset, "g_optim.name=sgd", "d_optim.name=sgd")
    model = make(cfg)
    reals, rng = real_batches(3), torch.Generator().manual_seed(7)
    next_real = feeder(reals)
    metrics = [train_step(model, next_real, rng) for _ in range(3)][-1]
    want = BEFORE[preset]
    for net in ("generator", "discriminator"):
        state = getattr(model, net).state_dict().values()
        flat = torch.cat([t.double().flatten() for t in state if t.is_floating_point()])
        ramp = torch.linspace(-1.0, 1.0, flat.numel(), dtype=torch.float64)
        total, ramped, size = flat.sum().item(), (flat * ramp).sum().item(), flat.abs().sum().item()
        tol = 1e-6 * want[net][2]
        assert (total, ramped, size) == pytest.approx(want[net], rel=1e-6, abs=tol), net
    assert metrics["d_loss"] == pytest.approx(want["d_loss"], rel=1e-5)
    assert metrics["g_loss"] == pytest.approx(want["g_loss"], rel=1e-5)
