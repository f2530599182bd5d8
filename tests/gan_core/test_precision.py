"""The GPU path of the training step, checked on CPU: fp32 stays the plain step bit for bit; bf16
and fp16 autocast stay within their precision of fp32 and still learn; fp16's two GradScalers
skip exactly the network whose gradients overflowed, unscale gradient penalties and the unroll
look-ahead exactly, and resume exactly; channels_last and torch.compile change no outputs."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gan_core.config import GanConfig, load_config
from gan_core.nets import to_channels_last
from gan_core.precision import (
    autocast_call,
    make_scaler,
    scale_grad,
    scaled_penalty_critic,
    scaled_step,
)
from gan_core.steps import (
    GanModel,
    build_model,
    compile_networks,
    discriminator_loss,
    generator_loss,
    needs_double_backward,
    sample_noise,
    train_step,
    unwrap,
)
from gan_core.unroll import lookahead_params

BATCH = 8
POINTS = (2,)
IMAGE = (3, 8, 8)  # stacked digits: three channels, so NCHW and NHWC strides differ
TINY = [
    "generators.width=16",
    "generators.depth=2",
    "discriminator.width=16",
    "discriminator.depth=2",
    "encoder.width=16",
    "encoder.depth=1",
    f"train.batch_size={BATCH}",
]
TINY_CONV = ["generators.width=8", "discriminator.width=8", f"train.batch_size={BATCH}"]
# bf16 keeps 8 significant bits (relative rounding 2**-9); a few layers of it stay within 2 %.
BF16_RTOL = 2e-2
# fp16 keeps 11 bits (2**-12).
FP16_RTOL = 2e-3
# Hand-made points, as in test_steps.py.
REAL = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [0.5, 0.5]])
FAKE = torch.tensor([[0.2, -0.1], [1.5, 0.0], [0.0, 0.0], [-0.3, 0.4]])
FAKE_GEN = torch.tensor([0, 0, 1, 1])


def tiny(preset: str = "ring8", *overrides: str) -> GanConfig:
    return load_config(preset, [*TINY, *overrides])


def tiny_conv(*overrides: str) -> GanConfig:
    return load_config("stacked_digits", [*TINY_CONV, *overrides])


def make(cfg: GanConfig, shape: tuple[int, ...] = POINTS, seed: int = 0) -> GanModel:
    torch.manual_seed(seed)
    return build_model(cfg, shape)


def batches(n: int, shape: tuple[int, ...] = POINTS, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, *shape, generator=g).clamp(-1, 1) for _ in range(n)]


def run(model: GanModel, reals: list[Tensor], seed: int = 7) -> list[dict[str, float]]:
    """``len(reals)`` steps; the batches are reused in turn when D takes several per step."""
    it, rng = itertools.cycle(reals), torch.Generator().manual_seed(seed)
    return [train_step(model, lambda: next(it), rng) for _ in range(len(reals))]


def params(net: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def all_equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- fp32: the plain step, bit for bit ------------------------------------------------------------


def test_fp32_step_is_the_hand_written_plain_step():
    cfg = tiny("ring8", "train.precision=fp32")
    model = make(cfg)
    ref = copy.deepcopy(model)
    (real,) = batches(1)
    rng = torch.Generator().manual_seed(7)
    ref_rng = torch.Generator().manual_seed(7)
    metrics = train_step(model, lambda: real, rng)

    # The same step in plain PyTorch: no autocast, no scaler, no layout change.
    G, D = ref.generator, ref.discriminator
    with torch.no_grad():
        fake = G(sample_noise(ref, BATCH, ref_rng, "cpu")).reshape(BATCH, 2)
    out = D(torch.cat([real, fake]), groups=2)
    d_loss = F.softplus(-out[:BATCH]).mean() + F.softplus(out[BATCH:]).mean()
    ref.d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    ref.d_opt.step()
    D.requires_grad_(False)
    fake = G(sample_noise(ref, BATCH, ref_rng, "cpu")).reshape(BATCH, 2)
    g_loss = F.softplus(-D(fake, groups=1)).mean()
    ref.g_opt.zero_grad(set_to_none=True)
    g_loss.backward()
    ref.g_opt.step()

    assert metrics["d_loss"] == d_loss.item() and metrics["g_loss"] == g_loss.item()
    assert all_equal(params(model.generator), params(G))
    assert all_equal(params(model.discriminator), params(D))
    assert not {"amp_scale_d", "amp_scale_g", "amp_skipped"} & set(metrics)


def test_fp32_with_gpu_keys_that_do_nothing_here_is_bit_identical():
    # channels_last on MLPs changes nothing; fp32 has no scalers and no extra state.
    plain, keyed = (
        make(tiny("ring8_wgan_gp")),
        make(tiny("ring8_wgan_gp", "train.channels_last=true")),
    )
    assert keyed.g_scaler is None and keyed.d_scaler is None and not keyed.channels_last
    reals = batches(2)
    assert run(plain, reals) == run(keyed, reals)
    assert all_equal(params(plain.discriminator), params(keyed.discriminator))
    assert set(keyed.state_dict()) == {"generator", "discriminator", "g_opt", "d_opt", "step"}


def test_autocast_call_is_the_function_itself_for_fp32():
    net = nn.Linear(2, 1)
    assert autocast_call(net, "fp32", "cpu") is net
    assert make_scaler("fp32", "cpu") is None and make_scaler("bf16", "cpu") is None
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        autocast_call(net, "fp8", "cpu")


# --- bf16 on CPU --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("ring8", ()),
        ("ring8_wgan_gp", ()),
        ("ring8_madgan", ("generators.count=2",)),
        ("ring8_ebgan", ()),
    ],
)
def test_bf16_losses_are_fp32_within_bf16_rounding(preset, extra):
    losses = {}
    for precision in ("fp32", "bf16"):
        model = make(tiny(preset, *extra, f"train.precision={precision}"))
        critic = model.amp(model.discriminator)
        rng = torch.Generator().manual_seed(3)
        d_loss, logs = discriminator_loss(model.cfg, critic, REAL, FAKE, FAKE_GEN, rng)
        g_loss = generator_loss(model.cfg, critic, FAKE)
        losses[precision] = [d_loss, g_loss, *logs.values()]
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"], strict=True):
        # Losses leave the networks as float32 (reductions and penalties in float32)...
        assert bf16.dtype == torch.float32
        torch.testing.assert_close(bf16, fp32, rtol=BF16_RTOL, atol=1e-3)
    # ...but were really computed in bf16, not silently in fp32.
    assert losses["bf16"][0].item() != losses["fp32"][0].item()


def test_bf16_runs_the_networks_in_bf16_and_returns_float32():
    model = make(tiny("ring8", "train.precision=bf16"))
    seen: list[torch.dtype] = []
    model.discriminator.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = model.amp(model.discriminator)(REAL)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.discriminator.parameters())


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("ring8", ()),
        ("ring8_unrolled", ("unroll.steps=2",)),
        ("ring8_mrgan", ("train.ema=0.9",)),
        ("ring8_madgan", ("discriminator.minibatch.kernels=4", "unroll.steps=1")),
    ],
)
def test_bf16_step_updates_like_fp32(preset, extra):
    reals = batches(2)
    models = {p: make(tiny(preset, *extra, f"train.precision={p}")) for p in ("fp32", "bf16")}
    start = params(models["bf16"].generator) + params(models["bf16"].discriminator)
    metrics = {p: run(m, reals) for p, m in models.items()}
    for key, value in metrics["bf16"][-1].items():
        assert math.isfinite(value)
        assert value == pytest.approx(metrics["fp32"][-1][key], rel=BF16_RTOL, abs=1e-2)
    bf16 = models["bf16"]
    after = params(bf16.generator) + params(bf16.discriminator)
    fp32 = params(models["fp32"].generator) + params(models["fp32"].discriminator)
    assert all(p.dtype == torch.float32 for p in after)
    # Every tensor moved, and in fp32's direction: Adam's steps follow the gradient's signs,
    # which bf16 keeps except for gradients near zero.
    moved = torch.cat([(a - s).flatten() for a, s in zip(after, start, strict=True)])
    ref = torch.cat([(f - s).flatten() for f, s in zip(fp32, start, strict=True)])
    # Every weight matrix moved. (Biases right before a BatchNorm have an exactly-zero gradient
    # in exact arithmetic: fp32's rounding noise moves them by a full Adam step, bf16's does not.)
    assert all(not torch.equal(a, s) for a, s in zip(after, start, strict=True) if a.dim() >= 2)
    assert F.cosine_similarity(moved, ref, dim=0) > 0.9


def test_bf16_conv_nets_with_channels_last_train_on_cpu():
    cfg = tiny_conv("train.precision=bf16", "train.channels_last=true", "objective.name=wgan-gp")
    model = make(cfg, IMAGE)
    start = params(model.generator)
    metrics = run(model, batches(2, IMAGE))
    assert all(math.isfinite(v) for m in metrics for v in m.values())
    assert not all_equal(start, params(model.generator))


# --- fp16 with two GradScalers (CPU autocast supports float16 in torch 2.13) ---------------------


def test_fp16_has_one_scaler_per_network_in_the_state_dict_and_resumes_exactly():
    cfg = tiny("ring8_wgan_gp", "train.precision=fp16")
    model = make(cfg)
    assert model.g_scaler is not None and model.d_scaler is not None
    assert model.g_scaler is not model.d_scaler
    reals = batches(4)
    run(model, reals[:2])
    state = model.state_dict()
    assert {"g_scaler", "d_scaler"} <= set(state)
    # A checkpoint is written with torch.save and read with weights_only=True only.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed = make(cfg, seed=5)
    assert resumed.g_scaler.state_dict() != model.g_scaler.state_dict()  # growth tracker 0 vs 2
    resumed.load_state_dict(loaded)
    for key in ("g_scaler", "d_scaler"):
        assert getattr(resumed, key).state_dict() == getattr(model, key).state_dict()
    after_model = run(model, reals[2:], seed=9)
    after_resumed = run(resumed, reals[2:], seed=9)
    assert after_model == after_resumed
    assert all_equal(params(model.generator), params(resumed.generator))
    assert all_equal(params(model.discriminator), params(resumed.discriminator))


def test_scaler_state_is_optional_across_precisions():
    fp16, fp32 = make(tiny("ring8", "train.precision=fp16")), make(tiny("ring8"))
    # fp16 resumes from an fp32 checkpoint with fresh scalers, and the other way round ignores
    # them; any other key difference is still refused.
    fp16.load_state_dict(fp32.state_dict())
    assert fp16.d_scaler.get_scale() == 2.0**16
    fp32.load_state_dict(fp16.state_dict())
    state = fp16.state_dict()
    del state["d_opt"]
    with pytest.raises(ValueError, match="d_opt"):
        fp32.load_state_dict(state)


def _inf_grads(net: nn.Module) -> None:
    first = next(iter(net.parameters()))
    first.register_hook(lambda g: torch.full_like(g, math.inf))


@pytest.mark.parametrize("broken", ["discriminator", "generator"])
def test_fp16_skips_only_the_network_whose_gradients_overflowed(broken):
    model = make(tiny("ring8", "train.precision=fp16"))
    # D's parameters get gradients only in the D phase (frozen in the G phase), G's only in the
    # G phase (its D-phase forward is under no_grad): the hook breaks exactly one network.
    _inf_grads(getattr(model, broken))
    other = "generator" if broken == "discriminator" else "discriminator"
    scaler = {"discriminator": model.d_scaler, "generator": model.g_scaler}
    before = {net: params(getattr(model, net)) for net in (broken, other)}
    (metrics,) = run(model, batches(1))

    assert all_equal(params(getattr(model, broken)), before[broken])
    optimizer = model.d_opt if broken == "discriminator" else model.g_opt
    assert len(optimizer.state) == 0  # no Adam moments either: optimizer.step never ran
    assert scaler[broken].get_scale() == 2.0**15  # halved
    assert not all_equal(params(getattr(model, other)), before[other])
    assert scaler[other].get_scale() == 2.0**16
    assert metrics["amp_skipped"] == 1.0
    assert metrics["amp_scale_d"] == scaler["discriminator"].get_scale()
    assert math.isfinite(metrics["d_loss"]) and math.isfinite(metrics["g_loss"])


def test_scaled_step_skips_and_halves_on_inf():
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = make_scaler("fp16", "cpu")
    start = params(net)
    loss = net(torch.ones(1, 2)).sum() * math.inf
    assert scaled_step(loss, opt, scaler) is False
    assert all_equal(params(net), start) and scaler.get_scale() == 2.0**15
    opt.zero_grad(set_to_none=True)
    assert scaled_step(net(torch.ones(1, 2)).sum(), opt, scaler) is True
    assert not all_equal(params(net), start)


class SmallCritic(nn.Module):
    """A two-layer critic whose input gradient depends on its weights (for penalty gradients)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Linear(2, 8), nn.Linear(8, 1)

    def forward(self, x: Tensor, groups: int = 1) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def _penalty_loss_and_grads(
    preset: str, critic: nn.Module, scale: Tensor | None, precision: str = "fp32"
) -> tuple[Tensor, list[Tensor]]:
    cfg = tiny(preset)
    critic.zero_grad(set_to_none=True)
    d = autocast_call(critic, precision, "cpu")
    rng = torch.Generator().manual_seed(4)
    loss, logs = discriminator_loss(cfg, d, REAL, FAKE, FAKE_GEN, rng, grad_scale=scale)
    (loss if scale is None else loss * scale).backward()
    grads = [p.grad / (1.0 if scale is None else scale) for p in critic.parameters()]
    return logs["penalty"].detach(), grads


