"""The single-process loop: determinism, bit-identical resume, per-rank streams, the evaluation
schedule and hooks, sample generation, images, the progress text and the CLI."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gan_core import data, loop
from gan_core.config import GanConfig, load_config
from gan_core.file_eval import FileEvaluator
from gan_core.files import FileData
from gan_core.loop import GanRun, LoopHooks, coverage_table, format_eval, main
from gan_core.manifold import prdc
from gan_core.metrics import frechet_distance, mixture_metrics

TINY = [
    "generators.width=16",
    "generators.depth=2",
    "discriminator.width=16",
    "discriminator.depth=2",
    "discriminator.maxout_pieces=1",
    "train.batch_size=8",
    "eval.samples=200",
    "eval.grid=16",
]
# Timings are the only values two identical runs may disagree on.
TIMING = ("steps_per_s", "eval_seconds")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(preset: str = "ring8", *overrides: str) -> GanConfig:
    return load_config(preset, [*TINY, *overrides])


def weights(run: GanRun) -> list[torch.Tensor]:
    model = run.model
    nets = [model.generator, model.discriminator] + ([model.ema] if model.ema else [])
    return [t.detach().clone() for net in nets for t in [*net.parameters(), *net.buffers()]]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def checkpoint_round_trip(state: dict) -> dict:
    """What the service does with a checkpoint: save, then load with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_same_seed_same_run_other_seed_other_run():
    cfg = tiny()
    first, second = GanRun(cfg), GanRun(cfg)
    metrics_a = [first.train_step() for _ in range(3)]
    metrics_b = [second.train_step() for _ in range(3)]
    assert metrics_a == metrics_b
    assert same(weights(first), weights(second))
    other = GanRun(tiny("ring8", "seed=1"))
    assert [other.train_step() for _ in range(3)] != metrics_a


@pytest.mark.parametrize(
    "extra",
    [
        ("train.ema=0.9", "train.lr_schedule=cosine", "train.steps=4"),
        ("objective.name=wgan-gp", "objective.n_critic=2"),
    ],
)
def test_resume_is_bit_identical(extra):
    cfg = tiny("ring8", *extra)
    straight = GanRun(cfg)
    metrics = [straight.train_step() for _ in range(4)]

    first_half = GanRun(cfg)
    for _ in range(2):
        first_half.train_step()
    state = checkpoint_round_trip(first_half.state_dict())
    next_global_draw = torch.rand(3)
    resumed = GanRun(cfg)
    torch.manual_seed(12345)  # building the run re-seeded: move the global stream elsewhere
    resumed.load_state_dict(state)
    assert resumed.model.step == 2
    # torch's global stream is restored too, for anything outside the derived streams.
    assert torch.equal(torch.rand(3), next_global_draw)
    assert [resumed.train_step() for _ in range(2)] == metrics[2:]
    assert same(weights(resumed), weights(straight))
    for opt in ("g_opt", "d_opt"):
        a = getattr(resumed.model, opt).state_dict()["state"]
        b = getattr(straight.model, opt).state_dict()["state"]
        assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in b)


def test_resume_through_run_keeps_the_history():
    cfg = tiny("ring8", "train.steps=4", "eval.every=2")
    straight = GanRun(cfg)
    straight.run()
    interrupted = GanRun(cfg)
    interrupted.run(LoopHooks(should_stop=lambda r: r.model.step >= 2))
    assert [h["step"] for h in interrupted.history] == [2]
    # The history holds evaluation metrics: they must survive a weights_only load.
    state = checkpoint_round_trip(interrupted.state_dict())
    resumed = GanRun(cfg)
    resumed.load_state_dict(state)
    resumed.run()
    assert untimed(resumed.history) == untimed(straight.history)
    assert same(weights(resumed), weights(straight))


def record_reals(run: GanRun) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    draw = run.next_real

    def next_real() -> torch.Tensor:
        seen.append(draw())
        return seen[-1]

    run.next_real = next_real
    return seen


