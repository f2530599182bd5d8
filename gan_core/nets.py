"""Generator and discriminator networks for every GAN variant, built from a ``GanConfig``.

The classes only build layers and run ``forward``; the ``build_*`` functions map a config onto
their constructor arguments. Two families: MLPs (2D point data, PacGAN / Unrolled-GAN sized nets)
and DCGAN-style conv nets for square images of side 8, 16, 32 or 64. The anti-collapse parts live
here too: maxout units, minibatch discrimination (Salimans et al. 2016), packed discriminator
inputs (PacGAN), a bank of generators (MAD-GAN), EBGAN's autoencoder D, MRGAN's encoder and the
second discriminator of its manifold-diffusion schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gan_core.config.schema import ACTIVATIONS, DCGAN_SIDES, GanConfig

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def make_activation(name: str) -> nn.Module:
    """A fresh activation module: relu | leaky_relu (slope 0.2) | tanh | elu."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.2)
    if name == "tanh":
        return nn.Tanh()
    if name == "elu":
        return nn.ELU()
    raise ValueError(f"activation {name!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")


class Maxout(nn.Module):
    """Goodfellow et al.'s maxout: ``Linear(in, out * pieces)``, then a max over each unit's pieces.

    Unit ``j`` is the max of the linear outputs ``j * pieces`` to ``j * pieces + pieces - 1``.
    """

    def __init__(self, in_features: int, out_features: int, pieces: int) -> None:
        super().__init__()
        self.out_features, self.pieces = out_features, pieces
        self.linear = nn.Linear(in_features, out_features * pieces)

    def forward(self, x: Tensor) -> Tensor:
        pieces = self.linear(x).view(x.shape[0], self.out_features, self.pieces)
        return pieces.max(dim=-1).values


class MinibatchDiscrimination(nn.Module):
    """Salimans et al. 2016: lets D see how similar each sample is to the rest of its batch.

    With a learned tensor T of shape A x B x C: ``M_i = h_i T`` (B x C),
    ``c_b(i, j) = exp(-||M_i,b - M_j,b||_L1)`` and ``o_b(i) = sum_{j != i} c_b(i, j)``;
    the output is ``cat([h, o], dim=1)`` of shape (n, A + B).
    """

    def __init__(self, in_features: int, kernels: int, kernel_dims: int) -> None:
        super().__init__()
        self.in_features, self.kernels, self.kernel_dims = in_features, kernels, kernel_dims
        # The init scale of the reference implementation (improved-gan, Normal(0.05)).
        self.T = nn.Parameter(torch.randn(in_features, kernels, kernel_dims) * 0.05)

    @property
    def out_features(self) -> int:
        return self.in_features + self.kernels

    def forward(self, h: Tensor, groups: int = 1) -> Tensor:
        """``h`` is ``groups`` equal contiguous chunks (e.g. [real; fake] in one D forward);
        similarities are taken only within a chunk so real and fake samples never see each other.
        """
        n = h.shape[0]
        if groups < 1 or n % groups != 0:
            raise ValueError(f"batch of {n} cannot be split into groups={groups} equal chunks")
        k = n // groups
        m = (h @ self.T.flatten(1)).view(groups, k, self.kernels, self.kernel_dims)
        # Explicit |difference| rather than torch.cdist: it supports the double backward that
        # gradient penalties (WGAN-GP, DRAGAN) take through D.
        l1 = (m.unsqueeze(2) - m.unsqueeze(1)).abs().sum(dim=-1)  # (groups, k, k, B)
        not_self = ~torch.eye(k, dtype=torch.bool, device=h.device)
        o = (torch.exp(-l1) * not_self.unsqueeze(-1)).sum(dim=2).reshape(n, self.kernels)
        return torch.cat([h, o], dim=1)


