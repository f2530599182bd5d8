"""The single-process training loop, and the object the Ray worker drives in each process.

``GanRun`` owns one process's share of a run: the dataset stream, the model (``GanModel``),
its random streams and the evaluation. The Ray service adds DDP wrapping (``run.model.wrap``),
reporting and checkpointing through ``LoopHooks``; the plain CLI below uses no hooks at all.

    python -m gan_core.loop --config ring8 train.steps=2000 --out runs/plain
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from gan_core.config import ConfigError, GanConfig, load_config, preset_names
from gan_core.data import Dataset, MixtureDataset, build_dataset
from gan_core.file_eval import FileEvaluator
from gan_core.files import FileData
from gan_core.filestream import FileStream
from gan_core.metrics import SampleEvaluator
from gan_core.steps import (
    LOSS_METRICS,
    GanModel,
    build_model,
    sample_noise,
    train_step,
    unwrap,
)

# Offsets keep the streams of one seed apart: data, training noise, evaluation noise, grid noise.
_DATA, _NOISE, _EVAL, _GRID = 0, 1, 2, 3


def _stream(seed: int, kind: int, rank: int = 0, step: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + kind * 10_007 + rank * 7_919 + step * 104_729) % (2**63)
    )


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or weight and may not go on (policy ``stop`` or no
    rollbacks left). ``step`` is where it was detected, ``what`` names the first bad value."""

    def __init__(self, step: int, what: str, rollbacks: int, policy: str) -> None:
        self.step, self.what, self.rollbacks, self.policy = step, what, rollbacks, policy
        reason = (
            "train.on_nonfinite=stop"
            if policy == "stop"
            else f"{rollbacks} rollback(s) used, train.nan_retries={rollbacks}"
        )
        super().__init__(f"non-finite {what} at step {step}; stopped ({reason})")


@dataclass
class LoopHooks:
    """What a caller adds to the plain loop. Each hook gets the run; all are optional.

    ``on_rollback(run, info)`` is told after a non-finite rollback: info holds the step where
    it was detected, what was bad, the step rolled back to and the new learning-rate scale."""

    on_step: Callable[[GanRun, dict[str, float]], None] | None = None
    on_eval: Callable[[GanRun, dict[str, float]], None] | None = None
    should_stop: Callable[[GanRun], bool] | None = None
    on_rollback: Callable[[GanRun, dict[str, object]], None] | None = None


