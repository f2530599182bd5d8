"""bench.convergence: the rank statistic, the figure, a tiny real run per objective, the doc."""

from __future__ import annotations

import json
import math

import pytest

from bench import convergence as cv
from bench import results_doc
from tests.gan_core.test_loop import PNG_MAGIC, TINY

# The loop tests' tiny nets and the PNG signature, shared rather than copied.


def test_spearman_on_known_sequences():
    assert cv.spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]) == pytest.approx(1.0)
    # Monotone but not linear: still a perfect rank correlation.
    assert cv.spearman([1, 2, 3, 4, 5], [1, 4, 9, 100, 1e6]) == pytest.approx(1.0)
    assert cv.spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = (-1, 1, -1, 1, 0): 1 - 6 * 4 / (5 * 24) = 0.8
    assert cv.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # Ties share their mean rank: x ranks (1.5, 1.5, 3) against (1, 2, 3) -> 1.5 / sqrt(3)
    assert cv.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3))
    # Non-finite pairs are dropped; the rest is perfectly anti-correlated.
    assert cv.spearman([1, 2, math.nan, 3, 4], [4, 3, 0, 2, math.inf]) == pytest.approx(-1.0)


def test_spearman_is_nan_without_a_ranking():
    assert math.isnan(cv.spearman([1, 1, 1, 1], [1, 2, 3, 4]))
    assert math.isnan(cv.spearman([1, 2], [2, 1]))


def _history(w, rkl, hq, d=None):
    d = d or [1.0] * len(w)
    return [
        {
            "step": 100.0 * (i + 1),
            "d_loss": d[i],
            "g_loss": -w[i],
            "wasserstein": w[i],
            "reverse_kl": rkl[i],
            "hq_pct": hq[i],
            "modes": 8.0,
        }
        for i in range(len(w))
    ]


def test_correlations_and_summary_on_a_hand_made_history():
    # The estimate falls with reverse KL (but not linearly) while HQ rises; D loss is flat.
    h = _history(w=[0.9, 0.5, 0.4, 0.1], rkl=[2.0, 1.0, 0.2, 0.1], hq=[10, 50, 60, 90])
    c = cv.correlations(h)
    assert c["wasserstein"]["reverse_kl"] == pytest.approx(1.0)
    assert c["wasserstein"]["hq_pct"] == pytest.approx(-1.0)
    assert c["wasserstein"]["step"] == pytest.approx(-1.0)
    assert c["g_loss"]["reverse_kl"] == pytest.approx(-1.0)
    assert math.isnan(c["d_loss"]["reverse_kl"])
    # A GAN history has no estimate: no row for it.
    assert "wasserstein" not in cv.correlations(
        [{k: v for k, v in e.items() if k != "wasserstein"} for e in h]
    )

    other = _history(w=[0.9, 0.4, 0.5, 0.1], rkl=[2.0, 1.0, 0.2, 0.1], hq=[10, 50, 60, 90])
    s = cv.summarise([{"seed": 0, "history": h}, {"seed": 1, "history": other}])
    per_seed = s["rho"]["wasserstein"]["reverse_kl"]["per_seed"]
    assert per_seed == pytest.approx([1.0, 0.8])
    assert s["rho"]["wasserstein"]["reverse_kl"]["median"] == pytest.approx(0.9)
    assert s["first"]["wasserstein"] == pytest.approx(0.9)
    assert s["last"]["reverse_kl"] == pytest.approx(0.1)
    assert s["reverse_kl_vs_step"] == pytest.approx(-1.0)


