"""Reproduce the published mode-coverage tables and write docs/RESULTS.md.

    python -m bench [--quick] [--suites ring8 grid25 stacked unroll] [--jobs 2] [--fresh]

Suites (BENCHMARKS.md sections 1 and 2; the rows and their configs are in ``plan`` below):

- ring8 / grid25: PacGAN's protocol (2,500 samples; HQ = within 3 std of the nearest mean; a mode
  is captured by >= 1 HQ sample; reverse KL over nearest-mean assignments), plain GAN on
  PacGAN's nets beside raygan's best config, 5 seeds each, median and range.
- stacked: stacked digits (1,000 modes), modes and KL(generated || uniform) over 26,000 samples,
  plain DCGAN beside the best config, 5 seeds.
- unroll: the Unrolled GAN paper's Table 2 in shape: unroll depth 0 / 1 / 5 / 10 with a
  discriminator of 1/4 and of 1/2 the generator's channels, on stacked digits.

Every run is one process with one torch thread (``--jobs`` of them at once, longest first);
finished runs are appended to ``bench/out/reproduce.runs.jsonl`` and reused by a rerun of the
same config, so an interrupted bench resumes (``--fresh`` retrains everything). The summary is
written to ``bench/out/reproduce[_quick].json`` and, with one picture per row, to
``docs/RESULTS.md`` (``docs/RESULTS_quick.md`` for ``--quick``); it covers every planned row
whose runs are all recorded, so ``--suites ring8`` after a change to ring-8's config retrains
ring-8 only and keeps the other suites' recorded rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, machine, run_parallel

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("ring8", "grid25", "stacked", "unroll")


@dataclass(frozen=True)
class Row:
    """One line of a results table: a config trained with several seeds."""

    suite: str
    key: str  # stable id, also the picture's file name
    label: str
    preset: str
    overrides: tuple[str, ...]
    steps: int
    seeds: tuple[int, ...]
    note: str = ""  # how this row's setup differs from the published protocol
    cost: float = 1.0  # relative cost of one step, to start the longest runs first

    def config_id(self, seed: int) -> str:
        """Changes whenever anything that decides the trained model changes."""
        text = json.dumps([self.preset, list(self.overrides), self.steps, seed])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Plan:
    rows: list[Row] = field(default_factory=list)

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)


# --- the rows --------------------------------------------------------------------------------
# The best configs came from the Tune sweep (tuning.sweep --space collapse, bench/out/
# collapse_sweep_report.md: several generators are what buys coverage on 2D data) and from the
# hand search recorded in docs/RESULTS.md ("How the best configs were chosen"), which added
# packing (outside the sweep's space).

# grid-25's recipe with one head per mode (8 generators sharing one body, D learning twice as
# fast as G, an EMA generator whose BatchNorm statistics are recomputed, see
# gan_core.steps.recalibrate_batch_norm, twice the batch) plus PacGAN2's packed D. Each alone
# missed reverse KL over 5 seeds (PacGAN2 + EMA: median 0.060; the bank: 0.059): a single G
# splits its mass unevenly; the bank without packing lets two heads share a mode; packing lets D
# see a mode drawn twice as often.
RING8_BEST: tuple[str, ...] = (
    "generators.count=8",
    "generators.shared=true",
    "discriminator.pack=2",
    "g_optim.lr=1e-3",
    "d_optim.lr=2e-3",
    "train.ema=0.999",
    "train.batch_size=200",
)
# A bank of 25 generators sharing one body (MAD-GAN's shared mode, non-saturating loss): each
# head is a linear map of shared features, so a head can sit tightly on one mode and the bank's
# equal shares make the mode masses equal (rKL ~0.01); EMA and batch as for ring-8, and D
# learning twice as fast as G (two time-scale updates) to clear the stragglers between modes.
GRID25_BEST: tuple[str, ...] = (
    "generators.count=25",
    "generators.shared=true",
    "g_optim.lr=1e-3",
    "d_optim.lr=2e-3",
    "train.ema=0.999",
    "train.batch_size=200",
)
# On 8x8 images the DCGAN nets are one strided conv deep, and their digits stay ambiguous (40 %
# of channels labelled with confidence < 0.9, which skews each channel's digit frequencies):
# MLP nets (3 x 512 hidden units each) packed in pairs, with a slower EMA and batch 128, more
# than halve KL for about twice the CPU time of 6,000 DCGAN steps.
STACKED_BEST: tuple[str, ...] = (
    "generators.arch=mlp",
    "generators.width=512",
    "generators.depth=3",
    "discriminator.arch=mlp",
    "discriminator.width=512",
    "discriminator.depth=3",
    "discriminator.pack=2",
    "d_optim.lr=6e-4",
    "train.ema=0.9995",
    "train.batch_size=128",
)


def plan(quick: bool) -> Plan:
    """The rows of ``python -m bench`` (``quick``: one seed, budgets cut ~5x: a smoke test)."""
    seeds = (0,) if quick else (0, 1, 2, 3, 4)
    p = Plan()
    # PacGAN's nets and optimizer (presets ring8 / grid25) for a CPU budget (the paper: 400
    # epochs at lr 1e-4; here lr 2e-3 cosine-decayed); plain and best train for the same steps.
    for data, best, steps in (("ring8", RING8_BEST, 10000), ("grid25", GRID25_BEST, 8000)):
        steps = 2000 if quick else steps
        p.add(
            Row(data, f"{data}_plain", "plain GAN (PacGAN's nets)", data, (), steps, seeds),
            Row(data, f"{data}_best", "best config", data, best, steps, seeds, cost=1.8),
        )
    sd_steps = 1000 if quick else 6000
    p.add(
        Row("stacked", "stacked_plain", "plain DCGAN", "stacked_digits", (), sd_steps, seeds),
        Row(
            "stacked",
            "stacked_best",
            "best config (MLP nets)",
            "stacked_digits",
            STACKED_BEST,
            3000 if quick else 12000,
            seeds,
            cost=1.0,
        ),
    )
    # The Unrolled GAN paper's Table 2 setting: a weak D (1/4 or 1/2 of G's base channels, 64),
    # second-order unrolling; k unrolled D steps cost about 1 + 0.16 k plain steps here. One
    # seed: a fresh `make bench` with two seeds here and a PacDCGAN2 row (KL 0.153, now in
    # bench/search_notes.md) took 62 min on 2026-11-27, past the hour `make bench` must fit.
    un_steps = 200 if quick else 1500
    for frac, width in (("1/4", 16), ("1/2", 32)):
        for k in (0, 1, 5, 10):
            p.add(
                Row(
                    "unroll",
                    f"unroll_d{width}_k{k}",
                    f"D = {frac} G, unroll {k}",
                    "stacked_digits",
                    (f"discriminator.width={width}", f"unroll.steps={k}"),
                    un_steps,
                    (0,),
                    cost=(1.0 + 0.16 * k) * (0.8 if width == 16 else 1.2),
                )
            )
    return p


# --- running ---------------------------------------------------------------------------------


def row_config(row: Row, seed: int) -> Any:
    """The validated GanConfig of one (row, seed) run."""
    from gan_core.config import load_config

    return load_config(
        row.preset,
        [
            *row.overrides,
            f"name={row.key}",
            f"seed={seed}",
            f"train.steps={row.steps}",
            # One evaluation, at the end: evaluations cost time and change nothing trained.
            f"eval.every={row.steps}",
            "train.threads=1",
        ],
    )


def train_one(row: Row, seed: int, picture: str) -> dict[str, Any]:
    """Train one (row, seed) in this process with one thread; metrics of the final model."""
    import torch

    torch.set_num_threads(1)
    from gan_core.loop import GanRun

    cfg = row_config(row, seed)
    wall, cpu = time.perf_counter(), time.process_time()
    run = GanRun(cfg)
    history = run.run()
    train_cpu = time.process_time() - cpu
    final = history[-1]
    out = Path(picture)
    drawn = run.save_images(out.parent, out.stem)[0]
    return {
        "key": row.key,
        "seed": seed,
        "config_id": row.config_id(seed),
        "steps": row.steps,
        "metrics": {k: float(v) for k, v in final.items()},
        "cpu_seconds": train_cpu,
        "wall_seconds": time.perf_counter() - wall,
        "picture": str(drawn),
    }


def _load_done(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        if line.strip():
            result = json.loads(line)
            if Path(result["picture"]).is_file():
                done[result["config_id"]] = result
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, short budgets (< 10 min)")
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--fresh", action="store_true", help="retrain runs already recorded")
    parser.add_argument("--docs", default="", help="markdown output (default docs/RESULTS.md)")
    parser.add_argument("--out", default=str(OUT_DIR), help="JSON, run log and pictures")
    args = parser.parse_args(argv)

    from bench import results_doc

    tag = "_quick" if args.quick else ""
    rows = [r for r in plan(args.quick).rows if r.suite in args.suites]
    # Every config is validated before the first run starts: a typo fails in a second.
    for row in rows:
        row_config(row, row.seeds[0])
    out_dir = Path(args.out)
    log_path = out_dir / "reproduce.runs.jsonl"
    pictures = out_dir / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    done = {} if args.fresh else _load_done(log_path)
    # The config id in the name: a row whose config changed never overwrites the pictures that
    # recorded runs of its old config (kept in the log, maybe shown under another row) point to.
    jobs = [
        (row, seed, str(pictures / f"{row.key}{tag}_seed{seed}_{row.config_id(seed)[:8]}.png"))
        for row in rows
        for seed in row.seeds
        if row.config_id(seed) not in done
    ]
    # Longest first: the two processes then finish close together.
    jobs.sort(key=lambda job: -job[0].steps * job[0].cost)
    print(results_doc.protocol_text(args.quick), flush=True)
    print(
        f"runs: {len(jobs)} to train, {sum(len(r.seeds) for r in rows) - len(jobs)} reused "
        f"from {log_path}; {args.jobs} at once",
        flush=True,
    )
    started = time.perf_counter()

    def record(result: dict[str, Any]) -> None:
        done[result["config_id"]] = result
        with log_path.open("a") as fh:
            fh.write(json.dumps(result) + "\n")
        m = result["metrics"]
        shown = " ".join(
            f"{k} {m[k]:.3f}" for k in ("modes", "hq_pct", "reverse_kl", "kl") if k in m
        )
        print(
            f"  {result['key']} seed {result['seed']}: {shown} ({result['cpu_seconds']:.0f} CPU s)",
            flush=True,
        )

    run_parallel(train_one, jobs, args.jobs, on_result=record)
    wall = time.perf_counter() - started

    # The document covers every planned row whose runs are all recorded, so rerunning one suite
    # after changing its config refreshes that suite and keeps the others' recorded results.
    shown = [
        row
        for row in plan(args.quick).rows
        if all(row.config_id(seed) in done for seed in row.seeds)
    ]
    results = {row.key: [done[row.config_id(seed)] for seed in row.seeds] for row in shown}
    summary = results_doc.summarise(shown, results)
    docs_path = Path(args.docs) if args.docs else ROOT / "docs" / f"RESULTS{tag}.md"
    figures = docs_path.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    for item in summary:
        # The picture of the run whose result is the row's median stands for the row.
        src = Path(item["picture"])
        dest = figures / f"{item['key']}{tag}.png"
        shutil.copyfile(src, dest)
        item["picture"] = str(dest.relative_to(docs_path.parent))
    from gan_core.classifier import get_classifier

    payload = {
        "quick": args.quick,
        "classifier_test_accuracy": (
            get_classifier().test_accuracy
            if any(r.suite in ("stacked", "unroll") for r in shown)
            else float("nan")
        ),
        "machine": machine(),
        "wall_seconds": wall,
        "trained": len(jobs),
        "jobs": args.jobs,
        "rows": summary,
        "runs": [r for key in results for r in results[key]],
    }
    json_path = out_dir / f"reproduce{tag}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    docs_path.write_text(results_doc.render(payload))
    print(results_doc.console_tables(summary))
    print(f"wall: {wall:.0f} s for {len(jobs)} runs; wrote {json_path} and {docs_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
