"""Reproduce the published mode-coverage tables and write docs/RESULTS.md.

    python -m bench [--quick] [--suites ring8 grid25 stacked unroll fashion] [--jobs 2] [--fresh]

Suites (docs/PROTOCOLS.md sections 1-3; the rows and their configs are in ``plan`` below):

- ring8 / grid25: PacGAN's protocol (2,500 samples; HQ = within 3 std of the nearest mean; a mode
  is captured by >= 1 HQ sample; reverse KL over nearest-mean assignments), plain GAN on
  PacGAN's nets beside raygan's best config, 5 seeds each, median and range.
- stacked: stacked digits (1,000 modes), modes and KL(generated || uniform) over 26,000 samples,
  plain DCGAN beside the best config, 5 seeds.
- unroll: the Unrolled GAN paper's Table 2 in shape: unroll depth 0 / 1 / 5 / 10 with a
  discriminator of 1/4 and of 1/2 the generator's channels, on stacked digits.
- fashion: Fashion-MNIST (60,000 28x28 images padded to 32x32), plain DCGAN beside the best
  anti-collapse config at the same steps, 1 seed; classes covered, KL to the real class
  frequencies and the Frechet distance in the features of a classifier trained on the data set's
  own labels (gan_core/file_eval.py). The Parquet is written on first use from Debian's
  ``dataset-fashion-mnist`` package into raygan's cache folder (or set $RAYGAN_FASHION_PARQUET /
  ``--fashion-data``); without it the suite is skipped with the command that installs it.

Every run is one process with one torch thread (``--jobs`` of them at once, longest first);
finished runs are appended to ``bench/out/reproduce.runs.jsonl`` and reused by a rerun of the
same config, so an interrupted bench resumes (``--fresh`` retrains everything). The summary is
written to ``bench/out/reproduce[_quick].json`` and, with one picture per row, to
``docs/RESULTS.md`` (``docs/RESULTS_quick.md`` for ``--quick``); it covers every planned row
whose runs are all recorded, so ``--suites ring8`` after a change to ring-8's config retrains
ring-8 only and keeps the other suites' recorded rows. Runs missing from the run log (a fresh
clone has none: it is not committed) are taken from the committed summary
``bench/out/reproduce[_quick].json`` when their config id matches, with the row's picture already
in docs/results/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, machine, run_parallel

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("ring8", "grid25", "stacked", "unroll", "fashion")
# Where the fashion suite reads Fashion-MNIST's train split (a Parquet of PNG rows written by
# gan_core.datasets); unset: under raygan's cache folder, converted there on first use.
FASHION_ENV = "RAYGAN_FASHION_PARQUET"


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
    # Raised when a change to the training code changes what this row trains (its config text
    # stays the same), so the recorded runs of the old code are not reused; see CODE_REVISIONS.
    revision: int = 0

    def config_id(self, seed: int) -> str:
        """Changes whenever anything that decides the trained model changes."""
        parts: list[Any] = [self.preset, list(self.overrides), self.steps, seed]
        if self.revision:  # appended only when set: the other rows keep their recorded ids
            parts.append(self.revision)
        text = json.dumps(parts)
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
# Training-code changes that change what a row trains, by row key (Row.revision):
# 1: fake packs drawn from the mixture of heads (gan_core.steps.mix_bank), not one head's.
CODE_REVISIONS: dict[str, int] = {"ring8_best": 1}
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
# One config for any points data (preset points_best): nothing in it is set from the data's number
# of modes. A bank of 32 heads on a shared body (more heads than either mixture has modes, so
# several heads share a mode and none has to stretch over two), grid-25's optimizer, EMA and
# batch; no packing (a packed D kept grid-25's samples blurred: HQ 4-5 % at 6,000 steps with 16
# or 32 heads). The search is in bench/search_notes.md. Trained for the preset's 10,000 steps
# on both mixtures, seeds 0-4, held to the same bars as the mode-count-tuned rows.
POINTS_BEST: tuple[str, ...] = (
    "generators.count=32",
    "generators.shared=true",
    "g_optim.lr=1e-3",
    "d_optim.lr=2e-3",
    "train.ema=0.999",
    "train.batch_size=256",
)
POINTS_BEST_STEPS = 10000
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


# What the plain rows' seeds 3 and 4 had added (docs/RESULTS.md generated at commit ceda03b).
_CUT = (
    "Seeds 3 and 4 were cut from this reference row when the Fashion-MNIST suite was added, to "
    "keep `make bench` under an hour; with them (recorded at commit ceda03b) it read "
)
PLAIN_CUT = {
    "ring8": _CUT + "modes 7 (6-8), HQ 96.6 % (95.8-97.0), rKL 0.391 (0.336-0.650); seeds 3 and "
    "4 alone: modes 6, 8; HQ 96.6, 95.8; rKL 0.650, 0.336.",
    "grid25": _CUT + "modes 16 (11-19), HQ 82.0 % (76.8-85.5), rKL 0.916 (0.832-1.158); seeds 3 "
    "and 4 alone: modes 13, 11; HQ 76.8, 82.2; rKL 1.041, 0.916.",
    "stacked": _CUT + "modes 950 (941-985), KL 0.607 (0.470-0.650); seeds 3 and 4 alone: modes "
    "943, 958; KL 0.625, 0.607.",
}
# Fashion-MNIST (bench/search_notes.md): minibatch discrimination (B = 8 kernels of C = 5 dims
# on D's last features) and an EMA generator on the plain DCGAN preset. Minibatch
# discrimination alone beat packing, EMA alone, two time-scale rates and DRAGAN at the same
# steps; a short EMA (decay 0.99) smooths what is left of G's step-to-step wander.
FASHION_BEST: tuple[str, ...] = (
    "discriminator.minibatch.kernels=8",
    "discriminator.minibatch.kernel_dims=5",
    "train.ema=0.99",
)
# One Fashion-MNIST step (DCGAN nets at 32x32, batch 64) costs about 7 steps of the other rows.
FASHION_COST = 7.0
# ~270 CPU s a run here; the plain DCGAN's FD still wanders by +-100 between evaluations.
FASHION_STEPS = 2000


def plan(quick: bool) -> Plan:
    """The rows of ``python -m bench`` (``quick``: one seed, budgets cut ~5x: a smoke test)."""
    seeds = (0,) if quick else (0, 1, 2, 3, 4)
    # The plain rows (references, held to no bar) train seeds 0-2: their seeds 3 and 4 were cut
    # when the Fashion-MNIST suite came in, so that `make bench` still fits an hour (they cost
    # 888 CPU s; a fresh run of the 38-run plan was estimated at 52-58 min already).
    plain_seeds = (0,) if quick else (0, 1, 2)
    p = Plan()
    # PacGAN's nets and optimizer (presets ring8 / grid25) for a CPU budget (the paper: 400
    # epochs at lr 1e-4; here lr 2e-3 cosine-decayed); plain and best train for the same steps.
    for data, best, steps in (("ring8", RING8_BEST, 10000), ("grid25", GRID25_BEST, 8000)):
        steps = 2000 if quick else steps
        p.add(
            Row(
                data,
                f"{data}_plain",
                "plain GAN (PacGAN's nets)",
                data,
                (),
                steps,
                plain_seeds,
                note="" if quick else PLAIN_CUT[data],
            ),
            Row(
                data,
                f"{data}_best",
                "best config",
                data,
                best,
                steps,
                seeds,
                cost=1.8,
                revision=CODE_REVISIONS.get(f"{data}_best", 0),
            ),
            # The preset as shipped, only data.name set: the same settings on both mixtures.
            Row(
                data,
                f"{data}_points_best",
                "one config for any points (`points_best`)",
                "points_best",
                (f"data.name={data}",),
                2000 if quick else POINTS_BEST_STEPS,
                seeds,
                cost=2.4,
            ),
        )
    sd_steps = 1000 if quick else 6000
    p.add(
        Row(
            "stacked",
            "stacked_plain",
            "plain DCGAN",
            "stacked_digits",
            (),
            sd_steps,
            plain_seeds,
            note="" if quick else PLAIN_CUT["stacked"],
        ),
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
    # Fashion-MNIST: one seed per row (a run costs ~4.5 min of CPU here, as much as ~1.5 ring-8
    # runs); plain and best train for the same steps on the same DCGAN nets.
    fm_steps = 300 if quick else FASHION_STEPS
    note = "One seed (0), to keep `make bench` under an hour."
    p.add(
        Row(
            "fashion",
            "fashion_plain",
            "plain DCGAN",
            "fashion_mnist",
            (),
            fm_steps,
            (0,),
            note=note,
            cost=FASHION_COST,
        ),
        Row(
            "fashion",
            "fashion_best",
            "best config (minibatch discrimination + EMA)",
            "fashion_mnist",
            FASHION_BEST,
            fm_steps,
            (0,),
            note=note,
            cost=FASHION_COST,
        ),
    )
    return p


# --- the Fashion-MNIST data ------------------------------------------------------------------


def fashion_data_path() -> Path:
    """The Parquet the fashion suite trains on: $RAYGAN_FASHION_PARQUET, else
    ``fashion-mnist/train.parquet`` in raygan's cache folder ($RAYGAN_CACHE or ~/.cache/raygan,
    where the label classifiers are cached too)."""
    if os.environ.get(FASHION_ENV):
        return Path(os.environ[FASHION_ENV]).expanduser().resolve()
    cache = Path(os.environ.get("RAYGAN_CACHE", Path.home() / ".cache" / "raygan"))
    return cache.expanduser().resolve() / "fashion-mnist" / "train.parquet"


def ensure_fashion_data(path: Path) -> str:
    """Make sure ``path`` holds Fashion-MNIST's train split: converted from Debian's
    ``dataset-fashion-mnist`` package (gan_core.datasets, as ``python -m gan_core.datasets
    fashion-mnist --out PATH`` does) when it is missing. Returns "" when the data is there, else
    what is missing and how to get it."""
    if path.is_file():
        return ""
    if os.environ.get(FASHION_ENV):
        return (
            f"{FASHION_ENV}={os.environ[FASHION_ENV]}: no such file; write it with `python -m "
            f"gan_core.datasets fashion-mnist --out {path}` or unset {FASHION_ENV}"
        )
    from gan_core.datasets import FASHION_CLASSES, SourceError, fashion_mnist, write_image_parquet

    try:
        images, labels = fashion_mnist("train")
    except SourceError as exc:
        return str(exc)
    partial = path.with_name(path.name + ".partial")
    print(f"fashion: writing {len(images)} Fashion-MNIST images to {path} (once)", flush=True)
    write_image_parquet([(images, labels)], str(partial), class_names=FASHION_CLASSES)
    partial.replace(path)
    return ""


def fashion_reference(row: Row) -> dict[str, Any]:
    """What the fashion rows are scored with: the label classifier (trained here on first use,
    one thread as in the runs, then cached on disk for every run), its held-out accuracy, the
    sample counts, and real held-out images scored like a generator (the metrics' floor: 5,000 of
    Fashion-MNIST's 10,000 test images against the same reference; NaN without the package)."""
    import numpy as np
    import torch

    from gan_core import file_eval
    from gan_core.files import open_file_data
    from gan_core.metrics import label_metrics

    cfg = row_config(row, 0)
    data = open_file_data(cfg.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        classifier, prior = file_eval.label_classifier(data)
        n = min(cfg.eval.samples, 5000)  # GanRun.real_reference: what every run is scored against
        real, _ = data.reference(n, seed=0)
        floor = {"modes": float("nan"), "kl": float("nan"), "fd": float("nan")}
        try:
            from gan_core.datasets import fashion_mnist

            images, _ = fashion_mnist("test")
        except Exception:  # noqa: BLE001 - the floor is optional: no package, no floor
            images = None
        if images is not None and data.shape == (1, 32, 32) and cfg.data.pad == 2:
            # Decoded as the training rows are: 2 px of black on every side, scaled to [-1, 1].
            pick = np.random.default_rng(0).permutation(len(images))[:n]
            test = np.pad(images[np.sort(pick)], ((0, 0), (2, 2), (2, 2)))[:, None]
            test = torch.from_numpy(test).to(torch.float32) / 127.5 - 1.0
            floor = label_metrics(test, real, classifier, prior)
    finally:
        torch.set_num_threads(threads)
    rows = min(
        file_eval.CLASSIFIER_ROWS,
        file_eval.MAX_CLASSIFIER_BYTES // (4 * int(np.prod(data.shape))),
        data.num_rows,
    )
    held_out = max(1, round(rows * file_eval.TEST_FRACTION))
    return {
        "data_rows": data.num_rows,
        "classifier_train_rows": rows - held_out,
        "classifier_test_rows": held_out,
        "classifier_test_accuracy": classifier.test_accuracy,
        "samples": cfg.eval.samples,
        "reference_rows": n,
        "real_floor": {k: float(v) for k, v in floor.items()},
    }


# --- running ---------------------------------------------------------------------------------


def row_config(row: Row, seed: int) -> Any:
    """The validated GanConfig of one (row, seed) run."""
    from gan_core.config import load_config

    # The Fashion-MNIST Parquet's path is the machine's, not the row's: outside the config id.
    data = [f"data.path={fashion_data_path()}"] if row.suite == "fashion" else []
    return load_config(
        row.preset,
        [
            *row.overrides,
            *data,
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


def _load_summary(path: Path, docs_dir: Path, rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Runs recorded in a summary JSON (``bench/out/reproduce[_quick].json``, committed, unlike
    the run log and the per-run pictures) for every row of ``rows`` whose runs it all holds under
    the same config ids. The run whose picture stood for its row there gets that picture (its
    copy in ``docs_dir``); the other runs' pictures are not on this machine."""
    if not path.is_file():
        return {}
    payload = json.loads(path.read_text())
    runs = {r["config_id"]: r for r in payload.get("runs", [])}
    items = {item["key"]: item for item in payload.get("rows", [])}
    done = {}
    for row in rows:
        ids = [row.config_id(seed) for seed in row.seeds]
        item = items.get(row.key)
        if item is None or not all(i in runs for i in ids):
            continue
        for seed, config_id in zip(row.seeds, ids, strict=True):
            run = dict(runs[config_id])
            picture = docs_dir / str(item.get("picture", ""))
            if seed == item.get("picture_seed") and item.get("picture") and picture.is_file():
                run["picture"] = str(picture)
            done[config_id] = run
    return done


def _median_pictures_missing(
    rows: list[Row], done: dict[str, dict[str, Any]]
) -> list[tuple[Row, int]]:
    """(row, seed) of each recorded row whose median run's picture is not on disk (runs reused
    from the summary JSON, after the row's seeds changed): retraining that run (training is
    deterministic per seed) draws it again."""
    from bench import results_doc

    missing = []
    for row in rows:
        if all(row.config_id(seed) in done for seed in row.seeds):
            runs = [done[row.config_id(seed)] for seed in row.seeds]
            (item,) = results_doc.summarise([row], {row.key: runs})
            if not Path(item["picture"]).is_file():
                missing.append((row, item["picture_seed"]))
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, short budgets (< 10 min)")
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--fresh", action="store_true", help="retrain runs already recorded")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=[],
        metavar="KEY",
        help="train only these rows of the suites (e.g. ring8_points_best); the document still "
        "shows every row whose runs are recorded",
    )
    parser.add_argument("--docs", default="", help="markdown output (default docs/RESULTS.md)")
    parser.add_argument("--out", default=str(OUT_DIR), help="JSON, run log and pictures")
    parser.add_argument(
        "--fashion-data",
        default="",
        help=f"Fashion-MNIST train Parquet (default ${FASHION_ENV}, else {fashion_data_path()})",
    )
    args = parser.parse_args(argv)
    if not args.fashion_data:
        return _run(args)
    # In the environment, so the spawned training processes read the same file; restored after.
    saved = os.environ.get(FASHION_ENV)
    os.environ[FASHION_ENV] = str(Path(args.fashion_data).expanduser().resolve())
    try:
        return _run(args)
    finally:
        if saved is None:
            os.environ.pop(FASHION_ENV, None)
        else:
            os.environ[FASHION_ENV] = saved


def _run(args: argparse.Namespace) -> int:
    from bench import results_doc

    tag = "_quick" if args.quick else ""
    planned = plan(args.quick).rows
    rows = [r for r in planned if r.suite in args.suites]
    if args.rows:
        unknown = sorted(set(args.rows) - {r.key for r in rows})
        if unknown:
            keys = ", ".join(r.key for r in rows)
            print(f"--rows: {', '.join(unknown)} not in the suites' rows ({keys})", file=sys.stderr)
            return 2
        rows = [r for r in rows if r.key in args.rows]
    fashion_missing = ""
    if any(r.suite == "fashion" for r in rows):
        fashion_missing = ensure_fashion_data(fashion_data_path())
        if fashion_missing:
            print(f"fashion suite skipped: {fashion_missing}", file=sys.stderr, flush=True)
            rows = [r for r in rows if r.suite != "fashion"]
            if not rows:
                return 2
    # Every config is validated before the first run starts: a typo fails in a second.
    for row in rows:
        row_config(row, row.seeds[0])
    out_dir = Path(args.out)
    log_path = out_dir / "reproduce.runs.jsonl"
    json_path = out_dir / f"reproduce{tag}.json"
    docs_path = Path(args.docs) if args.docs else ROOT / "docs" / f"RESULTS{tag}.md"
    figures = docs_path.parent / "results"
    pictures = out_dir / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    previous = json.loads(json_path.read_text()) if json_path.is_file() else {}
    logged = {} if args.fresh else _load_done(log_path)
    done = {} if args.fresh else {**_load_summary(json_path, docs_path.parent, planned), **logged}

    def picture(row: Row, seed: int) -> str:
        # The config id in the name: a row whose config changed never overwrites the pictures
        # that recorded runs of its old config (kept in the log, maybe shown under another row)
        # point to.
        return str(pictures / f"{row.key}{tag}_seed{seed}_{row.config_id(seed)[:8]}.png")

    jobs = [
        (row, seed, picture(row, seed))
        for row in rows
        for seed in row.seeds
        if row.config_id(seed) not in done
    ]
    redraw = _median_pictures_missing(rows, done)
    jobs += [(row, seed, picture(row, seed)) for row, seed in redraw]
    # Longest first: the two processes then finish close together.
    jobs.sort(key=lambda job: -job[0].steps * job[0].cost)
    print(results_doc.protocol_text(args.quick), flush=True)
    fashion = previous.get("fashion")
    if any(job[0].suite == "fashion" for job in jobs) or (
        any(r.suite == "fashion" for r in rows) and not fashion
    ):
        # Before the runs: the label classifier is trained once here (a minute on one thread,
        # then cached on disk), not by every run at once.
        fashion = fashion_reference(next(r for r in rows if r.suite == "fashion"))
        print(
            f"fashion: classifier held-out accuracy {fashion['classifier_test_accuracy']:.4f} "
            f"({fashion['classifier_test_rows']} images); real test images score "
            + " ".join(f"{k} {v:.3f}" for k, v in fashion["real_floor"].items()),
            flush=True,
        )
    retrained = {job[0].config_id(job[1]) for job in jobs}
    reused = [r.config_id(s) for r in rows for s in r.seeds if r.config_id(s) not in retrained]
    from_summary = sum(config_id not in logged for config_id in reused)
    print(
        f"runs: {len(jobs)} to train"
        + (f" ({len(redraw)} recorded, retrained for their missing picture)" if redraw else "")
        + f", {len(reused)} reused ({len(reused) - from_summary} from {log_path}, "
        + f"{from_summary} from {json_path}); {args.jobs} at once",
        flush=True,
    )
    started = time.perf_counter()

    def record(result: dict[str, Any]) -> None:
        done[result["config_id"]] = result
        with log_path.open("a") as fh:
            fh.write(json.dumps(result) + "\n")
        m = result["metrics"]
        shown = " ".join(
            f"{k} {m[k]:.3f}" for k in ("modes", "hq_pct", "reverse_kl", "kl", "fd") if k in m
        )
        print(
            f"  {result['key']} seed {result['seed']}: {shown} ({result['cpu_seconds']:.0f} CPU s)",
            flush=True,
        )

    run_parallel(train_one, jobs, args.jobs, on_result=record)
    wall = time.perf_counter() - started

    # The document covers every planned row whose runs are all recorded, so rerunning one suite
    # after changing its config refreshes that suite and keeps the others' recorded results.
    shown = [row for row in planned if all(row.config_id(seed) in done for seed in row.seeds)]
    results = {row.key: [done[row.config_id(seed)] for seed in row.seeds] for row in shown}
    summary = results_doc.summarise(shown, results)
    figures.mkdir(parents=True, exist_ok=True)
    for item in summary:
        # The picture of the run whose result is the row's median stands for the row.
        src = Path(item["picture"])
        dest = figures / f"{item['key']}{tag}.png"
        if not src.is_file():
            suite = next(r.suite for r in shown if r.key == item["key"])
            print(
                f"warning: {item['key']}: the median run's picture {src} is not on this machine; "
                f"`python -m bench{' --quick' if args.quick else ''} --suites {suite}` draws it",
                file=sys.stderr,
            )
            item["picture"] = ""
            continue
        if src.resolve() != dest.resolve():
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
    if fashion and any(r.suite == "fashion" for r in shown):
        payload["fashion"] = fashion
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    docs_path.write_text(results_doc.render(payload))
    print(results_doc.console_tables(summary))
    print(f"wall: {wall:.0f} s for {len(jobs)} runs; wrote {json_path} and {docs_path}")
    if fashion_missing:
        print(f"fashion suite skipped: {fashion_missing}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