def pack_samples(x: Tensor, pack: int) -> Tensor:
    """PacGAN packing: ``(n, *shape) -> (n // pack, pack * shape[0], *shape[1:])``.

    Consecutive samples ``pack * i ... pack * i + pack - 1`` form packed input ``i``: points are
    concatenated, images are stacked along channels. ``pack=1`` returns ``x`` unchanged.
    """
    n = x.shape[0]
    if pack < 1 or n % pack != 0:
        raise ValueError(f"batch of {n} samples cannot be packed in groups of pack={pack}")
    if pack == 1:
        return x
    return x.reshape(n // pack, pack * x.shape[1], *x.shape[2:])


def _is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3


def _dcgan_steps(shape: tuple[int, ...]) -> int:
    """Number of stride-2 convs between a 4x4 map and the image side."""
    if not _is_image(shape) or shape[1] != shape[2] or shape[1] not in DCGAN_SIDES:
        raise ValueError(
            f"dcgan nets need square images (C, H, W) with side in {DCGAN_SIDES}; got {shape}"
        )
    return int(math.log2(shape[1] // 4))


def _dcgan_init(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            nn.init.zeros_(module.bias)


def _mlp_hidden(
    in_features: int, width: int, depth: int, activation: str, batch_norm: bool
) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(in_features if i == 0 else width, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(make_activation(activation))
    return layers


def _conv_down(
    in_channels: int, width: int, steps: int, activation: str, batch_norm: bool
) -> tuple[list[nn.Module], int]:
    """DCGAN D body: stride-2 convs down to 4x4, doubling channels; no BN on the first conv."""
    layers: list[nn.Module] = []
    channels = in_channels
    for i in range(steps):
        out = width * 2**i
        layers.append(nn.Conv2d(channels, out, 4, 2, 1))
        if batch_norm and i > 0:
            layers.append(nn.BatchNorm2d(out))
        layers.append(make_activation(activation))
        channels = out
    return layers, channels


def _feature_body(
    role: str,
    in_shape: tuple[int, ...],
    arch: str,
    width: int,
    depth: int,
    activation: str,
    batch_norm: bool,
    maxout_pieces: int,
) -> tuple[list[nn.Module], int]:
    """The feature extractor shared by D and MRGAN's encoder: flattened features and their size.

    MLP: ``depth`` hidden layers (Maxout when ``maxout_pieces > 1``); DCGAN: strided convs down
    to 4x4, flattened.
    """
    if arch == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        features = math.prod(in_shape)
        if maxout_pieces > 1:
            for _ in range(depth):
                layers.append(Maxout(features, width, maxout_pieces))
                if batch_norm:
                    layers.append(nn.BatchNorm1d(width))
                features = width
        else:
            layers += _mlp_hidden(features, width, depth, activation, batch_norm)
        return layers, width
    if arch == "dcgan":
        layers, channels = _conv_down(
            in_shape[0], width, _dcgan_steps(in_shape), activation, batch_norm
        )
        layers.append(nn.Flatten())
        return layers, channels * 4 * 4
    raise ValueError(f"{role} arch {arch!r} is unknown; allowed: mlp, dcgan")


def _generator_parts(
    out_shape: tuple[int, ...],
    z_dim: int,
    arch: str,
    width: int,
    depth: int,
    activation: str,
    batch_norm: bool,
) -> tuple[nn.Sequential, nn.Sequential]:
    """One generator as (body, last layer); MAD-GAN's shared mode shares the body."""
    if arch == "mlp":
        body = nn.Sequential(*_mlp_hidden(z_dim, width, depth, activation, batch_norm))
        last: list[nn.Module] = [nn.Linear(width, math.prod(out_shape)), nn.Unflatten(1, out_shape)]
        if _is_image(out_shape):
            last.append(nn.Tanh())
        return body, nn.Sequential(*last)
    if arch == "dcgan":
        steps = _dcgan_steps(out_shape)
        channels = width * 2**steps
        layers: list[nn.Module] = [
            nn.Linear(z_dim, channels * 4 * 4),
            nn.Unflatten(1, (channels, 4, 4)),
        ]
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels))
        layers.append(make_activation(activation))
        for _ in range(steps):
            layers.append(nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1))
            channels //= 2
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(make_activation(activation))
        body = nn.Sequential(*layers)
        head = nn.Sequential(nn.Conv2d(channels, out_shape[0], 3, 1, 1), nn.Tanh())
        _dcgan_init(body)
        _dcgan_init(head)
        return body, head
    raise ValueError(f"generator arch {arch!r} is unknown; allowed: mlp, dcgan")


class GeneratorBank(nn.Module):
    """N generators (1 = an ordinary single generator; > 1 = MAD-GAN).

    Independent generators, or (``shared=True``) one shared body and N separate last layers.
    ``forward`` maps z (count, m, z_dim) to (count, m, *out_shape); generator i maps z[i].
    """

    def __init__(
        self,
        out_shape: tuple[int, ...],
        *,
        z_dim: int,
        count: int,
        shared: bool,
        arch: str,
        width: int,
        depth: int,
        activation: str,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        self.count, self.z_dim, self.out_shape = count, z_dim, tuple(out_shape)
        self.shared = shared and count > 1
        args = (self.out_shape, z_dim, arch, width, depth, activation, batch_norm)
        parts = [_generator_parts(*args) for _ in range(count)]
        if self.shared:
            # The other generators' bodies are built only to be dropped: keeps one code path.
            self.body = parts[0][0]
            self.heads = nn.ModuleList([head for _, head in parts])
        else:
            self.generators = nn.ModuleList([nn.Sequential(body, head) for body, head in parts])

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 3 or z.shape[0] != self.count or z.shape[2] != self.z_dim:
            raise ValueError(
                f"z must have shape (count={self.count}, m, z_dim={self.z_dim}); "
                f"got {tuple(z.shape)}"
            )
        if self.shared:
            # One body pass over all generators' noise, then each head on its own slice.
            features = self.body(z.flatten(0, 1)).unflatten(0, z.shape[:2])
            return torch.stack([head(features[i]) for i, head in enumerate(self.heads)])
        return torch.stack([g(z[i]) for i, g in enumerate(self.generators)])


class FourierFeatures(nn.Module):
    """``(n, pack * d)`` packed points -> ``(n, pack * 2m)``: each point x becomes
    ``[sin(2 pi x B), cos(2 pi x B)]`` with one fixed ``B ~ N(0, scale^2)`` of shape (d, m).

    B is a buffer (saved in checkpoints, never trained) drawn from torch's global generator, which
    the run seeds before building its nets: every rank and every resume has the same B.
    """

    def __init__(self, point_dim: int, features: int, scale: float, pack: int) -> None:
        super().__init__()
        self.point_dim, self.pack = point_dim, pack
        self.register_buffer("frequencies", torch.randn(point_dim, features) * scale)
        self.out_features = pack * 2 * features

    def forward(self, x: Tensor) -> Tensor:
        angles = 2 * math.pi * (x.reshape(-1, self.point_dim) @ self.frequencies)
        return torch.cat([angles.sin(), angles.cos()], dim=1).reshape(x.shape[0], -1)


class Discriminator(nn.Module):
    """An MLP or DCGAN-style conv D on PACKED inputs: (n, pack*2) points or (n, pack*C, H, W).

    Output (n, out_dim) with no sigmoid: a logit / critic value (out_dim 1) or MAD-GAN's class
    logits (one class per generator, then REAL last). Optional minibatch discrimination sits
    before the final linear layer. Maxout (``maxout_pieces > 1``) applies to the MLP only.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        *,
        out_dim: int,
        arch: str,
        width: int,
        depth: int,
        activation: str,
        maxout_pieces: int,
        batch_norm: bool,
        minibatch_kernels: int,
        minibatch_kernel_dims: int,
        fourier_features: int = 0,
        fourier_scale: float = 1.0,
        pack: int = 1,
    ) -> None:
        super().__init__()
        self.fourier: FourierFeatures | None = None
        if fourier_features > 0:
            self.fourier = FourierFeatures(
                math.prod(in_shape) // pack, fourier_features, fourier_scale, pack
            )
            in_shape = (self.fourier.out_features,)
        layers, features = _feature_body(
            "discriminator", in_shape, arch, width, depth, activation, batch_norm, maxout_pieces
        )
        self.body = nn.Sequential(*layers)
        self.minibatch: MinibatchDiscrimination | None = None
        if minibatch_kernels > 0:
            self.minibatch = MinibatchDiscrimination(
                features, minibatch_kernels, minibatch_kernel_dims
            )
            features = self.minibatch.out_features
        self.head = nn.Linear(features, out_dim)
        _dcgan_init(self)

    def features(self, x: Tensor, groups: int = 1) -> Tensor:
        """The penultimate layer: what ``head`` maps to the output, (n, features).

        MAD-GAN-Sim measures how alike two generators' samples are in this space; ``forward`` is
        ``head(features(x))``, so reading the features changes no output.
        """
        if self.fourier is not None:
            x = self.fourier(x)
        h = self.body(x)
        if self.minibatch is not None:
            h = self.minibatch(h, groups)
        return h

    def forward(self, x: Tensor, groups: int = 1) -> Tensor:
        return self.head(self.features(x, groups))


class AutoencoderDiscriminator(nn.Module):
    """EBGAN's D: an autoencoder whose per-sample reconstruction error is the energy.

    MLP: ``depth`` hidden layers encode to a code of ``width`` units, ``depth`` linear layers
    decode. Conv: stride-2 convs to a 4x4 map (the flattened map is the code), transposed convs
    back. The decoder has no output nonlinearity so it can reconstruct any data range.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        *,
        arch: str,
        width: int,
        depth: int,
        activation: str,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        if arch == "mlp":
            features = math.prod(in_shape)
            self.encoder = nn.Sequential(
                nn.Flatten(), *_mlp_hidden(features, width, depth, activation, batch_norm)
            )
            self.decoder = nn.Sequential(
                *_mlp_hidden(width, width, depth - 1, activation, batch_norm),
                nn.Linear(width, features),
                nn.Unflatten(1, self.in_shape),
            )
        elif arch == "dcgan":
            steps = _dcgan_steps(in_shape)
            layers, channels = _conv_down(in_shape[0], width, steps, activation, batch_norm)
            self.encoder = nn.Sequential(*layers, nn.Flatten())
            up: list[nn.Module] = [nn.Unflatten(1, (channels, 4, 4))]
            for i in reversed(range(steps)):
                out = in_shape[0] if i == 0 else width * 2 ** (i - 1)
                up.append(nn.ConvTranspose2d(channels, out, 4, 2, 1))
                if i > 0:
                    if batch_norm:
                        up.append(nn.BatchNorm2d(out))
                    up.append(make_activation(activation))
                channels = out
            self.decoder = nn.Sequential(*up)
            _dcgan_init(self)
        else:
            raise ValueError(f"discriminator arch {arch!r} is unknown; allowed: mlp, dcgan")

    def forward(self, x: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
        """Returns (energy (n,), code (n, k)). ``groups`` is accepted for the same call signature
        as ``Discriminator``; nothing here compares samples, so it changes nothing."""
        code = self.encoder(x)
        recon = self.decoder(code)
        energy = (recon - x).pow(2).flatten(1).mean(dim=1)
        return energy, code


class Encoder(nn.Module):
    """MRGAN's E: x (n, *data_shape) -> z (n, z_dim); an MLP or conv body like D's, then Linear."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        *,
        z_dim: int,
        arch: str,
        width: int,
        depth: int,
        activation: str,
    ) -> None:
        super().__init__()
        layers, features = _feature_body(
            "encoder", in_shape, arch, width, depth, activation, batch_norm=False, maxout_pieces=1
        )
        self.net = nn.Sequential(*layers, nn.Linear(features, z_dim))
        _dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def has_convs(net: nn.Module) -> bool:
    """Whether ``net`` holds a 2D convolution (a DCGAN-style net) rather than only linear layers."""
    return any(isinstance(m, _CONVS) for m in net.modules())


def to_channels_last(net: nn.Module) -> bool:
    """Store ``net``'s 4D weights NHWC (``torch.channels_last``) in place; False for an MLP.

    Why: cuDNN's tensor-core convolutions work on NHWC data, and with NCHW tensors every conv
    pays a layout transform. A conv whose weight is channels_last returns a channels_last output
    whatever its input's layout, so converting the weights (plus the real batch at D's input, see
    ``gan_core.steps``) keeps every conv activation NHWC. An MLP has no 4D weights: nothing to do.
    Values, parameter names and state-dict keys are unchanged; only strides differ.
    """
    if not has_convs(net):
        return False
    net.to(memory_format=torch.channels_last)
    return True


def packed_shape(data_shape: tuple[int, ...], pack: int) -> tuple[int, ...]:
    """The shape of one packed discriminator input (see ``pack_samples``)."""
    return (pack * data_shape[0], *data_shape[1:])


def build_generator(cfg: GanConfig, data_shape: tuple[int, ...]) -> GeneratorBank:
    g = cfg.generators
    return GeneratorBank(
        tuple(data_shape),
        z_dim=g.z_dim,
        count=g.count,
        shared=g.shared,
        arch=g.arch,
        width=g.width,
        depth=g.depth,
        activation=g.activation,
        batch_norm=g.batch_norm,
    )


def build_discriminator(cfg: GanConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """EBGAN's autoencoder for objective ebgan, else a ``Discriminator`` on packed inputs."""
    d = cfg.discriminator
    if cfg.objective.name == "ebgan":
        return AutoencoderDiscriminator(
            tuple(data_shape),
            arch=d.arch,
            width=d.width,
            depth=d.depth,
            activation=d.activation,
            batch_norm=d.batch_norm,
        )
    return Discriminator(
        packed_shape(tuple(data_shape), d.pack),
        out_dim=cfg.generators.count + 1 if cfg.objective.name == "madgan" else 1,
        arch=d.arch,
        width=d.width,
        depth=d.depth,
        activation=d.activation,
        maxout_pieces=d.maxout_pieces,
        batch_norm=d.batch_norm,
        minibatch_kernels=d.minibatch.kernels,
        minibatch_kernel_dims=d.minibatch.kernel_dims,
        fourier_features=d.fourier_features,
        fourier_scale=d.fourier_scale,
        pack=d.pack,
    )


def build_encoder(cfg: GanConfig, data_shape: tuple[int, ...]) -> Encoder | None:
    """MRGAN's encoder (shaped like D's body); None for every other objective."""
    if cfg.objective.name != "mrgan":
        return None
    return Encoder(
        tuple(data_shape),
        z_dim=cfg.generators.z_dim,
        arch=cfg.discriminator.arch,
        width=cfg.encoder.width,
        depth=cfg.encoder.depth,
        activation=cfg.discriminator.activation,
    )


def build_diffusion_discriminator(cfg: GanConfig, data_shape: tuple[int, ...]) -> nn.Module | None:
    """MDGAN's second discriminator D_D (``objective.mrgan_diffusion``): D's architecture, its own
    weights. None unless the manifold-diffusion schedule is on."""
    if cfg.objective.name != "mrgan" or not cfg.objective.mrgan_diffusion:
        return None
    return build_discriminator(cfg, data_shape)
