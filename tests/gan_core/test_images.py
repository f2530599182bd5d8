"""Tests for gan_core.images: grid layout and pixel values by hand, and real PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan_core.images import BORDER, grid_array, save_grid, save_points, save_scatter

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


def test_save_scatter_draws_red_centers(tmp_path: Path) -> None:
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    points = centers.repeat(50, 1) + 0.05 * torch.randn(200, 2, generator=torch.Generator())
    path = save_scatter(points.numpy(), centers, tmp_path / "scatter.png", title="ring")
    assert path.stat().st_size > 0
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (500, 500)
        rgb = np.asarray(picture.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() > 20  # the four red crosses are drawn


def _blue_and_grey(path: Path) -> tuple[int, int]:
    """Pixels of the samples' colour (matplotlib's first, #1f77b4) and of the real data's grey."""
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        rgb = np.asarray(picture.convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    blue = (b - r > 60) & (b > 150)
    grey = (abs(r - g) < 6) & (abs(g - b) < 6) & (r > 110) & (r < 235)
    return int(blue.sum()), int(grey.sum())


@pytest.mark.parametrize(
    ("dims", "size"),
    [
        (1, (450, 450)),  # one panel: the two histograms
        (2, (450, 450)),  # one scatter
        (3, (1350, 450)),  # pairs of 3 coordinates: 3 panels in a row
        (4, (1350, 900)),  # 6 panels: 2 rows of 3
        (5, (1350, 900)),  # only the first 4 coordinates are drawn
    ],
)
def test_save_points_lays_out_one_panel_per_pair_of_coordinates(
    tmp_path: Path, dims: int, size: tuple[int, int]
) -> None:
    rng = torch.Generator().manual_seed(dims)
    real = torch.randn(400, dims, generator=rng)
    samples = 0.5 * torch.randn(300, dims, generator=rng) + 0.5
    path = save_points(samples, real.numpy(), tmp_path / "sub" / "points.png", title="file data")
    assert path == tmp_path / "sub" / "points.png"
    with Image.open(path) as picture:
        assert picture.size == size
    blue, grey = _blue_and_grey(path)
    assert blue > 100 and grey > 100  # samples over the real data, in every layout


def test_save_points_axes_follow_the_real_data_not_diverged_samples(tmp_path: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    real = torch.randn(500, 2, generator=rng)
    inside = _blue_and_grey(save_points(real[:400] * 0.5, real, tmp_path / "inside.png"))
    # Samples 1000 units away fall outside the axes, which still span the real data: only the
    # legend's marker is left in the samples' colour.
    outside = _blue_and_grey(save_points(real[:400] + 1000.0, real, tmp_path / "outside.png"))
    assert outside[0] < 80 and inside[0] > outside[0] + 250
    assert outside[1] > 100  # the real data is still drawn at full size


def test_save_points_refuses_mismatched_dimensions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="samples have 3 coordinates, real data 2"):
        save_points(np.zeros((10, 3)), np.zeros((10, 2)), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
