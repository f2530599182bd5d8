"""Tests for gan_core.images: grids, mode shares and histograms by hand, and real PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan_core.images import (
    BACKGROUND,
    BORDER,
    GAP,
    TITLE_HEIGHT,
    grid_array,
    grid_pair_array,
    mode_shares,
    save_grid,
    save_grid_pair,
    save_points,
    save_scatter,
    shared_histograms,
)
from gan_core.metrics import mixture_metrics

# Four 1x2x2 images; [-1, 1] maps to [0, 255] as round((x + 1) * 127.5).
FOUR = torch.tensor(
    [
        [[[-1.0, 1.0], [0.0, 0.5]]],
        [[[1.0, 1.0], [1.0, 1.0]]],
        [[[-1.0, -1.0], [-1.0, -1.0]]],
        [[[5.0, -7.0], [-0.5, 0.0]]],  # out of range: clamped
    ]
)
FOUR_PIXELS = [
    [[0, 255], [128, 191]],
    [[255, 255], [255, 255]],
    [[0, 0], [0, 0]],
    [[255, 0], [64, 128]],
]


def test_grid_of_four_images_by_hand() -> None:
    grid = grid_array(FOUR, nrow=2, scale=1)
    # 2 x 2 tiles of 2 x 2 pixels with a 1-pixel border around each: 2 * (2 + 1) + 1 = 7.
    assert grid.shape == (7, 7, 1) and grid.dtype == np.uint8
    for i, expected in enumerate(FOUR_PIXELS):
        top, left = 1 + (i // 2) * 3, 1 + (i % 2) * 3
        assert grid[top : top + 2, left : left + 2, 0].tolist() == expected
    border = np.ones((7, 7), bool)
    border[1:3, 1:3] = border[1:3, 4:6] = border[4:6, 1:3] = border[4:6, 4:6] = False
    assert (grid[border, 0] == BORDER).all()


def test_scale_repeats_every_pixel_nearest_neighbour() -> None:
    small = grid_array(FOUR, nrow=2, scale=1)
    big = grid_array(FOUR, nrow=2, scale=3)
    assert big.shape == (21, 21, 1)
    assert np.array_equal(big, small.repeat(3, axis=0).repeat(3, axis=1))


def test_rows_columns_and_empty_cells() -> None:
    images = torch.zeros(5, 1, 2, 3)
    grid = grid_array(images, nrow=2, scale=1)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 1)  # ceil(5 / 2) = 3 rows of 2
    assert (grid[7:9, 5:8] == BORDER).all()  # the sixth cell is empty
    assert grid_array(images[:3], nrow=8, scale=1).shape == (3 + 1, 3 * 4 + 1, 1)  # one row of 3


def test_rgb_channels_and_nan() -> None:
    image = torch.tensor([[[[1.0]], [[-1.0]], [[float("nan")]]]])  # R = 1, G = -1, B = NaN
    grid = grid_array(image, nrow=1, scale=1)
    assert grid.shape == (3, 3, 3)
    assert grid[1, 1].tolist() == [255, 0, 128]  # NaN drawn as mid-grey


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(2, 2, 4, 4\); expected"):
        grid_array(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="expected"):
        grid_array(torch.zeros(0, 1, 4, 4))


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_save_grid_writes_the_grid_as_png(tmp_path: Path, channels: int, mode: str) -> None:
    images = torch.rand(10, channels, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=4, scale=2)
    assert path == tmp_path / "sub" / "grid.png" and path.stat().st_size > 0
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == mode
        assert picture.size == (2 * (4 * 9 + 1), 2 * (3 * 9 + 1))  # 4 columns, 3 rows of 8 + 1
        pixels = np.asarray(picture)
    expected = grid_array(images, nrow=4, scale=2)
    assert pixels.reshape(expected.shape).tolist() == expected.tolist()


def test_grid_pair_puts_fake_left_real_right_with_a_white_gap() -> None:
    # Constant images: every fake pixel -1 (0 after mapping), every real one +1 (255).
    fake, real = -torch.ones(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
    pair = grid_pair_array(fake, real, nrow=2, scale=1, gap=3)
    assert pair.shape == (7, 7 + 3 + 7, 1) and pair.dtype == np.uint8
    assert np.array_equal(pair[:, :7], grid_array(fake, nrow=2, scale=1))
    assert np.array_equal(pair[:, 10:], grid_array(real, nrow=2, scale=1))
    assert (pair[:, 7:10] == BACKGROUND).all()
    tiles_left = pair[:, :7, 0][pair[:, :7, 0] != BORDER]
    tiles_right = pair[:, 10:, 0][pair[:, 10:, 0] != BORDER]
    assert tiles_left.tolist() == [0] * 16 and tiles_right.tolist() == [255] * 16


def test_grid_pair_pads_the_shorter_grid_and_refuses_mixed_channels() -> None:
    pair = grid_pair_array(torch.zeros(4, 1, 2, 2), torch.zeros(2, 1, 2, 2), nrow=2, scale=1)
    # Left: 2 rows of tiles (7 high); right: 1 row (4 high), white below.
    assert pair.shape == (7, 7 + GAP + 7, 1)
    assert (pair[4:, 7 + GAP :] == BACKGROUND).all() and (pair[:4, 7 + GAP :] != BACKGROUND).any()
    with pytest.raises(ValueError, match="generated images have 1 channels, real ones 3"):
        grid_pair_array(torch.zeros(2, 1, 2, 2), torch.zeros(2, 3, 2, 2))


def test_save_grid_pair_keeps_the_grids_exact_under_a_title_strip(tmp_path: Path) -> None:
    fake, real = -torch.ones(6, 3, 4, 4), torch.ones(6, 3, 4, 4)
    path = save_grid_pair(fake, real, tmp_path / "sub" / "pair.png", nrow=3, scale=2)
    expected = grid_pair_array(fake, real, nrow=3, scale=2)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        pixels = np.asarray(picture)
    assert pixels.shape == (TITLE_HEIGHT + expected.shape[0], *expected.shape[1:])
    assert np.array_equal(pixels[TITLE_HEIGHT:], expected)
    strip = pixels[:TITLE_HEIGHT, :, 0]
    width = grid_array(fake, nrow=3, scale=2).shape[1]
    # A title is written above each grid: dark text pixels on both sides of the gap.
    assert (strip[:, :width] < 100).sum() > 20 and (strip[:, width + GAP :] < 100).sum() > 20


def test_mode_shares_by_hand() -> None:
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = np.array(
        [
            [0.1, 0.0],  # mode 0
            [0.0, -0.5],  # mode 0
            [9.0, 0.5],  # mode 1 (distance ~1.12)
            [10.0, 0.2],  # mode 1
            [5.1, 0.0],  # nearest mode 1 at 4.9: off for radius 2
            [np.nan, 0.0],  # not finite: off
            [0.0, 10.0],  # mode 2
            [1.0, 1.0],  # mode 0 at 1.41
        ]
    )
    shares = mode_shares(samples, centers, radius=2.0)
    assert shares.tolist() == [3 / 8, 2 / 8, 1 / 8, 2 / 8]
    # No radius: every finite sample counts for its nearest mode; only the NaN is off.
    assert mode_shares(samples, centers).tolist() == [3 / 8, 3 / 8, 1 / 8, 1 / 8]
    # The radius is strict, as in mixture_metrics' high-quality test (distance < 3 std).
    assert mode_shares(np.array([[1.0, 0.0]]), centers, radius=1.0).tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="radius=0"):
        mode_shares(samples, centers, radius=0)
    with pytest.raises(ValueError, match="0 samples"):
        mode_shares(np.zeros((0, 2)), centers)


def test_mode_shares_match_the_hq_share_of_mixture_metrics() -> None:
    centers = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    rng = np.random.default_rng(0)
    samples = centers[rng.integers(0, 2, 500)] + 0.02 * rng.standard_normal((500, 2))
    shares = mode_shares(samples, centers, radius=3 * 0.01)
    metrics = mixture_metrics(samples, centers, std=0.01)
    assert math.isclose(100 * (1 - shares[-1]), metrics["hq_pct"])
    assert (shares[:-1] > 0).sum() == metrics["modes"] == 2


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        return np.asarray(picture.convert("RGB")).astype(int)


def test_save_scatter_draws_centers_and_one_bar_per_mode(tmp_path: Path) -> None:
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    points = centers.repeat(50, 1) + 0.05 * torch.randn(200, 2, generator=torch.Generator())
    path = save_scatter(points.numpy(), centers, tmp_path / "scatter.png", title="ring")
    rgb = _pixels(path)
    assert rgb.shape == (500, 1000, 3)  # scatter | bars
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red[:, :500].sum() > 20 and red[:, 500:].sum() == 0  # the crosses, left only
    # Bars are blue: the tallest one's height in pixels, over the right half.
    balanced = _tallest_blue(rgb[:, 500:])
    assert balanced > 60  # four bars of 25 %
    # All samples on mode 0: one tall bar, the three others under half the uniform share.
    lopsided = _pixels(save_scatter(centers[:1].repeat(200, 1), centers, tmp_path / "one.png"))
    # 100 % against 25 %, on y axes up to 1.12 and 3 / 4 (the floor of 3 x uniform).
    assert _tallest_blue(lopsided[:, 500:]) > 2.4 * balanced
    # The three dropped modes' indices are written in orange; none in the balanced picture.
    assert _orange(lopsided[:, 500:]) > 3 * 15 and _orange(rgb[:, 500:]) == 0


def _orange(rgb: np.ndarray) -> int:
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] > 80) & (rgb[..., 2] < 60)).sum())


def _tallest_blue(rgb: np.ndarray) -> int:
    blue = (rgb[..., 2] - rgb[..., 0] > 60) & (rgb[..., 2] > 150)
    return int(blue.sum(axis=0).max())


def test_shared_histograms_by_hand() -> None:
    real = np.array([[0.5, 0.5], [0.5, 0.5], [1.5, 0.5], [3.5, 3.5]])
    samples = np.array([[0.5, 1.5], [9.0, 0.0], [np.inf, 0.0], [1.2, 0.1], [3.9, 0.2]])
    real_h, fake_h, xedges, yedges = shared_histograms(real, samples, (0, 0), (4, 4), bins=4)
    assert xedges.tolist() == yedges.tolist() == [0, 1, 2, 3, 4]
    expected_real = np.zeros((4, 4))
    expected_real[0, 0], expected_real[1, 0], expected_real[3, 3] = 0.5, 0.25, 0.25
    assert np.array_equal(real_h, expected_real)
    # Fractions of all 5 samples: the two outside the box or not finite are missing from the sum.
    expected_fake = np.zeros((4, 4))
    expected_fake[0, 1] = expected_fake[1, 0] = expected_fake[3, 0] = 0.2
    assert np.allclose(fake_h, expected_fake) and math.isclose(fake_h.sum(), 0.6)
    with pytest.raises(ValueError, match="expected bins >= 1, high > low"):
        shared_histograms(real, samples, (0, 0), (0, 4))


@pytest.mark.parametrize(
    ("dims", "size"),
    [
        (1, (450, 450)),  # one panel: the two histograms
        (2, (1350, 450)),  # real histogram | samples histogram | scatter
        (3, (1350, 450)),  # the same on the first two coordinates
        (5, (1350, 450)),
    ],
)
def test_save_points_layout(tmp_path: Path, dims: int, size: tuple[int, int]) -> None:
    rng = torch.Generator().manual_seed(dims)
    real = torch.randn(400, dims, generator=rng)
    samples = 0.5 * torch.randn(300, dims, generator=rng) + 0.5
    path = save_points(samples, real.numpy(), tmp_path / "sub" / "points.png", title="file data")
    assert path == tmp_path / "sub" / "points.png"
    rgb = _pixels(path)
    assert (rgb.shape[1], rgb.shape[0]) == size
    blue = (rgb[..., 2] - rgb[..., 0] > 60) & (rgb[..., 2] > 150)
    assert blue.sum() > 100  # the samples are drawn in every layout


def _ink(rgb: np.ndarray) -> int:
    """Histogram pixels: empty bins are white, any mass is coloured."""
    return int((rgb.sum(axis=2) < 3 * 250).sum())


def test_save_points_histograms_follow_the_real_data_not_diverged_samples(tmp_path: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    real = torch.randn(500, 2, generator=rng)
    inside = _pixels(save_points(real[:400] * 0.5, real, tmp_path / "inside.png"))
    outside = _pixels(save_points(real[:400] + 1000.0, real, tmp_path / "outside.png"))
    # Inside the frames of the real histogram (x 95-445, y 59-400 of 1350 x 450 pixels) and the
    # samples' (x 533-884). The real one is the same in both pictures (the axes span the real
    # data); the diverged samples' is empty.
    real_ink = _ink(inside[65:395, 100:440])
    assert real_ink > 5000 and _ink(outside[65:395, 100:440]) == real_ink
    assert _ink(inside[65:395, 540:878]) > 3000 and _ink(outside[65:395, 540:878]) == 0


def test_save_points_refuses_mismatched_dimensions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="samples have 3 coordinates, real data 2"):
        save_points(np.zeros((10, 3)), np.zeros((10, 2)), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
