"""Packing with a generator bank (``steps.mix_bank``): fake packs are draws from the mixture of
heads, as real packs are draws from the data, so a perfect one-head-per-mode bank cannot be
told from the data by its packs; configs without a bank or without packing draw as before."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gan_core.config import load_config
from gan_core.nets import pack_samples
from gan_core.steps import build_model, mix_bank, sample_noise, train_step
from tests.gan_core.test_loop import TINY
from tests.gan_core.test_steps import clone_rng

MODES = 8
RADIUS, STD = 1.0, 0.01
BATCH = 200  # ring8_best's batch: 25 samples per head


def ring_means() -> Tensor:
    angle = torch.arange(MODES) * (2 * math.pi / MODES)
    return RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)


def real_batch(rng: torch.Generator) -> Tensor:
    """Independent draws of ring-8."""
    modes = torch.randint(MODES, (BATCH,), generator=rng)
    return ring_means()[modes] + STD * torch.randn(BATCH, 2, generator=rng)


def perfect_bank_batch(rng: torch.Generator) -> Tensor:
    """What a perfect 8-head bank emits: generator-major, head i exactly on mode i."""
    per_head = BATCH // MODES
    modes = torch.arange(MODES).repeat_interleave(per_head)
    return ring_means()[modes] + STD * torch.randn(BATCH, 2, generator=rng)


def bank_cfg(*overrides: str):
    return load_config(
        "ring8",
        [*TINY, "generators.count=8", "discriminator.pack=2", "train.batch_size=16", *overrides],
    )


def same_mode_fraction(batch: Tensor) -> float:
    """Fraction of pack-2 pairs whose two points sit in the same mode (nearest mean)."""
    modes = torch.cdist(batch, ring_means()).argmin(dim=1)
    return (modes[0::2] == modes[1::2]).float().mean().item()


def test_mix_bank_is_the_permutation_drawn_from_the_step_stream():
    cfg = bank_cfg()
    fake = torch.arange(16.0).reshape(8, 2)
    rng = torch.Generator().manual_seed(5)
    expected = fake[torch.randperm(8, generator=clone_rng(rng))]
    mixed = mix_bank(cfg, fake, rng)
    assert torch.equal(mixed, expected)
    assert not torch.equal(mixed, fake)
    assert sorted(mixed[:, 0].tolist()) == fake[:, 0].tolist()  # every sample kept, once


def test_mix_bank_draws_nothing_without_a_bank_or_without_packing():
    fake = torch.randn(8, 2)
    for overrides in (["generators.count=1"], ["discriminator.pack=1"]):
        rng = torch.Generator().manual_seed(5)
        before = rng.get_state()
        assert mix_bank(bank_cfg(*overrides), fake, rng) is fake
        assert torch.equal(rng.get_state(), before)


def test_packs_of_a_mixed_perfect_bank_look_like_real_packs():
    # Real pack-2 pairs share a mode with probability 1/8; unmixed packs of a perfect bank
    # nearly always do (neighbours come from one head); mixed ones share it about as often as real.
    cfg = bank_cfg("train.batch_size=200")
    rng = torch.Generator().manual_seed(0)
    real = [same_mode_fraction(real_batch(rng)) for _ in range(40)]
    unmixed = [same_mode_fraction(perfect_bank_batch(rng)) for _ in range(40)]
    mixed = [same_mode_fraction(mix_bank(cfg, perfect_bank_batch(rng), rng)) for _ in range(40)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    # 25 samples per head: 4 of the 100 pairs straddle two heads, the rest hold one head's.
    assert all(abs(u - 0.96) < 1e-6 for u in unmixed)
    assert abs(mean(real) - 1 / 8) < 0.02
    # Without replacement within a head's 25 samples: 24 / 199 = 0.121.
    assert abs(mean(mixed) - 24 / 199) < 0.02
    assert abs(mean(mixed) - mean(real)) < 0.03


def packed_accuracy(make_fake, steps: int = 400) -> float:
    """Held-out accuracy of a small packed D trained to tell real packs from ``make_fake``'s."""
    torch.manual_seed(0)
    d = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    rng = torch.Generator().manual_seed(1)

    def batch() -> tuple[Tensor, Tensor]:
        x = torch.cat([pack_samples(real_batch(rng), 2), pack_samples(make_fake(rng), 2)])
        y = torch.cat([torch.ones(BATCH // 2), torch.zeros(BATCH // 2)])
        return x, y

    for _ in range(steps):
        x, y = batch()
        loss = nn.functional.binary_cross_entropy_with_logits(d(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        correct = [
            ((d(x).squeeze(1) > 0).float() == y).float().mean().item()
            for x, y in (batch() for _ in range(20))
        ]
    return sum(correct) / len(correct)


def test_a_packed_discriminator_separates_an_unmixed_perfect_bank_but_not_a_mixed_one():
    cfg = bank_cfg("train.batch_size=200")
    unmixed = packed_accuracy(perfect_bank_batch)
    mixed = packed_accuracy(lambda rng: mix_bank(cfg, perfect_bank_batch(rng), rng))
    assert unmixed > 0.8, unmixed  # the pack alone gives the bank away
    assert mixed < 0.6, mixed  # chance is 0.5


def test_train_step_feeds_d_and_g_mixed_packs_of_the_bank():
    cfg = bank_cfg()
    torch.manual_seed(0)
    model = build_model(cfg, (2,))
    seen: list[Tensor] = []
    hook = model.discriminator.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    rng = torch.Generator().manual_seed(2)
    shadow = clone_rng(rng)
    real = torch.randn(16, 2)
    # What the step draws, in its order: D phase noise, D phase permutation, G phase noise,
    # G phase permutation (one critic step per G step; the nonsaturating loss draws nothing
    # else). G is not updated before the G phase and BatchNorm normalises with the batch's own
    # statistics in training mode, so replaying the draws gives the step's exact inputs.
    with torch.no_grad():
        g = model.generator
        fake_d = g(sample_noise(model, 16, shadow, "cpu")).reshape(16, 2)
        perm_d = torch.randperm(16, generator=shadow)
        fake_g = g(sample_noise(model, 16, shadow, "cpu")).reshape(16, 2)
        perm_g = torch.randperm(16, generator=shadow)
    train_step(model, lambda: real, rng)
    hook.remove()
    assert len(seen) == 2  # D phase: [real; fake] packed in one forward; G phase: fake only
    assert torch.allclose(seen[0][:8], pack_samples(real, 2))
    assert torch.allclose(seen[0][8:], pack_samples(fake_d[perm_d], 2))
    assert torch.allclose(seen[1], pack_samples(fake_g[perm_g], 2), atol=1e-6)
    assert not torch.allclose(seen[1], pack_samples(fake_g, 2), atol=1e-3)
