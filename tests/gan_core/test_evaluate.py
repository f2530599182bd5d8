"""Tests for the gan_core.evaluate command line: JSON metrics on stdout, usage errors exit 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gan_core.data import load_digits, ring8
from gan_core.evaluate import main


def save(path: Path, array: np.ndarray | torch.Tensor) -> str:
    np.save(path, np.asarray(array))
    return str(path)


def ring_on_five_modes(n_per_mode: int = 20) -> np.ndarray:
    return ring8().centers[:5].repeat_interleave(n_per_mode, dim=0).numpy()


def test_ring_samples_print_json_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    samples = save(tmp_path / "fake.npy", ring_on_five_modes())
    assert main(["--data", "ring8", "--samples", samples]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx({"modes": 5, "hq_pct": 100.0, "reverse_kl": math.log(8 / 5)})


@pytest.mark.usefixtures("digit_classifier")  # points RAYGAN_CACHE at the session's folder
def test_digits_with_real_adds_fd(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = load_digits("test")[0].numpy()
    fake, real = save(tmp_path / "fake.npy", images), save(tmp_path / "real.npy", images)
    assert main(["--data", "digits", "--samples", fake, "--real", real]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["modes"] == 10 and metrics["kl"] < 0.01
    assert metrics["fd"] == pytest.approx(0.0, abs=1e-4)  # the same images on both sides


def test_wrong_shape_exits_2_naming_shape_and_expected(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    samples = save(tmp_path / "fake.npy", np.zeros((100, 3), np.float32))
    assert main(["--data", "ring8", "--samples", samples]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "samples for 'ring8' have shape (100, 3); expected (n >= 1, 2)" in captured.err


def test_unknown_data_name_exits_2_listing_allowed(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "mnist", "--samples", "x.npy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'mnist'" in err and "ring8" in err and "stacked_digits" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot be read as a .npy array"), (np.array(["a", "b"]), "expected numbers")],
)
def test_unreadable_samples_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: np.ndarray | None, message: str
) -> None:
    path = tmp_path / "samples.npy"
    if content is not None:
        np.save(path, content)
    assert main(["--data", "grid25", "--samples", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_runs_as_a_module(tmp_path: Path) -> None:
    samples = save(tmp_path / "fake.npy", ring_on_five_modes())
    done = subprocess.run(
        [sys.executable, "-m", "gan_core.evaluate", "--data", "ring8", "--samples", samples],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["modes"] == 5
