"""Tests for gan_core.nets: hand-computed layer values, shapes, presets and one CPU train step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gan_core.config import load_config
from gan_core.nets import (
    AutoencoderDiscriminator,
    Discriminator,
    Encoder,
    GeneratorBank,
    Maxout,
    MinibatchDiscrimination,
    build_discriminator,
    build_encoder,
    build_generator,
    make_activation,
    pack_samples,
)

POINTS = (2,)
DATA_SHAPES = {"digits": (1, 8, 8), "stacked_digits": (3, 8, 8)}


def shape_of(cfg) -> tuple[int, ...]:
    return DATA_SHAPES.get(cfg.data.name, POINTS)


def count(net: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def bank(out_shape=POINTS, **kw) -> GeneratorBank:
    args = dict(
        z_dim=3,
        count=1,
        shared=False,
        arch="mlp",
        width=16,
        depth=2,
        activation="relu",
        batch_norm=False,
    )
    return GeneratorBank(out_shape, **{**args, **kw})


def disc(in_shape=POINTS, **kw) -> Discriminator:
    args = dict(
        out_dim=1,
        arch="mlp",
        width=16,
        depth=2,
        activation="leaky_relu",
        maxout_pieces=1,
        batch_norm=False,
        minibatch_kernels=0,
        minibatch_kernel_dims=5,
    )
    return Discriminator(in_shape, **{**args, **kw})


# --- activations and maxout -------------------------------------------------------------------


def test_make_activation_values_and_unknown_name():
    x = torch.tensor([-1.0, 2.0])
    assert torch.equal(make_activation("relu")(x), torch.tensor([0.0, 2.0]))
    assert torch.allclose(make_activation("leaky_relu")(x), torch.tensor([-0.2, 2.0]))
    assert torch.allclose(make_activation("tanh")(x), torch.tanh(x))
    assert torch.allclose(make_activation("elu")(x), torch.tensor([math.exp(-1) - 1, 2.0]))
    with pytest.raises(ValueError, match="relu, leaky_relu, tanh, elu"):
        make_activation("gelu")


def test_maxout_hand_set_weights():
    m = Maxout(2, 2, pieces=2)
    with torch.no_grad():
        # Unit 0's pieces are x0 and x1; unit 1's are -x0 + 0.5 and -x1.
        m.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
        m.linear.bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.0]))
    out = m(torch.tensor([[3.0, -2.0], [-1.0, 4.0]]))
    assert torch.equal(out, torch.tensor([[3.0, 2.0], [4.0, 1.5]]))


# --- minibatch discrimination -----------------------------------------------------------------


def hand_mbd() -> MinibatchDiscrimination:
    mbd = MinibatchDiscrimination(2, kernels=2, kernel_dims=2)
    with torch.no_grad():
        mbd.T.zero_()
        mbd.T[:, 0, :] = torch.eye(2)  # M_i,0 = h_i
        mbd.T[0, 1, 0] = 2.0  # M_i,1 = (2 h_i0, 0)
    return mbd


def test_minibatch_discrimination_hand_computed():
    h = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 0.0]])
    e = math.exp
    # Kernel 0 L1 distances: d01 = 3, d02 = 3, d12 = 4; kernel 1 (values 0, 2, 6): 2, 6, 4.
    o = torch.tensor(
        [
            [e(-3) + e(-3), e(-2) + e(-6)],
            [e(-3) + e(-4), e(-2) + e(-4)],
            [e(-3) + e(-4), e(-6) + e(-4)],
        ]
    )
    out = hand_mbd()(h)
    assert out.shape == (3, 4)
    assert torch.equal(out[:, :2], h)
    assert torch.allclose(out[:, 2:], o, atol=1e-7)


def test_minibatch_discrimination_excludes_self():
    mbd = MinibatchDiscrimination(5, kernels=3, kernel_dims=4)
    h = torch.randn(1, 5).repeat(4, 1)
    out = mbd(h)
    assert out.shape == (4, 5 + 3)
    assert torch.allclose(out[:, 5:], torch.full((4, 3), 3.0))  # n - 1, not n


def test_minibatch_discrimination_groups_stay_apart():
    torch.manual_seed(0)
    mbd = MinibatchDiscrimination(6, kernels=4, kernel_dims=3)
    real, fake = torch.randn(2, 6), torch.randn(2, 6)
    joint = mbd(torch.cat([real, fake]), groups=2)
    assert torch.allclose(joint, torch.cat([mbd(real), mbd(fake)]))
    assert not torch.allclose(joint, mbd(torch.cat([real, fake])))
    with pytest.raises(ValueError, match="groups=3"):
        mbd(torch.randn(4, 6), groups=3)
    with pytest.raises(ValueError, match="groups=0"):
        mbd(torch.randn(4, 6), groups=0)


def test_minibatch_discrimination_supports_double_backward():
    # Gradient penalties differentiate D's input gradient once more.
    torch.manual_seed(0)
    mbd = MinibatchDiscrimination(3, kernels=2, kernel_dims=2)
    x = torch.randn(4, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(mbd(x).sum(), x, create_graph=True)
    grad.pow(2).sum().backward()
    assert mbd.T.grad is not None and mbd.T.grad.abs().sum() > 0


def test_discriminator_minibatch_layer_only_when_kernels_positive():
    off = build_discriminator(load_config("ring8"), POINTS)
    assert off.minibatch is None and count(off, MinibatchDiscrimination) == 0
    assert off.head.in_features == 200
    on = build_discriminator(load_config("ring8_minibatch"), POINTS)
    assert count(on, MinibatchDiscrimination) == 1
    assert (on.minibatch.kernels, on.minibatch.kernel_dims) == (32, 5)
    assert on.head.in_features == 200 + 32


def test_discriminator_passes_groups_to_minibatch():
    torch.manual_seed(0)
    d = disc(minibatch_kernels=4, minibatch_kernel_dims=3)
    real, fake = torch.randn(3, 2), torch.randn(3, 2)
    joint = d(torch.cat([real, fake]), groups=2)
    assert torch.allclose(joint, torch.cat([d(real), d(fake)]), atol=1e-6)


# --- packing ----------------------------------------------------------------------------------


def test_pack_samples_groups_consecutive_points():
    x = torch.arange(12.0).view(6, 2)
    packed = pack_samples(x, 3)
    assert torch.equal(packed, torch.tensor([[0.0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]))
    assert pack_samples(x, 1) is x
    with pytest.raises(ValueError, match="pack=4"):
        pack_samples(x, 4)


def test_pack_samples_stacks_image_channels():
    x = torch.arange(4 * 3 * 2 * 2.0).view(4, 3, 2, 2)
    packed = pack_samples(x, 2)
    assert packed.shape == (2, 6, 2, 2)
    assert torch.equal(packed[0, :3], x[0]) and torch.equal(packed[0, 3:], x[1])
    assert torch.equal(packed[1, :3], x[2]) and torch.equal(packed[1, 3:], x[3])


def test_pacgan_discriminator_takes_packed_points():
    cfg = load_config("ring8_pacgan")
    d = build_discriminator(cfg, POINTS)
    first = next(m for m in d.modules() if isinstance(m, Maxout))
    assert first.linear.in_features == 2 * 2
    out = d(pack_samples(torch.randn(10, 2), cfg.discriminator.pack))
    assert out.shape == (5, 1)


# --- generators -------------------------------------------------------------------------------


def test_generator_bank_shapes_for_one_and_four():
    one, four = bank(count=1), bank(count=4)
    assert one(torch.randn(1, 7, 3)).shape == (1, 7, 2)
    assert four(torch.randn(4, 7, 3)).shape == (4, 7, 2)
    assert (four.count, four.z_dim, four.out_shape) == (4, 3, (2,))
    with pytest.raises(ValueError, match="count=4"):
        four(torch.randn(1, 7, 3))


def test_independent_generators_differ_on_the_same_noise():
    torch.manual_seed(0)
    g = bank(count=4)
    out = g(torch.randn(1, 5, 3).expand(4, 5, 3))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(out[i], out[j])


def test_shared_generators_share_the_body():
    torch.manual_seed(0)
    shared, independent = bank(count=4, shared=True), bank(count=4)
    # Four bodies (16*3+16 + 16*16+16 = 336) collapse to one; four heads of 16*2+2 remain.
    assert n_params(independent) - n_params(shared) == 3 * 336
    z = torch.randn(4, 6, 3)

    def body_grads(loss_of_out):
        shared.zero_grad()
        loss_of_out(shared(z)).backward()
        return [p.grad.clone() for p in shared.body.parameters()]

    per_head = [body_grads(lambda out, i=i: out[i].pow(2).sum()) for i in range(4)]
    for grads in per_head:
        assert all(g.abs().sum() > 0 for g in grads)
    total = body_grads(lambda out: out.pow(2).sum())
    for i, g in enumerate(total):
        assert torch.allclose(g, sum(h[i] for h in per_head), atol=1e-5)


def test_independent_generator_gets_no_gradient_from_another():
    g = bank(count=2)
    g(torch.randn(2, 4, 3))[0].sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in g.generators[0].parameters())
    # torch.stack's backward hands the other slice zeros rather than no gradient.
    assert all(p.grad is None or not p.grad.any() for p in g.generators[1].parameters())


def test_mlp_generator_output_nonlinearity():
    assert count(bank(POINTS), nn.Tanh) == 0
    image = bank((1, 8, 8))
    out = image(torch.randn(1, 20, 3) * 100)
    assert out.shape == (1, 20, 1, 8, 8) and out.abs().max() <= 1


def test_presets_express_the_papers_nets():
    g = build_generator(load_config("ring8"), POINTS)  # PacGAN: 4 x 400 ReLU + BN
    assert count(g, nn.Linear) == 5 and count(g, nn.BatchNorm1d) == 4 and count(g, nn.ReLU) == 4
    assert g.generators[0][0][0].out_features == 400
    d = build_discriminator(load_config("ring8"), POINTS)  # 3 maxout x 200 units x 5 pieces
    maxouts = [m for m in d.modules() if isinstance(m, Maxout)]
    assert [(m.out_features, m.pieces) for m in maxouts] == [(200, 5)] * 3
    unrolled = [
        "generators.width=128",
        "generators.depth=2",
        "generators.activation=tanh",
        "generators.batch_norm=false",
    ]
    g2 = build_generator(load_config("ring8", unrolled), POINTS)  # Unrolled GAN: 2 x 128 tanh
    assert count(g2, nn.Tanh) == 2 and count(g2, nn.BatchNorm1d) == 0


# --- discriminators ---------------------------------------------------------------------------


def test_discriminator_out_dim_one_or_classes_for_madgan():
    x = torch.randn(6, 2)
    assert build_discriminator(load_config("ring8"), POINTS)(x).shape == (6, 1)
    madgan = load_config("ring8_madgan")
    assert build_discriminator(madgan, POINTS)(x).shape == (6, madgan.generators.count + 1)


def test_autoencoder_energy_is_mean_squared_reconstruction_error():
    torch.manual_seed(0)
    ae = build_discriminator(load_config("ring8_ebgan"), POINTS)
    assert isinstance(ae, AutoencoderDiscriminator)
    x = torch.randn(5, 2)
    energy, code = ae(x)
    recon = ae.decoder(ae.encoder(x))
    assert energy.shape == (5,) and code.shape == (5, 200)
    assert torch.allclose(energy, ((recon - x) ** 2).mean(dim=1))
    assert torch.allclose(code, ae.encoder(x))
    with torch.no_grad():
        last = ae.decoder[-2]  # the output Linear, before the Unflatten
        last.weight.zero_()
        last.bias.copy_(torch.tensor([1.0, -1.0]))
    x = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    # recon = (1, -1): errors (0 + 4) / 2 and (4 + 0) / 2.
    assert torch.allclose(ae(x)[0], torch.tensor([2.0, 2.0]))


def test_conv_autoencoder_energy_and_shapes():
    torch.manual_seed(0)
    ae = AutoencoderDiscriminator(
        (3, 16, 16), arch="dcgan", width=4, depth=3, activation="leaky_relu", batch_norm=False
    )
    x = torch.randn(2, 3, 16, 16)
    energy, code = ae(x)
    recon = ae.decoder(ae.encoder(x))
    assert recon.shape == x.shape and code.shape == (2, 8 * 4 * 4)
    assert torch.allclose(energy, ((recon - x) ** 2).flatten(1).mean(dim=1))


# --- DCGAN ------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [8, 16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_dcgan_shapes(side, channels):
    torch.manual_seed(0)
    steps = int(math.log2(side // 4))
    g = bank((channels, side, side), arch="dcgan", width=4, batch_norm=True, count=2)
    assert g.generators[0][0][0].out_features == 4 * 2**steps * 16
    assert count(g.generators[0], nn.ConvTranspose2d) == steps
    out = g(torch.randn(2, 3, 3))
    assert out.shape == (2, 3, channels, side, side) and out.abs().max() <= 1
    d = disc((2 * channels, side, side), arch="dcgan", width=4, minibatch_kernels=3)
    assert count(d, nn.Conv2d) == steps
    assert d.minibatch.in_features == 4 * 2 ** (steps - 1) * 16
    assert d(out[0].repeat(1, 2, 1, 1)).shape == (3, 1)
    e = Encoder(
        (channels, side, side), z_dim=5, arch="dcgan", width=4, depth=3, activation="leaky_relu"
    )
    assert e(out[1]).shape == (3, 5)


@pytest.mark.parametrize("shape", [(1, 12, 12), (1, 8, 16), (1, 128, 128)])
def test_dcgan_rejects_unsupported_image_sides(shape):
    with pytest.raises(ValueError, match=r"\(8, 16, 32, 64\)"):
        bank(shape, arch="dcgan")
    with pytest.raises(ValueError, match=r"\(8, 16, 32, 64\)"):
        disc(shape, arch="dcgan")


def test_dcgan_conv_weights_use_normal_0_02():
    torch.manual_seed(0)
    g = bank((1, 32, 32), arch="dcgan", width=64)
    conv = next(m for m in g.modules() if isinstance(m, nn.ConvTranspose2d))
    weight = conv.weight  # 512 -> 256 channels, 4x4: two million weights
    assert abs(weight.std().item() - 0.02) < 1e-3 and abs(weight.mean().item()) < 1e-3


# --- presets build and train one step ---------------------------------------------------------


def test_encoder_only_for_mrgan():
    assert build_encoder(load_config("ring8"), POINTS) is None
    cfg = load_config("ring8_mrgan")
    e = build_encoder(cfg, POINTS)
    assert e(torch.randn(4, 2)).shape == (4, cfg.generators.z_dim)
    conv = build_encoder(load_config("stacked_digits", ["objective.name=mrgan"]), (3, 8, 8))
    assert count(conv, nn.Conv2d) == 1 and conv(torch.randn(4, 3, 8, 8)).shape == (4, 64)


def d_score(d: nn.Module, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A per-input scalar: the logit / critic value / first class logit, or minus the energy."""
    if isinstance(d, AutoencoderDiscriminator):
        return -d(x, groups)[0]
    return d(x, groups)[:, 0]


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("ring8", []),
        ("ring8_pacgan", []),
        ("ring8_minibatch", []),
        ("ring8_madgan", []),
        ("ring8_madgan", ["generators.shared=true"]),
        ("ring8_ebgan", []),
        ("ring8_mrgan", []),
        ("digits", []),
        ("stacked_digits", ["discriminator.pack=2", "discriminator.minibatch.kernels=8"]),
    ],
)
def test_one_d_and_g_step_changes_parameters(preset, overrides):
    torch.manual_seed(0)
    cfg = load_config(preset, overrides)
    shape, pack = shape_of(cfg), cfg.discriminator.pack
    g, d = build_generator(cfg, shape), build_discriminator(cfg, shape)
    m = 8
    z = torch.randn(g.count, m // g.count, g.z_dim)
    real = torch.randn(m, *shape)

    d_opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in d.parameters()]
    fake = g(z).flatten(0, 1).detach()
    both = pack_samples(torch.cat([real, fake]), pack)  # [real; fake] in one forward
    scores = d_score(d, both, groups=2)
    loss = (
        nn.functional.softplus(-scores[: m // pack]).mean()
        + nn.functional.softplus(scores[m // pack :]).mean()
    )
    assert torch.isfinite(loss)
    d_opt.zero_grad()
    loss.backward()
    d_opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, d.parameters(), strict=True))

    g_opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in g.parameters()]
    loss = nn.functional.softplus(-d_score(d, pack_samples(g(z).flatten(0, 1), pack))).mean()
    assert torch.isfinite(loss)
    g_opt.zero_grad()
    loss.backward()
    g_opt.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, g.parameters(), strict=True)]
    assert all(changed)
