"""One composed GAN training step: D phase(s), then G phase, for every variant a config can name.

The variant is data (``cfg.objective.name``, ``cfg.unroll.steps``, ``cfg.generators.count``,
``cfg.discriminator.pack``/``.minibatch``), so an unrolled MAD-GAN with minibatch discrimination
is simply a config. The step is written for DDP from the start (docs/ARCHITECTURE.md, "GANs under
DDP"): G and D may each be wrapped separately; D sees real and fake in ONE forward; in the G phase
D is frozen and called through its unwrapped module so it neither accumulates nor all-reduces
gradients; the unroll look-ahead is functional and local to the process.

The GPU path is configuration too (``cfg.train``; see docs/GPU.md): ``precision`` (fp32 | bf16 |
fp16: autocast around every network forward, two GradScalers for fp16, ``gan_core.precision``),
``channels_last`` (NHWC conv weights and image batches) and ``compile`` (``torch.compile`` of the
networks that are never double-differentiated). With all three at their defaults the step is
exactly the plain float32 step.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gan_core import objectives as obj
from gan_core.config import WASSERSTEIN_OBJECTIVES, GanConfig, OptimizerConfig
from gan_core.nets import (
    build_diffusion_discriminator,
    build_discriminator,
    build_encoder,
    build_generator,
    pack_samples,
    to_channels_last,
)
from gan_core.precision import (
    autocast_call,
    loss_scale,
    make_scaler,
    scaled_penalty_critic,
    scaled_step,
)
from gan_core.unroll import functional_discriminator, lookahead_params

Critic = Callable[..., Tensor]
# torch.compile backend for train.compile: inductor, unless this environment variable names another
# (e.g. aot_eager, to tell a compiler bug from a tracing one). RAYGAN_* variables reach Ray workers.
COMPILE_BACKEND_ENV = "RAYGAN_COMPILE_BACKEND"
# Optional state-dict entries: present only for fp16 (see GanModel.load_state_dict); dd_scaler
# only with MRGAN's manifold-diffusion schedule too.
_SCALER_KEYS = ("g_scaler", "d_scaler", "dd_scaler")
# The per-step metrics of train_step that are losses or parts of one: the loop reports each as
# its mean over the steps since the previous evaluation (gan_core.loop), the D-side ones are
# already means over the step's n_critic updates. ``wasserstein`` (wgan, wgan-gp) is the
# critic's estimate E[D(x)] - E[D(G(z))]; ``gp`` the weighted penalty term of D's loss, so that
# d_loss = gp - wasserstein; ``penalty`` the unweighted gradient penalty (wgan-gp, dragan).
# MRGAN's manifold-diffusion schedule adds D_D's ``dd_loss``, ``dd_real``, ``dd_fake`` (means
# over its n_critic updates) and G's diffusion loss ``g_diffusion`` (manifold_diffusion_updates).
LOSS_METRICS = (
    "d_loss",
    "g_loss",
    "g_adv",
    "d_real",
    "d_fake",
    "wasserstein",
    "gp",
    "penalty",
    "diversity",
    "similarity",
    "mode_reg",
    "dd_loss",
    "dd_real",
    "dd_fake",
    "g_diffusion",
)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or similar) wrapper; the module itself otherwise."""
    return getattr(module, "module", module)