def test_the_figure_writer_draws_a_png_for_gan_and_wgan_columns(tmp_path):
    wgan = _history(w=[0.9, 0.5, 0.4], rkl=[2.0, 0.0, 0.1], hq=[10, 50, 60])
    gan = [{k: v for k, v in e.items() if k != "wasserstein"} for e in wgan]
    configs = {
        "nonsaturating": {"label": "GAN", "runs": [{"seed": 0, "history": gan}]},
        "wgan": {
            "label": "WGAN",
            "runs": [{"seed": 0, "history": wgan}, {"seed": 1, "history": wgan}],
        },
    }
    path = cv.plot(configs, tmp_path / "sub" / "c.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_a_short_real_run_logs_the_signals_of_each_objective():
    keys = {"step", "d_loss", "g_loss", "modes", "hq_pct", "reverse_kl"}
    for name in cv.CONFIGS:
        run = cv.train_one(name, 0, 40, 20, [*TINY, "eval.samples=200"])
        h = run["history"]
        assert [e["step"] for e in h] == [20.0, 40.0]
        assert all(keys <= set(e) for e in h)
        assert all(("wasserstein" in e) == name.startswith("wgan") for e in h)
        assert all(("gp" in e) == (name == "wgan_gp") for e in h)
        if name == "minimax":
            # E[log(1 - D(G(z)))] is negative, the non-saturating -E[log D(G(z))] positive:
            # the override reached the objective.
            assert all(e["g_loss"] < 0 for e in h)
        if name == "nonsaturating":
            assert all(e["g_loss"] > 0 for e in h)
        if name.startswith("wgan"):
            # d_loss = gp - wasserstein, both logged as means over the same steps.
            for e in h:
                assert e["d_loss"] == pytest.approx(e.get("gp", 0.0) - e["wasserstein"], abs=1e-5)


def test_main_writes_json_and_figure_and_resumes_without_training(tmp_path, capsys):
    argv = [
        "--steps", "20", "--every", "10", "--configs", "nonsaturating", "wgan",
        "--out", str(tmp_path), "--figure", str(tmp_path / "c.png"),
        "--set", *TINY, "eval.samples=100",
    ]  # fmt: skip
    assert cv.main(argv) == 0
    out = json.loads((tmp_path / "convergence.json").read_text())
    assert list(out["configs"]) == ["nonsaturating", "wgan"] and out["trained"] == 2
    assert "wasserstein" in out["configs"]["wgan"]["summary"]["rho"]
    assert "wasserstein" not in out["configs"]["nonsaturating"]["summary"]["rho"]
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    assert cv.main(argv) == 0
    assert "runs: 0 to train, 2 reused" in capsys.readouterr().out
    # Another budget reuses nothing.
    assert cv.main([*argv[:1], "30", *argv[2:]]) == 0
    assert json.loads((tmp_path / "convergence.json").read_text())["trained"] == 2


def test_the_results_section_states_protocol_numbers_and_verdicts(tmp_path):
    def run(w, rkl, hq, d):
        return {"seed": 0, "cpu_seconds": 1.0, "history": _history(w, rkl, hq, d)}

    falling = [2.0, 1.0, 0.5, 0.2]
    configs = {
        # GAN losses that go up and down regardless of quality; a WGAN estimate that tracks it.
        "minimax": {
            "label": "GAN minimax",
            "runs": [run([0.1, 0.3, 0.2, 0.4], falling, [1, 2, 3, 4], [1.0, 1.2, 0.9, 1.1])],
        },
        "wgan": {
            "label": "WGAN",
            "runs": [run([0.9, 0.6, 0.3, 0.1], falling, [1, 2, 3, 4], [1.0, 1.2, 0.9, 1.1])],
        },
    }
    # Reverse KL good (<= 0.05) all run and noisy: the verdict reads HQ % alone.
    configs["wgan_gp"] = {
        "label": "WGAN-GP",
        "runs": [run([0.9, 0.6, 0.3, 0.1], [0.01, 0.03, 0.002, 0.02], [1, 2, 3, 4], [1, 2, 3, 4])],
    }
    for entry in configs.values():
        entry["summary"] = cv.summarise(entry["runs"])
    del configs["minimax"]["summary"]["rho"]["wasserstein"]
    # A run names the machine that trained it; one without falls back to the file's.
    configs["wgan"]["runs"][0]["machine"] = {"commit": "def5678", "date": "2026-01-02 03:04:05"}
    path = tmp_path / "convergence.json"
    protocol = {
        "steps": 400,
        "every": 100,
        "seeds": [0],
        "samples": 2500,
        "extra_overrides": [],
        "configs": {
            "minimax": {"preset": "ring8", "overrides": ["objective.name=minimax"]},
            "wgan": {"preset": "ring8_wgan", "overrides": []},
            "wgan_gp": {"preset": "ring8_wgan_gp", "overrides": []},
        },
    }
    machine = {"commit": "abc1234", "date": "2026-01-01 00:00:00", "cpu": "x", "cores": 2}
    path.write_text(json.dumps({"protocol": protocol, "machine": machine, "configs": configs}))
    text = "\n".join(results_doc.convergence_section(path))
    assert text.startswith("\n## The loss as a convergence signal")
    assert "python -m bench.convergence --steps 400 --every 100 --seeds 0" in text
    assert "`ring8_wgan`" in text and "objective.name=minimax" in text
    # The WGAN estimate's rho with reverse KL is +1.00; the minimax D loss's is not >= 0.5.
    assert "| WGAN | wasserstein | 0.9 | 0.1 | +1.00 | -1.00 | -1.00 |" in text
    assert (
        "- WGAN: the critic's estimate has rho +1.00 with reverse KL and -1.00 with HQ %: it falls "
        "as the samples improve; the claim (it falls as the samples improve) is supported here."
    ) in text
    assert "runs trained at commit `abc1234`, `def5678` on 2026-01-01 to 2026-01-02" in text
    # minimax: D loss ranks 2 4 1 3 against reverse KL's 4 3 2 1 and HQ's 1 2 3 4: rho 0 and 0;
    # G loss (= -w here) ranks 4 2 3 1: rho +0.8 and -0.8, so one loss does follow quality.
    assert (
        "- GAN minimax, with reverse KL / HQ %: d_loss (rho +0.00 / +0.00) says little; g_loss "
        "(rho +0.80 / -0.80) falls as the samples improve: the claim (the losses say little) is "
        "not supported here."
    ) in text
    # w ranks 4 3 2 1 against reverse KL's 2 4 1 3: rho 0, which would read "one metric only".
    assert (
        "- WGAN-GP: the critic's estimate has rho +0.00 with reverse KL and -1.00 with HQ % "
        "(reverse KL within its bar all run: HQ % alone): it falls as the samples improve; the "
        "claim (it falls as the samples improve) is supported here. Its rho with the step is "
        "-1.00, as strong as with HQ %"
    ) in text
    assert results_doc.convergence_section(tmp_path / "missing.json") == []


def test_relation_needs_both_quality_metrics_to_agree():
    assert results_doc._relation(0.6, -0.7) == "falls as the samples improve"
    assert results_doc._relation(-0.6, 0.5) == "rises as the samples improve"
    assert results_doc._relation(0.49, -0.2) == "says little"
    assert results_doc._relation(float("nan"), 0.1) == "says little"
    assert results_doc._relation(0.9, 0.1) == "follows one quality metric only"
    # Both strong but in the directions of no single quality (rKL up and HQ up).
    assert results_doc._relation(0.9, 0.9) == "follows reverse KL and HQ % in contradicting senses"
    # Without reverse KL: HQ % alone decides.
    assert results_doc._relation(0.9, -0.6, use_kl=False) == "falls as the samples improve"
    assert results_doc._relation(-0.9, 0.6, use_kl=False) == "rises as the samples improve"
    assert results_doc._relation(0.9, 0.4, use_kl=False) == "says little"
