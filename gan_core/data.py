"""Training data sampled on the fly: 2D Gaussian mixtures and (stacked) 8x8 digits.

Every dataset draws a batch with ``sample(n, generator)``: sampling is vectorised and depends only
on the ``torch.Generator`` passed in, so a run's data stream is reproducible from its seed. The
mixtures follow the PacGAN protocol (docs/PROTOCOLS.md, section 1); the digits are scikit-learn's
bundled 8x8 images (MNIST cannot be downloaded here), stacked three deep for the 1,000-mode
experiment.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from gan_core.config import DATASETS, ConfigError, DataConfig
from gan_core.files import DataError, FileData, open_file_data

__all__ = ["DataError", "Dataset", "build_dataset"]

DIGIT_SPLITS = ("all", "train", "test")
# The split must be identical on every machine and every run, so it comes from numpy's legacy
# RandomState, whose stream numpy guarantees never to change.
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


class Dataset(ABC):
    """A source of training samples: float32 tensors of shape ``(n, *shape)``."""

    kind: str  # "points" or "images"
    shape: tuple[int, ...]  # per sample: (D,) for points, (C, H, W) for images

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` samples; the same generator state always gives the same samples."""


class MixtureDataset(Dataset):
    """An equal-weight mixture of isotropic 2D Gaussians with the given means and one std."""

    kind = "points"
    shape = (2,)

    def __init__(self, centers: Tensor, std: float) -> None:
        self.centers = torch.as_tensor(centers, dtype=torch.float32).reshape(-1, 2)
        self.std = float(std)

    @property
    def num_modes(self) -> int:
        return self.centers.shape[0]

    def sample_with_labels(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Points ``(n, 2)`` and the index ``(n,)`` of the mode each was drawn from."""
        labels = torch.randint(0, self.num_modes, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator)
        return self.centers[labels] + self.std * noise, labels

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.sample_with_labels(n, generator)[0]


def ring8() -> MixtureDataset:
    """8 modes on the unit circle at angles 2*pi*k/8, std 0.01 (PacGAN's ring)."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return MixtureDataset(torch.stack([angles.cos(), angles.sin()], dim=1), std=0.01)


def grid25() -> MixtureDataset:
    """25 modes on {-4, -2, 0, 2, 4}^2, std 0.05 (PacGAN's grid)."""
    axis = torch.arange(-4.0, 5.0, 2.0)
    return MixtureDataset(torch.cartesian_prod(axis, axis), std=0.05)


@lru_cache(maxsize=len(DIGIT_SPLITS))
def load_digits(split: str = "all") -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits as images ``(n, 1, 8, 8)`` in [-1, 1] and labels ``(n,)`` int64.

    ``split`` is "all" (1,797 images), or "train" / "test": a fixed stratified ~80/20 split, the
    same everywhere. The result is cached and shared between callers: do not modify it in place.
    """
    if split not in DIGIT_SPLITS:
        raise ValueError(f"load_digits: split={split!r} is invalid; allowed: {DIGIT_SPLITS}")
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    pixels, labels = bunch.data, bunch.target  # pixels are 0..16
    if split != "all":
        test = _stratified_test_mask(labels)
        keep = test if split == "test" else ~test
        pixels, labels = pixels[keep], labels[keep]
    images = torch.as_tensor(pixels / 8.0 - 1.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return images, torch.as_tensor(labels, dtype=torch.int64)


def _stratified_test_mask(labels: np.ndarray) -> np.ndarray:
    rng = np.random.RandomState(_SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test[members[: round(_TEST_FRACTION * len(members))]] = True
    return test


class DigitsDataset(Dataset):
    """Real 8x8 digits drawn uniformly (with replacement) from one split."""

    kind = "images"
    shape = (1, 8, 8)

    def __init__(self, split: str = "train") -> None:
        self.images, self.labels = load_digits(split)

    def sample_with_labels(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randint(0, len(self.labels), (n,), generator=generator)
        return self.images[index], self.labels[index]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.sample_with_labels(n, generator)[0]


class StackedDigitsDataset(Dataset):
    """Three independently drawn digits stacked as channels: 1,000 modes (the label triples).

    Each channel's label is uniform over 0..9 and its image uniform among that label's images.
    Drawing the label first makes the real data exactly uniform over the 1,000 triples, which is
    the reference the stacked-digits KL is measured against (the split's class counts differ by a
    few percent).
    """

    kind = "images"
    shape = (3, 8, 8)
    num_modes = 1000

    def __init__(self, split: str = "train") -> None:
        images, labels = load_digits(split)
        order = torch.argsort(labels, stable=True)
        self._images_by_label = images[order, 0]  # (N, 8, 8), grouped by label
        counts = torch.bincount(labels, minlength=10)
        self._counts = counts.to(torch.float64)
        self._offsets = torch.cumsum(counts, 0) - counts

    @staticmethod
    def mode_ids(labels: Tensor) -> Tensor:
        """Map label triples ``(n, 3)`` to mode ids ``100*l0 + 10*l1 + l2`` in 0..999."""
        return labels[..., 0] * 100 + labels[..., 1] * 10 + labels[..., 2]

    def sample_with_labels(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Images ``(n, 3, 8, 8)`` and each channel's digit label ``(n, 3)`` int64."""
        labels = torch.randint(0, 10, (n, 3), generator=generator)
        # float64 keeps floor(u * count) < count for every u in [0, 1).
        within = torch.rand(n, 3, generator=generator, dtype=torch.float64)
        rank = (within * self._counts[labels]).floor().to(torch.int64)
        return self._images_by_label[self._offsets[labels] + rank], labels

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.sample_with_labels(n, generator)[0]


def build_dataset(cfg: DataConfig) -> Dataset | FileData:
    """The dataset a run's ``data`` config section names: a generated one, or the description
    of a file data set (``gan_core.files``), read as a stream."""
    builders = {
        "ring8": ring8,
        "grid25": grid25,
        "digits": DigitsDataset,
        "stacked_digits": StackedDigitsDataset,
        "parquet": lambda: open_file_data(cfg),
        "image_folder": lambda: open_file_data(cfg),
    }
    if cfg.name not in builders:
        raise ConfigError("data.name", cfg.name, "one of " + ", ".join(DATASETS))
    return builders[cfg.name]()