def make_optimizer(params: list[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    if cfg.name == "rmsprop":
        # No momentum: the WGAN paper picked RMSProp because momentum made its critic unstable.
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha)
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate at G step ``step`` (0-based) of ``total``.

    Stateless on purpose: a resumed run needs only the step counter to get the same rate.
    """
    progress = min(step / max(total, 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


@dataclass
class GanModel:
    """Everything that learns in one run. ``generator``/``discriminator``/``encoder`` (and
    ``diffusion_discriminator``) may be DDP-wrapped by ``wrap``; optimizers and the EMA copy
    always refer to the unwrapped modules."""

    cfg: GanConfig
    data_shape: tuple[int, ...]
    generator: nn.Module
    discriminator: nn.Module
    encoder: nn.Module | None
    g_opt: torch.optim.Optimizer
    d_opt: torch.optim.Optimizer
    ema: nn.Module | None
    step: int = 0
    # Multiplies both scheduled learning rates; < 1 after a non-finite rollback (GanRun).
    lr_scale: float = 1.0
    # The GPU path, set by build_model from cfg.train: the device type autocast runs on, one
    # GradScaler per network for fp16 (None otherwise), whether image batches are made NHWC for
    # D, and the names of the networks whose forward torch.compile has compiled.
    device_type: str = "cpu"
    g_scaler: torch.amp.GradScaler | None = None
    d_scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    compiled: tuple[str, ...] = ()
    # MRGAN's manifold-diffusion schedule (objective.mrgan_diffusion): the second discriminator
    # D_D, its optimizer (d_optim's settings) and, for fp16, its GradScaler; None otherwise.
    diffusion_discriminator: nn.Module | None = None
    dd_opt: torch.optim.Optimizer | None = None
    dd_scaler: torch.amp.GradScaler | None = None
    # The step at which the EMA generator's BN statistics were last recomputed (-1: never).
    _ema_bn_step: int = -1

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap each network on its own (never one module holding both G and D)."""
        self.generator = wrapper(self.generator)
        self.discriminator = wrapper(self.discriminator)
        if self.encoder is not None:
            self.encoder = wrapper(self.encoder)
        if self.diffusion_discriminator is not None:
            self.diffusion_discriminator = wrapper(self.diffusion_discriminator)

    def amp(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a network or critic) run under this run's autocast, float32 outputs; for fp32
        ``fn`` itself."""
        return autocast_call(fn, self.cfg.train.precision, self.device_type)

    def sampler(self, use_ema: bool = True) -> nn.Module:
        return self.ema if (use_ema and self.ema is not None) else unwrap(self.generator)

    @torch.no_grad()
    def sample(self, z: Tensor, use_ema: bool = True) -> Tensor:
        """Evaluation samples, eval mode (BN running statistics); z is (count, m, z_dim)."""
        net = self.sampler(use_ema)
        if net is self.ema and self._ema_bn_step != self.step:
            recalibrate_batch_norm(net, z.shape[0], z.shape[-1], self.step, z.device)
            self._ema_bn_step = self.step
        was_training = net.training
        net.eval()
        try:
            out = net(z)
        finally:
            net.train(was_training)
        return out.reshape(-1, *self.data_shape)

    def state_dict(self) -> dict:
        """Weights (unwrapped: no ``module.`` prefixes), optimizer moments, EMA and step; with
        fp16 also both GradScalers (scale and growth tracker), so a resumed run scales exactly
        as an uninterrupted one. Other precisions keep the exact fp32 key set."""
        state = {
            "generator": unwrap(self.generator).state_dict(),
            "discriminator": unwrap(self.discriminator).state_dict(),
            "g_opt": self.g_opt.state_dict(),
            "d_opt": self.d_opt.state_dict(),
            "step": self.step,
        }
        if self.encoder is not None:
            state["encoder"] = unwrap(self.encoder).state_dict()
        # Only with the manifold-diffusion schedule, so older checkpoints keep their key set.
        if self.diffusion_discriminator is not None and self.dd_opt is not None:
            state["diffusion_discriminator"] = unwrap(self.diffusion_discriminator).state_dict()
            state["dd_opt"] = self.dd_opt.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        for key in _SCALER_KEYS:
            scaler = getattr(self, key)
            if scaler is not None:
                state[key] = scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Strict: a checkpoint of another architecture or variant fails loudly, never partly.

        The GradScalers are the one exception: precision changes the arithmetic, not what is
        learned, so a checkpoint of another precision loads; an fp16 run resumed from one
        without scalers starts them fresh, and scalers in the checkpoint of an fp16 run are
        ignored by a run in another precision.
        """
        expected = set(self.state_dict())
        if set(state) - set(_SCALER_KEYS) != expected - set(_SCALER_KEYS):
            raise ValueError(
                f"checkpoint holds {sorted(state)}, this config needs {sorted(expected)}"
            )
        unwrap(self.generator).load_state_dict(state["generator"], strict=True)
        unwrap(self.discriminator).load_state_dict(state["discriminator"], strict=True)
        if self.encoder is not None:
            unwrap(self.encoder).load_state_dict(state["encoder"], strict=True)
        if self.diffusion_discriminator is not None and self.dd_opt is not None:
            dd = unwrap(self.diffusion_discriminator)
            dd.load_state_dict(state["diffusion_discriminator"], strict=True)
            self.dd_opt.load_state_dict(state["dd_opt"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"], strict=True)
            self._ema_bn_step = -1
        self.g_opt.load_state_dict(state["g_opt"])
        self.d_opt.load_state_dict(state["d_opt"])
        for key in _SCALER_KEYS:
            scaler = getattr(self, key)
            if scaler is not None and key in state:
                scaler.load_state_dict(state[key])
        self.step = int(state["step"])


def needs_double_backward(cfg: GanConfig) -> bool:
    """Whether the step differentiates through D's own gradient: a gradient penalty (WGAN-GP,
    DRAGAN with a positive weight) or a second-order unroll look-ahead."""
    o = cfg.objective
    penalty = o.name in ("wgan-gp", "dragan") and o.gp_weight > 0
    return penalty or (cfg.unroll.steps > 0 and cfg.unroll.second_order)


def compile_networks(model: GanModel, backend: str | None = None) -> tuple[str, ...]:
    """``torch.compile`` the forward of G, MRGAN's encoder and, when safe, D, in place.

    In place (``nn.Module.compile``) rather than an ``OptimizedModule`` wrapper: parameter names
    and checkpoint keys stay the same, DDP can still wrap the module afterwards, and the G phase's
    call to D's unwrapped module runs the compiled code too. D stays eager when the step
    double-differentiates through it (``needs_double_backward``): AOTAutograd's compiled backward
    raises "torch.compile with aot_autograd does not currently support double backward" there.
    The first-order look-ahead (``torch.func.functional_call`` on D) runs through the compiled
    D unchanged. Returns the names of the compiled networks (also kept in ``model.compiled``).
    """
    backend = backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    # nn.Module.compile compiles Module._call_impl, one code object shared by every compiled
    # network, so the graph variants of G, D and the encoder together (grad mode, frozen D,
    # ``groups``, batch shapes, evaluation) count against one recompile limit: 7 were measured
    # for MRGAN + unroll + evaluation against the default limit of 8, past which dynamo runs the
    # forward eagerly without saying so. Graphs are shared between instances of a class, so
    # the count does not grow with the number of models.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    names = ["generator", "encoder"]
    if not needs_double_backward(model.cfg):
        names += ["discriminator", "diffusion_discriminator"]
    done = []
    for name in names:
        net = getattr(model, name)
        if net is not None:
            unwrap(net).compile(backend=backend)
            done.append(name)
    model.compiled = tuple(done)
    return model.compiled


def build_model(
    cfg: GanConfig, data_shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> GanModel:
    """Networks, optimizers, EMA and (fp16) GradScalers for ``cfg`` on ``device``, in the memory
    layout and compiled state ``cfg.train`` asks for; the caller seeds torch beforehand."""
    generator = build_generator(cfg, data_shape).to(device)
    discriminator = build_discriminator(cfg, data_shape).to(device)
    encoder = build_encoder(cfg, data_shape)
    if encoder is not None:
        encoder = encoder.to(device)
    # Built last: every other network draws its initial weights exactly as without it.
    diffusion_d = build_diffusion_discriminator(cfg, data_shape)
    if diffusion_d is not None:
        diffusion_d = diffusion_d.to(device)
    channels_last = False
    if cfg.train.channels_last:
        # Before the EMA copy (which then shares the layout) and before compiling (which traces
        # the layout it sees). Only D's layout decides whether the real batch is made NHWC.
        to_channels_last(generator)
        if encoder is not None:
            to_channels_last(encoder)
        channels_last = to_channels_last(discriminator)
        if diffusion_d is not None:
            to_channels_last(diffusion_d)
    # MRGAN's encoder learns with the generator: both minimise the G-side objective.
    g_params = list(generator.parameters()) + (list(encoder.parameters()) if encoder else [])
    ema = None
    if cfg.train.ema > 0:
        # Copied before compiling: the EMA generator only samples, in evaluation, and stays eager.
        ema = copy.deepcopy(generator).requires_grad_(False)
    device_type = torch.device(device).type
    model = GanModel(
        cfg=cfg,
        data_shape=tuple(data_shape),
        generator=generator,
        discriminator=discriminator,
        encoder=encoder,
        g_opt=make_optimizer(g_params, cfg.g_optim),
        d_opt=make_optimizer(list(discriminator.parameters()), cfg.d_optim),
        ema=ema,
        device_type=device_type,
        g_scaler=make_scaler(cfg.train.precision, device_type),
        d_scaler=make_scaler(cfg.train.precision, device_type),
        channels_last=channels_last,
    )
    if diffusion_d is not None:
        model.diffusion_discriminator = diffusion_d
        model.dd_opt = make_optimizer(list(diffusion_d.parameters()), cfg.d_optim)
        model.dd_scaler = make_scaler(cfg.train.precision, device_type)
    if cfg.train.compile:
        compile_networks(model)
    return model


def sample_noise(
    model: GanModel, batch: int, rng: torch.Generator, device: torch.device | str
) -> Tensor:
    """z of shape (count, batch // count, z_dim): each generator gets an equal share."""
    count = model.cfg.generators.count
    noise = torch.randn(count, batch // count, model.cfg.generators.z_dim, generator=rng)
    return noise.to(device)


def shared_noise(
    model: GanModel, m: int, rng: torch.Generator, device: torch.device | str
) -> Tensor:
    """z of shape (count, m, z_dim) that is THE SAME for every generator (``z[i] == z[0]``):
    MAD-GAN-Sim compares G_i(z) with G_j(z), which says something only on the same z."""
    count, z_dim = model.cfg.generators.count, model.cfg.generators.z_dim
    noise = torch.randn(1, m, z_dim, generator=rng).expand(count, m, z_dim)
    return noise.to(device)


def mix_bank(cfg: GanConfig, fake: Tensor, rng: torch.Generator) -> Tensor:
    """The flat fake batch in a random order when a generator bank meets a packed D, else as is.

    The batch is generator-major (``sample_noise``) and ``pack_samples`` packs neighbours, so
    unmixed a fake pack holds samples of ONE head, while a real pack holds independent draws of
    the data. A packed D then tells a perfect one-head-per-mode bank from the data by the packs
    alone (both samples always in one mode), so "each head takes one mode" would not be an
    equilibrium. Permuted, a fake pack is a draw from the mixture of heads, like a real pack.
    The permutation comes from the step's stream only in that case: every other config draws
    exactly the numbers it drew before. (MAD-GAN, whose D names each pack's generator, refuses
    packing in the config.)"""
    if cfg.generators.count == 1 or cfg.discriminator.pack == 1:
        return fake
    order = torch.randperm(fake.shape[0], generator=rng).to(fake.device)
    return fake[order]


def _d_outputs(d: Critic, x: Tensor, pack: int, groups: int) -> Tensor | tuple[Tensor, Tensor]:
    return d(pack_samples(x, pack), groups=groups)


def discriminator_loss(
    cfg: GanConfig,
    d: Critic,
    real: Tensor,
    fake: Tensor,
    fake_generator: Tensor,
    rng: torch.Generator | None = None,
    penalties: bool = True,
    grad_scale: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """D's loss for the configured objective with real and fake in a single forward.

    ``penalties=False`` drops gradient penalties: the unroll look-ahead uses that, because
    differentiating a penalty through k look-ahead steps would need third-order gradients.
    ``grad_scale`` (fp16: D's GradScaler scale) scales the penalties' inner backward and unscales
    the input gradient they are computed from (``precision.scaled_penalty_critic``).
    """
    o, pack = cfg.objective, cfg.discriminator.pack
    n_real = real.shape[0]
    both = torch.cat([real, fake])
    logs: dict[str, Tensor] = {}
    if o.name == "ebgan":
        energy, _ = _d_outputs(d, both, pack, groups=2)
        real_e, fake_e = energy[:n_real], energy[n_real:]
        loss = obj.ebgan_d_loss(real_e, fake_e, o.ebgan_margin)
        logs["d_real"], logs["d_fake"] = real_e.mean(), fake_e.mean()
        return loss, logs
    out = _d_outputs(d, both, pack, groups=2)
    n_packed = n_real // pack
    real_out, fake_out = out[:n_packed], out[n_packed:]
    if o.name == "madgan":
        loss = obj.madgan_d_loss(real_out, fake_out, fake_generator[::pack])
        # Probability D gives the real class, a readable "D(x)" for the N+1-way classifier.
        logs["d_real"] = real_out.softmax(1)[:, -1].mean()
        logs["d_fake"] = fake_out.softmax(1)[:, -1].mean()
        return loss, logs
    if o.name in WASSERSTEIN_OBJECTIVES:
        loss = obj.wgan_d_loss(real_out, fake_out)
        logs["wasserstein"] = obj.wasserstein_estimate(real_out, fake_out)
        if o.name == "wgan-gp" and penalties and o.gp_weight > 0:
            gp = obj.gradient_penalty(
                scaled_penalty_critic(lambda x: d(x, groups=1), grad_scale),
                pack_samples(real, pack),
                pack_samples(fake, pack),
                rng,
            )
            logs["penalty"] = gp
            logs["gp"] = o.gp_weight * gp
            loss = loss + logs["gp"]
        logs["d_real"], logs["d_fake"] = real_out.mean(), fake_out.mean()
        return loss, logs
    loss = obj.gan_d_loss(real_out, fake_out)
    if o.name == "dragan" and penalties and o.gp_weight > 0:
        gp = obj.dragan_penalty(
            scaled_penalty_critic(lambda x: d(x, groups=1), grad_scale),
            pack_samples(real, pack),
            o.dragan_noise,
            rng,
        )
        logs["penalty"] = gp
        loss = loss + o.gp_weight * gp
    logs["d_real"] = torch.sigmoid(real_out).mean()
    logs["d_fake"] = torch.sigmoid(fake_out).mean()
    return loss, logs


def generator_loss(cfg: GanConfig, critic: Critic, fake: Tensor) -> Tensor:
    """G's adversarial loss on ``fake`` (flat batch) judged by ``critic`` (D or its look-ahead)."""
    o, pack = cfg.objective, cfg.discriminator.pack
    if o.name == "ebgan":
        energy, code = _d_outputs(critic, fake, pack, groups=1)
        return obj.ebgan_g_loss(energy, code, o.ebgan_pt_weight)
    out = _d_outputs(critic, fake, pack, groups=1)
    if o.name == "madgan":
        return obj.madgan_g_loss(out)
    if o.name in WASSERSTEIN_OBJECTIVES:
        return obj.wgan_g_loss(out)
    if o.name == "minimax":
        return obj.minimax_g_loss(out)
    return obj.nonsaturating_g_loss(out)


def _set_lr(model: GanModel) -> float:
    factor = lr_factor(model.cfg.train.lr_schedule, model.step, model.cfg.train.steps)
    factor *= model.lr_scale
    pairs = [(model.g_opt, model.cfg.g_optim.lr), (model.d_opt, model.cfg.d_optim.lr)]
    if model.dd_opt is not None:
        pairs.append((model.dd_opt, model.cfg.d_optim.lr))
    for opt, base in pairs:
        for group in opt.param_groups:
            group["lr"] = base * factor
    return factor


@torch.no_grad()
def clip_critic(d: nn.Module, clip: float) -> None:
    """WGAN's constraint (Arjovsky et al. 2017, Algorithm 1): every parameter of the critic
    clamped to ``[-clip, clip]`` in place, after each critic update. The weights then lie in a
    compact set, so the critic is K-Lipschitz for a K fixed by ``clip`` and the architecture.
    Buffers (BatchNorm statistics, fixed Fourier frequencies) are not weights and stay as they
    are. Every DDP rank holds the same updated weights, so the clamped ones stay identical."""
    for p in unwrap(d).parameters():
        p.clamp_(-clip, clip)


@torch.no_grad()
def update_ema(model: GanModel) -> None:
    if model.ema is None:
        return
    decay = model.cfg.train.ema
    source = unwrap(model.generator)
    for p_ema, p in zip(model.ema.parameters(), source.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - decay)
    # BN running statistics are left alone: G's describe G's weights, not the averaged ones
    # (copying them cost 20+ points of HQ % on ring-8); sample() recomputes the EMA's own.


# Batches of noise the EMA generator's BN statistics are re-estimated from, and their size.
_BN_CALIBRATION_BATCHES, _BN_CALIBRATION_SIZE = 8, 256


@torch.no_grad()
def recalibrate_batch_norm(
    net: nn.Module, count: int, z_dim: int, step: int, device: torch.device | str
) -> bool:
    """Recompute the running statistics of every BatchNorm layer of ``net`` from its own
    activations on fixed noise (a cumulative average over a few batches in training mode).

    An averaged (EMA) generator's activations differ from the live one's, so borrowed statistics
    shift every sample; recomputed ones match the weights. The noise depends only on ``step``, so
    the result is a function of the weights: a resumed run recomputes exactly the same values.
    Returns False (and does nothing) when ``net`` has no BatchNorm layer.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: a cumulative moving average, equal weight per batch
    rng = torch.Generator().manual_seed(1_000_003 + step)
    was_training = net.training
    net.train()
    try:
        for _ in range(_BN_CALIBRATION_BATCHES):
            size = max(_BN_CALIBRATION_SIZE // count, 2)
            net(torch.randn(count, size, z_dim, generator=rng).to(device))
    finally:
        net.train(was_training)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return True


def _nhwc(model: GanModel, x: Tensor) -> Tensor:
    """An image batch in channels_last when D's convs are (a no-op otherwise and for points)."""
    if model.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def similarity_term(model: GanModel, d: nn.Module, same_grouped: Tensor) -> Tensor:
    """MAD-GAN-Sim's term (``objectives.madgan_similarity``) for ``same_grouped``, the
    generators' samples of one shared z, (count, m, *data_shape): D's penultimate features and
    real-class probability of each, from one forward of ``d``, the unwrapped, frozen D. With an
    unroll look-ahead it is still the current D: the look-ahead sharpens the adversarial term,
    the similarity is measured in the features D has now."""
    count, m = same_grouped.shape[:2]
    x = _nhwc(model, same_grouped.reshape(count * m, *model.data_shape))
    features = model.amp(d.features)(x)
    real_prob = model.amp(d.head)(features).softmax(1)[:, -1]
    return obj.madgan_similarity(features.reshape(count, m, -1), real_prob.reshape(count, m))


@contextmanager
def frozen_batch_norm_stats(net: nn.Module) -> Iterator[None]:
    """Within the block every BatchNorm layer of ``net`` normalises by its input batch's own
    statistics (training mode, as ever) and leaves its running statistics alone.

    For MRGAN's reconstructions G(E(x)): G's outputs on the encoder's codes rather than on
    N(0, I) noise, while evaluation samples G(z) with the running statistics, which must
    therefore describe G(z) only. Done by ``track_running_stats=False`` for the block, not by
    momentum 0 or by saving and restoring the buffers: ``batch_norm`` is then handed no running
    buffers at all, so nothing is written (not even ``num_batches_tracked``) and no buffer is
    saved for a backward that a later in-place update could invalidate. torch.compile guards on
    the attribute (a compiled G gets a second graph for these forwards); in eval mode the
    layers read their running statistics as usual.
    """
    norms = [m for m in unwrap(net).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(norms, tracking, strict=True):
            m.track_running_stats = flag


def reconstruct(model: GanModel, real: Tensor) -> Tensor:
    """MRGAN's reconstruction G(E(x)) of the flat real batch ``real``, a flat batch like it.

    A generator forward of its own under ``frozen_batch_norm_stats``: BatchNorm normalises the
    reconstructions by their own batch statistics, G(z) (a separate forward) by its own, and
    only G(z) moves the running statistics. Real row i is encoded for generator
    i // (batch / count), ``sample_noise``'s layout."""
    if model.encoder is None:
        raise ValueError("reconstruct needs MRGAN's encoder (objective.name=mrgan)")
    g = model.cfg.generators
    codes = model.amp(model.encoder)(real).reshape(g.count, -1, g.z_dim)
    with frozen_batch_norm_stats(model.generator):
        out = model.amp(model.generator)(codes)
    return out.reshape(-1, *model.data_shape)


@contextmanager
def _frozen(net: nn.Module) -> Iterator[nn.Module]:
    """``net``'s unwrapped module, frozen for the block and unfrozen after it (also on error):
    a critic in a G update neither accumulates gradients nor, under DDP, all-reduces them."""
    inner = unwrap(net)
    inner.requires_grad_(False)
    try:
        yield inner
    finally:
        inner.requires_grad_(True)


def _accumulate(sums: dict[str, Tensor], values: dict[str, Tensor]) -> None:
    # As tensors (no device sync): the metrics are the means over a phase's n_critic updates.
    for key, value in values.items():
        sums[key] = value.detach() + sums[key] if key in sums else value.detach()


def manifold_diffusion_updates(
    model: GanModel,
    next_real: Callable[[], Tensor],
    rng: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Tensor], int]:
    """The updates of one step of MRGAN's manifold-diffusion schedule (MDGAN, Che et al. 2017;
    ``objective.mrgan_diffusion``), in order. Returns the step's metrics (0-d tensors) and the
    number of optimizer steps fp16's scalers skipped.

    Manifold step: D (D_M) learns to tell real x from its reconstruction G(E(x)), made without
    a graph (``n_critic`` updates, one real batch each); then G and E take one step together on
    MRGAN's regularizer against D_M on the last real batch (``objectives.mrgan_regularizer``:
    geometric * ||x - G(E(x))||^2 + mode * -log D_M(G(E(x)))).
    Diffusion step: D_D learns to tell G(E(x)), its real side, from G(z), both made without a
    graph (``n_critic`` updates; the k-th reconstructs the manifold step's k-th real batch with
    the updated G and E, so a step reads n_critic real batches as for every objective, and
    draws fresh noise); then G alone takes one step on the non-saturating -log D_D(G(z)) on
    fresh noise. E has no gradient there (None: Adam skips it and its moments), so G takes two
    steps per training step from its one optimizer and E one.

    Metrics: ``d_loss``, ``d_real``, ``d_fake`` (D_M) and ``dd_loss``, ``dd_real``, ``dd_fake``
    (D_D), each the mean over its n_critic updates; ``mode_reg`` and ``g_diffusion``, G's two
    losses, and ``g_loss``, their sum.

    The paper's algorithm box could not be read while this was written (only summaries naming
    its manifold and diffusion steps): the order and the losses above are this code's reading.
    """
    cfg, o = model.cfg, model.cfg.objective
    G, D = model.generator, model.discriminator
    DD, dd_opt = model.diffusion_discriminator, model.dd_opt
    if DD is None or dd_opt is None:
        raise ValueError("the manifold-diffusion schedule needs objective.mrgan_diffusion=true")
    batch, pack = cfg.train.batch_size, cfg.discriminator.pack
    # One generator (the config refuses a bank with this schedule): every fake is generator 0's.
    fake_generator = torch.zeros(batch, dtype=torch.long, device=device)
    skipped = 0

    d_sums: dict[str, Tensor] = {}
    reals: list[Tensor] = []
    for _ in range(o.n_critic):
        real = _nhwc(model, next_real())
        reals.append(real)
        with torch.no_grad():
            recon = reconstruct(model, real)
        d_loss, d_logs = discriminator_loss(
            cfg,
            model.amp(D),
            real,
            recon,
            fake_generator,
            rng,
            grad_scale=loss_scale(model.d_scaler, device),
        )
        model.d_opt.zero_grad(set_to_none=True)
        skipped += not scaled_step(d_loss, model.d_opt, model.d_scaler)
        _accumulate(d_sums, {"d_loss": d_loss, **d_logs})
    with _frozen(D) as d_inner:
        recon = reconstruct(model, real)
        logits = _d_outputs(model.amp(d_inner), recon, pack, groups=1)
        mode_reg = obj.mrgan_regularizer(real, recon, logits, o.mrgan_geometric, o.mrgan_mode)
        model.g_opt.zero_grad(set_to_none=True)
        skipped += not scaled_step(mode_reg, model.g_opt, model.g_scaler)

    dd_sums: dict[str, Tensor] = {}
    for real in reals:
        with torch.no_grad():
            recon = reconstruct(model, real)
            fake = model.amp(G)(sample_noise(model, batch, rng, device))
            fake = fake.reshape(batch, *model.data_shape)
        dd_loss, dd_logs = discriminator_loss(
            cfg,
            model.amp(DD),
            recon,
            fake,
            fake_generator,
            rng,
            grad_scale=loss_scale(model.dd_scaler, device),
        )
        dd_opt.zero_grad(set_to_none=True)
        skipped += not scaled_step(dd_loss, dd_opt, model.dd_scaler)
        _accumulate(
            dd_sums,
            {"dd_loss": dd_loss, "dd_real": dd_logs["d_real"], "dd_fake": dd_logs["d_fake"]},
        )
    with _frozen(DD) as dd_inner:
        fake = model.amp(G)(sample_noise(model, batch, rng, device))
        fake = fake.reshape(batch, *model.data_shape)
        g_diffusion = generator_loss(cfg, model.amp(dd_inner), fake)
        model.g_opt.zero_grad(set_to_none=True)
        skipped += not scaled_step(g_diffusion, model.g_opt, model.g_scaler)

    n = o.n_critic
    named = {
        "d_loss": d_sums.pop("d_loss") / n,
        "g_loss": (mode_reg + g_diffusion).detach(),
        **{key: value / n for key, value in d_sums.items()},
        **{key: value / n for key, value in dd_sums.items()},
        "mode_reg": mode_reg.detach(),
        "g_diffusion": g_diffusion.detach(),
    }
    return named, skipped


def _finish_step(model: GanModel, named: dict[str, Tensor], skipped: int) -> dict[str, float]:
    """After a step's updates: the EMA, the step counter and the metrics as Python floats."""
    update_ema(model)
    model.step += 1
    # One device-to-host copy for all of them (a GPU waits once per step, not once per metric).
    values = torch.stack([v.float() for v in named.values()]).tolist()
    metrics = dict(zip(named, values, strict=True))
    if model.d_scaler is not None and model.g_scaler is not None:
        metrics["amp_scale_d"] = float(model.d_scaler.get_scale())
        metrics["amp_scale_g"] = float(model.g_scaler.get_scale())
        if model.dd_scaler is not None:
            metrics["amp_scale_dd"] = float(model.dd_scaler.get_scale())
        metrics["amp_skipped"] = float(skipped)
    return metrics


def train_step(
    model: GanModel,
    next_real: Callable[[], Tensor],
    rng: torch.Generator,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """One G update preceded by ``n_critic`` D updates. Returns scalar metrics of this step:
    G's from its update, D's (``d_loss``, ``d_real``, ``d_fake``, ``wasserstein``, ``gp``, ...)
    the mean over the n_critic updates. With ``objective.name=wgan`` every critic update is
    followed by weight clipping (``clip_critic``).

    With fp16 the metrics also hold both scales (``amp_scale_d``, ``amp_scale_g``) and
    ``amp_skipped``, the number of optimizer steps the scalers skipped for inf/NaN gradients
    (normal while the scale calibrates; skipped steps leave weights and moments untouched).

    With ``objective.mrgan_diffusion`` the step is MRGAN's manifold-diffusion schedule instead
    (``manifold_diffusion_updates``).
    """
    cfg = model.cfg
    count, batch = cfg.generators.count, cfg.train.batch_size
    G, D = model.generator, model.discriminator
    # Every network forward goes through model.amp: autocast plus float32 outputs, so losses,
    # penalties and the look-ahead's update arithmetic stay float32. For fp32 these are G and D.
    G_amp, D_amp = model.amp(G), model.amp(D)
    fake_generator = torch.arange(count, device=device).repeat_interleave(batch // count)
    _set_lr(model)
    if model.diffusion_discriminator is not None:
        return _finish_step(model, *manifold_diffusion_updates(model, next_real, rng, device))
    skipped = 0

    # D phase: fakes are generated without a graph; D sees real and fake in one forward.
    n_critic = cfg.objective.n_critic
    d_sums: dict[str, Tensor] = {}
    for _ in range(n_critic):
        real = _nhwc(model, next_real())
        with torch.no_grad():
            fake = G_amp(sample_noise(model, batch, rng, device)).reshape(batch, *model.data_shape)
            fake = mix_bank(cfg, fake, rng)
        d_loss, d_logs = discriminator_loss(
            cfg,
            D_amp,
            real,
            fake,
            fake_generator,
            rng,
            grad_scale=loss_scale(model.d_scaler, device),
        )
        model.d_opt.zero_grad(set_to_none=True)
        skipped += not scaled_step(d_loss, model.d_opt, model.d_scaler)
        if cfg.objective.name == "wgan":
            clip_critic(D, cfg.objective.clip)
        # Summed as tensors (no device sync here): the step reports D's metrics as means over
        # its n_critic updates.
        for key, value in {"d_loss": d_loss, **d_logs}.items():
            d_sums[key] = value.detach() + d_sums[key] if key in d_sums else value.detach()

    # G phase: D frozen and called unwrapped, so DDP neither syncs nor accumulates its grads.
    d_inner = unwrap(D)
    d_inner.requires_grad_(False)
    try:
        z = sample_noise(model, batch, rng, device)
        encoder = model.encoder
        similarity_weight = cfg.objective.madgan_similarity
        if encoder is not None:
            # MRGAN: G(z) and G(E(x)) in two generator forwards, so that BatchNorm normalises
            # each by its own batch statistics and only G(z) moves the running statistics that
            # evaluation samples with (reconstruct). Under DDP, G then runs two forwards before
            # one backward: autograd sums each parameter's two gradients before its single
            # AccumulateGrad hook, which is what DDP's reducer counts (test_ddp.py[mrgan]).
            fake_grouped = G_amp(z)
            recon = reconstruct(model, real)
        elif similarity_weight > 0:
            # MAD-GAN-Sim: the shared-z samples ride in the same generator forward (one forward
            # per backward under DDP); both halves are N(0, I) noise, so BatchNorm's statistics
            # describe the same distribution. The adversarial half keeps its own z per generator.
            m = z.shape[1]
            out = G_amp(torch.cat([z, shared_noise(model, m, rng, device)], dim=1))
            fake_grouped, same_grouped = out[:, :m], out[:, m:]
        else:
            fake_grouped = G_amp(z)
        fake = mix_bank(cfg, fake_grouped.reshape(batch, *model.data_shape), rng)

        critic: Critic = model.amp(d_inner)
        if cfg.unroll.steps > 0:
            unroll_fake = fake if cfg.unroll.second_order else fake.detach()
            params = lookahead_params(
                d_inner,
                lambda call: discriminator_loss(
                    cfg, model.amp(call), real, unroll_fake, fake_generator, rng, penalties=False
                )[0],
                steps=cfg.unroll.steps,
                optimizer=cfg.d_optim.name,
                lr=model.d_opt.param_groups[0]["lr"],
                betas=(cfg.d_optim.beta1, cfg.d_optim.beta2),
                optimizer_state=model.d_opt.state,
                second_order=cfg.unroll.second_order,
                # fp16: the look-ahead emulates D's real step, so it scales like D's scaler.
                loss_scale=loss_scale(model.d_scaler, device),
            )
            critic = model.amp(functional_discriminator(d_inner, params))
        g_loss = generator_loss(cfg, critic, fake)
        logs = {"g_adv": g_loss.detach()}
        if cfg.objective.name == "madgan" and cfg.objective.madgan_diversity > 0:
            diversity = obj.madgan_diversity(fake_grouped)
            logs["diversity"] = diversity.detach()
            g_loss = g_loss + cfg.objective.madgan_diversity * diversity
        if similarity_weight > 0:
            similarity = similarity_term(model, d_inner, same_grouped)
            logs["similarity"] = similarity.detach()
            g_loss = g_loss + similarity_weight * similarity
        if encoder is not None:
            recon_logits = _d_outputs(critic, recon, cfg.discriminator.pack, groups=1)
            reg = obj.mrgan_regularizer(
                real, recon, recon_logits, cfg.objective.mrgan_geometric, cfg.objective.mrgan_mode
            )
            logs["mode_reg"] = reg.detach()
            g_loss = g_loss + reg
        model.g_opt.zero_grad(set_to_none=True)
        skipped += not scaled_step(g_loss, model.g_opt, model.g_scaler)
    finally:
        d_inner.requires_grad_(True)
    d_means = {key: value / n_critic for key, value in d_sums.items()}
    named = {"d_loss": d_means.pop("d_loss"), "g_loss": g_loss.detach(), **d_means, **logs}
    return _finish_step(model, named, skipped)
