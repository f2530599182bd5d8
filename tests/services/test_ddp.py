"""The GAN step under DDP equals one process on the concatenated batch.

Two gloo ranks on 127.0.0.1 (no Ray: its start-up is slow) each train B rows wrapped as the Ray
worker wraps them (G, D and MRGAN's encoder each in its own DDP); one plain process trains the
same 2B rows. Every loss is a mean over the batch and DDP averages gradients, so after two steps
the weights must agree to float rounding. The real batches, the noise and WGAN-GP's
interpolation weights are fixed tensors: rank r gets its r-th slice, the reference all of them.

The configs have no batch norm in G and no minibatch discrimination: both use per-batch
statistics by design, so a rank's B rows and the reference's 2B rows legitimately differ.
Both optimizers are SGD, not Adam: Adam divides each gradient element by its own magnitude, so
an element whose exact gradient is 0 (WGAN's cancelling means under an unused maxout piece)
steps by a sizeable fraction of lr on rounding noise of 1e-8, and the runs would differ for
reasons that have nothing to do with DDP. SGD keeps a gradient difference a weight difference.

The unroll look-ahead is local to each rank by design (gan_core/unroll.py): rank r looks D ahead
on its own B rows, so G's all-reduced gradient is the mean over ranks of G's gradient against
D looked ahead on that rank's rows, not G's gradient against one look-ahead on all 2B rows (G's
update differs from that by 1-2 %, 2.5e-5 in the weights here). Its reference computes the mean
over ranks in one process (``_shard_local_lookahead``).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from gan_core import objectives, steps
from gan_core.config import GanConfig, load_config
from gan_core.loop import GanRun
from gan_core.steps import unwrap

WORLD = 2
BATCH = 8  # per rank
STEPS = 2
ATOL = 2e-6
TINY = [
    "generators.width=16",
    "generators.depth=2",
    "generators.batch_norm=false",
    "discriminator.width=16",
    "discriminator.depth=2",
    "discriminator.maxout_pieces=2",
    "encoder.width=16",
    "encoder.depth=2",
    "train.lr_schedule=constant",
    "g_optim.name=sgd",
    "g_optim.lr=0.1",
    "d_optim.name=sgd",
    "d_optim.lr=0.1",
    "eval.grid=4",
]
VARIANTS: dict[str, list[str]] = {
    "nonsaturating": [],
    "wgan-gp": ["objective.name=wgan-gp"],
    "unrolled": ["unroll.steps=2", "unroll.second_order=true"],
    "unrolled-first-order": ["unroll.steps=2", "unroll.second_order=false"],
    "madgan": ["objective.name=madgan", "generators.count=2", "objective.madgan_diversity=0.5"],
    "mrgan": ["objective.name=mrgan"],
    # The manifold-diffusion schedule: D_D is a fourth DDP module; per step it reads one real
    # batch and two noise draws (D_D's update, then G's diffusion update), as _inputs provides.
    "mrgan-diffusion": ["objective.name=mrgan", "objective.mrgan_diffusion=true"],
}
Patch = Callable[[Any, str, Any], None]


def _config(variant: str, batch: int) -> GanConfig:
    return load_config("ring8", [*TINY, *VARIANTS[variant], f"train.batch_size={batch}"])


def _inputs(cfg: GanConfig) -> dict[str, Tensor]:
    """Everything random a step draws, for all STEPS, over the full WORLD * BATCH rows."""
    g = torch.Generator().manual_seed(1234)
    rows, count, z_dim = WORLD * BATCH, cfg.generators.count, cfg.generators.z_dim
    return {
        "real": torch.randn(STEPS, rows, 2, generator=g),
        # Two noise draws per step: the D phase's, then the G phase's.
        "noise": torch.randn(2 * STEPS, count, rows // count, z_dim, generator=g),
        # One WGAN-GP interpolation weight per sample and step.
        "mix": torch.rand(STEPS, rows, 1, generator=g),
    }


def _feed(run: GanRun, patch: Patch, shard: int, shards: int) -> None:
    """Make ``run`` draw slice ``shard`` of ``shards`` of the fixed inputs instead of its streams.

    ``patch`` is ``setattr`` in a rank's own process and ``monkeypatch.setattr`` in pytest's.
    """
    fixed = _inputs(run.cfg)
    real, noise, mix = (iter(fixed[key]) for key in ("real", "noise", "mix"))
    batch = run.cfg.train.batch_size

    def sample_noise(model: Any, n: int, rng: torch.Generator, device: Any) -> Tensor:
        assert n == batch
        # The noise is (count, m, z_dim): each generator's share is split over the ranks.
        return next(noise).chunk(shards, dim=1)[shard].to(device)

    def per_sample_uniform(like: Tensor, shape: tuple[int, ...], rng: Any) -> Tensor:
        draw = next(mix).chunk(shards)[shard]
        assert tuple(draw.shape) == shape
        return draw.to(like)

    patch(run, "next_real", lambda: next(real).chunk(shards)[shard])
    patch(steps, "sample_noise", sample_noise)
    patch(objectives, "_per_sample_uniform", per_sample_uniform)


def _weights(run: GanRun) -> dict[str, Tensor]:
    model = run.model
    nets = {"G": model.generator, "D": model.discriminator, "E": model.encoder}
    nets["DD"] = model.diffusion_discriminator
    return {
        f"{net}.{key}": value.detach().clone()
        for net, module in nets.items()
        if module is not None
        for key, value in unwrap(module).state_dict().items()
    }


def _rank_main(rank: int, port: int, out: str) -> None:
    """One DDP rank: train every variant on this rank's slice, save its weights."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        # A rank that dies leaves the other in a collective: fail fast instead of the 30 min.
        timeout=timedelta(seconds=60),
    )
    try:
        for variant in VARIANTS:
            run = GanRun(_config(variant, BATCH), rank=rank, world_size=WORLD)
            run.model.wrap(lambda m: torch.nn.parallel.DistributedDataParallel(m))
            _feed(run, setattr, rank, WORLD)
            for _ in range(STEPS):
                run.train_step()
            torch.save(_weights(run), Path(out) / f"{variant}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rank_process(rank: int, port: int, out: str) -> None:
    """``_rank_main``, then exit at once: the weights are saved, and gloo's threads sometimes
    abort the interpreter's normal shutdown ("terminate called without an active exception",
    SIGABRT, in about 1 run in 5 on these machines, after every file was written), which
    ``mp.spawn`` would report as a failed rank."""
    _rank_main(rank, port, out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One spawn of WORLD ranks for all variants (each process start costs a torch import)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_process, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def _shard_local_lookahead(patch: Patch, shards: int) -> None:
    """Make one process's unrolled G phase what ``shards`` DDP ranks compute together.

    Each shard's look-ahead sees only that shard's real and fake rows, and G's loss judges each
    shard's fakes by that shard's looked-ahead D: the mean over the concatenated rows is then
    the mean over shards of each rank's loss, whose gradient DDP all-reduces.
    """
    loss, lookahead, functional = (
        steps.discriminator_loss,
        steps.lookahead_params,
        steps.functional_discriminator,
    )
    active: list[int] = []  # the shard being looked ahead; empty in the D phase

    def shard_loss(cfg: GanConfig, d: Any, *tensors: Tensor, **kwargs: Any) -> Any:
        if active:
            real, fake, fake_generator = (t.chunk(shards)[active[0]] for t in tensors[:3])
            tensors = (real, fake, fake_generator, *tensors[3:])
        return loss(cfg, d, *tensors, **kwargs)

    def per_shard_lookahead(d: Any, d_loss_fn: Any, **kwargs: Any) -> list[dict[str, Tensor]]:
        params = []
        for shard in range(shards):
            active[:] = [shard]
            params.append(lookahead(d, d_loss_fn, **kwargs))
        active.clear()
        return params

    def per_shard_critic(d: Any, params: list[dict[str, Tensor]]) -> Callable[..., Tensor]:
        critics = [functional(d, p) for p in params]

        def call(x: Tensor, **kwargs: Any) -> Tensor:
            parts = x.chunk(shards)
            return torch.cat([c(part, **kwargs) for c, part in zip(critics, parts, strict=True)])

        return call

    patch(steps, "discriminator_loss", shard_loss)
    patch(steps, "lookahead_params", per_shard_lookahead)
    patch(steps, "functional_discriminator", per_shard_critic)


def _reference(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Initial and trained weights of one plain process on all WORLD * BATCH rows."""
    run = GanRun(_config(variant, WORLD * BATCH))
    initial = _weights(run)
    _feed(run, monkeypatch.setattr, 0, 1)
    if run.cfg.unroll.steps > 0:
        _shard_local_lookahead(monkeypatch.setattr, WORLD)
    for _ in range(STEPS):
        run.train_step()
    return initial, _weights(run)


def _named(key: str) -> Callable[[str], str]:
    return lambda message: f"{key}: {message}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ddp_step_equals_one_process_on_the_concatenated_batch(
    variant: str, ddp_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranks = [torch.load(ddp_weights / f"{variant}.rank{r}.pt") for r in range(WORLD)]
    initial, expected = _reference(variant, monkeypatch)
    assert set(ranks[0]) == set(ranks[1]) == set(expected)
    for key, value in expected.items():
        # The ranks hold one model: DDP all-reduced identical gradients into identical steps.
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0, msg=_named(key))
        torch.testing.assert_close(ranks[0][key], value, rtol=0, atol=ATOL, msg=_named(key))
    # Agreement means something only if the steps moved every network well beyond ATOL.
    for net in {key.split(".")[0] for key in expected}:
        keys = [k for k in expected if k.split(".")[0] == net]
        moved = max((expected[k] - initial[k]).abs().max().item() for k in keys)
        assert moved > 50 * ATOL, (net, moved)
