"""Training data sampled on the fly: 2D Gaussian mixtures, (stacked) 8x8 digits and Parquet files.

Every dataset draws a batch with ``sample(n, generator)``: sampling is vectorised and depends only
on the ``torch.Generator`` passed in, so a run's data stream is reproducible from its seed. The
mixtures follow the PacGAN protocol (docs/BENCHMARKS.md, section 1); the digits are scikit-learn's
bundled 8x8 images (MNIST cannot be downloaded here), stacked three deep for the 1,000-mode
experiment.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch import Tensor

from gan_core.config import DATASETS, ConfigError, DataConfig

DIGIT_SPLITS = ("all", "train", "test")
# The split must be identical on every machine and every run, so it comes from numpy's legacy
# RandomState, whose stream numpy guarantees never to change.
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


class DataError(ValueError):
    """Training data that is missing, empty or not in the expected schema."""

    def __init__(self, path: str, problem: str, expected: str) -> None:
        self.path, self.problem, self.expected = path, problem, expected
        super().__init__(f"{path}: {problem}; expected {expected}")


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


def _image_schema(values: int) -> str:
    return (
        f"a column 'image' of list<float in [-1, 1] or int in 0..255> with channels*image_size^2 "
        f"= {values} values per row (C, H, W row-major), and an optional int column 'label'"
    )


_POINTS_SCHEMA = (
    "one or more numeric (float or int) columns, one per coordinate in column order, and an "
    "optional int column 'label'"
)


class ParquetDataset(Dataset):
    """Rows of a Parquet file, or of a folder of Parquet files, drawn uniformly with replacement.

    ``path`` is a local path or a URI such as ``s3://bucket/key`` (opened with
    ``pyarrow.fs.FileSystem.from_uri``, which honours ``AWS_ENDPOINT_URL``). Everything is read into
    memory once. Expected schema:

    - images (``image_size > 0``): a column ``image`` of ``list<float>`` or ``list<int>`` holding
      ``channels * image_size**2`` values per row, row-major (C, H, W). Floats must already be in
      [-1, 1]; integers are pixel values 0..255, scaled to [-1, 1] as ``x / 127.5 - 1``. Other
      columns are ignored.
    - points (``image_size == 0``): every float or int column except ``label`` is one coordinate,
      in column order; there must be at least one, and no column of another type.

    Both may have an int column ``label`` (no nulls), returned by ``sample_with_labels``. Missing
    paths, empty tables, other schemas, nulls, NaN or Inf raise ``DataError``.
    """

    def __init__(self, path: str, image_size: int = 0, channels: int = 1) -> None:
        self.path, self.image_size, self.channels = path, image_size, channels
        if image_size > 0:
            self.kind, self.shape = "images", (channels, image_size, image_size)
            self.expected = _image_schema(channels * image_size * image_size)
        else:
            self.kind, self.expected = "points", _POINTS_SCHEMA
        table = self._read()
        if table.num_rows == 0:
            self._fail("it holds no rows")
        self.data = self._images(table) if image_size > 0 else self._points(table)
        if self.kind == "points":
            self.shape = (self.data.shape[1],)
        self.labels = self._labels(table)

    def sample_with_labels(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.labels is None:
            self._fail("it has no 'label' column, so samples have no labels")
        index = torch.randint(0, len(self.data), (n,), generator=generator)
        return self.data[index], self.labels[index]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        index = torch.randint(0, len(self.data), (n,), generator=generator)
        return self.data[index]

    def _fail(self, problem: str) -> NoReturn:
        raise DataError(self.path, problem, self.expected)

    def _read(self) -> pa.Table:
        try:
            if "://" in self.path:
                filesystem, where = pafs.FileSystem.from_uri(self.path)
            else:
                filesystem, where = pafs.LocalFileSystem(), os.path.abspath(self.path)
            info = filesystem.get_file_info(where)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(self.path, f"cannot open it ({exc})", self.expected) from None
        if info.type == pafs.FileType.NotFound:
            self._fail(_not_found(filesystem, where))
        # pyarrow reads an empty folder as a table without rows or columns and reports a 0-byte
        # file as a footer problem; both are said plainly here.
        if info.type == pafs.FileType.File and info.size == 0:
            self._fail("the file is empty (0 bytes)")
        if info.type == pafs.FileType.Directory and not _data_files(filesystem, where):
            self._fail(
                "the folder holds no data files (names starting with '_' or '.' are skipped)"
            )
        try:
            return pq.read_table(where, filesystem=filesystem)
        except (OSError, pa.ArrowException) as exc:
            problem = f"cannot read it as Parquet ({exc})"
            raise DataError(self.path, problem, self.expected) from None

    def _images(self, table: pa.Table) -> Tensor:
        if "image" not in table.column_names:
            self._fail(f"no usable columns: no 'image' column among {table.column_names}")
        column = table.column("image")
        kind = column.type
        if not (
            pa.types.is_list(kind)
            or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind)
        ):
            self._fail(f"column 'image' has type {kind}, not a list of numbers")
        if not _is_number(kind.value_type):
            self._fail(f"column 'image' has non-numeric values of type {kind.value_type}")
        if column.null_count:
            self._fail(f"column 'image' has {column.null_count} null rows")
        lengths = pc.list_value_length(column).to_numpy()
        size = self.channels * self.image_size**2
        wrong = np.flatnonzero(lengths != size)
        if wrong.size:
            row = int(wrong[0])
            self._fail(
                f"wrong-length image list: row {row} has {lengths[row]} values, not "
                f"channels*image_size^2 = {self.channels}*{self.image_size}^2 = {size} "
                f"({wrong.size} rows are wrong)"
            )
        flat = pc.list_flatten(column)
        if flat.null_count:
            self._fail(f"column 'image' has {flat.null_count} null pixel values")
        values = flat.to_numpy()
        if pa.types.is_integer(kind.value_type):
            if values.min() < 0 or values.max() > 255:
                self._fail(f"integer pixels must be 0..255, found {values.min()}..{values.max()}")
            values = values / 127.5 - 1.0
        else:
            self._check_finite(values.astype(np.float32), "column 'image'")
            if values.min() < -1 or values.max() > 1:
                self._fail(f"float pixels must be in [-1, 1], found {values.min()}..{values.max()}")
        # astype copies: Arrow's buffers are read-only, and the tensor must own writable memory.
        return torch.from_numpy(values.astype(np.float32)).reshape(-1, *self.shape)

    def _points(self, table: pa.Table) -> Tensor:
        names = [name for name in table.column_names if name != "label"]
        other = [
            f"{n} ({table.schema.field(n).type})"
            for n in names
            if not _is_number(table.schema.field(n).type)
        ]
        if other:
            hint = " (set image_size for an image column)" if "image" in names else ""
            self._fail(f"non-numeric columns: {', '.join(other)}{hint}")
        if not names:
            found = table.column_names
            self._fail(f"no usable columns: no numeric column besides 'label' in {found}")
        for name in names:
            if table.column(name).null_count:
                self._fail(f"column {name!r} has {table.column(name).null_count} null values")
        columns = [table.column(name).to_numpy().astype(np.float32) for name in names]
        points = np.stack(columns, axis=1)
        self._check_finite(points, f"columns {names}")
        return torch.from_numpy(points)

    def _labels(self, table: pa.Table) -> Tensor | None:
        if "label" not in table.column_names:
            return None
        column = table.column("label")
        if not pa.types.is_integer(column.type):
            self._fail(f"column 'label' has type {column.type}, not int")
        if column.null_count:
            self._fail(f"column 'label' has {column.null_count} null values")
        return torch.from_numpy(column.to_numpy().astype(np.int64))

    def _check_finite(self, values: np.ndarray, where: str) -> None:
        # float32 is what training sees, so a float64 too large for it counts as Inf too.
        bad = ~np.isfinite(values)
        if bad.any():
            self._fail(f"{where} hold {int(bad.sum())} NaN/Inf values (or values beyond float32)")


def _not_found(filesystem: pafs.FileSystem, where: str) -> str:
    """What is missing: on S3 a missing bucket and a missing key call for different fixes."""
    if isinstance(filesystem, pafs.S3FileSystem):
        bucket = where.split("/", 1)[0]
        try:
            if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
                return f"bucket {bucket!r} does not exist"
        except (OSError, pa.ArrowException):
            pass
        return f"no such key in bucket {bucket!r}"
    if isinstance(filesystem, pafs.LocalFileSystem):
        return "no such file or folder"
    return "no such file, folder or object"


def _data_files(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    """Files under ``folder`` that pyarrow's dataset reader reads (it skips '_' and '.' names)."""
    selector = pafs.FileSelector(folder, recursive=True)
    return [
        info.path
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File
        and not any(
            part.startswith(("_", "."))
            for part in info.path[len(folder.rstrip("/")) + 1 :].split("/")
        )
    ]


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def build_dataset(cfg: DataConfig) -> Dataset:
    """The dataset a run's ``data`` config section names."""
    builders = {
        "ring8": ring8,
        "grid25": grid25,
        "digits": DigitsDataset,
        "stacked_digits": StackedDigitsDataset,
        "parquet": lambda: ParquetDataset(cfg.path, cfg.image_size, cfg.channels),
    }
    if cfg.name not in builders:
        raise ConfigError("data.name", cfg.name, "one of " + ", ".join(DATASETS))
    return builders[cfg.name]()