@dataclass
class GanRun:
    """``batches``: real batches from outside (Ray Data's shard of a file data set under Ray
    Train); without them, file data is read by a ``FileStream`` and generated data sampled."""

    cfg: GanConfig
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    batches: Iterator[Tensor] | None = None
    # File data described already (the service's preflight, shipped to its workers); else the
    # run opens cfg.data itself, decoding the first rows to check them.
    data: FileData | None = None
    dataset: Dataset | FileData = field(init=False)
    model: GanModel = field(init=False)

    def __post_init__(self) -> None:
        if self.cfg.train.threads > 0:
            torch.set_num_threads(self.cfg.train.threads)
        # Same seed on every rank: identical initial weights (DDP would broadcast them anyway);
        # the data and noise streams below differ per rank, which is what shards the data.
        torch.manual_seed(self.cfg.seed)
        self.dataset = self.data if self.data is not None else build_dataset(self.cfg.data)
        self.model = build_model(self.cfg, self.dataset.shape, self.device)
        self.data_rng = self.noise_rng = torch.Generator()
        self.stream: FileStream | None = None
        if isinstance(self.dataset, FileData) and self.batches is None:
            self.stream = FileStream(self.dataset, self.cfg.seed, self.rank, self.world_size)
        self._reference: tuple[Tensor, Tensor | None] | None = None
        self._evaluator: FileEvaluator | SampleEvaluator | None = None
        grid_n = max(self.cfg.eval.grid // self.cfg.generators.count, 1)
        self.grid_noise = self._noise(
            grid_n * self.cfg.generators.count, _stream(self.cfg.seed, _GRID)
        )
        self.history: list[dict[str, float]] = []
        # Sums of the loss metrics (steps.LOSS_METRICS) over the steps since the last
        # evaluation, and their count: an evaluation reports their means, a loss curve rather
        # than one minibatch's value. Python floats: train_step has synced them already.
        self._loss_sums: dict[str, float] = {}
        self._loss_steps = 0
        self.rollbacks = 0  # non-finite rollbacks so far (kept in checkpoints)
        # The state at the last checkpoint step (what a checkpoint of this run holds): the
        # in-memory rollback target, so a rollback needs no storage round trip.
        self._good: dict | None = None

    def _noise(self, n: int, rng: torch.Generator) -> Tensor:
        return sample_noise(self.model, n, rng, "cpu").to(self.device)

    def next_real(self) -> Tensor:
        if self.batches is not None:
            batch = next(self.batches)
        elif self.stream is not None:
            batch = self.stream.next_batch(self.cfg.train.batch_size)
        else:
            batch = self.dataset.sample(self.cfg.train.batch_size, self.data_rng)
        if self.device.startswith("cuda"):
            # Page-locked host memory lets the copy run asynchronously with the step.
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def train_step(self) -> dict[str, float]:
        # The streams are a function of (seed, rank, step), not carried state: a resumed run,
        # even on a different number of workers, draws exactly what an uninterrupted one would.
        step = self.model.step
        self.data_rng = _stream(self.cfg.seed, _DATA, self.rank, step)
        self.noise_rng = _stream(self.cfg.seed, _NOISE, self.rank, step)
        return train_step(self.model, self.next_real, self.noise_rng, self.device)

    def generate(self, n: int, use_ema: bool = True, seed_offset: int = 0) -> Tensor:
        """``n`` samples from a fixed evaluation stream (same z at every eval: comparable)."""
        count = self.cfg.generators.count
        rng = _stream(self.cfg.seed + seed_offset, _EVAL)
        per_call = 5000 - 5000 % count
        chunks, left = [], n
        while left > 0:
            take = min(per_call, left + (-left) % count)
            chunks.append(self.model.sample(self._noise(take, rng), use_ema).cpu())
            left -= take
        return torch.cat(chunks)[:n]

    def real_reference(self) -> tuple[Tensor, Tensor | None]:
        """Real samples the generated ones are compared with (metrics, pictures), and their
        labels if any: the same at every evaluation and on every rank; read once."""
        if self._reference is None:
            n = min(self.cfg.eval.samples, 5000)
            if isinstance(self.dataset, FileData):
                self._reference = self.dataset.reference(n, seed=self.cfg.seed)
            else:
                self._reference = (self.dataset.sample(n, _stream(self.cfg.seed, 9)), None)
        return self._reference

    def evaluate(self) -> dict[str, float]:
        """Metrics of the (EMA) generator on ``eval.samples`` samples against the real
        reference: mode coverage where the data has modes (``gan_core.metrics``; file data:
        ``gan_core.file_eval``), and everywhere fd, precision, recall, density and coverage."""
        started = time.perf_counter()
        samples = self.generate(self.cfg.eval.samples)
        if self._evaluator is None:  # the real side (features, k-NN balls) once per run
            real = self.real_reference()[0]
            if isinstance(self.dataset, FileData):
                self._evaluator = FileEvaluator(self.dataset, real, self.cfg.eval.features)
            else:
                self._evaluator = SampleEvaluator(self.cfg.data.name, real)
        metrics = self._evaluator(samples)
        metrics["eval_seconds"] = time.perf_counter() - started
        return metrics

    def save_images(self, folder: str | Path, tag: str) -> list[Path]:
        """One PNG, ``folder/tag.png``. Images: the fixed-noise grid beside as many real images
        (the real reference). 2D mixtures: samples over the mode centers beside the share of
        samples nearest each mode. File points: the real data's 2D histogram beside the
        samples' (first two coordinates), and the samples over the real data."""
        # Imported here: matplotlib is slow to import and only needed when drawing.
        from gan_core.images import save_grid_pair, save_points, save_scatter

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.dataset.kind == "images":
            samples = self.model.sample(self.grid_noise).cpu()
            real = self.real_reference()[0][: len(samples)]
            return [save_grid_pair(samples, real, folder / f"{tag}.png")]
        points = self.generate(self.cfg.eval.samples)
        title = f"{self.cfg.name} {tag}"
        if isinstance(self.dataset, MixtureDataset):
            # 3 std: the radius within which gan_core.metrics.mixture_metrics counts a sample as
            # high quality, so the "off" bar is 100 - hq_pct.
            radius = 3 * self.dataset.std
            path = folder / f"{tag}.png"
            return [save_scatter(points, self.dataset.centers, path, title, radius=radius)]
        real = self.real_reference()[0]
        return [save_points(points, real, folder / f"{tag}.png", title=title)]

    def state_dict(self) -> dict:
        """Full state: model, optimizers, EMA, step, torch's RNG and the metric history.

        The data and noise streams need no state: they are derived from (seed, rank, step)."""
        state = {
            "model": self.model.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": list(self.history),
            "lr_scale": self.model.lr_scale,
            "rollbacks": self.rollbacks,
        }
        if self.stream is not None:
            # Rows of the file stream consumed: a resume continues where this run stopped.
            state["data_position"] = self.stream.position
        return state

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints are taken at evaluations, where the loss sums start again: none to restore.
        self._loss_sums, self._loss_steps = {}, 0
        self.model.load_state_dict(state["model"])
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])
        # Absent in checkpoints written before rollbacks existed: full rate, none used.
        self.model.lr_scale = float(state.get("lr_scale", 1.0))
        self.rollbacks = int(state.get("rollbacks", 0))
        if self.stream is not None:
            self.stream = FileStream(
                self.dataset,
                self.cfg.seed,
                self.rank,
                self.world_size,
                position=int(state.get("data_position", 0)),
            )
        self._good = None

    def _add_losses(self, metrics: dict[str, float]) -> None:
        for key in LOSS_METRICS:
            if key in metrics:
                self._loss_sums[key] = self._loss_sums.get(key, 0.0) + metrics[key]
        self._loss_steps += 1

    def _take_loss_means(self) -> dict[str, float]:
        """The loss metrics averaged over the steps since the last evaluation; starts again."""
        means = {key: total / self._loss_steps for key, total in self._loss_sums.items()}
        self._loss_sums, self._loss_steps = {}, 0
        return means

    # -- non-finite detection and rollback ------------------------------------------------------
    def _remember_good(self) -> None:
        self._good = _clone(self.state_dict())

    def first_nonfinite(self, metrics: dict[str, float]) -> str | None:
        """The name of the first NaN/Inf loss or weight after a step; None when all are finite.

        Weights are checked with one fused max-abs norm per network (a NaN or Inf anywhere
        makes it non-finite; unlike the 2-norm it cannot overflow on large finite weights), so
        the check costs microseconds. Under fp16 a scaler skips steps
        with infinite gradients by design, so only the weights count there."""
        if self.cfg.train.precision != "fp16":
            for key, value in metrics.items():
                if isinstance(value, float) and not math.isfinite(value):
                    return f"loss {key}={value}"
        nets = {"generator": self.model.generator, "discriminator": self.model.discriminator}
        if self.model.encoder is not None:
            nets["encoder"] = self.model.encoder
        if self.model.diffusion_discriminator is not None:
            nets["diffusion_discriminator"] = self.model.diffusion_discriminator
        for name, net in nets.items():
            params = [p.detach() for p in unwrap(net).parameters()]
            norms = torch._foreach_norm(params, math.inf) if params else []
            if norms and not bool(torch.isfinite(torch.stack(norms)).all()):
                bad = next(n for n, p in unwrap(net).named_parameters() if not p.isfinite().all())
                return f"weight {name}.{bad}"
        return None

    def _agree(self, bad: bool) -> bool:
        # Under DDP every rank must take the same branch (a rank rolling back alone would
        # deadlock the next all-reduce): one tiny all-reduce of the flag per step.
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)
        return bad

    def _handle_nonfinite(self, what: str, hooks: LoopHooks) -> None:
        t = self.cfg.train
        step = self.model.step
        if t.on_nonfinite == "stop" or self.rollbacks >= t.nan_retries or self._good is None:
            raise NonFiniteError(step, what, self.rollbacks, t.on_nonfinite)
        rollbacks, scale = self.rollbacks + 1, self.model.lr_scale * t.nan_lr_factor
        self.load_state_dict(_clone(self._good))
        self._good = _clone(self.state_dict())
        # The retry count and the smaller rate survive the restore (and go into checkpoints).
        self.rollbacks, self.model.lr_scale = rollbacks, scale
        if hooks.on_rollback is not None:
            hooks.on_rollback(
                self,
                {
                    "detected_at": step,
                    "what": what,
                    "resumed_at": self.model.step,
                    "lr_scale": scale,
                    "rollbacks": rollbacks,
                },
            )

    def run(self, hooks: LoopHooks | None = None) -> list[dict[str, float]]:
        """Train to ``train.steps`` from the current step; evaluate every ``eval.every`` steps."""
        hooks = hooks or LoopHooks()
        cfg = self.cfg
        window_start, window_steps = time.perf_counter(), 0
        if self._good is None:
            self._remember_good()
        while self.model.step < cfg.train.steps:
            if hooks.should_stop is not None and hooks.should_stop(self):
                break
            metrics = self.train_step()
            window_steps += 1
            if hooks.on_step is not None:
                hooks.on_step(self, metrics)
            bad = None if cfg.train.on_nonfinite == "continue" else self.first_nonfinite(metrics)
            if cfg.train.on_nonfinite != "continue" and self._agree(bad is not None):
                self._handle_nonfinite(bad or "value on another rank", hooks)
                window_start, window_steps = time.perf_counter(), 0
                continue
            self._add_losses(metrics)
            step = self.model.step
            if step % cfg.eval.every == 0 or step == cfg.train.steps:
                # A new dict: the one on_step was handed keeps this step's own values.
                metrics = {**metrics, **self._take_loss_means()}
                elapsed = time.perf_counter() - window_start
                metrics["steps_per_s"] = window_steps / max(elapsed, 1e-9)
                metrics.update(self.evaluate())
                metrics["step"] = step
                self.history.append(metrics)
                if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                    # Taken before on_eval writes the checkpoint: the same state, kept here.
                    self._remember_good()
                if hooks.on_eval is not None:
                    hooks.on_eval(self, metrics)
                window_start, window_steps = time.perf_counter(), 0
        return self.history


