"""The single-process training loop, and the object the Ray worker drives in each process.

``GanRun`` owns one process's share of a run: the dataset stream, the model (``GanModel``),
its random streams and the evaluation. The Ray service adds DDP wrapping (``run.model.wrap``),
reporting and checkpointing through ``LoopHooks``; the plain CLI below uses no hooks at all.

    python -m gan_core.loop --config ring8 train.steps=2000 --out runs/plain
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from gan_core.config import ConfigError, GanConfig, load_config, preset_names
from gan_core.data import Dataset, MixtureDataset, build_dataset
from gan_core.metrics import evaluate_samples
from gan_core.steps import GanModel, build_model, sample_noise, train_step

# Offsets keep the streams of one seed apart: data, training noise, evaluation noise, grid noise.
_DATA, _NOISE, _EVAL, _GRID = 0, 1, 2, 3


def _stream(seed: int, kind: int, rank: int = 0, step: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + kind * 10_007 + rank * 7_919 + step * 104_729) % (2**63)
    )


@dataclass
class LoopHooks:
    """What a caller adds to the plain loop. Each hook gets the run; all are optional."""

    on_step: Callable[[GanRun, dict[str, float]], None] | None = None
    on_eval: Callable[[GanRun, dict[str, float]], None] | None = None
    should_stop: Callable[[GanRun], bool] | None = None


@dataclass
class GanRun:
    cfg: GanConfig
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    dataset: Dataset = field(init=False)
    model: GanModel = field(init=False)

    def __post_init__(self) -> None:
        if self.cfg.train.threads > 0:
            torch.set_num_threads(self.cfg.train.threads)
        # Same seed on every rank: identical initial weights (DDP would broadcast them anyway);
        # the data and noise streams below differ per rank, which is what shards the data.
        torch.manual_seed(self.cfg.seed)
        self.dataset = build_dataset(self.cfg.data)
        self.model = build_model(self.cfg, self.dataset.shape, self.device)
        self.data_rng = self.noise_rng = torch.Generator()
        grid_n = max(self.cfg.eval.grid // self.cfg.generators.count, 1)
        self.grid_noise = self._noise(
            grid_n * self.cfg.generators.count, _stream(self.cfg.seed, _GRID)
        )
        self.history: list[dict[str, float]] = []

    def _noise(self, n: int, rng: torch.Generator) -> Tensor:
        return sample_noise(self.model, n, rng, "cpu").to(self.device)

    def next_real(self) -> Tensor:
        return self.dataset.sample(self.cfg.train.batch_size, self.data_rng).to(self.device)

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

    def evaluate(self) -> dict[str, float]:
        """Mode-coverage metrics of the (EMA) generator on ``eval.samples`` samples."""
        started = time.perf_counter()
        samples = self.generate(self.cfg.eval.samples)
        real = None
        if self.dataset.kind == "images":
            real = self.dataset.sample(min(self.cfg.eval.samples, 5000), _stream(self.cfg.seed, 9))
        name = self.cfg.data.name
        metrics = evaluate_samples(name, samples, real) if name != "parquet" else {}
        metrics["eval_seconds"] = time.perf_counter() - started
        return metrics

    def save_images(self, folder: str | Path, tag: str) -> list[Path]:
        """The fixed-noise grid (images) or scatter over the mode centers (2D points)."""
        # Imported here: matplotlib is slow to import and only needed when drawing.
        from gan_core.images import save_grid, save_scatter

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        samples = self.model.sample(self.grid_noise).cpu()
        if self.dataset.kind == "images":
            return [save_grid(samples, folder / f"{tag}.png")]
        points = self.generate(self.cfg.eval.samples)
        centers = self.dataset.centers if isinstance(self.dataset, MixtureDataset) else None
        return [
            save_scatter(points, centers, folder / f"{tag}.png", title=f"{self.cfg.name} {tag}")
        ]

    def state_dict(self) -> dict:
        """Full state: model, optimizers, EMA, step, torch's RNG and the metric history.

        The data and noise streams need no state: they are derived from (seed, rank, step)."""
        return {
            "model": self.model.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])

    def run(self, hooks: LoopHooks | None = None) -> list[dict[str, float]]:
        """Train to ``train.steps`` from the current step; evaluate every ``eval.every`` steps."""
        hooks = hooks or LoopHooks()
        cfg = self.cfg
        window_start, window_steps = time.perf_counter(), 0
        while self.model.step < cfg.train.steps:
            if hooks.should_stop is not None and hooks.should_stop(self):
                break
            metrics = self.train_step()
            window_steps += 1
            if hooks.on_step is not None:
                hooks.on_step(self, metrics)
            step = self.model.step
            if step % cfg.eval.every == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                metrics["steps_per_s"] = window_steps / max(elapsed, 1e-9)
                metrics.update(self.evaluate())
                metrics["step"] = step
                self.history.append(metrics)
                if hooks.on_eval is not None:
                    hooks.on_eval(self, metrics)
                window_start, window_steps = time.perf_counter(), 0
        return self.history


def format_eval(step: int, total: int, metrics: dict[str, float]) -> str:
    """One concise progress line: step, speed, ETA (when known), losses and coverage."""
    parts = [
        f"step {step}/{total}",
        f"{metrics.get('steps_per_s', 0):.1f} it/s",
        *([f"ETA {metrics['eta_s']:.0f} s"] if "eta_s" in metrics else []),
        f"d {metrics.get('d_loss', float('nan')):.3f}",
        f"g {metrics.get('g_loss', float('nan')):.3f}",
    ]
    if "hq_pct" in metrics:
        parts += [
            f"modes {metrics['modes']:.0f}",
            f"HQ {metrics['hq_pct']:.1f}%",
            f"rKL {metrics['reverse_kl']:.3f}",
        ]
    elif "kl" in metrics:
        parts += [f"modes {metrics['modes']:.0f}", f"KL {metrics['kl']:.3f}"]
    return " | ".join(parts)


def coverage_table(history: list[dict[str, float]]) -> str:
    keys = [k for k in ("modes", "hq_pct", "reverse_kl", "kl", "fd") if history and k in history[0]]
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
