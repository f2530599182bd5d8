"""python -m services.sample: samples of a stored run's generator as .npy, .png or .parquet."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gan_core import evaluate
from gan_core.config import DataConfig, GanConfig, load_config
from gan_core.files import open_file_data, to_training
from gan_core.loop import GanRun
from gan_core.steps import build_model
from services import sample
from services.checkpoints import save_checkpoint

TINY = ["generators.width=16", "discriminator.width=16", "train.batch_size=24"]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = sample.main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def _untrained_checkpoint(
    folder: Path, cfg: GanConfig, shape: tuple[int, ...], step: int = 1, metrics: dict | None = None
) -> Path:
    """A checkpoint of freshly built nets: enough for everything but trained behaviour."""
    torch.manual_seed(0)
    model = build_model(cfg, shape)
    model.step = step
    state = {"model": model.state_dict(), "torch_rng": torch.get_rng_state(), "history": []}
    return save_checkpoint(folder, state, cfg, metrics or {})


@pytest.fixture(scope="module")
def ring8_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A ring8 run folder as the service writes it: checkpoints at steps 4 and 8, each with the
    metrics its evaluation logged (EMA + BatchNorm, so EMA and raw samples differ)."""
    cfg = load_config(
        "ring8",
        [*TINY, "train.ema=0.9", "train.steps=8", "eval.every=4", "eval.samples=400"],
    )
    run, folder = GanRun(cfg), tmp_path_factory.mktemp("runs") / "ring8"

    def on_eval(r: GanRun, metrics: dict[str, float]) -> None:
        save_checkpoint(folder / f"checkpoint_{r.model.step:06d}", r.state_dict(), cfg, metrics)

    from gan_core.loop import LoopHooks

    run.run(LoopHooks(on_eval=on_eval))
    return folder, run.history


