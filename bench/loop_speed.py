"""The plain loop's own overhead: GanRun.train_step vs a hand-written PyTorch step.

    python -m bench.loop_speed [--steps 300] [--rounds 5]

Protocol: PacGAN-size 2D nets (G: z in R^2, 4 x 400 ReLU + BN; D: 3 maxout layers x 200 units x
5 pieces), batch 100, one D and one G update with the non-saturating loss, Adam; one torch
thread. Both loops run in this process in alternating blocks of ``--steps`` steps, ``--rounds``
times, after a warm-up; reported: median steps/s of each and their ratio (bar: the loop costs
under 10 %, i.e. ratio >= 0.90). Writes bench/out/loop_speed.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

from bench.common import machine, median, write_json


class _Maxout(nn.Module):
    def __init__(self, n_in: int, n_out: int, pieces: int) -> None:
        super().__init__()
        self.linear, self.n_out, self.pieces = nn.Linear(n_in, n_out * pieces), n_out, pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).view(x.shape[0], self.n_out, self.pieces).amax(-1)


def plain_step_factory(batch: int = 100):
    """The reference: the same computation written directly in PyTorch, no raygan code."""
    layers: list[nn.Module] = []
    width_in = 2
    for _ in range(4):
        layers += [nn.Linear(width_in, 400), nn.BatchNorm1d(400), nn.ReLU()]
        width_in = 400
    G = nn.Sequential(*layers, nn.Linear(400, 2))
    D = nn.Sequential(
        _Maxout(2, 200, 5), _Maxout(200, 200, 5), _Maxout(200, 200, 5), nn.Linear(200, 1)
    )
    g_opt = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.8, 0.999))
    d_opt = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.8, 0.999))
    angles = torch.arange(8) * 2 * math.pi / 8
    centers = torch.stack([angles.cos(), angles.sin()], 1)
    softplus = nn.functional.softplus

    def step() -> None:
        real = centers[torch.randint(0, 8, (batch,))] + 0.01 * torch.randn(batch, 2)
        with torch.no_grad():
            fake = G(torch.randn(batch, 2))
        out = D(torch.cat([real, fake]))
        d_loss = softplus(-out[:batch]).mean() + softplus(out[batch:]).mean()
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        D.requires_grad_(False)
        g_loss = softplus(-D(G(torch.randn(batch, 2)))).mean()
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        D.requires_grad_(True)

    return step


def raygan_step_factory():
    from gan_core.config import load_config
    from gan_core.loop import GanRun

    run = GanRun(load_config("ring8", ["train.steps=1000000"]))
    return run.train_step


def _rate(step, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("# loop overhead: GanRun.train_step vs hand-written PyTorch (PacGAN-size 2D nets)")
    print(f"protocol: batch 100, 1 thread, {args.rounds} alternating rounds x {args.steps} steps")
    plain, ours = plain_step_factory(), raygan_step_factory()
    _rate(plain, 30), _rate(ours, 30)  # warm-up: allocator, lazy inits
    plain_rates, ours_rates = [], []
    for _ in range(args.rounds):
        plain_rates.append(_rate(plain, args.steps))
        ours_rates.append(_rate(ours, args.steps))
    ratios = [o / p for o, p in zip(ours_rates, plain_rates, strict=True)]
    result = {
        "plain_steps_per_s": median(plain_rates),
        "raygan_steps_per_s": median(ours_rates),
        "ratio_median": median(ratios),
        "ratios": ratios,
        "bar": ">= 0.90",
    }
    print(f"plain PyTorch: {result['plain_steps_per_s']:.1f} steps/s (median of {args.rounds})")
    print(f"raygan loop:   {result['raygan_steps_per_s']:.1f} steps/s")
    print(
        f"ratio raygan/plain: {result['ratio_median']:.3f} (per round: "
        f"{', '.join(f'{r:.3f}' for r in ratios)}); bar >= 0.90"
    )
    path = write_json("loop_speed", {"protocol": vars(args), "machine": machine(), **result})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