def _clone(state: dict) -> dict:
    """A deep copy with every tensor cloned (optimizer moments included)."""
    return copy.deepcopy(state)


def format_eval(step: int, total: int, metrics: dict[str, float]) -> str:
    """One concise progress line: step, speed, ETA (when known), losses and coverage."""
    parts = [
        f"step {step}/{total}",
        f"{metrics.get('steps_per_s', 0):.1f} it/s",
        *([f"ETA {metrics['eta_s']:.0f} s"] if "eta_s" in metrics else []),
        f"d {metrics.get('d_loss', float('nan')):.3f}",
        f"g {metrics.get('g_loss', float('nan')):.3f}",
        *([f"W {metrics['wasserstein']:.4f}"] if "wasserstein" in metrics else []),
    ]
    if "hq_pct" in metrics:
        parts += [
            f"modes {metrics['modes']:.0f}",
            f"HQ {metrics['hq_pct']:.1f}%",
            f"rKL {metrics['reverse_kl']:.3f}",
        ]
    elif "kl" in metrics:
        parts += [f"modes {metrics['modes']:.0f}", f"KL {metrics['kl']:.3f}"]
    if "fd" in metrics and "hq_pct" not in metrics:
        parts.append(f"FD {metrics['fd']:.4g}")
    if "coverage" in metrics:
        parts.append(f"coverage {metrics['coverage']:.3f} | precision {metrics['precision']:.3f}")
    return " | ".join(parts)