def test_ranks_share_weights_but_not_data_or_noise(monkeypatch):
    noise: list[torch.Tensor] = []
    step = loop.train_step

    def spy(model, next_real, rng, device):
        twin = torch.Generator()
        twin.set_state(rng.get_state())
        noise.append(torch.randn(4, generator=twin))
        return step(model, next_real, rng, device)

    monkeypatch.setattr(loop, "train_step", spy)
    cfg = tiny()
    runs = [GanRun(cfg, rank=0, world_size=2), GanRun(cfg, rank=1, world_size=2), GanRun(cfg)]
    assert same(weights(runs[0]), weights(runs[1]))
    reals = [record_reals(r) for r in runs]
    metrics = [[r.train_step() for _ in range(2)] for r in runs]
    rank0, rank1, rank0_again = reals
    assert not torch.equal(rank0[0], rank1[0])
    assert not torch.equal(rank0[0], rank0[1])  # a new batch every step
    assert torch.equal(rank0[0], rank0_again[0]) and torch.equal(rank0[1], rank0_again[1])
    # noise: rank 0 steps 1-2, rank 1 steps 1-2, rank 0 again steps 1-2
    assert not torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert torch.equal(noise[0], noise[4]) and torch.equal(noise[1], noise[5])
    assert metrics[0] == metrics[2] and metrics[0] != metrics[1]


def test_run_evaluates_on_schedule_and_calls_hooks():
    run = GanRun(tiny("ring8", "train.steps=5", "eval.every=2"))
    steps, evals = [], []
    hooks = LoopHooks(
        on_step=lambda r, m: steps.append((r.model.step, m["d_loss"])),
        on_eval=lambda r, m: evals.append(m),
    )
    history = run.run(hooks)
    assert [h["step"] for h in history] == [2, 4, 5]
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5]
    assert evals == history
    for h in history:
        assert {"d_loss", "g_loss", "modes", "hq_pct", "reverse_kl", *TIMING} <= set(h)
        assert h["steps_per_s"] > 0
    # The history keeps the mean of the step losses handed to on_step since the last evaluation.
    assert history[0]["d_loss"] == (steps[0][1] + steps[1][1]) / 2
    assert history[1]["d_loss"] == (steps[2][1] + steps[3][1]) / 2
    assert history[2]["d_loss"] == steps[4][1]


def test_should_stop_stops_and_run_continues_later():
    run = GanRun(tiny("ring8", "train.steps=5", "eval.every=2"))
    asked: list[int] = []

    def stop(r: GanRun) -> bool:
        asked.append(r.model.step)
        return r.model.step >= 3

    run.run(LoopHooks(should_stop=stop))
    assert run.model.step == 3 and asked == [0, 1, 2, 3]
    assert [h["step"] for h in run.history] == [2]
    run.run()
    assert run.model.step == 5 and [h["step"] for h in run.history] == [2, 4, 5]


def test_evaluate_ring8_scores_the_ema_samples(monkeypatch):
    scored: list[torch.Tensor] = []
    built: list[torch.Tensor] = []

    class Spy(loop.SampleEvaluator):
        def __init__(self, name, real=None):
            built.append(real)
            super().__init__(name, real)

        def __call__(self, samples):
            scored.append(samples)
            return super().__call__(samples)

    monkeypatch.setattr(loop, "SampleEvaluator", Spy)
    run = GanRun(tiny("ring8", "train.ema=0.5"))
    run.train_step()
    metrics = run.evaluate()
    assert torch.equal(scored[0], run.generate(200))
    assert not torch.equal(scored[0], run.generate(200, use_ema=False))
    mixture = data.ring8()
    expected = mixture_metrics(scored[0], mixture.centers, mixture.std)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    # The label-free measures and fd, in raw coordinates against the fixed real reference.
    real = run.real_reference()[0]
    assert torch.equal(built[0], real)
    expected = {"fd": frechet_distance(real.numpy(), scored[0].numpy()), **prdc(real, scored[0])}
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert set(metrics) == {
        "modes",
        "hq_pct",
        "reverse_kl",
        "fd",
        "precision",
        "recall",
        "density",
        "coverage",
        "eval_seconds",
    }
    assert all(type(v) is float for v in metrics.values())
    assert 0 <= metrics["modes"] <= 8 and 0 <= metrics["hq_pct"] <= 100
    run.train_step()
    run.evaluate()
    assert len(built) == 1 and len(scored) == 2  # the real side once per run


