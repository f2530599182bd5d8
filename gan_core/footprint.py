"""A run's memory footprint per worker, estimated before anything is allocated.

Range checks let ``generators.width=10**6`` or ``train.batch_size=10**9`` through: they are valid
numbers, and the run would only die inside a Ray worker, out of memory, after the cluster had
started. ``footprint`` builds the run's nets on PyTorch's ``meta`` device (shapes without storage,
so a net of 10**12 parameters costs nothing) and runs one forward pass there to count
activations; ``check_footprint`` refuses a config whose estimate exceeds what any single worker
has, naming the key that costs the most.

The estimate is an upper-bound model, not a measurement: every parameter costs 16 bytes in
training (weights, gradients, Adam's two moments; +4 for G's EMA copy); every activation element
of a training step is kept for backward (x2 for its gradient); evaluation keeps ``eval.samples``
outputs plus one chunk's activations, of which a forward pass without autograd holds only a
layer's input and output at a time.

The Unrolled GAN look-ahead (``gan_core.unroll``) is its own part, ``unroll.steps``: a
second-order look-ahead keeps all k of its D steps in the autograd graph, each with D's
activations on the real and fake batch (and their gradients) and a new copy of D's parameters
with the Adam moments and gradients that made it (``LOOKAHEAD_PARAM_BYTES`` per parameter); a
first-order one detaches each step, so one step is alive at a time, whatever k.

MRGAN's manifold-diffusion schedule adds a second discriminator D_D of D's architecture: its
parameters count like D's, under ``discriminator.width``. Its activations add nothing to the
step's part: the schedule's four updates run one after another, each backward freeing its graph
before the next forward, and none holds more than the D phase and G phase counted below.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gan_core.config.schema import ConfigError, GanConfig
from gan_core.nets import (
    build_diffusion_discriminator,
    build_discriminator,
    build_encoder,
    build_generator,
    pack_samples,
)

# No single worker (a host's RAM, or one GPU: an H200 has 141 GB) holds more than this; a config
# above it cannot train anywhere raygan runs, so it is refused before Ray starts.
MAX_WORKER_BYTES = 256 * 2**30
_EVAL_CHUNK = 5000  # samples generated per call (gan_core.loop.GanRun.generate)
_FLOAT = 4
# Bytes per D parameter one second-order look-ahead step keeps alive: the new weights, the
# gradient taken with create_graph and Adam's moments and step terms. Measured with autograd's
# saved-tensor hooks on ring-8's D: ~25 with Adam, ~4 with SGD (test_config_hardening.py).
LOOKAHEAD_PARAM_BYTES = 32


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes per worker, by what costs them (keys are the config keys that scale them)."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def largest(self) -> str:
        return max(self.parts, key=self.parts.__getitem__)


def data_shape(cfg: GanConfig) -> tuple[int, ...]:
    """The per-sample shape ``cfg.data`` yields, without reading data.

    Parquet points have as many coordinates as the file has columns, unknown until read: (1,) is
    a lower bound, which keeps the estimate from refusing a config that fits.
    """
    shapes = {"ring8": (2,), "grid25": (2,), "digits": (1, 8, 8), "stacked_digits": (3, 8, 8)}
    if cfg.data.name in shapes:
        return shapes[cfg.data.name]
    if cfg.data.image_size > 0:
        return (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return (1,)


def _outputs(net: nn.Module, x: torch.Tensor) -> list[int]:
    """Elements output by each leaf module of ``net`` on input ``x`` (on the meta device), in
    call order."""
    sizes: list[int] = []

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel())

    hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def _activations(net: nn.Module, x: torch.Tensor) -> int:
    """Elements output by every leaf module of ``net`` on ``x``: what backward keeps."""
    return sum(_outputs(net, x))


def _inference_peak(net: nn.Module, x: torch.Tensor) -> int:
    """Elements alive at once in a forward pass of ``net`` on ``x`` without autograd: a leaf's
    input and its output (earlier outputs are freed as the pass goes on)."""
    sizes = [x.numel(), *_outputs(net, x)]
    return max(a + b for a, b in zip(sizes, sizes[1:], strict=False))


def _parameters(net: nn.Module | None) -> int:
    return 0 if net is None else sum(p.numel() for p in net.parameters())


def footprint(cfg: GanConfig, shape: tuple[int, ...] | None = None) -> Footprint:
    """Estimated training and evaluation bytes per worker of ``cfg`` on samples of ``shape``."""
    shape = tuple(shape or data_shape(cfg))
    g, d = cfg.generators, cfg.discriminator
    # A bank of N generators is N copies (or one body and N heads): build one or two and scale,
    # since building 5,000 generators, even without storage, takes minutes.
    one = dataclasses.replace(cfg, generators=dataclasses.replace(g, count=1))
    two = dataclasses.replace(cfg, generators=dataclasses.replace(g, count=2))
    with torch.device("meta"):
        generator = build_generator(one, shape)
        g_params = _parameters(generator)
        if g.count > 1:
            per_head = _parameters(build_generator(two, shape)) - g_params if g.shared else g_params
            g_params += (g.count - 1) * per_head
        discriminator = build_discriminator(cfg, shape)
        encoder = build_encoder(cfg, shape)
        diffusion_d = build_diffusion_discriminator(cfg, shape)
        # Two packed inputs: BatchNorm refuses a batch of one in training mode.
        probe = 2 * d.pack
        noise = torch.zeros(1, probe, g.z_dim)
        per_sample_g = _activations(generator, noise) / probe
        # Evaluation generates under no_grad: the peak of one pass, not every activation (at 32
        # px the sum is ~1.9 GB for 5,000 samples against ~0.4 GB alive at once).
        peak_g = _inference_peak(generator, noise) / probe
        fake = torch.zeros(probe, *shape)
        per_sample_d = _activations(discriminator, pack_samples(fake, d.pack)) / probe
        per_sample_e = 0.0 if encoder is None else _activations(encoder, fake) / probe
    batch = cfg.train.batch_size
    d_params = _parameters(discriminator)
    # G draws batch samples per step (split among its generators); D sees them and as many real
    # ones; backward keeps every activation and its gradient. MRGAN's G phase also runs G on the
    # batch's codes E(x): a second batch through G.
    g_batches = 1 if encoder is None else 2
    step = batch * (g_batches * per_sample_g + 2 * per_sample_d + 2 * per_sample_e)
    # Each look-ahead step is D's step on the same real and fake batch, plus a copy of D.
    alive = cfg.unroll.steps if cfg.unroll.second_order else min(cfg.unroll.steps, 1)
    lookahead = alive * (2 * _FLOAT * batch * 2 * per_sample_d + LOOKAHEAD_PARAM_BYTES * d_params)
    chunk = min(cfg.eval.samples, _EVAL_CHUNK)
    parts = {
        "generators.width": (16 + 4) * g_params,
        "discriminator.width": 16 * (d_params + _parameters(diffusion_d)),
        "encoder.width": 16 * _parameters(encoder),
        "train.batch_size": int(2 * _FLOAT * step),
        "unroll.steps": int(lookahead),
        "eval.samples": int(_FLOAT * (cfg.eval.samples * math.prod(shape) + chunk * peak_g)),
    }
    return Footprint(parts)


def check_footprint(
    cfg: GanConfig,
    shape: tuple[int, ...] | None = None,
    limit: int = MAX_WORKER_BYTES,
    source: str = "<config>",
) -> Footprint:
    """``footprint(cfg)``, or a ConfigError naming the costliest key when it exceeds ``limit``."""
    estimate = footprint(cfg, shape)
    if estimate.total > limit:
        key = _costliest_key(cfg, shape, estimate)
        value = _field_at(cfg, key)
        breakdown = ", ".join(
            f"{name} {size / 2**30:.3g} GiB"
            for name, size in sorted(estimate.parts.items(), key=lambda kv: -kv[1])
            if size
        )
        raise ConfigError(
            key,
            value,
            f"a size whose estimated memory per worker fits {limit / 2**30:.0f} GiB; this "
            f"config needs ~{estimate.total / 2**30:.3g} GiB ({breakdown})",
            source,
        )
    return estimate


def _costliest_key(cfg: GanConfig, shape: tuple[int, ...] | None, estimate: Footprint) -> str:
    """The key whose default value would shrink the estimate most, else the largest part's.

    A part can grow with two keys (the look-ahead with unroll.steps and train.batch_size), so
    the largest part alone would blame ring8_unrolled's unroll.steps=5 for a batch of 10**9."""
    defaults = GanConfig()
    best, best_total = estimate.largest, estimate.total
    for key in estimate.parts:
        default = _field_at(defaults, key)
        if _field_at(cfg, key) == default:
            continue
        total = footprint(_replace(cfg, key, default), shape).total
        if total < best_total:
            best, best_total = key, total
    return best


def _replace(node: Any, key: str, value: object) -> Any:
    """A copy of the dataclass tree ``node`` with dotted ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    new = _replace(getattr(node, head), rest, value) if rest else value
    return dataclasses.replace(node, **{head: new})


def _field_at(cfg: GanConfig, key: str) -> object:
    """The value of the dataclass field at dotted ``key`` (what ``_replace`` sets)."""
    node: object = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
