"""The EMA generator's BatchNorm statistics: recomputed from its own activations, not borrowed.

Borrowing the live G's running statistics for the averaged weights shifted every sample (ring-8
HQ fell from ~90 % to ~69 % at 6,000 steps with train.ema=0.999); these tests pin the fix.
"""

from __future__ import annotations

import torch
from torch import nn

from gan_core.loop import GanRun
from gan_core.steps import recalibrate_batch_norm
from tests.gan_core.test_loop import checkpoint_round_trip, tiny


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


class _Bank(nn.Module):
    """Takes (count, m, z_dim) noise like raygan's generators."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(-1, z.shape[-1]))


def test_recalibration_sets_the_exact_mean_and_variance_of_the_calibration_activations():
    bank = _Bank(_mlp())
    bn = bank.net[1]
    bn.running_mean.fill_(7.0)  # stale statistics that must disappear
    bn.running_var.fill_(9.0)
    assert recalibrate_batch_norm(bank, count=1, z_dim=3, step=42, device="cpu")
    # The same noise recalibrate_batch_norm draws: 8 batches of 256 from a step-seeded stream.
    rng = torch.Generator().manual_seed(1_000_003 + 42)
    batches = [torch.randn(1, 256, 3, generator=rng).reshape(-1, 3) for _ in range(8)]
    with torch.no_grad():
        pre = [bank.net[0](b) for b in batches]
    # A cumulative average of the per-batch means and (unbiased) variances.
    want_mean = torch.stack([p.mean(0) for p in pre]).mean(0)
    want_var = torch.stack([p.var(0, unbiased=True) for p in pre]).mean(0)
    torch.testing.assert_close(bn.running_mean, want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, want_var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1  # restored
    assert bank.training  # the mode it was in
    bank.eval()
    recalibrate_batch_norm(bank, 1, 3, 42, "cpu")
    assert not bank.training


def test_recalibration_is_a_function_of_weights_and_step_and_skips_nets_without_bn():
    a, b = _Bank(_mlp()), _Bank(_mlp())
    b.net[1].running_mean.fill_(3.0)
    recalibrate_batch_norm(a, 2, 3, 5, "cpu")
    recalibrate_batch_norm(b, 2, 3, 5, "cpu")
    assert torch.equal(a.net[1].running_mean, b.net[1].running_mean)
    assert torch.equal(a.net[1].running_var, b.net[1].running_var)
    recalibrate_batch_norm(b, 2, 3, 6, "cpu")  # other step, other noise
    assert not torch.equal(a.net[1].running_mean, b.net[1].running_mean)
    plain = _Bank(nn.Sequential(nn.Linear(3, 2)))
    assert recalibrate_batch_norm(plain, 1, 3, 0, "cpu") is False


def _trained(*extra: str) -> GanRun:
    run = GanRun(tiny("ring8", "train.ema=0.9", "train.steps=6", "eval.every=6", *extra))
    run.run()
    return run


def test_training_leaves_ema_statistics_alone_and_sampling_recomputes_them():
    run = GanRun(tiny("ring8", "train.ema=0.9", "train.steps=6", "eval.every=100"))
    ema_bn = [m for m in run.model.ema.modules() if isinstance(m, nn.BatchNorm1d)]
    live_bn = [m for m in run.model.generator.modules() if isinstance(m, nn.BatchNorm1d)]
    before = [m.running_mean.clone() for m in ema_bn]
    for _ in range(6):  # training only: run() would also evaluate (and so sample) at the end
        run.train_step()
    # G's own statistics moved with training; the EMA's were not copied from them.
    assert not torch.equal(live_bn[0].running_mean, before[0])
    assert all(torch.equal(m.running_mean, b) for m, b in zip(ema_bn, before, strict=True))
    first = run.generate(64)
    assert run.model._ema_bn_step == run.model.step
    assert not torch.equal(ema_bn[0].running_mean, before[0])
    assert not torch.equal(ema_bn[0].running_mean, live_bn[0].running_mean)
    assert torch.equal(run.generate(64), first)  # cached for the step: same samples again


def test_ema_with_equal_weights_recalibrated_matches_the_generator_in_training_mode_statistics():
    """With the EMA equal to G, the recomputed statistics describe G's activations: sampling a
    large batch in eval mode equals G's train-mode output on that batch up to sampling noise."""
    run = _trained()
    model = run.model
    model.ema.load_state_dict(model.generator.state_dict())
    model._ema_bn_step = -1
    z = torch.randn(1, 4000, 2, generator=torch.Generator().manual_seed(3))
    ema_eval = model.sample(z, use_ema=True)
    g = model.generator
    g.train()
    with torch.no_grad():
        g_train = g(z).reshape(-1, 2)
    # Batch statistics of 4,000 vs 2,048 calibration samples: close, not equal.
    assert (ema_eval - g_train).abs().mean() < 0.05 * g_train.abs().mean() + 1e-3


def test_resumed_run_recomputes_the_same_statistics():
    run = _trained()
    samples = run.generate(100)
    state = checkpoint_round_trip(run.state_dict())
    other = GanRun(run.cfg)
    other.load_state_dict(state)
    assert other.model._ema_bn_step == -1
    assert torch.equal(other.generate(100), samples)