def test_generate_exactly_n_from_a_fixed_stream():
    run = GanRun(tiny("ring8", "generators.count=3", "train.batch_size=9"))
    ten = run.generate(10)
    assert ten.shape == (10, 2)
    assert torch.equal(ten, run.generate(10))  # the same z at every evaluation
    assert torch.equal(ten, run.generate(12)[:10])
    assert not torch.equal(ten, run.generate(10, seed_offset=1))
    many = run.generate(5001)  # more than one chunk of 4,998
    assert many.shape == (5001, 2)
    assert torch.equal(many[:4998], run.generate(4998))


def test_generate_uses_ema_unless_told_not_to():
    run = GanRun(tiny("ring8", "train.ema=0.9"))
    run.train_step()
    assert not torch.equal(run.generate(8), run.generate(8, use_ema=False))


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("ring8", ()),
        ("digits", ("generators.width=8", "discriminator.width=8", "generators.z_dim=8")),
    ],
)
def test_save_images_writes_a_png(tmp_path, preset, extra):
    run = GanRun(tiny(preset, *extra))
    paths = run.save_images(tmp_path / "images", "step_1")
    assert paths == [tmp_path / "images" / "step_1.png"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC


def test_format_eval_mixture_and_digits_lines():
    line = format_eval(
        3,
        10,
        {
            "steps_per_s": 12.34,
            "d_loss": 0.5,
            "g_loss": 1.25,
            "modes": 7.0,
            "hq_pct": 85.04,
            "reverse_kl": 0.1234,
        },
    )
    assert line == "step 3/10 | 12.3 it/s | d 0.500 | g 1.250 | modes 7 | HQ 85.0% | rKL 0.123"
    line = format_eval(4, 8, {"modes": 950.0, "kl": 0.25})
    assert line == "step 4/8 | 0.0 it/s | d nan | g nan | modes 950 | KL 0.250"
    line = format_eval(5, 8, {"steps_per_s": 2.0, "eta_s": 90.4, "d_loss": 1.0, "g_loss": 1.0})
    assert line == "step 5/8 | 2.0 it/s | ETA 90 s | d 1.000 | g 1.000"


def test_coverage_table_rows():
    history = [
        {"step": 2.0, "modes": 3.0, "hq_pct": 50.0, "reverse_kl": 0.5, "d_loss": 1.0},
        {"step": 4.0, "modes": 8.0, "hq_pct": 97.25, "reverse_kl": 0.0125, "d_loss": 0.9},
    ]
    assert coverage_table(history).splitlines() == [
        "| step | modes | hq_pct | reverse_kl |",
        "|---|---|---|---|",
        "| 2 | 3.000 | 50.000 | 0.500 |",
        "| 4 | 8.000 | 97.250 | 0.013 |",
    ]
    digits = coverage_table([{"step": 1, "modes": 9.0, "kl": 0.1, "fd": 2.5}])
    assert digits.splitlines()[0] == "| step | modes | kl | fd |"
    assert digits.splitlines()[2] == "| 1 | 9.000 | 0.100 | 2.500 |"


def test_main_trains_and_writes_history(tmp_path, capsys):
    out = tmp_path / "plain"
    code = main(["--config", "ring8", "train.steps=4", "eval.every=2", *TINY, "--out", str(out)])
    assert code == 0
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    assert (out / "step_0000004.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "step 2/4" in printed and "step 4/4" in printed
    assert "| step | modes | hq_pct | reverse_kl |" in printed


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["train.batch_size=0"], "train.batch_size"),
        (["generators.nope=1"], "nope"),
        (["--config", "no_such_preset"], "--config"),
    ],
)
def test_main_bad_config_returns_2(tmp_path, capsys, args, key):
    assert main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and key in err
    assert not (tmp_path / "history.json").exists()