def coverage_table(history: list[dict[str, float]]) -> str:
    shown = ("modes", "hq_pct", "reverse_kl", "kl", "fd", "coverage", "precision")
    keys = [k for k in shown if history and k in history[0]]
    header = "| step | " + " | ".join(keys) + " |"
    rows = [header, "|" + "---|" * (len(keys) + 1)]
    for h in history:
        rows.append(f"| {int(h['step'])} | " + " | ".join(f"{h[k]:.3f}" for k in keys) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a GAN in one process (no Ray).")
    parser.add_argument(
        "--config", default="ring8", help=f"preset ({', '.join(preset_names())}) or YAML path"
    )
    parser.add_argument("--out", default="", help="folder for images and history.json")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / "plain" / cfg.name)
    run = GanRun(cfg)
    started = time.perf_counter()

    def on_eval(r: GanRun, m: dict[str, float]) -> None:
        print(format_eval(r.model.step, cfg.train.steps, m), flush=True)

    run.run(LoopHooks(on_eval=on_eval))
    wall = time.perf_counter() - started
    images = run.save_images(out, f"step_{run.model.step:07d}")
    (out / "history.json").write_text(json.dumps(run.history, indent=1))
    print(coverage_table(run.history))
    print(
        f"trained {run.model.step} steps in {wall:.1f} s; samples: {images[0]}; "
        f"history: {out / 'history.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
