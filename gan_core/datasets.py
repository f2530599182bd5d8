"""Turn image data sets into the Parquet or image-folder layout raygan reads, from the shell.

    python -m gan_core.datasets fashion-mnist --out PATH_OR_S3_URI [--split train|test|all]
    python -m gan_core.datasets digits --out PATH_OR_S3_URI [--size S] [--copies K] ...

The Parquet layout is the one Hugging Face ``datasets`` uses for images: a column ``image`` of
``struct<bytes: binary, path: string>`` holding PNG bytes, an int64 column ``label``, and row groups
of a bounded number of rows so readers can stream the file. ``--format folder`` writes
``OUT/<class name>/<index>.png`` instead. Outputs go to a local path or an ``s3://bucket/key`` URI.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (the original gzip IDX files);
the digits are scikit-learn's bundled 8x8 images, optionally upsampled and multiplied into a large
data set by jittered, noisy copies. Both are generated and written one chunk at a time, so memory
stays flat however many rows are written.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from gan_core.data import DIGIT_SPLITS, load_digits

FASHION_CLASSES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_SPLITS = ("train", "test", "all")
_FASHION_FILES = {"train": "train", "test": "t10k"}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049
_GZIP_MAGIC = b"\x1f\x8b"

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([("image", IMAGE_TYPE), ("label", pa.int64())])
DEFAULT_ROWS_PER_GROUP = 1000
# Digit chunks hold at most this many pixels (a few MiB of uint8, plus the float32 noise), so
# memory stays flat for any --size and --copies.
_CHUNK_PIXELS = 1 << 22
_FASHION_CHUNK = 10_000
USAGE_ERROR = 2


class SourceError(ValueError):
    """Input data that is missing or corrupt; the message names the file or folder."""


# --- reading ------------------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
    """One IDX file (gzipped or not) as uint8: images ``(n, rows, cols)`` or labels ``(n,)``.

    Only the two unsigned-byte kinds MNIST-style data sets use are accepted (magic 2051: images,
    2049: labels). A wrong magic number, a truncated file or trailing bytes raise ``SourceError``
    naming the file.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        # Decide by content, not by name: a renamed or already unpacked file still reads.
        data = gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{path}: cannot read it as a gzip IDX file ({exc})") from None
    if len(data) < 8:
        raise SourceError(f"{path}: {len(data)} bytes is too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic == _IDX_IMAGES:
        if len(data) < 16:
            raise SourceError(f"{path}: {len(data)} bytes is too short for an IDX image header")
        shape = tuple(int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
        header = 16
    elif magic == _IDX_LABELS:
        shape, header = (int.from_bytes(data[4:8], "big"),), 8
    else:
        raise SourceError(
            f"{path}: magic number {magic} is not an IDX uint8 file; expected "
            f"{_IDX_IMAGES} (images) or {_IDX_LABELS} (labels)"
        )
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        dims = " x ".join(map(str, shape))
        raise SourceError(
            f"{path}: the header promises {dims} = {expected} bytes of data but the file holds "
            f"{len(data) - header} (truncated or corrupt)"
        )
    # A copy, so callers get an ordinary writable array rather than a view of the read buffer.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def fashion_mnist(split: str, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``(n, 28, 28)`` uint8 and labels ``(n,)`` int64 from the IDX files.

    ``split`` is "train" (60,000), "test" (the 10,000 t10k images) or "all" (train first). The
    files are looked up in ``source``, else ``$RAYGAN_FASHION_MNIST_DIR``, else Debian's
    ``/usr/share/datasets/fashion-mnist``; missing or corrupt files raise ``SourceError``.
    """
    if split not in FASHION_SPLITS:
        raise ValueError(f"fashion_mnist: split={split!r} is invalid; allowed: {FASHION_SPLITS}")
    folder = source or os.environ.get("RAYGAN_FASHION_MNIST_DIR") or FASHION_MNIST_DIR
    parts = ["train", "test"] if split == "all" else [split]
    names = [
        f"{_FASHION_FILES[part]}-{kind}-ubyte.gz"
        for part in parts
        for kind in ("images-idx3", "labels-idx1")
    ]
    missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise SourceError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}): install it with "
            f"`apt-get update && apt-get install dataset-fashion-mnist` (as root), or point "
            f"--source or RAYGAN_FASHION_MNIST_DIR at a folder holding the IDX files"
        )
    images, labels = [], []
    for part in parts:
        stem = os.path.join(folder, _FASHION_FILES[part])
        x = _read_idx_kind(f"{stem}-images-idx3-ubyte.gz", images=True)
        y = _read_idx_kind(f"{stem}-labels-idx1-ubyte.gz", images=False)
        if x.shape[1:] != (28, 28):
            raise SourceError(f"{stem}-images-idx3-ubyte.gz: images are {x.shape[1:]}, not 28x28")
        if len(x) != len(y):
            raise SourceError(f"{stem}-*: {len(x)} images but {len(y)} labels")
        if y.size and y.max() >= len(FASHION_CLASSES):
            raise SourceError(f"{stem}-labels-idx1-ubyte.gz: label {y.max()} is not in 0..9")
        images.append(x)
        labels.append(y.astype(np.int64))
    if len(parts) == 1:
        return images[0], labels[0]
    return np.concatenate(images), np.concatenate(labels)


def _read_idx_kind(path: str, images: bool) -> np.ndarray:
    array = read_idx(path)
    if (array.ndim == 3) != images:
        want, got = ("images", "labels") if images else ("labels", "images")
        raise SourceError(f"{path}: holds IDX {got}, expected {want}")
    return array


def digit_images(
    split: str = "all",
    size: int = 8,
    copies: int = 1,
    jitter: int = 0,
    noise: float = 0.0,
    seed: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as chunks of uint8 images ``(n, size, size)`` and int64 labels.

    Pixels are ``load_digits(split)`` mapped to 0..255, upsampled to ``size`` with Pillow's
    bilinear filter. ``copies`` passes over the split follow one another; pass 0 is the clean
    images, every later image is shifted by a random whole number of pixels in
    ``[-jitter, jitter]`` along each axis (the uncovered border is 0) and gets Gaussian noise of
    std ``noise`` (0..255 units, rounded and clipped). The same arguments always give the same
    pixels, and chunks are generated lazily, so a huge ``copies`` costs no memory.
    """
    if split not in DIGIT_SPLITS:
        raise ValueError(f"digit_images: split={split!r} is invalid; allowed: {DIGIT_SPLITS}")
    for name, value, least in (("size", size, 1), ("copies", copies, 1), ("jitter", jitter, 0)):
        if value < least:
            raise ValueError(f"digit_images: {name}={value} must be >= {least}")
    if not noise >= 0 or not np.isfinite(noise):
        raise ValueError(f"digit_images: noise={noise} must be a finite number >= 0")
    if seed < 0:
        raise ValueError(f"digit_images: seed={seed} must be >= 0")
    return _digit_chunks(split, size, copies, jitter, float(noise), seed)


def _digit_chunks(
    split: str, size: int, copies: int, jitter: int, noise: float, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    images, labels = load_digits(split)
    base = np.rint((images[:, 0].numpy().astype(np.float64) + 1.0) * 127.5).astype(np.uint8)
    if size != base.shape[1]:
        base = np.stack(
            [np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)) for img in base]
        )
    labels = labels.numpy().astype(np.int64)
    n = len(labels)
    rows = max(1, min(n, _CHUNK_PIXELS // (size * size)))
    for copy in range(copies):
        for chunk, start in enumerate(range(0, n, rows)):
            clean = base[start : start + rows]
            if copy == 0:
                yield clean, labels[start : start + rows]
                continue
            # One stream per (seed, pass, chunk): a chunk's pixels never depend on how many
            # chunks were drawn before it, so --limit and chunking cannot change an image.
            rng = np.random.default_rng([seed, copy, chunk])
            yield _jittered(clean, rng, jitter, noise), labels[start : start + rows]


def _jittered(clean: np.ndarray, rng: np.random.Generator, jitter: int, noise: float) -> np.ndarray:
    n, size = clean.shape[0], clean.shape[1]
    shift = rng.integers(-jitter, jitter + 1, size=(n, 2))
    # out[y, x] = clean[y - dy, x - dx]: padding by `jitter` zeros turns every shift into a
    # window of the padded image, gathered for the whole chunk at once.
    padded = np.pad(clean, ((0, 0), (jitter, jitter), (jitter, jitter)))
    grid = np.arange(size)
    rows = (jitter - shift[:, 0])[:, None, None] + grid[None, :, None]
    cols = (jitter - shift[:, 1])[:, None, None] + grid[None, None, :]
    shifted = padded[np.arange(n)[:, None, None], rows, cols]
    if noise == 0:
        return shifted
    noisy = shifted + noise * rng.standard_normal(shifted.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# --- writing ------------------------------------------------------------------------------------


def write_image_parquet(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    out: str,
    rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Write image chunks as PNG rows of one Parquet file, ``rows_per_group`` rows per row group.

    Each chunk is uint8 images ``(n, H, W)`` (grayscale) or ``(n, H, W, 3)`` (RGB) and ``n``
    integer labels. Chunks are consumed one at a time and every full row group is written as soon
    as it is encoded, so memory holds at most one chunk and one row group. ``out`` is a local path
    (parent folders are created) or a URI such as ``s3://bucket/key``. ``class_names`` are recorded
    in the Hugging Face schema metadata. On an error the partial file is removed. Returns
    ``{"rows", "row_groups", "bytes", "uri"}``.
    """
    if rows_per_group < 1:
        raise ValueError(f"rows_per_group={rows_per_group} must be >= 1")
    filesystem, where = _open_filesystem(out)
    sink = filesystem.open_output_stream(where)
    rows = groups = 0
    writer = None
    try:
        writer = pq.ParquetWriter(sink, _schema_with_features(class_names))
        pending: list[bytes] = []
        pending_labels: list[int] = []
        for images, labels in chunks:
            for image, label in zip(*_check_chunk(images, labels, class_names), strict=True):
                pending.append(_png(image))
                pending_labels.append(int(label))
                if len(pending) == rows_per_group:
                    writer.write_table(_table(pending, pending_labels), row_group_size=len(pending))
                    rows, groups = rows + len(pending), groups + 1
                    pending, pending_labels = [], []
        if pending:
            writer.write_table(_table(pending, pending_labels), row_group_size=len(pending))
            rows, groups = rows + len(pending), groups + 1
        writer.close()
        size = sink.tell()
        sink.close()
    except BaseException:
        # The writer's footer would make a truncated data set read without complaint, so the
        # partial file is removed (the writer is closed first, or it would try again when
        # garbage-collected, on a closed stream).
        _remove_quietly(filesystem, where, [writer.close] if writer else [], sink)
        raise
    return {"rows": rows, "row_groups": groups, "bytes": size, "uri": _shown(out, where)}


def write_image_folder(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    out: str,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Write image chunks as ``out/<class name>/<index>.png``, one subfolder per label.

    ``index`` is the row's position in the whole stream (zero-padded to 6 digits), so a file maps
    back to the same row of the Parquet layout. Class names default to the label itself ("0",
    "1", ...). ``out`` is a local folder or a URI prefix such as ``s3://bucket/prefix``; it must
    not hold files already, since stale images would silently join the data set. Returns
    ``{"rows", "classes", "bytes", "uri"}`` with ``bytes`` the total size of the PNG files.
    """
    filesystem, where = _open_filesystem(out, folder=True)
    where = where.rstrip("/")
    if _has_files(filesystem, where):
        raise FileExistsError(f"{out} already holds files; write the image folder to a new place")
    local = isinstance(filesystem, pafs.LocalFileSystem)
    rows = size = 0
    classes: set[str] = set()
    for images, labels in chunks:
        for image, label in zip(*_check_chunk(images, labels, class_names), strict=True):
            name = class_names[label] if class_names is not None else str(label)
            if name not in classes and local:
                # Object stores have no folders; on them a folder marker would be a stray key.
                filesystem.create_dir(f"{where}/{name}", recursive=True)
            classes.add(name)
            data = _png(image)
            with filesystem.open_output_stream(f"{where}/{name}/{rows:06d}.png") as stream:
                stream.write(data)
            rows, size = rows + 1, size + len(data)
    return {"rows": rows, "classes": len(classes), "bytes": size, "uri": _shown(out, where)}


def _open_filesystem(out: str, folder: bool = False) -> tuple[pafs.FileSystem, str]:
    if "://" in out:
        filesystem, where = pafs.FileSystem.from_uri(out)
    else:
        filesystem, where = pafs.LocalFileSystem(), os.path.abspath(out)
    if isinstance(filesystem, pafs.LocalFileSystem):
        os.makedirs(where if folder else os.path.dirname(where), exist_ok=True)
    return filesystem, where


def _shown(out: str, where: str) -> str:
    return out if "://" in out else where


def _has_files(filesystem: pafs.FileSystem, folder: str) -> bool:
    selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
    return any(info.type == pafs.FileType.File for info in filesystem.get_file_info(selector))


def _remove_quietly(
    filesystem: pafs.FileSystem, where: str, closers: list[Callable[[], None]], sink: pa.NativeFile
) -> None:
    # Best effort: the error that got us here is the one worth reporting, not a cleanup failure.
    for step in [*closers, sink.close, lambda: filesystem.delete_file(where)]:
        try:
            step()
        except (OSError, pa.ArrowException):
            pass


def _check_chunk(
    images: np.ndarray, labels: np.ndarray, class_names: list[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    rgb = images.ndim == 4 and images.shape[3] == 3
    if images.dtype != np.uint8 or not (images.ndim == 3 or rgb):
        raise ValueError(
            f"images must be uint8 (n, H, W) or (n, H, W, 3); got {images.dtype} {images.shape}"
        )
    if (
        labels.ndim != 1
        or len(labels) != len(images)
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise ValueError(
            f"labels must be {len(images)} integers, one per image; got {labels.dtype} "
            f"{labels.shape}"
        )
    if (
        class_names is not None
        and labels.size
        and (labels.min() < 0 or labels.max() >= len(class_names))
    ):
        raise ValueError(
            f"labels {labels.min()}..{labels.max()} do not index the {len(class_names)} class names"
        )
    return images, labels.astype(np.int64)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _table(pngs: list[bytes], labels: list[int]) -> pa.Table:
    image = pa.StructArray.from_arrays(
        [pa.array(pngs, pa.binary()), pa.nulls(len(pngs), pa.string())], fields=list(IMAGE_TYPE)
    )
    return pa.Table.from_arrays([image, pa.array(labels, pa.int64())], schema=SCHEMA)


def _schema_with_features(class_names: list[str] | None) -> pa.Schema:
    # The Hugging Face feature metadata makes `datasets` decode the column as images and map
    # labels to names; readers that do not know it see the plain struct.
    label = (
        {"names": list(class_names), "_type": "ClassLabel"}
        if class_names is not None
        else {"dtype": "int64", "_type": "Value"}
    )
    features = {"image": {"_type": "Image"}, "label": label}
    return SCHEMA.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def _slices(
    images: np.ndarray, labels: np.ndarray, rows: int = _FASHION_CHUNK
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(labels), rows):
        yield images[start : start + rows], labels[start : start + rows]


def _take(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], limit: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The first ``limit`` rows; stops drawing chunks once they are reached."""
    if limit is None:
        yield from chunks
        return
    left = limit
    for images, labels in chunks:
        yield images[:left], labels[:left]
        left -= len(labels[:left])
        if left <= 0:
            return


# --- command line -------------------------------------------------------------------------------


def _int_at_least(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (np.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gan_core.datasets", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{fashion-mnist,digits}")
    fashion = sub.add_parser("fashion-mnist", help="Fashion-MNIST from Debian's IDX files")
    fashion.add_argument("--split", choices=FASHION_SPLITS, default="train")
    fashion.add_argument(
        "--source",
        help=f"folder of the IDX files (default: $RAYGAN_FASHION_MNIST_DIR or {FASHION_MNIST_DIR})",
    )
    digits = sub.add_parser("digits", help="scikit-learn's 8x8 digits, optionally multiplied")
    digits.add_argument("--split", choices=DIGIT_SPLITS, default="all")
    digits.add_argument("--size", type=_int_at_least(1), default=8, help="upsample to SxS")
    digits.add_argument("--copies", type=_int_at_least(1), default=1, help="passes over the split")
    digits.add_argument(
        "--jitter", type=_int_at_least(0), default=0, help="max shift in pixels (passes > 0)"
    )
    digits.add_argument(
        "--noise", type=_non_negative_float, default=0.0, help="pixel noise std, 0..255 units"
    )
    digits.add_argument("--seed", type=_int_at_least(0), default=0)
    for command in (fashion, digits):
        command.add_argument("--out", required=True, help="local path or s3://bucket/key")
        command.add_argument("--format", choices=("parquet", "folder"), default="parquet")
        command.add_argument(
            "--rows-per-group",
            type=_int_at_least(1),
            default=DEFAULT_ROWS_PER_GROUP,
            help="rows per Parquet row group (parquet only)",
        )
        command.add_argument("--limit", type=_int_at_least(1), help="keep only the first N rows")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad arguments or missing input)."""
    args = _parser().parse_args(argv)
    try:
        if args.dataset == "fashion-mnist":
            images, labels = fashion_mnist(args.split, args.source)
            chunks: Iterable[tuple[np.ndarray, np.ndarray]] = _slices(images, labels)
            class_names = FASHION_CLASSES
        else:
            chunks = digit_images(
                args.split, args.size, args.copies, args.jitter, args.noise, args.seed
            )
            class_names = DIGIT_CLASSES
        chunks = _take(chunks, args.limit)
        if args.format == "parquet":
            result = write_image_parquet(chunks, args.out, args.rows_per_group, class_names)
            what = f"{result['row_groups']} row groups"
        else:
            result = write_image_folder(chunks, args.out, class_names)
            what = f"{result['classes']} class folders"
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except (OSError, pa.ArrowException) as exc:
        problem = " ".join(str(exc).split())  # Arrow's messages may span lines
        print(f"error: cannot write {args.out}: {problem}", file=sys.stderr)
        return 1
    print(
        f"wrote {result['rows']} rows in {what}, {result['bytes']} bytes "
        f"({result['bytes'] / 2**20:.1f} MiB), to {result['uri']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
