"""Tests for gan_core.data: mixtures, digits, stacked digits and build_dataset (file data sets:
test_files.py)."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits as sklearn_digits

from gan_core.config import ConfigError, DataConfig
from gan_core.data import (
    DataError,
    DigitsDataset,
    MixtureDataset,
    StackedDigitsDataset,
    build_dataset,
    grid25,
    load_digits,
    ring8,
)
from gan_core.files import FileData


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- 2D mixtures ---------------------------------------------------------------------------------


def test_ring8_centers_are_the_eight_points_on_the_unit_circle() -> None:
    h = math.sqrt(0.5)
    expected = torch.tensor([[1, 0], [h, h], [0, 1], [-h, h], [-1, 0], [-h, -h], [0, -1], [h, -h]])
    ds = ring8()
    assert ds.centers.dtype == torch.float32
    torch.testing.assert_close(ds.centers, expected, atol=1e-7, rtol=0)
    assert ds.std == 0.01
    assert (ds.kind, ds.shape, ds.num_modes) == ("points", (2,), 8)


def test_grid25_centers_are_the_product_set() -> None:
    ds = grid25()
    expected = {(float(a), float(b)) for a in (-4, -2, 0, 2, 4) for b in (-4, -2, 0, 2, 4)}
    got = [tuple(row) for row in ds.centers.tolist()]
    assert len(got) == 25 and set(got) == expected
    assert ds.std == 0.05


@pytest.mark.parametrize("make", [ring8, grid25])
def test_mixture_samples_have_the_mode_std_and_uniform_modes(make) -> None:
    ds = make()
    n = 20_000
    points, labels = ds.sample_with_labels(n, gen(1))
    assert points.shape == (n, 2) and points.dtype == torch.float32
    assert labels.dtype == torch.int64
    residual = points - ds.centers[labels]
    std = residual.std(dim=0)
    assert torch.all((std - ds.std).abs() < 0.05 * ds.std), std
    assert torch.all(residual.mean(dim=0).abs() < 0.05 * ds.std)
    # Modes are far apart relative to std, so each point's nearest mean is its own mode.
    nearest = torch.cdist(points, ds.centers).argmin(dim=1)
    assert torch.equal(nearest, labels)
    counts = torch.bincount(labels, minlength=ds.num_modes).double()
    expected = n / ds.num_modes
    assert torch.all((counts - expected).abs() < 0.15 * expected), counts


def test_mixture_sampling_is_deterministic_given_the_generator() -> None:
    ds = grid25()
    a = ds.sample(500, gen(7))
    assert torch.equal(a, ds.sample(500, gen(7)))
    assert not torch.equal(a, ds.sample(500, gen(8)))
    points, _ = ds.sample_with_labels(500, gen(7))
    assert torch.equal(a, points)


def test_mixture_dataset_from_hand_made_centers() -> None:
    ds = MixtureDataset(torch.tensor([[5.0, -5.0]]), std=0.0)
    assert torch.equal(ds.sample(3, gen()), torch.tensor([[5.0, -5.0]] * 3))


# --- digits --------------------------------------------------------------------------------------


def test_load_digits_all_matches_sklearn_scaled_to_unit_range() -> None:
    images, labels = load_digits("all")
    bunch = sklearn_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    # Pixel 0 -> -1, 8 -> 0, 16 -> 1.
    expected = torch.tensor(bunch.data[5].reshape(8, 8) / 8 - 1, dtype=torch.float32)
    assert torch.equal(images[5, 0], expected)
    assert labels.tolist() == bunch.target.tolist()


def _rows(images: torch.Tensor, labels: torch.Tensor) -> Counter:
    return Counter(
        (tuple(img.flatten().tolist()), int(lab)) for img, lab in zip(images, labels, strict=True)
    )


def test_digit_splits_partition_all_and_are_stratified() -> None:
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    all_x, all_y = load_digits("all")
    assert len(train_y) + len(test_y) == 1797
    # As multisets of rows (some digits repeat), train + test is exactly all: disjoint and complete.
    assert _rows(train_x, train_y) + _rows(test_x, test_y) == _rows(all_x, all_y)
    per_class = torch.bincount(all_y, minlength=10).tolist()
    assert torch.bincount(test_y, minlength=10).tolist() == [round(0.2 * c) for c in per_class]
    assert len(test_y) == 359


def test_digit_split_is_pinned_and_cached() -> None:
    # Golden values: a changed split would silently invalidate shipped classifiers and results.
    test_x, test_y = load_digits("test")
    assert test_y[:10].tolist() == [3, 7, 3, 9, 0, 8, 7, 0, 8, 0]
    assert int(((test_x + 1) * 8).round().sum()) == 111461
    assert load_digits("train") is load_digits("train")


def test_load_digits_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="validation"):
        load_digits("validation")


def _match_table(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(n, N) bool: sample i equals reference image j exactly."""
    return (samples.flatten(1)[:, None, :] == reference.flatten(1)[None, :, :]).all(dim=2)