@pytest.mark.parametrize("preset", ["ring8_wgan_gp", "ring8_dragan"])
def test_penalty_under_a_loss_scale_is_unscaled_exactly(preset):
    # The scaled inner backward and the unscaling around it are multiplications by powers of
    # two, exact in float32: penalty and D's (unscaled) gradients are bit-identical.
    critic = SmallCritic()
    plain_penalty, plain_grads = _penalty_loss_and_grads(preset, critic, None)
    scaled_penalty, scaled_grads = _penalty_loss_and_grads(preset, critic, torch.tensor(2.0**16))
    assert torch.equal(scaled_penalty, plain_penalty)
    assert all_equal(scaled_grads, plain_grads)
    # Without the unscaling the penalty would be that of a 2**14-times steeper critic.
    wrong = ((2.0**14 * torch.ones(4)) - 1.0).pow(2).mean()
    assert plain_penalty < wrong


@pytest.mark.parametrize("preset", ["ring8_wgan_gp", "ring8_dragan"])
def test_fp16_penalty_and_gradients_are_fp32_within_fp16_rounding(preset):
    critic = SmallCritic()
    ref_penalty, ref_grads = _penalty_loss_and_grads(preset, critic, None)
    # 2**8: DRAGAN's weighted penalty overflows float16 at 2**16 (the scaler would skip that
    # step and halve the scale; test_fp16_skips_only_the_network... covers skipping).
    penalty, grads = _penalty_loss_and_grads(preset, critic, torch.tensor(2.0**8), "fp16")
    torch.testing.assert_close(penalty, ref_penalty, rtol=FP16_RTOL, atol=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


def test_scale_grad_is_identity_forward_with_a_scaled_differentiable_backward():
    w = torch.tensor([0.5, 3.0], requires_grad=True)
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = scale_grad(w * x, torch.tensor(4.0))
    assert torch.equal(y, w * x)
    (g,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
    torch.testing.assert_close(g, 4.0 * 2 * (w * x) * w)
    # The scaled gradient is itself differentiable w.r.t. what it was computed from (w here, D's
    # weights in a penalty), as a penalty's double backward needs.
    (gw,) = torch.autograd.grad(g.sum(), w)
    assert gw.abs().sum() > 0
    assert scaled_penalty_critic(torch.sin, None) is torch.sin


@pytest.mark.parametrize(("optimizer", "second_order"), [("adam", True), ("sgd", False)])
def test_lookahead_loss_scale_is_unscaled_exactly(optimizer, second_order):
    critic = SmallCritic()
    fake = FAKE.clone().requires_grad_(True)

    def loss_fn(call):
        return F.softplus(-call(REAL)).mean() + F.softplus(call(fake)).mean()

    results = []
    for scale in (None, torch.tensor(2.0**16)):
        ahead = lookahead_params(
            critic, loss_fn, 2, optimizer, lr=0.1, second_order=second_order, loss_scale=scale
        )
        (g,) = torch.autograd.grad(sum(p.sum() for p in ahead.values()), fake, allow_unused=True)
        results.append((ahead, g))
    (plain, g_plain), (scaled, g_scaled) = results
    assert all(torch.equal(plain[k], scaled[k]) for k in plain)
    assert (g_plain is None) == (g_scaled is None) == (not second_order)
    if second_order:
        assert torch.equal(g_plain, g_scaled)


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("ring8_unrolled", ("unroll.steps=2",)),
        ("ring8_mrgan", ()),
        ("ring8_dragan", ()),
    ],
)
def test_fp16_step_updates_like_fp32(preset, extra):
    reals = batches(3)
    models = {p: make(tiny(preset, *extra, f"train.precision={p}")) for p in ("fp32", "fp16")}
    # A step the scaler skips while calibrating its scale from 2**16 down is a step fp32 takes:
    # start both scalers where these nets need no calibration, so the runs are comparable.
    models["fp16"].g_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    models["fp16"].d_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    metrics = {p: run(m, reals) for p, m in models.items()}
    assert not any(m["amp_skipped"] for m in metrics["fp16"])
    for key, value in metrics["fp16"][-1].items():
        if not key.startswith("amp_"):
            assert value == pytest.approx(metrics["fp32"][-1][key], rel=1e-2, abs=1e-3)


