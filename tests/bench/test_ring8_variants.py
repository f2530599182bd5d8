"""bench.ring8_variants: rows map to existing presets, a partial rerun keeps recorded rows."""

from __future__ import annotations

import json

import pytest

from bench import ring8_variants as rv
from gan_core.config import load_config, preset_names


def test_the_new_rows_name_their_presets_settings():
    wgan = load_config(
        rv.preset_for("ring8", rv.VARIANTS["WGAN (clip 0.01, n_critic 5, RMSProp)"][0])
    )
    assert wgan.objective.name == "wgan" and wgan.objective.clip == 0.01
    assert wgan.objective.n_critic == 5 and wgan.d_optim.name == "rmsprop"
    sim = load_config(rv.preset_for("ring8", rv.VARIANTS["MAD-GAN-Sim N=4"][0]))
    assert sim.generators.count == 4 and sim.objective.madgan_similarity > 0
    mrgan = load_config(rv.preset_for("ring8", rv.VARIANTS["MRGAN"][0]))
    assert mrgan.objective.name == "mrgan"


def test_a_row_is_available_exactly_when_its_preset_exists():
    for variant, (suffix, _) in rv.VARIANTS.items():
        assert rv.available("ring8", variant) == (f"ring8{suffix}" in preset_names())
    # grid-25 falls back to the ring-8 remedy presets.
    assert rv.preset_for("grid25", "_wgan") == "ring8_wgan"
    assert rv.preset_for("ring8", "_mrgan_diffusion") == "ring8_mrgan_diffusion"


def _fake_run(data: str, variant: str, seed: int, steps: int, extra: list[str]) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "modes": 5.0 + seed,
        "hq_pct": 50.0,
        "reverse_kl": 0.5,
        "cpu_seconds": 1.0,
        "wall_seconds": 1.0,
    }


def _old_json(path, steps=6000):
    runs = [
        {**_fake_run("ring8", "plain GAN", s, steps, []), "modes": 7.0, "overrides": []}
        for s in (0, 1, 2)
    ]
    runs.append({**_fake_run("ring8", "old name", 0, steps, []), "overrides": []})
    path.write_text(
        json.dumps(
            {
                "protocol": {"data": "ring8", "steps": steps, "shared_overrides": []},
                "machine": {"commit": "old"},
                "runs": runs,
            }
        )
    )


def test_a_partial_rerun_keeps_the_recorded_rows_of_the_json_without_a_run_log(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(rv, "OUT_DIR", tmp_path)
    trained = []

    def fake(*job):
        trained.append(job[1:3])
        return _fake_run(*job)

    monkeypatch.setattr(rv, "train_one", fake)
    _old_json(tmp_path / "ring8_variants.json")
    assert not (tmp_path / "ring8_variants.runs.jsonl").exists()
    # plain GAN seed 0 is recorded: asking for it again trains nothing for it.
    code = rv.main(["--variants", "MAD-GAN-Sim N=4", "plain GAN", "--seeds", "0", "--jobs", "1"])
    assert code == 0 and trained == [("MAD-GAN-Sim N=4", 0)]
    out = json.loads((tmp_path / "ring8_variants.json").read_text())
    by_variant = {row["variant"]: row for row in out["summary"]}
    # VARIANTS' order, then the name no longer listed; plain GAN's row is the requested seed's,
    assert list(by_variant) == ["plain GAN", "MAD-GAN-Sim N=4", "old name"]
    assert by_variant["plain GAN"]["modes per seed"] == "7"
    assert by_variant["plain GAN"]["seeds"] == [0]
    assert by_variant["MAD-GAN-Sim N=4"]["modes per seed"] == "5"
    # ... while the JSON keeps every recorded run (nothing to retrain next time);
    assert sorted(r["seed"] for r in out["runs"] if r["variant"] == "plain GAN") == [0, 1, 2]
    # ... a row not asked for keeps all its recorded seeds and its machine.
    kept = [r for r in out["runs"] if r["variant"] == "old name"]
    assert len(kept) == 1 and kept[0]["machine"] == {"commit": "old"}
    new = next(r for r in out["runs"] if r["variant"] == "MAD-GAN-Sim N=4")
    assert new["machine"]["commit"] != "old"
    # A second partial run, now with the run log present, still keeps every row.
    trained.clear()
    rv.main(["--variants", "PacGAN2", "--seeds", "1", "--jobs", "1"])
    assert trained == [("PacGAN2", 1)]
    out = json.loads((tmp_path / "ring8_variants.json").read_text())
    assert [row["variant"] for row in out["summary"]] == [
        "plain GAN",
        "PacGAN2",
        "MAD-GAN-Sim N=4",
        "old name",
    ]
    # Not asked for this time: plain GAN is back to its three recorded seeds.
    assert out["summary"][0]["modes per seed"] == "7 / 7 / 7"


def test_runs_of_another_budget_are_not_merged(tmp_path, monkeypatch):
    monkeypatch.setattr(rv, "OUT_DIR", tmp_path)
    monkeypatch.setattr(rv, "train_one", _fake_run)
    _old_json(tmp_path / "ring8_variants.json", steps=3000)
    rv.main(["--variants", "PacGAN2", "--seeds", "0", "--jobs", "1"])
    out = json.loads((tmp_path / "ring8_variants.json").read_text())
    assert [row["variant"] for row in out["summary"]] == ["PacGAN2"]


def test_a_row_without_its_preset_is_left_out_by_default_and_refused_by_name(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(rv, "OUT_DIR", tmp_path)
    monkeypatch.setattr(rv, "train_one", _fake_run)
    monkeypatch.setattr(rv, "VARIANTS", {"plain GAN": ("", []), "future": ("_no_such", [])})
    with pytest.raises(SystemExit):
        rv.main(["--variants", "future", "--seeds", "0", "--jobs", "1"])
    assert "ring8_no_such" in capsys.readouterr().err
    rv.main(["--seeds", "0", "--jobs", "1"])
    assert "left out (no preset yet): future" in capsys.readouterr().out
    out = json.loads((tmp_path / "ring8_variants.json").read_text())
    assert [row["variant"] for row in out["summary"]] == ["plain GAN"]
