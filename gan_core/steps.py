"""One composed GAN training step: D phase(s), then G phase, for every variant a config can name.

The variant is data (``cfg.objective.name``, ``cfg.unroll.steps``, ``cfg.generators.count``,
``cfg.discriminator.pack``/``.minibatch``), so an unrolled MAD-GAN with minibatch discrimination
is simply a config. The step is written for DDP from the start (ARCHITECTURE.md, "GANs under
DDP"): G and D may each be wrapped separately; D sees real and fake in ONE forward; in the G phase
D is frozen and called through its unwrapped module so it neither accumulates nor all-reduces
gradients; the unroll look-ahead is functional and local to the process.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gan_core import objectives as obj
from gan_core.config import GanConfig, OptimizerConfig
from gan_core.nets import build_discriminator, build_encoder, build_generator, pack_samples
from gan_core.unroll import functional_discriminator, lookahead_params

Critic = Callable[..., Tensor]


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or similar) wrapper; the module itself otherwise."""
    return getattr(module, "module", module)


def make_optimizer(params: list[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
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
    """Everything that learns in one run. ``generator``/``discriminator``/``encoder`` may be
    DDP-wrapped by ``wrap``; optimizers and the EMA copy always refer to the unwrapped modules."""

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

    def wrap(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap each network on its own (never one module holding both G and D)."""
        self.generator = wrapper(self.generator)
        self.discriminator = wrapper(self.discriminator)
        if self.encoder is not None:
            self.encoder = wrapper(self.encoder)

    def sampler(self, use_ema: bool = True) -> nn.Module:
        return self.ema if (use_ema and self.ema is not None) else unwrap(self.generator)

    @torch.no_grad()
    def sample(self, z: Tensor, use_ema: bool = True) -> Tensor:
        """Evaluation samples, eval mode (BN running statistics); z is (count, m, z_dim)."""
        net = self.sampler(use_ema)
        was_training = net.training
        net.eval()
        try:
            out = net(z)
        finally:
            net.train(was_training)
        return out.reshape(-1, *self.data_shape)

    def state_dict(self) -> dict:
        """Weights (unwrapped: no ``module.`` prefixes), optimizer moments, EMA and step."""
        state = {
            "generator": unwrap(self.generator).state_dict(),
            "discriminator": unwrap(self.discriminator).state_dict(),
            "g_opt": self.g_opt.state_dict(),
            "d_opt": self.d_opt.state_dict(),
            "step": self.step,
        }
        if self.encoder is not None:
            state["encoder"] = unwrap(self.encoder).state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Strict: a checkpoint of another architecture or variant fails loudly, never partly."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"checkpoint holds {sorted(state)}, this config needs {sorted(expected)}"
            )
        unwrap(self.generator).load_state_dict(state["generator"], strict=True)
        unwrap(self.discriminator).load_state_dict(state["discriminator"], strict=True)
        if self.encoder is not None:
            unwrap(self.encoder).load_state_dict(state["encoder"], strict=True)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"], strict=True)
        self.g_opt.load_state_dict(state["g_opt"])
        self.d_opt.load_state_dict(state["d_opt"])
        self.step = int(state["step"])


def build_model(
    cfg: GanConfig, data_shape: tuple[int, ...], device: torch.device | str = "cpu"
) -> GanModel:
    """Networks, optimizers and EMA for ``cfg``; the caller seeds torch beforehand."""
    generator = build_generator(cfg, data_shape).to(device)
    discriminator = build_discriminator(cfg, data_shape).to(device)
    encoder = build_encoder(cfg, data_shape)
    if encoder is not None:
        encoder = encoder.to(device)
    # MRGAN's encoder learns with the generator: both minimise the G-side objective.
    g_params = list(generator.parameters()) + (list(encoder.parameters()) if encoder else [])
    ema = None
    if cfg.train.ema > 0:
        ema = copy.deepcopy(generator).requires_grad_(False)
    return GanModel(
        cfg=cfg,
        data_shape=tuple(data_shape),
        generator=generator,
        discriminator=discriminator,
        encoder=encoder,
        g_opt=make_optimizer(g_params, cfg.g_optim),
        d_opt=make_optimizer(list(discriminator.parameters()), cfg.d_optim),
        ema=ema,
    )


def sample_noise(
    model: GanModel, batch: int, rng: torch.Generator, device: torch.device | str
) -> Tensor:
    """z of shape (count, batch // count, z_dim): each generator gets an equal share."""
    count = model.cfg.generators.count
    noise = torch.randn(count, batch // count, model.cfg.generators.z_dim, generator=rng)
    return noise.to(device)


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """D's loss for the configured objective with real and fake in a single forward.

    ``penalties=False`` drops gradient penalties: the unroll look-ahead uses that, because
    differentiating a penalty through k look-ahead steps would need third-order gradients.
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
    if o.name == "wgan-gp":
        loss = obj.wgan_d_loss(real_out, fake_out)
        if penalties and o.gp_weight > 0:
            gp = obj.gradient_penalty(
                lambda x: d(x, groups=1), pack_samples(real, pack), pack_samples(fake, pack), rng
            )
            logs["penalty"] = gp
            loss = loss + o.gp_weight * gp
        logs["d_real"], logs["d_fake"] = real_out.mean(), fake_out.mean()
        return loss, logs
    loss = obj.gan_d_loss(real_out, fake_out)
    if o.name == "dragan" and penalties and o.gp_weight > 0:
        gp = obj.dragan_penalty(
            lambda x: d(x, groups=1), pack_samples(real, pack), o.dragan_noise, rng
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
    if o.name == "wgan-gp":
        return obj.wgan_g_loss(out)
    if o.name == "minimax":
        return obj.minimax_g_loss(out)
    return obj.nonsaturating_g_loss(out)


def _set_lr(model: GanModel) -> float:
    factor = lr_factor(model.cfg.train.lr_schedule, model.step, model.cfg.train.steps)
    factor *= model.lr_scale
    for opt, base in ((model.g_opt, model.cfg.g_optim.lr), (model.d_opt, model.cfg.d_optim.lr)):
        for group in opt.param_groups:
            group["lr"] = base * factor
    return factor


@torch.no_grad()
def update_ema(model: GanModel) -> None:
    if model.ema is None:
        return
    decay = model.cfg.train.ema
    source = unwrap(model.generator)
    for p_ema, p in zip(model.ema.parameters(), source.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - decay)
    # BN running statistics are not learned by gradient: the EMA generator uses G's current ones.
    for b_ema, b in zip(model.ema.buffers(), source.buffers(), strict=True):
        b_ema.copy_(b)


def train_step(
    model: GanModel,
    next_real: Callable[[], Tensor],
    rng: torch.Generator,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """One G update preceded by ``n_critic`` D updates. Returns scalar metrics of this step."""
    cfg = model.cfg
    count, batch = cfg.generators.count, cfg.train.batch_size
    G, D = model.generator, model.discriminator
    fake_generator = torch.arange(count, device=device).repeat_interleave(batch // count)
    _set_lr(model)

    # D phase: fakes are generated without a graph; D sees real and fake in one forward.
    d_logs: dict[str, Tensor] = {}
    for _ in range(cfg.objective.n_critic):
        real = next_real()
        with torch.no_grad():
            fake = G(sample_noise(model, batch, rng, device)).reshape(batch, *model.data_shape)
        d_loss, d_logs = discriminator_loss(cfg, D, real, fake, fake_generator, rng)
        d_logs = {k: v.detach() for k, v in d_logs.items()}
        model.d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        model.d_opt.step()

    # G phase: D frozen and called unwrapped, so DDP neither syncs nor accumulates its grads.
    d_inner = unwrap(D)
    d_inner.requires_grad_(False)
    try:
        z = sample_noise(model, batch, rng, device)
        encoder = model.encoder
        if encoder is not None:
            # MRGAN: G(z) and G(E(x)) in one generator forward (one forward per backward under DDP).
            z_rec = encoder(real).reshape(count, -1, cfg.generators.z_dim)
            out = G(torch.cat([z, z_rec], dim=1))
            m = z.shape[1]
            fake_grouped, recon = out[:, :m], out[:, m:].reshape(-1, *model.data_shape)
        else:
            fake_grouped = G(z)
        fake = fake_grouped.reshape(batch, *model.data_shape)

        critic: Critic = d_inner
        if cfg.unroll.steps > 0:
            unroll_fake = fake if cfg.unroll.second_order else fake.detach()
            params = lookahead_params(
                d_inner,
                lambda call: discriminator_loss(
                    cfg, call, real, unroll_fake, fake_generator, rng, penalties=False
                )[0],
                steps=cfg.unroll.steps,
                optimizer=cfg.d_optim.name,
                lr=model.d_opt.param_groups[0]["lr"],
                betas=(cfg.d_optim.beta1, cfg.d_optim.beta2),
                optimizer_state=model.d_opt.state,
                second_order=cfg.unroll.second_order,
            )
            critic = functional_discriminator(d_inner, params)
        g_loss = generator_loss(cfg, critic, fake)
        logs = {"g_adv": g_loss.detach()}
        if cfg.objective.name == "madgan" and cfg.objective.madgan_diversity > 0:
            diversity = obj.madgan_diversity(fake_grouped)
            logs["diversity"] = diversity.detach()
            g_loss = g_loss + cfg.objective.madgan_diversity * diversity
        if encoder is not None:
            recon_logits = _d_outputs(critic, recon, cfg.discriminator.pack, groups=1)
            reg = obj.mrgan_regularizer(
                real, recon, recon_logits, cfg.objective.mrgan_geometric, cfg.objective.mrgan_mode
            )
            logs["mode_reg"] = reg.detach()
            g_loss = g_loss + reg
        model.g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        model.g_opt.step()
    finally:
        d_inner.requires_grad_(True)
    update_ema(model)
    model.step += 1
    metrics = {"d_loss": d_loss.item(), "g_loss": g_loss.item()}
    metrics.update({k: v.item() for k, v in {**d_logs, **logs}.items()})
    return metrics