# --- file data -----------------------------------------------------------------------------------

FILE_TINY = [
    "generators.width=16",
    "discriminator.width=16",
    "generators.depth=1",
    "discriminator.depth=1",
    "discriminator.maxout_pieces=1",
    "train.batch_size=32",
    "eval.samples=200",
    "eval.every=5",
    "eval.grid=16",
]
# The real points' mean, far from where an untrained generator puts its samples (near 0).
POINTS_MEAN = (1.0, -2.0, 0.5)


@pytest.fixture(scope="module")
def points_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """150 rows of 3-D Gaussian points in row groups of 40, 40, 40 and 30."""
    xyz = np.random.default_rng(0).normal(POINTS_MEAN, (0.3, 0.5, 0.2), size=(150, 3))
    path = tmp_path_factory.mktemp("points") / "points.parquet"
    pq.write_table(pa.table({"a": xyz[:, 0], "b": xyz[:, 1], "c": xyz[:, 2]}), path, 40)
    return str(path)


def file_points(path: str, *overrides: str) -> GanConfig:
    return load_config("ring8", [*FILE_TINY, "data.name=parquet", f"data.path={path}", *overrides])


def test_a_run_on_parquet_points_trains_and_reports_the_frechet_distance(points_path: str):
    run = GanRun(file_points(points_path, "train.steps=10"))
    assert isinstance(run.dataset, FileData) and run.dataset.shape == (3,)
    history = run.run()
    assert [h["step"] for h in history] == [5, 10]
    assert run.stream is not None and run.stream.position == 10 * 32
    for h in history:
        assert math.isfinite(h["fd"]) and h["fd"] >= 0
        assert math.isfinite(h["d_loss"]) and "hq_pct" not in h
    real, labels = run.real_reference()
    assert real.shape == (150, 3) and labels is None  # eval.samples=200, capped by the rows
    rows = {tuple(r) for r in run.dataset.read_all()[0].tolist()}
    assert {tuple(r) for r in real.tolist()} == rows
    metrics = run.evaluate()
    samples = run.generate(200).numpy()
    assert metrics["fd"] == pytest.approx(frechet_distance(real.numpy(), samples))
    # FD = |mu_real - mu_fake|^2 + a non-negative trace term, in raw coordinates.
    gap = real.numpy().mean(0) - samples.mean(0)
    assert metrics["fd"] >= float(gap @ gap) - 1e-9
    assert f"FD {metrics['fd']:.4g}" in format_eval(10, 10, metrics)
    # Label-free coverage of the same samples against the same real points.
    expected = prdc(real, samples)
    for key in ("precision", "recall", "density", "coverage"):
        assert metrics[key] == pytest.approx(expected[key])
    assert f"coverage {metrics['coverage']:.3f}" in format_eval(10, 10, metrics)


def test_coverage_of_file_points_counts_the_clusters_a_generator_drops(tmp_path: Path):
    # Real: 4,000 ring-8 points in a Parquet file, no labels. A "generator" that draws only three
    # of the eight clusters covers about 3/8 of the real points' k-NN balls, at full precision.
    ring = data.ring8()
    real_points = ring.sample(4000, torch.Generator().manual_seed(0)).numpy()
    path = tmp_path / "ring.parquet"
    pq.write_table(pa.table({"x": real_points[:, 0], "y": real_points[:, 1]}), path)
    run = GanRun(
        load_config(
            "ring8", [*FILE_TINY, "data.name=parquet", f"data.path={path}", "eval.samples=4000"]
        )
    )
    real, _ = run.real_reference()
    evaluator = FileEvaluator(run.dataset, real)
    draw, labels = ring.sample_with_labels(16000, torch.Generator().manual_seed(1))
    collapsed = evaluator(draw[labels < 3][:3000])
    assert collapsed["coverage"] == pytest.approx(3 / 8, abs=0.05)
    assert collapsed["precision"] > 0.95
    whole = evaluator(draw[:3000])
    assert whole["coverage"] > 0.9 and whole["recall"] > 0.9