# --- channels_last --------------------------------------------------------------------------------


def _convs(net: nn.Module) -> list[Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]


def test_channels_last_keeps_ds_output_and_stores_conv_weights_nhwc():
    plain = make(tiny_conv(), IMAGE)
    nhwc = make(tiny_conv("train.channels_last=true", "train.ema=0.9"), IMAGE)
    assert nhwc.channels_last and not plain.channels_last
    for net in (nhwc.generator, nhwc.discriminator, nhwc.ema):
        weights = _convs(net)
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
        assert not any(w.is_contiguous() for w in weights)  # 3+ channels: NCHW strides differ
    assert not any(
        w.is_contiguous(memory_format=torch.channels_last) for w in _convs(plain.generator)
    )
    assert set(nhwc.state_dict()["discriminator"]) == set(plain.state_dict()["discriminator"])

    # A hand-made batch: every pixel a different value, so a layout mix-up would show.
    x = torch.linspace(-1, 1, 4 * math.prod(IMAGE)).reshape(4, *IMAGE)
    with torch.no_grad():
        want = plain.discriminator(x, groups=1)
        got = nhwc.discriminator(x.contiguous(memory_format=torch.channels_last), groups=1)
        fakes = (plain.generator(torch.ones(1, 4, 64)), nhwc.generator(torch.ones(1, 4, 64)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(fakes[1], fakes[0], rtol=0, atol=1e-5)


def test_channels_last_step_feeds_d_nhwc_and_matches_nchw():
    plain = make(tiny_conv(), IMAGE)
    nhwc = make(tiny_conv("train.channels_last=true"), IMAGE)
    layouts: list[bool] = []
    nhwc.discriminator.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    reals = batches(2, IMAGE)
    ref, got = run(plain, reals), run(nhwc, reals)
    assert layouts and all(layouts)
    for a, b in zip(ref, got, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    for p, q in zip(params(plain.discriminator), params(nhwc.discriminator), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_channels_last_is_a_no_op_for_mlps():
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    strides = [p.stride() for p in net.parameters()]
    assert to_channels_last(net) is False
    assert [p.stride() for p in net.parameters()] == strides


# --- torch.compile (backend aot_eager on CPU: dynamo + AOTAutograd, no C++ codegen) --------------


@pytest.mark.parametrize(
    ("preset", "extra", "needs"),
    [
        ("ring8", (), False),
        ("ring8_unrolled", ("unroll.steps=2",), True),
        ("ring8_unrolled", ("unroll.steps=2", "unroll.second_order=false"), False),
        ("ring8_wgan_gp", (), True),
        ("ring8_wgan_gp", ("objective.gp_weight=0",), False),
        ("ring8_dragan", (), True),
        ("ring8_mrgan", (), False),
    ],
)
def test_needs_double_backward(preset, extra, needs):
    assert needs_double_backward(tiny(preset, *extra)) is needs


@pytest.mark.parametrize(
    ("preset", "extra", "compiled"),
    [
        # First-order unroll: torch.func.functional_call runs through the compiled D.
        (
            "ring8_unrolled",
            ("unroll.steps=2", "unroll.second_order=false"),
            ("generator", "encoder", "discriminator"),
        ),
        # A gradient penalty double-differentiates D: D stays eager, G is compiled.
        ("ring8_wgan_gp", (), ("generator", "encoder")),
    ],
)
def test_compiled_step_matches_eager(preset, extra, compiled):
    cfg = tiny(preset, *extra)
    eager, fast = make(cfg), make(cfg)
    names = compile_networks(fast, backend="aot_eager")
    assert names == tuple(n for n in compiled if getattr(fast, n) is not None)
    for name in ("generator", "discriminator"):
        is_compiled = getattr(unwrap(getattr(fast, name)), "_compiled_call_impl", None) is not None
        assert is_compiled is (name in names)
    reals = batches(2)
    for a, b in zip(run(eager, reals), run(fast, reals), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for p, q in zip(params(eager.generator), params(fast.generator), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    # Compiled in place: the checkpoint keys are the module's own.
    assert set(fast.state_dict()["generator"]) == set(eager.state_dict()["generator"])


def test_compile_flag_builds_compiled_networks_with_the_env_backend(monkeypatch):
    monkeypatch.setenv("RAYGAN_COMPILE_BACKEND", "eager")
    model = make(tiny("ring8", "train.compile=true", "train.ema=0.9"))
    assert model.compiled == ("generator", "discriminator")
    # The EMA copy samples in evaluation and stays eager (it is copied before compiling).
    assert getattr(model.ema, "_compiled_call_impl", None) is None
    (metrics,) = run(model, batches(1))
    assert all(math.isfinite(v) for v in metrics.values())