def test_digits_dataset_samples_real_train_digits_with_their_labels() -> None:
    ds = DigitsDataset()
    assert (ds.kind, ds.shape) == ("images", (1, 8, 8))
    images, labels = ds.sample_with_labels(300, gen(3))
    assert images.shape == (300, 1, 8, 8) and images.dtype == torch.float32
    train_x, train_y = load_digits("train")
    matches = _match_table(images, train_x)
    same_label = train_y[None, :] == labels[:, None]
    assert (matches & same_label).any(dim=1).all()
    assert torch.equal(ds.sample(300, gen(3)), images)


def test_stacked_digits_channels_are_real_digits_of_their_labels() -> None:
    ds = StackedDigitsDataset()
    assert (ds.kind, ds.shape) == ("images", (3, 8, 8))
    images, labels = ds.sample_with_labels(200, gen(4))
    assert images.shape == (200, 3, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (200, 3) and labels.dtype == torch.int64
    train_x, train_y = load_digits("train")
    channels = images.reshape(600, 1, 8, 8)
    matches = _match_table(channels, train_x)
    same_label = train_y[None, :] == labels.reshape(600)[:, None]
    assert (matches & same_label).any(dim=1).all()
    # Not one fixed image per label: 600 draws over 10 labels hit many distinct digits.
    assert len({tuple(c.flatten().tolist()) for c in channels}) > 300


def test_stacked_digits_cover_all_1000_modes_fast_and_uniformly() -> None:
    ds = StackedDigitsDataset()
    start = time.perf_counter()
    images, labels = ds.sample_with_labels(26_000, gen(5))
    assert time.perf_counter() - start < 1.0
    modes = ds.mode_ids(labels)
    assert modes.unique().numel() == 1000 and ds.num_modes == 1000
    for c in range(3):
        counts = torch.bincount(labels[:, c], minlength=10).double()
        assert torch.all((counts - 2600).abs() < 0.1 * 2600), counts
    # ~2,600 draws per label over ~145 images each: every train digit should be drawn.
    drawn = images.reshape(-1, 64).unique(dim=0)
    assert torch.equal(drawn, load_digits("train")[0].reshape(-1, 64).unique(dim=0))
    assert torch.equal(ds.sample(26_000, gen(5)), images)


def test_stacked_mode_ids() -> None:
    labels = torch.tensor([[1, 2, 3], [0, 0, 0], [9, 9, 9], [0, 4, 0]])
    assert StackedDigitsDataset.mode_ids(labels).tolist() == [123, 0, 999, 40]


# --- build_dataset -------------------------------------------------------------------------------


def test_build_dataset_dispatches_on_name(tmp_path: Path) -> None:
    assert build_dataset(DataConfig(name="ring8")).num_modes == 8
    assert build_dataset(DataConfig(name="grid25")).num_modes == 25
    assert isinstance(build_dataset(DataConfig(name="digits")), DigitsDataset)
    assert isinstance(build_dataset(DataConfig(name="stacked_digits")), StackedDigitsDataset)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"image": [np.linspace(-1, 1, 12).tolist()]}), path)
    ds = build_dataset(DataConfig(name="parquet", path=str(path), image_size=2, channels=3))
    assert isinstance(ds, FileData) and (ds.kind, ds.shape, ds.num_rows) == ("images", (3, 2, 2), 1)
    # Opening a file data set decodes (small ones: all) its rows to check them.
    pq.write_table(pa.table({"x": [1.0, float("nan")]}), path)
    with pytest.raises(DataError, match="NaN"):
        build_dataset(DataConfig(name="parquet", path=str(path)))
    folder = tmp_path / "images" / "cls"
    folder.mkdir(parents=True)
    Image.new("L", (8, 8), 7).save(folder / "a.png")
    images = build_dataset(
        DataConfig(name="image_folder", path=str(tmp_path / "images"), image_size=4)
    )
    assert isinstance(images, FileData) and images.classes == ["cls"] and images.shape == (1, 4, 4)
    with pytest.raises(ConfigError, match="data.name"):
        build_dataset(DataConfig(name="mnist"))
