"""Pictures of samples: image grids and 2D scatter plots, written as PNG files.

Only Pillow and matplotlib's object-oriented API with the Agg canvas are used (no pyplot, so no
global figure state and no GUI backend in a Ray worker; no torchvision, which does not import
here).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

# Mid-grey separates the tiles both from the black background of the digits and from their
# white strokes.
BORDER = 128


def grid_array(images: Tensor | np.ndarray, nrow: int = 8, scale: int = 4) -> np.ndarray:
    """Tile ``(n, C, H, W)`` images in [-1, 1] into one uint8 picture ``(rows, cols, C)``.

    ``nrow`` images per row, a 1-pixel border around every tile, then every pixel (border
    included) blown up to ``scale`` x ``scale``. C is 1 (grayscale) or 3 (RGB); values outside
    [-1, 1] are clamped and NaN shows as mid-grey. Empty cells of the last row are border.
    """
    array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if array.ndim != 4 or array.shape[1] not in (1, 3) or len(array) == 0:
        raise ValueError(f"images have shape {array.shape}; expected (n >= 1, 1 or 3, H, W)")
    if nrow < 1 or scale < 1:
        raise ValueError(f"nrow={nrow}, scale={scale}; expected both >= 1")
    n, channels, height, width = array.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    pixels = np.rint((np.clip(np.nan_to_num(array, nan=0.0), -1, 1) + 1) * 127.5).astype(np.uint8)
    grid = np.full((rows * (height + 1) + 1, cols * (width + 1) + 1, channels), BORDER, np.uint8)
    for i, image in enumerate(pixels):
        top, left = 1 + (i // cols) * (height + 1), 1 + (i % cols) * (width + 1)
        grid[top : top + height, left : left + width] = image.transpose(1, 2, 0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(images: Tensor | np.ndarray, path: str | Path, nrow: int = 8, scale: int = 4) -> Path:
    """Write ``grid_array(images, nrow, scale)`` as a PNG at ``path``; returns the path."""
    grid = grid_array(images, nrow, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(grid[:, :, 0], "L") if grid.shape[2] == 1 else Image.fromarray(grid)
    picture.save(path, format="PNG")
    return path


def save_scatter(
    points: Tensor | np.ndarray, centers: Tensor | np.ndarray, path: str | Path, title: str = ""
) -> Path:
    """Scatter 2D samples (small dots) over the mode centers (red x) as a PNG; returns the path."""
    xy, means = (
        (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)).reshape(-1, 2)
        for v in (points, centers)
    )
    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    # Samples on top of the centers: where a collapsed generator puts its mass must stay visible.
    ax.scatter(means[:, 0], means[:, 1], marker="x", c="red", s=60, zorder=1, label="mode centers")
    ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.5, linewidths=0, zorder=2, label="samples")
    # Axes fixed around the centers, not fitted to the samples, so plots from successive steps
    # are comparable and one diverged sample cannot shrink the whole picture to a dot.
    low, high = means.min(axis=0), means.max(axis=0)
    margin = max(0.25 * float((high - low).max()), 1.0)
    ax.set_xlim(low[0] - margin, high[0] + margin)
    ax.set_ylim(low[1] - margin, high[1] + margin)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


# Coordinates drawn for points of more than two dimensions: their pairwise projections (6 panels
# for 4 coordinates); more panels would be too small to read.
MAX_PROJECTED = 4


def save_points(
    samples: Tensor | np.ndarray, real: Tensor | np.ndarray, path: str | Path, title: str = ""
) -> Path:
    """Generated points over real ones, for data without known mode centers; returns the path.

    1 coordinate: the two histograms; 2: a scatter of samples (drawn last, on top) over the
    real points; more: the scatter of every pair of the first ``MAX_PROJECTED`` coordinates.
    Axes span the real data (1st to 99th percentile, plus a margin), so pictures of successive
    steps are comparable and a few diverged samples cannot shrink the real data to a dot.
    """
    fake, data = (
        (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)).astype(np.float64)
        for v in (samples, real)
    )
    fake, data = fake.reshape(len(fake), -1), data.reshape(len(data), -1)
    if fake.shape[1] != data.shape[1]:
        raise ValueError(f"samples have {fake.shape[1]} coordinates, real data {data.shape[1]}")
    dims = min(data.shape[1], MAX_PROJECTED)
    low, high = np.percentile(data[:, :dims], [1, 99], axis=0)
    margin = np.maximum(0.25 * (high - low), 1e-3)
    low, high = low - margin, high + margin
    pairs = [(i, j) for i in range(dims) for j in range(i + 1, dims)] or [(0, None)]
    cols = min(len(pairs), 3)
    rows = math.ceil(len(pairs) / cols)
    figure = Figure(figsize=(4.5 * cols, 4.5 * rows), dpi=100)
    FigureCanvasAgg(figure)
    for k, (i, j) in enumerate(pairs):
        ax = figure.add_subplot(rows, cols, k + 1)
        if j is None:
            bins = np.linspace(low[0], high[0], 61)
            ax.hist(data[:, 0], bins=bins, alpha=0.5, color="grey", label="real", density=True)
            ax.hist(fake[:, 0], bins=bins, alpha=0.6, label="samples", density=True)
            ax.set_xlabel("x0")
        else:
            ax.scatter(data[:, i], data[:, j], s=2, c="grey", alpha=0.4, linewidths=0, label="real")
            ax.scatter(
                fake[:, i], fake[:, j], s=2, alpha=0.5, linewidths=0, zorder=2, label="samples"
            )
            ax.set_xlim(low[i], high[i])
            ax.set_ylim(low[j], high[j])
            ax.set_xlabel(f"x{i}")
            ax.set_ylabel(f"x{j}")
        if k == 0:
            ax.legend(loc="upper right", fontsize="small", markerscale=4)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
