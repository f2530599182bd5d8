"""Pictures of samples, written as PNG files, made to be read at a glance.

Images: the fixed-noise grid beside a grid of real images. 2D mixtures: the samples over the mode
centers beside a bar of the share of samples nearest each mode. Other points: the real data's 2D
histogram beside the samples' on the same bins and colour scale.

Only Pillow and matplotlib's object-oriented API with the Agg canvas are used (no pyplot, so no
global figure state and no GUI backend in a Ray worker; no torchvision, which does not import
here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
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


# White between the two grids and behind the titles: unlike the grey tile borders, it reads as
# "a different picture starts here".
BACKGROUND = 255
GAP = 16
TITLE_HEIGHT = 24


def grid_pair_array(
    fake: Tensor | np.ndarray,
    real: Tensor | np.ndarray,
    nrow: int = 8,
    scale: int = 4,
    gap: int = GAP,
) -> np.ndarray:
    """``grid_array(fake)`` on the left, ``gap`` white columns, ``grid_array(real)`` on the right.

    The shorter grid is padded with white rows at the bottom. Both must have the same channels.
    """
    left, right = grid_array(fake, nrow, scale), grid_array(real, nrow, scale)
    if left.shape[2] != right.shape[2]:
        raise ValueError(
            f"generated images have {left.shape[2]} channels, real ones {right.shape[2]}"
        )
    if gap < 0:
        raise ValueError(f"gap={gap}; expected >= 0")
    height = max(left.shape[0], right.shape[0])
    pair = np.full(
        (height, left.shape[1] + gap + right.shape[1], left.shape[2]), BACKGROUND, np.uint8
    )
    pair[: left.shape[0], : left.shape[1]] = left
    pair[: right.shape[0], left.shape[1] + gap :] = right
    return pair


def save_grid_pair(
    fake: Tensor | np.ndarray,
    real: Tensor | np.ndarray,
    path: str | Path,
    nrow: int = 8,
    scale: int = 4,
) -> Path:
    """``grid_pair_array`` under a white strip titled "generated" and "real"; returns the path.

    The grids keep their pixels exactly (no resampling): the strip is added above them.
    """
    pair = grid_pair_array(fake, real, nrow, scale)
    left_width = grid_array(fake, nrow, scale).shape[1]  # cheap next to the PNG encoding
    canvas = np.full((TITLE_HEIGHT + pair.shape[0], *pair.shape[1:]), BACKGROUND, np.uint8)
    canvas[TITLE_HEIGHT:] = pair
    picture = (
        Image.fromarray(canvas[:, :, 0], "L") if canvas.shape[2] == 1 else Image.fromarray(canvas)
    )
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=14)
    black = 0 if canvas.shape[2] == 1 else (0, 0, 0)
    for text, start, width in (
        ("generated", 0, left_width),
        ("real", left_width + GAP, pair.shape[1] - left_width - GAP),
    ):
        x0, _, x1, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((start + max((width - (x1 - x0)) // 2, 0), 4), text, fill=black, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def _float_array(values: Tensor | np.ndarray) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    return array.astype(np.float64)


def mode_shares(
    samples: Tensor | np.ndarray, centers: Tensor | np.ndarray, radius: float = math.inf
) -> np.ndarray:
    """Share of the samples nearest each of the K centers (index order), then the share "off".

    Returns K + 1 fractions summing to 1. A sample is off when it is not finite or its nearest
    center is ``radius`` or farther: with ``radius = 3 std`` exactly the samples that
    ``gan_core.metrics.mixture_metrics`` does not count as high quality.
    """
    means = _float_array(centers)
    means = means.reshape(len(means), -1)
    points = _float_array(samples).reshape(-1, means.shape[1])
    if len(points) == 0 or len(means) == 0:
        raise ValueError(f"{len(points)} samples, {len(means)} centers; expected both >= 1")
    if not radius > 0:
        raise ValueError(f"radius={radius}; expected > 0")
    finite = points[np.isfinite(points).all(axis=1)]
    dist = np.linalg.norm(finite[:, None, :] - means[None, :, :], axis=2)
    nearest = dist.argmin(axis=1)
    near = dist[np.arange(len(finite)), nearest] < radius
    counts = np.bincount(nearest[near], minlength=len(means))
    return np.append(counts, len(points) - counts.sum()) / len(points)


# Modes holding less than this fraction of the uniform share are drawn in another colour: the
# ones a collapsing generator is dropping.
UNDER = 0.5


def save_scatter(
    points: Tensor | np.ndarray,
    centers: Tensor | np.ndarray,
    path: str | Path,
    title: str = "",
    radius: float = math.inf,
) -> Path:
    """Samples over the mode centers (left) beside the share nearest each mode (right).

    The bars are ``mode_shares(points, centers, radius)``: one per mode in index order (the
    index is written by each center), then the "off" share, with a dashed line at 1/K.
    """
    xy, means = _float_array(points).reshape(-1, 2), _float_array(centers).reshape(-1, 2)
    shares = mode_shares(xy, means, radius)
    k = len(means)
    figure = Figure(figsize=(10, 5), dpi=100)
    FigureCanvasAgg(figure)
    ax, bars = figure.subplots(1, 2)
    # Samples on top of the centers: where a collapsed generator puts its mass must stay visible.
    ax.scatter(means[:, 0], means[:, 1], marker="x", c="red", s=60, zorder=1, label="mode centers")
    ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.5, linewidths=0, zorder=2, label="samples")
    # Axes fixed around the centers, not fitted to the samples, so plots from successive steps
    # are comparable and one diverged sample cannot shrink the whole picture to a dot.
    low, high = means.min(axis=0), means.max(axis=0)
    span = float((high - low).max())
    margin = max(0.25 * span, 1.0)
    for i, (x, y) in enumerate(means):
        ax.annotate(str(i), (x, y), (5, 5), textcoords="offset points", fontsize=7, color="dimgrey")
    ax.set_xlim(low[0] - margin, high[0] + margin)
    ax.set_ylim(low[1] - margin, high[1] + margin)
    ax.set_aspect("equal")
    ax.set_title(title)
    legend = ax.legend(loc="upper right", fontsize="small")
    for handle in legend.legend_handles:  # the samples' dots are too small to see in the legend
        handle.set_sizes([30])

    uniform = 1.0 / k
    colours = ["tab:orange" if s < UNDER * uniform else "tab:blue" for s in shares[:k]]
    bars.bar(np.arange(k + 1), shares, color=[*colours, "grey"], width=0.8)
    bars.axhline(uniform, color="black", linestyle="--", linewidth=1)
    if k <= 12:  # room for the numbers above the bars
        for i, share in enumerate(shares):
            bars.annotate(
                f"{100 * share:.0f}%",
                (i, share),
                (0, 2),
                textcoords="offset points",
                ha="center",
                fontsize=8,
            )
    bars.set_xticks(np.arange(k + 1), [*map(str, range(k)), "off"], fontsize=8 if k <= 12 else 6)
    # Dropped modes have no bar to colour: their index is drawn in the same orange instead.
    for label, share in zip(bars.get_xticklabels()[:k], shares[:k], strict=True):
        if share < UNDER * uniform:
            label.set_color("tab:orange")
            label.set_fontweight("bold")
    # A floor of 3/K keeps balanced runs' pictures on one scale; a collapsed one stretches it.
    bars.set_ylim(0, min(max(3 * uniform, 1.12 * float(shares.max())), 1.12))
    off = "farther than " + (f"{radius:g}" if math.isfinite(radius) else "any") + " or not finite"
    bars.set_title(
        f"share of {len(xy)} samples nearest each mode\n(dashed: uniform 1/{k}; off: {off})",
        fontsize=10,
    )
    bars.set_xlabel(f"mode (orange: under {UNDER:g} x 1/{k})")
    bars.set_ylabel("share of samples")
    # Fixed margins: tight_layout would draw the figure a second time (most of the cost).
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.88, wspace=0.22)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


# Bins per axis of the 2D histograms: ~10 pixels per bin on a 450-pixel panel, and with 2500
# samples a couple of points per bin where the data are, so the mass is not mostly noise.
BINS = 40


def shared_histograms(
    real: np.ndarray,
    samples: np.ndarray,
    low: Sequence[float],
    high: Sequence[float],
    bins: int = BINS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """2D histograms of the first two coordinates of real points and samples on the same bins.

    ``bins`` x ``bins`` equal bins over [low[0], high[0]] x [low[1], high[1]]; each histogram is
    a fraction of its own number of points (``h[i, j]``: x in bin i, y in bin j), so sets of
    different sizes compare, and the mass outside the box (or not finite) is what its sum lacks.
    Returns (real, samples, x edges, y edges).
    """
    if bins < 1 or not (high[0] > low[0] and high[1] > low[1]):
        raise ValueError(f"bins={bins}, low={low}, high={high}; expected bins >= 1, high > low")
    box = [(float(low[0]), float(high[0])), (float(low[1]), float(high[1]))]
    hists = []
    for points in (real, samples):
        xy = np.asarray(points, dtype=np.float64)[:, :2]
        inside = xy[np.isfinite(xy).all(axis=1)]
        counts, xedges, yedges = np.histogram2d(inside[:, 0], inside[:, 1], bins, range=box)
        hists.append(counts / max(len(xy), 1))
    return hists[0], hists[1], xedges, yedges


def save_points(
    samples: Tensor | np.ndarray, real: Tensor | np.ndarray, path: str | Path, title: str = ""
) -> Path:
    """Generated points against real ones, for data without known mode centers; returns the path.

    1 coordinate: the two histograms overlaid. 2 or more: on the first two coordinates, the real
    data's 2D histogram, the samples' on the same bins and colour scale, and the samples' scatter
    over the real points. Axes span the real data (1st to 99th percentile, plus a margin), so
    pictures of successive steps are comparable and a few diverged samples cannot shrink the
    real data to a dot; the share of samples outside is written above their histogram.
    """
    fake, data = _float_array(samples), _float_array(real)
    fake, data = fake.reshape(len(fake), -1), data.reshape(len(data), -1)
    if fake.shape[1] != data.shape[1]:
        raise ValueError(f"samples have {fake.shape[1]} coordinates, real data {data.shape[1]}")
    dims = min(data.shape[1], 2)
    low, high = np.percentile(data[:, :dims], [1, 99], axis=0)
    margin = np.maximum(0.25 * (high - low), 1e-3)
    low, high = low - margin, high + margin
    panels = 1 if dims == 1 else 3
    figure = Figure(figsize=(4.5 * panels, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(1, panels))
    if dims == 1:
        bins = np.linspace(low[0], high[0], 61)
        axes[0].hist(data[:, 0], bins=bins, alpha=0.5, color="grey", label="real", density=True)
        axes[0].hist(fake[:, 0], bins=bins, alpha=0.6, label="samples", density=True)
        axes[0].set_xlabel("x0")
        axes[0].legend(loc="upper right", fontsize="small")
    else:
        real_h, fake_h, xedges, yedges = shared_histograms(data, fake, low, high)
        # One colour scale for both; the square root keeps thin mass visible next to a peak.
        norm = PowerNorm(0.5, vmin=0.0, vmax=max(float(real_h.max()), float(fake_h.max()), 1e-12))
        extent = (xedges[0], xedges[-1], yedges[0], yedges[-1])
        outside = 100.0 * (1.0 - fake_h.sum())
        names = ("real data", f"samples ({outside:.0f}% outside)")
        # Empty bins white, any mass coloured: "nothing here" reads apart from "a little".
        cmap = colormaps["magma_r"].with_extremes(bad="white")
        for ax, hist, name in zip(axes[:2], (real_h, fake_h), names, strict=True):
            ax.imshow(
                np.ma.masked_equal(hist.T, 0.0),
                origin="lower",
                extent=extent,
                cmap=cmap,
                norm=norm,
                aspect="auto",
                interpolation="nearest",
            )
            ax.set_title(f"{name}: 2D histogram", fontsize=10)
        scatter = axes[2]
        scatter.scatter(
            data[:, 0], data[:, 1], s=2, c="grey", alpha=0.4, linewidths=0, label="real"
        )
        scatter.scatter(
            fake[:, 0], fake[:, 1], s=2, alpha=0.5, linewidths=0, zorder=2, label="samples"
        )
        scatter.legend(loc="upper right", fontsize="small", markerscale=4)
        scatter.set_title("samples over real", fontsize=10)
        for ax in axes:
            ax.set_xlim(low[0], high[0])
            ax.set_ylim(low[1], high[1])
            ax.set_xlabel("x0")
            ax.set_ylabel("x1")
    if title or data.shape[1] > 2:
        more = f" (x0, x1 of {data.shape[1]} coordinates)" if data.shape[1] > 2 else ""
        figure.suptitle(f"{title}{more}".strip())
    figure.subplots_adjust(
        left=0.07 if panels > 1 else 0.15, right=0.98, bottom=0.11, top=0.87, wspace=0.25
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