def test_npy_of_the_eval_noise_scores_as_the_run_logged(
    ring8_run: tuple[Path, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, history = ring8_run
    out = tmp_path / "fake.npy"
    code, line, err = _cli(
        capsys, "--run", str(folder), "--checkpoint", "latest", "--n", "400", "--out", str(out),
        "--eval-noise",
    )  # fmt: skip
    assert code == 0, err
    assert line == (
        f"wrote {out} (400 samples, shape [2]) from checkpoint latest: "
        f"{folder / 'checkpoint_000008'} (step 8, EMA generator, eval noise)"
    )
    assert evaluate.main(["--data", "ring8", "--samples", str(out)]) == 0
    scored = json.loads(capsys.readouterr().out)
    logged = history[-1]
    assert logged["step"] == 8
    for key, value in scored.items():
        assert value == pytest.approx(logged[key], abs=1e-6), key
    # The raw generator on the same noise scores differently: the comparison can fail.
    raw = tmp_path / "raw.npy"
    code, line, _ = _cli(capsys, "--run", str(folder), "--checkpoint", "latest", "--n", "400",
                         "--out", str(raw), "--eval-noise", "--raw")  # fmt: skip
    assert code == 0 and "(step 8, raw generator, eval noise)" in line
    assert evaluate.main(["--data", "ring8", "--samples", str(raw)]) == 0
    raw_scores = json.loads(capsys.readouterr().out)
    assert raw_scores.keys() == scored.keys() and "reverse_kl" in scored
    assert abs(raw_scores["reverse_kl"] - logged["reverse_kl"]) > 1e-3


def test_seeded_noise_is_repeatable_and_parquet_points_read_back(
    ring8_run: tuple[Path, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = ring8_run[0]
    common = ["--run", str(folder), "--n", "50", "--seed", "7"]
    assert _cli(capsys, *common, "--out", str(tmp_path / "a.npy"))[0] == 0
    assert _cli(capsys, *common, "--out", str(tmp_path / "a.parquet"))[0] == 0
    assert _cli(capsys, *common[:-1], "8", "--out", str(tmp_path / "b.npy"))[0] == 0
    points = np.load(tmp_path / "a.npy")
    assert points.shape == (50, 2) and points.dtype == np.float32
    assert not np.array_equal(points, np.load(tmp_path / "b.npy"))
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.column_names == ["x", "y"]
    np.testing.assert_array_equal(np.stack([table["x"], table["y"]], 1), points)


def test_png_of_points(
    ring8_run: tuple[Path, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pic" / "scatter.png"
    code, line, _ = _cli(capsys, "--run", str(ring8_run[0]), "--n", "200", "--out", str(out))
    assert code == 0 and line.startswith(f"wrote {out} (200 samples")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _hand_made(folder: Path, source: Path, steps_and_modes: dict[str, tuple[int, float | None]]):
    """Copies of one real checkpoint under other names, with hand-written meta.json files."""
    for name, (step, modes) in steps_and_modes.items():
        shutil.copytree(source, folder / name)
        metrics = {} if modes is None else {"modes": modes}
        meta = {"step": step, "metrics": metrics, "format": 1}
        (folder / name / "meta.json").write_text(json.dumps(meta))


def test_best_and_latest_pick_the_right_folders(
    ring8_run: tuple[Path, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = ring8_run[0] / "checkpoint_000008"
    run = tmp_path / "run"
    # ring8's checkpoint metric is modes (max); the best is neither the first nor the last.
    _hand_made(
        run,
        source,
        {
            "checkpoint_000001": (10, 5.0),
            "checkpoint_000002": (20, 8.0),
            "checkpoint_000003": (30, 6.0),
            "checkpoint_000004": (40, None),  # no value for the metric: ranked last
        },
    )
    (run / "checkpoint_000005").mkdir()  # incomplete (no meta.json): not a checkpoint
    out = str(tmp_path / "s.npy")
    _, best, _ = _cli(capsys, "--run", str(run), "--n", "3", "--out", out)
    assert f"checkpoint best: {run / 'checkpoint_000002'} (step 20, EMA generator, seed 0)" in best
    _, latest, _ = _cli(
        capsys, "--run", str(run), "--checkpoint", "latest", "--n", "3", "--out", out
    )
    assert f"latest: {run / 'checkpoint_000004'} (step 40," in latest
    named = run / "checkpoint_000001"
    _, chosen, _ = _cli(
        capsys, "--run", str(run), "--checkpoint", str(named), "--n", "3", "--out", out
    )
    assert f"checkpoint {named} (step 10," in chosen


def test_best_follows_the_configured_mode_and_the_local_backend_layout(tmp_path: Path) -> None:
    cfg = load_config("ring8", ["checkpoint.metric=reverse_kl", "checkpoint.mode=min"])
    metas = {
        "local_checkpoints/step_0000010": {"step": 10, "metrics": {"reverse_kl": 0.5}},
        "local_checkpoints/step_0000020": {"step": 20, "metrics": {"reverse_kl": 0.2}},
        "local_checkpoints/step_0000030": {"step": 30, "metrics": {"reverse_kl": 0.9}},
    }
    assert sample.choose(metas, "best", cfg) == "local_checkpoints/step_0000020"
    assert sample.choose(metas, "latest", cfg) == "local_checkpoints/step_0000030"
    files = [f"{name}/{f}" for name in metas for f in ("meta.json", "state.pt", "config.yaml")]
    files += ["samples/step_1.png", "checkpoint_x/state.pt", "a/b/meta.json"]
    assert sample.checkpoint_names(files) == sorted(metas)


def test_a_bank_of_three_mixes_all_heads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(
        "ring8_madgan", [*TINY, "generators.count=3", "train.ema=0", "generators.z_dim=2"]
    )
    folder = _untrained_checkpoint(tmp_path / "run" / "checkpoint_000001", cfg, (2,))
    out = tmp_path / "bank.npy"
    assert _cli(capsys, "--run", str(folder.parent), "--n", "10", "--out", str(out))[0] == 0
    got = torch.from_numpy(np.load(out))
    noise = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(cfg, (2,))
    with torch.no_grad():
        each = model.sample(noise.expand(3, 10, 2).contiguous(), use_ema=False).reshape(3, 10, 2)
    for i in range(10):
        torch.testing.assert_close(got[i], each[i % 3, i], rtol=0, atol=1e-5)
    assert (each[0] - each[1]).abs().min() > 1e-4 and (each[1] - each[2]).abs().min() > 1e-4


def test_parquet_of_images_is_training_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config("digits", ["generators.width=8", "discriminator.width=8", "train.ema=0"])
    run = tmp_path / "digits"
    _untrained_checkpoint(run / "checkpoint_000001", cfg, (1, 8, 8))
    assert _cli(capsys, "--run", str(run), "--n", "6", "--out", str(tmp_path / "d.npy"))[0] == 0
    out = tmp_path / "d.parquet"
    assert _cli(capsys, "--run", str(run), "--n", "6", "--out", str(out))[0] == 0
    kind = pq.read_schema(out).field("image").type
    assert kind == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    data = open_file_data(DataConfig(name="parquet", path=str(out), image_size=8, channels=1))
    pixels, labels = data.read_all()
    assert labels is None and pixels.shape == (6, 1, 8, 8)
    want = np.load(tmp_path / "d.npy")
    # PNG holds uint8: within half a grey level of the float samples.
    assert np.abs(to_training(pixels).numpy() - want).max() <= 1 / 127.5 + 1e-6
    grid = tmp_path / "grid.png"
    assert _cli(capsys, "--run", str(run), "--n", "16", "--out", str(grid))[0] == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"


def test_file_points_keep_their_column_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "points.parquet"
    pq.write_table(pa.table({"a": [0.0, 1.0], "b": [1.0, 2.0], "c": [3, 4], "label": [0, 1]}), data)
    cfg = load_config("ring8", [*TINY, "data.name=parquet", f"data.path={data}", "train.ema=0"])
    run = tmp_path / "pts"
    _untrained_checkpoint(run / "checkpoint_000001", cfg, (3,))
    out = tmp_path / "p.parquet"
    assert _cli(capsys, "--run", str(run), "--n", "5", "--out", str(out))[0] == 0
    assert pq.read_table(out).column_names == ["a", "b", "c"]
    data.unlink()  # the training data gone: generic names
    assert _cli(capsys, "--run", str(run), "--n", "5", "--out", str(out))[0] == 0
    table = pq.read_table(out)
    assert table.column_names == ["x0", "x1", "x2"] and table.num_rows == 5


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_run", r"--run '.*nowhere': no such run folder"),
        ("empty_run", r"--run '.*empty' holds no checkpoint"),
        ("corrupt", r"checkpoint_000001: state\.pt is (truncated or )?corrupt"),
        ("not_torch", r"checkpoint_000001: state\.pt is not a torch checkpoint"),
        ("n_zero", r"--n '0' is invalid; allowed: a positive integer"),
        ("n_text", r"--n 'ten' is invalid; allowed: a positive integer"),
        ("suffix", r"--out '.*s\.csv' has suffix '\.csv'; allowed: \.npy, \.png, \.parquet"),
        ("checkpoint", r"--checkpoint 'checkpoint_9' is not an existing checkpoint folder"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config("ring8", [*TINY, "train.ema=0"])
    run = tmp_path / "run"
    ckpt = _untrained_checkpoint(run / "checkpoint_000001", cfg, (2,))
    (tmp_path / "empty").mkdir()
    args = {"--run": str(run), "--n": "5", "--out": str(tmp_path / "s.npy")}
    if case == "no_run":
        args["--run"] = str(tmp_path / "nowhere")
    elif case == "empty_run":
        args["--run"] = str(tmp_path / "empty")
    elif case == "corrupt":
        # Named explicitly: the picker would skip it as incomplete (test_disk_full.py).
        (ckpt / "state.pt").write_bytes(b"PK\x03\x04 not really a zip")
        args["--checkpoint"] = str(ckpt)
    elif case == "not_torch":
        (ckpt / "state.pt").write_bytes(b"garbage, not a checkpoint")
        args["--checkpoint"] = str(ckpt)
    elif case == "n_zero":
        args["--n"] = "0"
    elif case == "n_text":
        args["--n"] = "ten"
    elif case == "suffix":
        args["--out"] = str(tmp_path / "s.csv")
    else:
        args["--checkpoint"] = "checkpoint_9"
    code, out, err = _cli(capsys, *[x for pair in args.items() for x in pair])
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "s.npy").exists()


def test_an_s3_run_is_downloaded_and_sampled(
    ring8_run: tuple[Path, list[dict]],
    s3_bucket: str,
    s3_env: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import boto3

    folder = ring8_run[0]
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    for path in folder.rglob("*"):
        if path.is_file():
            key = f"runs/ring8/{path.relative_to(folder).as_posix()}"
            client.upload_file(str(path), s3_bucket, key)
    uri = f"s3://{s3_bucket}/runs/ring8"
    remote, local = tmp_path / "remote.npy", tmp_path / "local.npy"
    code, line, err = _cli(capsys, "--run", uri, "--endpoint", s3_env, "--checkpoint", "latest",
                           "--n", "20", "--out", str(remote))  # fmt: skip
    assert code == 0, err
    assert f"from checkpoint latest: {uri}/checkpoint_000008 (step 8, EMA" in line
    assert _cli(capsys, "--run", str(folder), "--checkpoint", "latest", "--n", "20",
                "--out", str(local))[0] == 0  # fmt: skip
    np.testing.assert_array_equal(np.load(remote), np.load(local))
    named = _cli(capsys, "--run", uri, "--endpoint", s3_env, "--checkpoint", "checkpoint_000004",
                 "--n", "2", "--out", str(remote))  # fmt: skip
    assert named[0] == 0 and f"{uri}/checkpoint_000004 (step 4," in named[1]
    missing = _cli(capsys, "--run", f"s3://{s3_bucket}/runs/none", "--endpoint", s3_env,
                   "--n", "2", "--out", str(remote))  # fmt: skip
    assert missing[0] == 2 and "no such run folder" in missing[2]
