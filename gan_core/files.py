"""Training data stored as files: Parquet points or images, and folders of image files.

The layouts (``open_file_data`` tells which one a path holds from schemas, row-group sizes and a
first look at the rows, never by reading the whole data set):

- points: Parquet whose numeric columns (every column but ``label``) are the coordinates;
- image lists: a Parquet column ``image`` of ``list<number>``, ``channels * side^2`` values per row
  (C, H, W row-major; floats in [-1, 1] or integers 0..255);
- encoded images: a Parquet column ``image`` of PNG/JPEG bytes, either a struct with a ``bytes``
  field (how Hugging Face ``datasets`` stores images) or a plain binary column;
- an image folder: ``.png`` / ``.jpg`` / ``.jpeg`` files, local or ``s3://``; when every image sits
  in a subfolder of the top folder, the subfolders are the classes (labels in sorted name order).

Parquet data may have an int ``label`` column. Encoded images are decoded with Pillow, converted
to ``data.channels`` (1 = grayscale, 3 = RGB), padded by ``data.pad`` pixels of black and resized
to ``data.image_size`` (the shorter side, then a centred square crop), so mixed sizes train
together.

The data set is cut into units read at once (a Parquet row group; a chunk of image files).
``FileData.decode`` turns the rows of a unit into training arrays; it is the one piece of data
code both readers share: ``FileStream`` (gan_core/filestream.py: pyarrow, for ``gan_core.loop``
and the service's local backend) and Ray Data (services/ray_data.py, for Ray Train workers).
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch import Tensor

from gan_core.config import DataConfig

POINTS, IMAGE_LISTS, ENCODED, IMAGE_FILES = "points", "image lists", "encoded images", "image files"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Image files read as one unit: enough to amortise a listing and a thread pool, few enough that
# a unit of 64x64 RGB images stays a few MiB.
FILES_PER_UNIT = 256
# Preflight decodes every row of a data set this small on disk (a NaN in the last row is refused
# before any worker starts); a larger one is checked on its first unit, and later bad rows stop
# the run when they are read, naming the file and row group.
CHECK_ALL_BYTES = 64 * 2**20
# Units shuffled together by FileStream: rows of 4 row groups mix in every batch.
WINDOW_UNITS = 4
_READ_THREADS = 8

_POINTS_SCHEMA = (
    "one or more numeric (float or int) columns, one per coordinate in column order, and an "
    "optional int column 'label'"
)


def _image_schema(values: int) -> str:
    return (
        f"a column 'image' of list<float in [-1, 1] or int in 0..255> with channels*image_size^2 "
        f"= {values} values per row (C, H, W row-major), or of PNG/JPEG bytes (binary, or a "
        f"struct with a 'bytes' field), and an optional int column 'label'"
    )


_FOLDER_SCHEMA = (
    "a folder of .png/.jpg/.jpeg files, optionally one subfolder per class (the labels)"
)


class DataError(ValueError):
    """Training data that is missing, empty or not in the expected schema."""

    def __init__(self, path: str, problem: str, expected: str) -> None:
        self.path, self.problem, self.expected = path, problem, expected
        super().__init__(f"{path}: {problem}; expected {expected}")


@dataclass(frozen=True)
class Unit:
    """Rows read at once: one row group of a Parquet file, or a chunk of image files."""

    paths: tuple[str, ...]  # the Parquet file, or the image files (paths inside the filesystem)
    row_group: int  # -1 for image files
    rows: int


@dataclass
class FileData:
    """A file data set, checked and described; picklable (Ray ships it to its read tasks)."""

    uri: str  # as the user wrote it (data.path)
    filesystem: pafs.FileSystem
    root: str  # data.path inside ``filesystem``
    layout: str  # POINTS | IMAGE_LISTS | ENCODED | IMAGE_FILES
    shape: tuple[int, ...]  # per sample: (D,) or (C, H, W)
    units: list[Unit]
    columns: list[str]  # Parquet columns read (coordinates or 'image', plus 'label')
    labelled: bool
    classes: list[str] = field(default_factory=list)  # image-folder classes, by label
    pad: int = 0
    cache_mb: int = 0
    expected: str = ""

    @property
    def kind(self) -> str:
        return "points" if self.layout == POINTS else "images"

    @property
    def num_rows(self) -> int:
        return sum(u.rows for u in self.units)

    @property
    def files(self) -> list[str]:
        return sorted({p for u in self.units for p in u.paths})

    @property
    def decoded_bytes(self) -> int:
        """Memory the whole data set takes decoded (uint8 pixels, float32 points and lists)."""
        per_value = 1 if self.layout in (ENCODED, IMAGE_FILES) else 4
        return self.num_rows * (math.prod(self.shape) * per_value + (8 if self.labelled else 0))

    @property
    def cached(self) -> bool:
        """Whether readers keep the decoded data in memory after the first pass."""
        return self.decoded_bytes <= self.cache_mb * 2**20

    def fail(self, problem: str, where: str | None = None) -> NoReturn:
        raise DataError(where or self.uri, problem, self.expected)

    # -- reading -------------------------------------------------------------------------------
    def read_unit(self, unit: Unit) -> tuple[np.ndarray, np.ndarray | None]:
        """A unit's rows as training arrays (see ``decode``)."""
        if self.layout == IMAGE_FILES:
            try:
                blobs = _read_files(self.filesystem, unit.paths)
            except (OSError, pa.ArrowException) as exc:
                self.fail(f"cannot read an image file ({exc})", self.display(unit.paths[0]))
            return self.decode_files(list(unit.paths), blobs)
        where = self._where(unit)
        try:
            with self.filesystem.open_input_file(unit.paths[0]) as handle:
                table = pq.ParquetFile(handle).read_row_group(unit.row_group, columns=self.columns)
        except (OSError, pa.ArrowException) as exc:
            self.fail(f"cannot read it as Parquet ({exc})", where)
        return self.decode(table, where)

    def read_all(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every row, decoded, in file order (small data sets and tests only)."""
        parts = [self.read_unit(u) for u in self.units]
        x = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts]) if self.labelled else None
        return x, labels

    def reference(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor | None]:
        """A fixed sample of up to ``n`` real rows for evaluation and pictures: whole units
        taken in a seeded random order until ``n`` rows are in, then ``n`` of them at random.
        The same data set, n and seed always give the same rows, on every process."""
        order = np.random.default_rng([seed, 7]).permutation(len(self.units))
        xs, ys, have = [], [], 0
        for index in order:
            x, labels = self.read_unit(self.units[index])
            xs.append(x)
            ys.append(labels)
            have += len(x)
            if have >= n:
                break
        x = np.concatenate(xs)
        pick = np.sort(np.random.default_rng([seed, 8]).permutation(len(x))[:n])
        labels = np.concatenate(ys)[pick] if self.labelled else None
        return to_training(x[pick]), None if labels is None else torch.from_numpy(labels)

    def display(self, path: str) -> str:
        """A path inside the filesystem as the user writes it (``s3://bucket/key``)."""
        scheme = self.uri.split("://", 1)[0] if "://" in self.uri else ""
        return f"{scheme}://{path}" if scheme and scheme != "file" else path

    def _where(self, unit: Unit) -> str:
        """How an error in ``unit`` names it: the file, and the row group where there are more."""
        one_file = len(self.units) == 1 or self.units[0].paths == self.units[-1].paths
        file = self.uri if one_file else self.display(unit.paths[0])
        return file if len(self.units) == 1 else f"{file} (row group {unit.row_group})"

    # -- decoding: rows -> training arrays -------------------------------------------------------
    def decode(self, table: pa.Table, where: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows of a Parquet table as ``(x, labels)``: points float32 ``(n, D)``; image lists
        float32 ``(n, C, H, W)`` in [-1, 1]; encoded images uint8 ``(n, C, H, W)`` (pixels, 4x
        smaller to ship between processes; ``to_training`` scales them). Bad rows raise
        ``DataError`` naming ``where`` and the row."""
        labels = self._labels(table, where) if self.labelled else None
        if self.layout == POINTS:
            return self._points(table, where), labels
        if self.layout == IMAGE_LISTS:
            return self._image_lists(table, where), labels
        column = table.column("image")
        if pa.types.is_struct(column.type):
            column = pc.struct_field(column, "bytes")
        if column.null_count:
            self.fail(f"column 'image' has {column.null_count} null images", where)
        blobs = column.to_pylist()
        names = [f"{where} row {i}" for i in range(len(blobs))]
        return self._decode_images(blobs, names), labels

    def decode_files(
        self, paths: list[str], blobs: list[bytes]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image files (their bytes) as uint8 ``(n, C, H, W)`` and, with classes, labels."""
        x = self._decode_images(blobs, [self.display(p) for p in paths])
        if not self.labelled:
            return x, None
        index = {name: i for i, name in enumerate(self.classes)}
        root = self.root.rstrip("/") + "/"
        labels = [index[p[len(root) :].split("/", 1)[0]] for p in paths]
        return x, np.asarray(labels, dtype=np.int64)

    def _decode_images(self, blobs: list[bytes], names: list[str]) -> np.ndarray:
        channels, side = self.shape[0], self.shape[1]
        out = np.empty((len(blobs), channels, side, side), dtype=np.uint8)
        for i, (blob, name) in enumerate(zip(blobs, names, strict=True)):
            out[i] = decode_image(blob, channels, side, self.pad, name, self.expected)
        return out

    def _points(self, table: pa.Table, where: str) -> np.ndarray:
        for name in self.columns:
            if name != "label" and table.column(name).null_count:
                count = table.column(name).null_count
                self.fail(f"column {name!r} has {count} null values", where)
        names = [n for n in self.columns if n != "label"]
        # A float64 beyond float32's range casts to inf, which _check_finite then names: the
        # overflow is the refusal's input, not a warning to print.
        with np.errstate(over="ignore"):
            points = np.stack([table.column(n).to_numpy().astype(np.float32) for n in names], 1)
        _check_finite(self, points, f"columns {names}", where)
        return points

    def _image_lists(self, table: pa.Table, where: str) -> np.ndarray:
        column = table.column("image")
        kind = column.type
        if column.null_count:
            self.fail(f"column 'image' has {column.null_count} null rows", where)
        lengths = pc.list_value_length(column).to_numpy()
        size = math.prod(self.shape)
        wrong = np.flatnonzero(lengths != size)
        if wrong.size:
            row = int(wrong[0])
            channels, side = self.shape[0], self.shape[1]
            self.fail(
                f"wrong-length image list: row {row} has {lengths[row]} values, not "
                f"channels*image_size^2 = {channels}*{side}^2 = {size} "
                f"({wrong.size} rows are wrong)",
                where,
            )
        flat = pc.list_flatten(column)
        if flat.null_count:
            self.fail(f"column 'image' has {flat.null_count} null pixel values", where)
        values = flat.to_numpy()
        if pa.types.is_integer(kind.value_type):
            if values.min() < 0 or values.max() > 255:
                low, high = values.min(), values.max()
                self.fail(f"integer pixels must be 0..255, found {low}..{high}", where)
            values = values / 127.5 - 1.0
        else:
            _check_finite(self, values.astype(np.float32), "column 'image'", where)
            if values.min() < -1 or values.max() > 1:
                low, high = values.min(), values.max()
                self.fail(f"float pixels must be in [-1, 1], found {low}..{high}", where)
        # astype copies: Arrow's buffers are read-only, and training wants writable memory.
        return values.astype(np.float32).reshape(-1, *self.shape)

    def _labels(self, table: pa.Table, where: str) -> np.ndarray:
        column = table.column("label")
        if column.null_count:
            self.fail(f"column 'label' has {column.null_count} null values", where)
        labels = column.to_numpy().astype(np.int64)
        if labels.size and labels.min() < 0:
            self.fail(f"column 'label' holds a negative label ({labels.min()})", where)
        return labels


def to_training(x: np.ndarray) -> Tensor:
    """Decoded rows as the float32 tensor training sees: uint8 pixels scaled to [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32) / 127.5 - 1.0
    return tensor.to(torch.float32)


def decode_image(
    blob: bytes, channels: int, side: int, pad: int = 0, name: str = "", expected: str = ""
) -> np.ndarray:
    """PNG/JPEG bytes as uint8 ``(channels, side, side)``: converted to grayscale (1) or RGB (3),
    ``pad`` pixels of black added on every side, the shorter side resized to ``side`` and the
    centre cropped square. Undecodable bytes raise ``DataError`` naming ``name``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as opened:
            if opened.mode in _WIDE_MODES:
                # 16-bit grayscale PNG: Pillow's convert("L") clips at 255 instead of scaling.
                wide = np.asarray(opened, dtype=np.float64) / 257.0
                opened = Image.fromarray(wide.round().clip(0, 255).astype(np.uint8), "L")
            image = opened.convert("L" if channels == 1 else "RGB")
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
        SyntaxError,
    ) as exc:
        raise DataError(name, f"cannot decode the image ({exc})", expected) from None
    if pad:
        image = ImageOps.expand(image, border=pad, fill=0)
    if image.size != (side, side):
        width, height = image.size
        scale = side / min(width, height)
        size = (max(side, round(width * scale)), max(side, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = (size[0] - side) // 2, (size[1] - side) // 2
        image = image.crop((left, top, left + side, top + side))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


# Pillow modes of 16-bit grayscale images (PNG allows 16 bits per sample at most).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")


def _check_finite(data: FileData, values: np.ndarray, what: str, where: str) -> None:
    # float32 is what training sees, so a float64 too large for it counts as Inf too.
    bad = ~np.isfinite(values)
    if bad.any():
        data.fail(f"{what} hold {int(bad.sum())} NaN/Inf values (or values beyond float32)", where)


def _read_files(filesystem: pafs.FileSystem, paths: tuple[str, ...] | list[str]) -> list[bytes]:
    def read(path: str) -> bytes:
        with filesystem.open_input_file(path) as handle:
            return handle.read()

    # Object stores answer one small GET at a time slowly; a few in flight hide the latency.
    with ThreadPoolExecutor(min(_READ_THREADS, max(len(paths), 1))) as pool:
        return list(pool.map(read, paths))


# -- opening: what is at data.path, checked ----------------------------------------------------


def resolve_filesystem(path: str, expected: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it; ``s3://`` honours AWS_ENDPOINT_URL."""
    try:
        if "://" in path:
            return pafs.FileSystem.from_uri(path)
        return pafs.LocalFileSystem(), os.path.abspath(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise DataError(path, f"cannot open it ({exc})", expected) from None


def open_file_data(
    cfg: DataConfig, check: bool = True, filesystem: pafs.FileSystem | None = None
) -> FileData:
    """Look at ``cfg.path`` and describe it; anything unusable raises ``DataError`` naming the
    path, the problem and the expected layout. Reads metadata and, with ``check``, decodes the
    first unit (every unit of a data set under CHECK_ALL_BYTES on disk), not the data set.

    ``filesystem`` serves a ``scheme://`` path (the service passes its S3 filesystem, with the
    storage's endpoint and credentials); without it ``FileSystem.from_uri`` picks one."""
    if cfg.name == "image_folder":
        expected = _FOLDER_SCHEMA
    elif cfg.image_size > 0:
        expected = _image_schema(cfg.channels * cfg.image_size**2)
    else:
        expected = _POINTS_SCHEMA
    if filesystem is not None and "://" in cfg.path:
        root = cfg.path.split("://", 1)[1].rstrip("/")
    else:
        filesystem, root = resolve_filesystem(cfg.path, expected)
    try:
        info = filesystem.get_file_info(root)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(cfg.path, f"cannot open it ({exc})", expected) from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(cfg.path, _not_found(filesystem, root), expected)
    data = FileData(
        uri=cfg.path,
        filesystem=filesystem,
        root=root,
        layout=IMAGE_FILES,
        shape=(cfg.channels, cfg.image_size, cfg.image_size),
        units=[],
        columns=[],
        labelled=False,
        pad=cfg.pad,
        cache_mb=cfg.cache_mb,
        expected=expected,
    )
    if cfg.name == "image_folder":
        _describe_folder(data, info, cfg)
        total = sum(len(u.paths) for u in data.units) * 2**14  # ~16 KiB a file: a guess
    else:
        total = _describe_parquet(data, info, cfg)
    checked = data.units if total <= CHECK_ALL_BYTES else data.units[:1]
    for unit in checked if check else []:
        data.read_unit(unit)
    return data


def _describe_folder(data: FileData, info: pafs.FileInfo, cfg: DataConfig) -> None:
    if cfg.channels not in (1, 3):
        data.fail(f"data.channels={cfg.channels} cannot be decoded; allowed: 1 or 3")
    if info.type != pafs.FileType.Directory:
        data.fail("it is a file, not a folder")
    root = data.root.rstrip("/")
    selector = pafs.FileSelector(root, recursive=True)
    images = sorted(
        f.path
        for f in data.filesystem.get_file_info(selector)
        if f.type == pafs.FileType.File
        and f.path.lower().endswith(IMAGE_SUFFIXES)
        and not any(p.startswith((".", "_")) for p in f.path[len(root) + 1 :].split("/"))
    )
    if not images:
        data.fail(f"the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    relative = [p[len(root) + 1 :] for p in images]
    if all(r.count("/") >= 1 for r in relative):
        data.classes = sorted({r.split("/", 1)[0] for r in relative})
        data.labelled = True
    data.units = [
        Unit(tuple(images[i : i + FILES_PER_UNIT]), -1, len(images[i : i + FILES_PER_UNIT]))
        for i in range(0, len(images), FILES_PER_UNIT)
    ]


def _describe_parquet(data: FileData, info: pafs.FileInfo, cfg: DataConfig) -> int:
    """Fill in layout, shape, columns and units from the files' metadata; returns their bytes."""
    if info.type == pafs.FileType.File:
        if info.size == 0:
            data.fail("the file is empty (0 bytes)")
        files = [(data.root, info.size)]
    else:
        files = _data_files(data.filesystem, data.root)
        if not files:
            data.fail("the folder holds no data files (names starting with '_' or '.' are skipped)")
    schema = None
    for path, _ in files:
        where = data.uri if len(files) == 1 else data.display(path)
        try:
            with data.filesystem.open_input_file(path) as handle:
                meta = pq.ParquetFile(handle).metadata
        except (OSError, pa.ArrowException) as exc:
            data.fail(f"cannot read it as Parquet ({exc})", where)
        file_schema = meta.schema.to_arrow_schema()
        if schema is None:
            schema = file_schema
            _layout(data, schema, cfg)
        elif not file_schema.equals(schema):
            first = data.display(files[0][0])
            data.fail(f"its schema differs from {first}'s ({file_schema} vs {schema})", where)
        data.units += [
            Unit((path,), i, meta.row_group(i).num_rows)
            for i in range(meta.num_row_groups)
            if meta.row_group(i).num_rows > 0
        ]
    if not data.units:
        data.fail("it holds no rows")
    return sum(size for _, size in files)


def _layout(data: FileData, schema: pa.Schema, cfg: DataConfig) -> None:
    names = schema.names
    if "label" in names:
        if not pa.types.is_integer(schema.field("label").type):
            data.fail(f"column 'label' has type {schema.field('label').type}, not int")
        data.labelled = True
    if cfg.image_size == 0:
        coordinates = [n for n in names if n != "label"]
        other = [
            f"{n} ({schema.field(n).type})"
            for n in coordinates
            if not _is_number(schema.field(n).type)
        ]
        if other:
            hint = " (set data.image_size for an image column)" if "image" in names else ""
            data.fail(f"non-numeric columns: {', '.join(other)}{hint}")
        if not coordinates:
            data.fail(f"no usable columns: no numeric column besides 'label' in {names}")
        data.layout, data.shape = POINTS, (len(coordinates),)
        data.columns = coordinates + (["label"] if data.labelled else [])
        return
    if "image" not in names:
        data.fail(f"no usable columns: no 'image' column among {names}")
    kind = schema.field("image").type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        if not _is_number(kind.value_type):
            data.fail(f"column 'image' has non-numeric values of type {kind.value_type}")
        data.layout = IMAGE_LISTS
    elif _is_binary(kind) or (
        pa.types.is_struct(kind)
        and kind.get_field_index("bytes") >= 0
        and _is_binary(kind.field("bytes").type)
    ):
        if cfg.channels not in (1, 3):
            data.fail(f"data.channels={cfg.channels} cannot be decoded; allowed: 1 or 3")
        data.layout = ENCODED
    else:
        data.fail(f"column 'image' has type {kind}, not a list of numbers or image bytes")
    data.columns = ["image"] + (["label"] if data.labelled else [])


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


def _data_files(filesystem: pafs.FileSystem, folder: str) -> list[tuple[str, int]]:
    """Files under ``folder`` that pyarrow's dataset reader reads (it skips '_' and '.' names)."""
    selector = pafs.FileSelector(folder, recursive=True)
    return sorted(
        (info.path, info.size)
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File
        and not any(
            part.startswith(("_", "."))
            for part in info.path[len(folder.rstrip("/")) + 1 :].split("/")
        )
    )


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