def test_resume_on_file_data_restores_the_data_position(points_path: str):
    # 4 steps of 32 rows cross the 150-row epoch; the checkpoint is taken at step 3 (96 rows),
    # inside a window.
    cfg = file_points(points_path, "train.steps=4")
    straight = GanRun(cfg)
    metrics = [straight.train_step() for _ in range(4)]
    first_part = GanRun(cfg)
    for _ in range(3):
        first_part.train_step()
    state = checkpoint_round_trip(first_part.state_dict())
    assert state["data_position"] == 96
    resumed = GanRun(cfg)
    resumed.load_state_dict(state)
    assert resumed.stream is not None and resumed.stream.position == 96
    assert [resumed.train_step()] == metrics[3:]
    assert same(weights(resumed), weights(straight))
    # Without the position the stream would start over and feed other rows.
    del state["data_position"]
    restarted = GanRun(cfg)
    restarted.load_state_dict(state)
    restarted.train_step()
    assert not same(weights(restarted), weights(straight))


def test_ranks_read_disjoint_rows_of_a_file(points_path: str):
    cfg = file_points(points_path)
    runs = [GanRun(cfg, rank=r, world_size=2) for r in (0, 1)]
    reals = [record_reals(r) for r in runs]
    for run in runs:
        run.train_step()
    rows = [{tuple(r) for r in seen[0].tolist()} for seen in reals]
    assert len(rows[0]) == len(rows[1]) == 32 and not rows[0] & rows[1]


def test_save_images_on_3d_points_draws_the_pairwise_projections(tmp_path, points_path: str):
    run = GanRun(file_points(points_path))
    paths = run.save_images(tmp_path, "step_0")
    assert paths == [tmp_path / "step_0.png"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    with Image.open(paths[0]) as picture:
        assert picture.size == (1350, 450)  # 3 pairs of coordinates: 3 panels in a row


def test_a_run_on_encoded_digit_images_trains_dcgan_nets(tmp_path: Path):
    images, _ = data.load_digits("all")
    pixels = np.round((images[:64].numpy() + 1) * 127.5).astype(np.uint8)
    blobs = []
    for p in pixels:
        buffer = io.BytesIO()
        Image.fromarray(p[0]).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    column = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)])
    path = tmp_path / "digits.parquet"
    pq.write_table(pa.table({"image": column}), path)
    cfg = load_config(
        "digits",
        [
            "data.name=parquet",
            f"data.path={path}",
            "data.image_size=8",
            "generators.width=8",
            "discriminator.width=8",
            "generators.z_dim=8",
            "train.batch_size=16",
            "train.steps=3",
            "eval.every=3",
            "eval.samples=32",
            "eval.grid=16",
        ],
    )
    run = GanRun(cfg)
    assert isinstance(run.dataset, FileData) and run.dataset.shape == (1, 8, 8)
    seen = record_reals(run)
    history = run.run()
    assert run.model.step == 3 and [h["step"] for h in history] == [3]
    assert math.isfinite(history[0]["d_loss"]) and math.isfinite(history[0]["g_loss"])
    # The real batches are the digits themselves, scaled back to [-1, 1].
    digits = {tuple(d) for d in (torch.from_numpy(pixels).float() / 127.5 - 1).flatten(1).tolist()}
    assert len(seen) == 3 and all(b.shape == (16, 1, 8, 8) for b in seen)
    assert {tuple(r) for b in seen for r in b.flatten(1).tolist()} <= digits
    picture = run.save_images(tmp_path / "images", "step_3")[0]
    assert picture.read_bytes()[:8] == PNG_MAGIC
