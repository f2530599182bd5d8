"""`python -m bench`: the reproduction plan, the summary logic and one tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

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
        assert sum(r.key.endswith("_best") for r in ours) == 1  # one row is held to the bar
        # The plain and best rows (what the bars compare) have 5 seeds; references may have 1.
        assert all(r.seeds == (0, 1, 2, 3, 4) for r in ours if r.key.endswith(("_plain", "_best")))
    unroll = [row_config(r, 0) for r in rows if r.suite == "unroll"]
    pairs = {(c.discriminator.width * 4 // c.generators.width, c.unroll.steps) for c in unroll}
    # D = 1/4 G and D = 1/2 G (in base channels), each at depths 0, 1, 5, 10.
    assert pairs == {(d, k) for d in (1, 2) for k in (0, 1, 5, 10)}
    # The plain rows are the presets as they are: PacGAN's nets, no remedy.
    plain = {r.suite: row_config(r, 0) for r in rows if r.key.endswith("_plain")}
    for cfg in plain.values():
        assert cfg.discriminator.pack == 1 and cfg.generators.count == 1
        assert cfg.unroll.steps == 0 and cfg.discriminator.minibatch.kernels == 0


@pytest.mark.parametrize("data", ["ring8", "grid25", "stacked_digits"])
def test_best_preset_trains_exactly_the_benchmarked_best_row(data):
    # `services.train --preset DATA_best` must be the config docs/RESULTS.md measured, not a
    # hand copy that drifted: everything that decides the model agrees.
    (row,) = [r for r in plan(False).rows if r.preset == data and r.key.endswith("_best")]
    bench = flatten(row_config(row, 0))
    preset = flatten(load_config(f"{data}_best"))
    ignored = {"name", "seed", "eval.every", "train.threads"}  # bookkeeping, not the model
    assert {k: v for k, v in preset.items() if k not in ignored} == {
        k: v for k, v in bench.items() if k not in ignored
    }


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
