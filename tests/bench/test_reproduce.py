"""`python -m bench`: the reproduction plan, the summary logic and one tiny end-to-end run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import reproduce, results_doc
from bench.reproduce import Plan, Row, plan, row_config
from gan_core.config import flatten, load_config

TINY = (
    "generators.width=16",
    "generators.depth=2",
    "discriminator.width=16",
    "discriminator.depth=2",
    "discriminator.maxout_pieces=1",
    "train.batch_size=8",
    "eval.samples=300",
    "eval.grid=16",
)


@pytest.mark.parametrize("quick", [False, True])
def test_every_planned_run_is_a_valid_config_with_a_unique_key(quick):
    rows = plan(quick).rows
    assert len({r.key for r in rows}) == len(rows)
    for row in rows:
        cfg = row_config(row, row.seeds[-1])
        assert cfg.train.steps == row.steps and cfg.train.threads == 1
    suites = {r.suite for r in rows}
    assert suites == set(reproduce.SUITES)


def test_full_plan_has_five_seeds_for_the_bars_and_every_unroll_depth_for_both_d_sizes():
    rows = plan(False).rows
    for suite in ("ring8", "grid25", "stacked"):
        ours = [r for r in rows if r.suite == suite]
        assert {"plain", "best"} <= {r.key.split("_")[-1] for r in ours}
        # Held to the bar: the mode-count-tuned best row, and on the mixtures points_best.
        held = {r.key for r in ours if r.key.endswith("_best")}
        points = {f"{suite}_points_best"} if suite != "stacked" else set()
        assert held == {f"{suite}_best"} | points
        # The best rows (held to the bars) have 5 seeds; the plain references 3 (seeds 3 and 4
        # were cut to fit the hour, and each plain row says so and what they had read).
        for key in held:
            (row,) = [r for r in ours if r.key == key]
            assert row.seeds == (0, 1, 2, 3, 4)
        (best,) = [r for r in ours if r.key == f"{suite}_best"]
        (plain,) = [r for r in ours if r.key.endswith("_plain")]
        assert best.seeds == (0, 1, 2, 3, 4) and plain.seeds == (0, 1, 2)
        assert "Seeds 3 and 4 were cut" in plain.note
    unroll = [row_config(r, 0) for r in rows if r.suite == "unroll"]
    pairs = {(c.discriminator.width * 4 // c.generators.width, c.unroll.steps) for c in unroll}
    # D = 1/4 G and D = 1/2 G (in base channels), each at depths 0, 1, 5, 10.
    assert pairs == {(d, k) for d in (1, 2) for k in (0, 1, 5, 10)}
    # The plain rows are the presets as they are: PacGAN's nets, no remedy.
    plain = {r.suite: row_config(r, 0) for r in rows if r.key.endswith("_plain")}
    for cfg in plain.values():
        assert cfg.discriminator.pack == 1 and cfg.generators.count == 1
        assert cfg.unroll.steps == 0 and cfg.discriminator.minibatch.kernels == 0


def test_fashion_rows_compare_plain_dcgan_and_best_at_the_same_steps_on_one_seed():
    for quick in (False, True):
        rows = {r.key: r for r in plan(quick).rows if r.suite == "fashion"}
        assert set(rows) == {"fashion_plain", "fashion_best"}
        plain, best = rows["fashion_plain"], rows["fashion_best"]
        assert plain.seeds == best.seeds == (0,) and plain.steps == best.steps
        assert plain.overrides == () and plain.preset == best.preset == "fashion_mnist"
        cfg = row_config(plain, 0)
        # The plain row is the preset's DCGAN with no remedy.
        assert cfg.generators.arch == cfg.discriminator.arch == "dcgan"
        assert cfg.discriminator.pack == 1 and cfg.generators.count == 1 and cfg.train.ema == 0
        assert cfg.unroll.steps == 0 and cfg.discriminator.minibatch.kernels == 0
        assert cfg.objective.name == "nonsaturating"
    full = {r.key: r for r in plan(False).rows if r.suite == "fashion"}
    quick = {r.key: r for r in plan(True).rows if r.suite == "fashion"}
    assert quick["fashion_plain"].steps * 5 <= full["fashion_plain"].steps


def test_fashion_data_path_is_absolute_and_outside_the_config_id(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(reproduce.FASHION_ENV, raising=False)
    monkeypatch.setenv("RAYGAN_CACHE", str(tmp_path / "cache"))
    (row,) = [r for r in plan(False).rows if r.key == "fashion_best"]
    cfg = row_config(row, 0)
    assert cfg.data.name == "parquet" and cfg.data.pad == 2 and cfg.data.image_size == 32
    assert cfg.data.path == str(tmp_path / "cache" / "fashion-mnist" / "train.parquet")
    before = row.config_id(0)
    monkeypatch.setenv(reproduce.FASHION_ENV, "elsewhere/train.parquet")
    assert row_config(row, 0).data.path == str(Path("elsewhere/train.parquet").resolve())
    assert row.config_id(0) == before  # another machine's path reuses the recorded runs


@pytest.mark.parametrize("data", ["ring8", "grid25", "stacked_digits", "fashion_mnist"])
def test_best_preset_trains_exactly_the_benchmarked_best_row(data):
    # `services.train --preset DATA_best` must be the config docs/RESULTS.md measured, not a
    # hand copy that drifted: everything that decides the model agrees.
    (row,) = [r for r in plan(False).rows if r.preset == data and r.key.endswith("_best")]
    bench = flatten(row_config(row, 0))
    preset = flatten(load_config(f"{data}_best"))
    # Bookkeeping, not the model; the bench passes its own absolute Fashion-MNIST path.
    ignored = {"name", "seed", "eval.every", "train.threads", "data.path"}
    assert {k: v for k, v in preset.items() if k not in ignored} == {
        k: v for k, v in bench.items() if k not in ignored
    }


def test_points_best_rows_train_the_shipped_preset_with_only_the_data_set_changed():
    # One config for any points: the two rows differ in data.name alone, and what they train
    # is the preset `services.train --config points_best data.name=...` trains.
    rows = {r.suite: r for r in plan(False).rows if r.key.endswith("_points_best")}
    assert set(rows) == {"ring8", "grid25"}
    ignored = {"name", "seed", "eval.every", "train.threads"}
    flat = {}
    for data, row in rows.items():
        assert row.preset == "points_best" and row.overrides == (f"data.name={data}",)
        bench = flatten(row_config(row, 0))
        preset = flatten(load_config("points_best", [f"data.name={data}"]))
        assert {k: v for k, v in preset.items() if k not in ignored} == {
            k: v for k, v in bench.items() if k not in ignored
        }
        flat[data] = {k: v for k, v in bench.items() if k not in ignored}
    differing = {k for k in flat["ring8"] if flat["ring8"][k] != flat["grid25"][k]}
    assert differing == {"data.name"}


def test_a_code_revision_changes_only_its_rows_ids():
    # Recorded runs of ring8_best trained before fake packs were mixed across the bank must not
    # be reused; every other row keeps the id its committed runs were recorded under.
    rows = {r.key: r for r in plan(False).rows}
    assert rows["ring8_best"].revision == reproduce.CODE_REVISIONS["ring8_best"] >= 1
    old = Row(**{**rows["ring8_best"].__dict__, "revision": 0})
    assert old.config_id(0) != rows["ring8_best"].config_id(0)
    plain = rows["ring8_plain"]
    text = json.dumps([plain.preset, list(plain.overrides), plain.steps, 0])
    assert plain.config_id(0) == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_config_id_changes_with_anything_that_decides_the_model():
    row = Row("ring8", "k", "label", "ring8", ("train.ema=0.9",), 100, (0, 1))
    other = Row("ring8", "k", "other label", "ring8", ("train.ema=0.9",), 100, (0, 1))
    assert row.config_id(0) == other.config_id(0)  # labels do not train anything
    assert row.config_id(0) != row.config_id(1)
    assert row.config_id(0) != Row("ring8", "k", "l", "ring8", (), 100, (0,)).config_id(0)
    assert row.config_id(0) != Row("ring8", "k", "l", "ring8", row.overrides, 101, (0,)).config_id(
        0
    )


def _run(seed: int, modes: float, hq: float, rkl: float) -> dict:
    return {
        "seed": seed,
        "metrics": {"modes": modes, "hq_pct": hq, "reverse_kl": rkl},
        "cpu_seconds": 10.0 + seed,
        "picture": f"seed{seed}.png",
    }


def test_summary_medians_ranges_bar_and_the_median_runs_picture():
    row = Row("ring8", "ring8_best", "best", "ring8", (), 100, (0, 1, 2, 3, 4))
    runs = [
        _run(0, 8, 96.0, 0.01),
        _run(1, 8, 97.0, 0.02),
        _run(2, 7, 99.0, 0.30),
        _run(3, 8, 95.5, 0.04),
        _run(4, 8, 94.0, 0.03),
    ]
    (item,) = results_doc.summarise([row], {"ring8_best": runs})
    assert item["stats"]["modes"] == {"median": 8, "min": 7, "max": 8, "values": [8, 8, 7, 8, 8]}
    assert item["stats"]["hq_pct"]["median"] == 96.0
    assert item["stats"]["reverse_kl"]["median"] == 0.03
    assert item["cpu_seconds"] == 12.0
    assert item["bar"] == {
        "met": True,
        "checks": {"modes": True, "hq_pct": True, "reverse_kl": True},
    }
    # Ranked by (modes, HQ): 7/99, 8/94, 8/95.5, 8/96, 8/97 -> the middle one is seed 3.
    assert item["picture_seed"] == 3 and item["picture"] == "seed3.png"
    runs[0]["metrics"]["hq_pct"] = runs[1]["metrics"]["hq_pct"] = 90.0
    (item,) = results_doc.summarise([row], {"ring8_best": runs})
    assert item["bar"]["met"] is False and item["bar"]["checks"]["hq_pct"] is False
    plain = Row("ring8", "ring8_plain", "plain", "ring8", (), 100, (0,))
    (item,) = results_doc.summarise([plain], {"ring8_plain": runs[:1]})
    assert item["bar"] is None  # plain GAN is reported, not held to the bar


def test_stacked_bar_needs_all_modes_and_low_kl():
    stats = {"modes": {"median": 1000.0}, "kl": {"median": 0.049}}
    assert results_doc.check_bar("stacked", stats)["met"]
    assert not results_doc.check_bar("stacked", {**stats, "kl": {"median": 0.051}})["met"]
    assert not results_doc.check_bar("stacked", {**stats, "modes": {"median": 999.0}})["met"]
    assert results_doc.check_bar("unroll", stats) is None


def test_end_to_end_tiny_plan_writes_json_markdown_pictures_and_resumes(
    tmp_path: Path, monkeypatch, capsys
):
    tiny = Plan()
    tiny.add(
        Row("ring8", "ring8_plain", "plain GAN", "ring8", TINY, 4, (0, 1)),
        Row("ring8", "ring8_best", "raygan best", "ring8_pacgan", TINY, 4, (0,)),
        Row(
            "unroll",
            "unroll_d16_k1",
            "D = 1/4 G, unroll 1",
            "stacked_digits",
            (
                "generators.width=8",
                "discriminator.width=8",
                "train.batch_size=8",
                "eval.samples=200",
                "eval.grid=16",
                "unroll.steps=1",
            ),
            3,
            (0,),
        ),
    )
    monkeypatch.setattr(reproduce, "plan", lambda quick: tiny)
    docs = tmp_path / "docs" / "RESULTS.md"
    args = ["--jobs", "1", "--out", str(tmp_path / "out"), "--docs", str(docs)]
    assert reproduce.main([*args, "--suites", "ring8"]) == 0
    printed = capsys.readouterr().out
    assert "runs: 3 to train, 0 reused" in printed
    payload = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert [r["key"] for r in payload["rows"]] == ["ring8_plain", "ring8_best"]
    assert len(payload["runs"]) == 3 and all(r["steps"] == 4 for r in payload["runs"])
    text = docs.read_text()
    # Published figures verbatim beside ours, and one picture per row that exists.
    assert "| GAN (PacGAN Table 1) | 6.3 +- 0.5 | 98.2 +- 0.2 | 0.45 |" in text
    assert "**raygan: raygan best**" in text and "## grid-25" not in text
    for row in payload["rows"]:
        assert (docs.parent / row["picture"]).is_file()
        assert f"]({row['picture']})" in text
    assert payload["machine"]["commit"] in text
    # A second invocation reuses every recorded run and trains nothing.
    assert reproduce.main([*args, "--suites", "ring8"]) == 0
    assert "runs: 0 to train, 3 reused" in capsys.readouterr().out
    # Another suite alone: only its run is trained; the document keeps the recorded ring-8 rows.
    assert reproduce.main([*args, "--suites", "unroll"]) == 0
    assert "runs: 1 to train, 0 reused" in capsys.readouterr().out
    text = docs.read_text()
    assert "**raygan: raygan best**" in text and "## Unroll depth" in text
    assert "last invocation trained 1 of them" in text


def test_a_bad_row_is_refused_before_any_run(tmp_path: Path, monkeypatch):
    bad = Plan()
    bad.add(Row("ring8", "ring8_best", "best", "ring8", ("discriminator.pack=0",), 4, (0,)))
    monkeypatch.setattr(reproduce, "plan", lambda quick: bad)
    monkeypatch.setattr(reproduce, "train_one", lambda *a: pytest.fail("a run started"))
    with pytest.raises(ValueError, match="discriminator.pack"):
        reproduce.main(["--jobs", "1", "--out", str(tmp_path), "--docs", str(tmp_path / "R.md")])


# --- the Fashion-MNIST suite, on a tiny hand-made stand-in (the real data is not on CI) --------

FASHION_TINY = (
    "generators.width=4",
    "discriminator.width=4",
    "train.batch_size=8",
    "eval.samples=120",
    "eval.grid=16",
)


def _fake_fashion(path: Path, rows: int = 160) -> Path:
    """A Parquet in Fashion-MNIST's layout (28x28 PNG rows, labels 0-9), as gan_core.datasets
    writes it, with row groups of 40 rows."""
    from gan_core.datasets import FASHION_CLASSES, write_image_parquet

    rng = np.random.default_rng(0)
    labels = np.arange(rows) % 10
    # Brightness by class, so the label classifier has something to learn.
    images = (rng.random((rows, 28, 28)) * 80 + labels[:, None, None] * 17).astype(np.uint8)
    write_image_parquet([(images, labels)], str(path), 40, FASHION_CLASSES)
    return path


def _fashion_plan() -> Plan:
    tiny = Plan()
    tiny.add(
        Row("ring8", "ring8_plain", "plain GAN", "ring8", TINY, 4, (0,)),
        Row("fashion", "fashion_plain", "plain DCGAN", "fashion_mnist", FASHION_TINY, 3, (0,)),
        Row(
            "fashion",
            "fashion_best",
            "best config",
            "fashion_mnist",
            (*FASHION_TINY, "train.ema=0.9"),
            3,
            (0,),
        ),
    )
    return tiny


def test_fashion_suite_end_to_end_on_a_stand_in_parquet(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "plan", lambda quick: _fashion_plan())
    monkeypatch.setenv(reproduce.FASHION_ENV, str(_fake_fashion(tmp_path / "fm.parquet")))
    # Real "test split" images for the floor row, without Debian's package.
    from gan_core import datasets

    test_images = np.random.default_rng(1).integers(0, 255, (150, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(datasets, "fashion_mnist", lambda split: (test_images, np.zeros(150)))
    docs = tmp_path / "docs" / "RESULTS.md"
    args = ["--jobs", "1", "--out", str(tmp_path / "out"), "--docs", str(docs)]
    assert reproduce.main([*args, "--suites", "fashion"]) == 0
    printed = capsys.readouterr().out
    assert "runs: 2 to train, 0 reused" in printed and "fashion: classifier held-out" in printed
    payload = json.loads((tmp_path / "out" / "reproduce.json").read_text())
    assert [r["key"] for r in payload["rows"]] == ["fashion_plain", "fashion_best"]
    for run in payload["runs"]:
        assert {"modes", "kl", "fd"} <= set(run["metrics"]) and run["steps"] == 3
    ref = payload["fashion"]
    # 160 rows: 133 train the classifier, 27 score it; every run is scored on 120 samples.
    assert ref["data_rows"] == 160 and ref["classifier_train_rows"] == 133
    assert ref["classifier_test_rows"] == 27 and 0 <= ref["classifier_test_accuracy"] <= 1
    assert ref["samples"] == ref["reference_rows"] == 120
    assert ref["real_floor"]["modes"] >= 1 and ref["real_floor"]["fd"] >= 0
    text = docs.read_text()
    assert "## Fashion-MNIST (10 classes)" in text
    assert "| method | modes | KL | FD | budget |" in text
    assert "**raygan: plain DCGAN**" in text and "**raygan: best config**" in text
    assert "real images (5,000 of the test split)" in text and "held-out accuracy" in text
    assert "## ring-8" not in text  # not run, not recorded
    for row in payload["rows"]:
        assert (docs.parent / row["picture"]).is_file() and f"]({row['picture']})" in text
    # Another suite: the fashion rows are kept from the log, the classifier facts from the JSON.
    assert reproduce.main([*args, "--suites", "ring8"]) == 0
    assert "runs: 1 to train, 0 reused" in capsys.readouterr().out
    text = docs.read_text()
    assert "## ring-8" in text and "## Fashion-MNIST" in text and "held-out accuracy" in text


def test_without_fashion_mnist_the_suite_is_skipped_with_the_install_hint(
    tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setattr(reproduce, "plan", lambda quick: _fashion_plan())
    monkeypatch.delenv(reproduce.FASHION_ENV, raising=False)
    monkeypatch.setenv("RAYGAN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("RAYGAN_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    docs = tmp_path / "R.md"
    args = ["--jobs", "1", "--out", str(tmp_path / "out"), "--docs", str(docs)]
    # The fashion suite alone: nothing to run, exit code 2 and how to get the data.
    assert reproduce.main([*args, "--suites", "fashion"]) == 2
    err = capsys.readouterr().err
    assert "fashion suite skipped" in err and "apt-get install dataset-fashion-mnist" in err
    assert not docs.exists()
    # With other suites: they run, the fashion rows are left out, and the hint is repeated.
    assert reproduce.main([*args, "--suites", "ring8", "fashion"]) == 0
    out, err = capsys.readouterr()
    assert "runs: 1 to train" in out and "apt-get install dataset-fashion-mnist" in err
    assert "## ring-8" in docs.read_text() and "## Fashion-MNIST" not in docs.read_text()
    # A path given on purpose that holds nothing is named, not converted over.
    missing = tmp_path / "nowhere.parquet"
    assert reproduce.main([*args, "--suites", "fashion", "--fashion-data", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert reproduce.FASHION_ENV not in os.environ  # --fashion-data is this invocation's alone


def test_fashion_data_is_converted_once_from_the_idx_files(tmp_path: Path, monkeypatch):
    from gan_core import datasets

    images = np.random.default_rng(0).integers(0, 255, (30, 28, 28), dtype=np.uint8)
    calls = []

    def fake(split: str):
        calls.append(split)
        return images, np.arange(30) % 10

    monkeypatch.setattr(datasets, "fashion_mnist", fake)
    path = tmp_path / "cache" / "fashion-mnist" / "train.parquet"
    assert reproduce.ensure_fashion_data(path) == ""
    assert path.is_file() and calls == ["train"] and not list(path.parent.glob("*.partial"))
    assert reproduce.ensure_fashion_data(path) == "" and calls == ["train"]  # there already
    from gan_core.config import DataConfig
    from gan_core.files import open_file_data

    data = open_file_data(DataConfig(name="parquet", path=str(path), image_size=32, pad=2))
    x, labels = data.read_all()
    assert x.shape == (30, 1, 32, 32) and labels.tolist() == (np.arange(30) % 10).tolist()
    assert (x[:, 0, 2:30, 2:30] == images).all() and x[:, :, :2].max() == 0  # 2 px of black


def test_a_fresh_clone_reuses_the_committed_summary_and_redraws_a_missing_median_picture(
    tmp_path: Path, monkeypatch, capsys
):
    # The run log and the per-run pictures are not committed; the summary JSON and the rows'
    # pictures in docs/results are. A clone must keep every recorded row from them.
    tiny = Plan()
    tiny.add(Row("ring8", "ring8_plain", "plain GAN", "ring8", TINY, 4, (0, 1, 2)))
    monkeypatch.setattr(reproduce, "plan", lambda quick: tiny)
    out, docs = tmp_path / "out", tmp_path / "docs" / "RESULTS.md"
    args = ["--jobs", "1", "--out", str(out), "--docs", str(docs)]
    assert reproduce.main([*args, "--suites", "ring8"]) == 0
    first = json.loads((out / "reproduce.json").read_text())
    (out / "reproduce.runs.jsonl").unlink()
    shutil.rmtree(out / "pictures")
    capsys.readouterr()
    # Another suite selected: ring-8's row comes from the summary, picture and all.
    assert reproduce.main([*args, "--suites", "unroll"]) == 0
    assert "runs: 0 to train" in capsys.readouterr().out
    again = json.loads((out / "reproduce.json").read_text())
    assert again["rows"][0]["stats"] == first["rows"][0]["stats"]
    assert (docs.parent / again["rows"][0]["picture"]).is_file()
    assert "![plain GAN" in docs.read_text()
    # The row loses a seed: the new median run's picture is not on disk, so that run alone is
    # retrained (deterministic: the same metrics) when its suite is selected.
    shown_seed = first["rows"][0]["picture_seed"]
    keep = tuple(s for s in (0, 1, 2) if s != shown_seed)
    tiny.rows[0] = Row("ring8", "ring8_plain", "plain GAN", "ring8", TINY, 4, keep)
    assert reproduce.main([*args, "--suites", "unroll"]) == 0
    assert "No picture" in docs.read_text()
    assert reproduce.main([*args, "--suites", "ring8"]) == 0
    printed = capsys.readouterr().out
    assert "runs: 1 to train (1 recorded, retrained for their missing picture), 1 reused" in printed
    assert f"(0 from {out / 'reproduce.runs.jsonl'}, 1 from {out / 'reproduce.json'})" in printed
    final = json.loads((out / "reproduce.json").read_text())
    old = {r["seed"]: r["metrics"] for r in first["runs"]}
    assert {r["seed"]: r["metrics"]["hq_pct"] for r in final["runs"]} == {
        s: old[s]["hq_pct"] for s in keep
    }
    assert "No picture" not in docs.read_text()
