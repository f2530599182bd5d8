"""Tests for gan_core.files: what open_file_data accepts and refuses (Parquet points, pixel lists,
encoded PNG/JPEG images, image folders; local and s3-like URIs), how rows decode, and the
deterministic, resumable, rank-sharded FileStream. Fixtures are tiny files written here."""

from __future__ import annotations

import io
import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gan_core import files
from gan_core.config import DataConfig
from gan_core.data import load_digits
from gan_core.files import (
    ENCODED,
    IMAGE_FILES,
    IMAGE_LISTS,
    POINTS,
    DataError,
    FileData,
    decode_image,
    open_file_data,
    to_training,
)
from gan_core.filestream import FileStream

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def digits_u8(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` 8x8 digits as uint8 pixels ``(n, 1, 8, 8)`` and their labels."""
    images, labels = load_digits("all")
    pixels = np.round((images[:n].numpy() + 1) * 127.5).astype(np.uint8)
    return pixels, labels[:n].numpy()


def encode(pixels: np.ndarray, fmt: str = "PNG", **options: int) -> bytes:
    """A uint8 ``(H, W)`` or ``(H, W, 3)`` array as image-file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write(path: Path, columns: dict, row_group_size: int | None = None) -> str:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


def write_hf(path: Path, blobs: list[bytes], labels: list[int] | None = None) -> str:
    """Encoded images the way Hugging Face ``datasets`` stores them: struct<bytes, path>."""
    images = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)], HF_IMAGE)
    return write(path, {"image": images, **({"label": labels} if labels is not None else {})})


def open_data(path: str, image_size: int = 0, **fields: object) -> FileData:
    name = str(fields.pop("name", "parquet"))
    return open_file_data(DataConfig(name=name, path=path, image_size=image_size, **fields))


def points_file(path: Path, sizes: list[int], labels: bool = False) -> str:
    """Points x = 0, 1, 2, ... (one unique value per row), one row group per size."""
    total = sum(sizes)
    table = pa.table(
        {
            "x": np.arange(total, dtype=np.float64),
            **({"label": np.arange(total) % 7} if labels else {}),
        }
    )
    with pq.ParquetWriter(path, table.schema) as writer:
        start = 0
        for size in sizes:
            writer.write_table(table.slice(start, size))
            start += size
    return str(path)


# --- errors --------------------------------------------------------------------------------------


def _error_case(tmp_path: Path, case: str) -> tuple[str, int]:
    """Write a broken dataset; return its path and the image_size to open it with."""
    file = tmp_path / f"{case}.parquet"
    if case == "missing":
        return str(tmp_path / "nowhere" / "x.parquet"), 0
    if case == "empty file":
        file.write_bytes(b"")
        return str(file), 0
    if case == "no rows":
        return write(file, {"x": pa.array([], pa.float32())}), 0
    if case == "no usable columns":
        return write(file, {"label": [1, 2]}), 0
    if case == "no image column":
        return write(file, {"pixels": [[0.0] * 4]}), 2
    if case == "wrong-length":
        return write(file, {"image": [[0.0] * 4, [0.0] * 3]}), 2
    if case == "non-numeric":
        return write(file, {"x": [1.0], "name": ["a"]}), 0
    if case == "non-numeric image":
        return write(file, {"image": [["a"] * 4]}), 2
    if case == "image of another type":
        return write(file, {"image": ["a string"]}), 2
    if case == "nan":
        return write(file, {"x": [1.0, float("nan")]}), 0
    if case == "beyond float32":
        return write(file, {"x": [1.0, 1e300]}), 0
    if case == "inf":
        return write(file, {"image": [[0.0, 0.0, 0.0, float("inf")]]}), 2
    if case == "out of range floats":
        return write(file, {"image": [[0.0, 0.0, 0.0, 2.0]]}), 2
    if case == "out of range ints":
        return write(file, {"image": pa.array([[0, 0, 0, 300]], pa.list_(pa.int16()))}), 2
    if case == "nulls":
        return write(file, {"x": [1.0, None]}), 0
    if case == "null image rows":
        return write(file, {"image": [[0.0] * 4, None]}), 2
    if case == "null pixels":
        return write(file, {"image": [[0.0, None, 0.0, 0.0]]}), 2
    if case == "float labels":
        return write(file, {"x": [1.0], "label": [0.5]}), 0
    if case == "null labels":
        return write(file, {"x": [1.0, 2.0], "label": [1, None]}), 0
    if case == "negative labels":
        return write(file, {"x": [1.0, 2.0], "label": [3, -2]}), 0
    if case == "not parquet":
        file.write_text("not parquet")
        return str(file), 0
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("missing", "no such file or folder"),
        ("empty file", "the file is empty (0 bytes)"),
        ("no rows", "it holds no rows"),
        ("no usable columns", "no usable columns"),
        ("no image column", "no usable columns: no 'image' column among ['pixels']"),
        ("wrong-length", "wrong-length image list: row 1 has 3 values, not"),
        ("non-numeric", "non-numeric columns: name (string)"),
        ("non-numeric image", "column 'image' has non-numeric values of type string"),
        ("image of another type", "column 'image' has type string, not a list of numbers"),
        ("nan", "columns ['x'] hold 1 NaN/Inf values"),
        ("beyond float32", "hold 1 NaN/Inf values (or values beyond float32)"),
        ("inf", "column 'image' hold 1 NaN/Inf"),
        ("out of range floats", "float pixels must be in [-1, 1], found 0.0..2.0"),
        ("out of range ints", "integer pixels must be 0..255, found 0..300"),
        ("nulls", "column 'x' has 1 null values"),
        ("null image rows", "column 'image' has 1 null rows"),
        ("null pixels", "column 'image' has 1 null pixel values"),
        ("float labels", "column 'label' has type double, not int"),
        ("null labels", "column 'label' has 1 null values"),
        ("negative labels", "column 'label' holds a negative label (-2)"),
        ("not parquet", "cannot read it as Parquet"),
    ],
)
def test_bad_parquet_is_refused_naming_path_problem_and_schema(
    tmp_path: Path, case: str, problem: str
) -> None:
    path, image_size = _error_case(tmp_path, case)
    with pytest.raises(DataError) as info:
        open_data(path, image_size)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert problem in message
    schema = "a column 'image' of list<" if image_size else "one or more numeric (float or int)"
    assert "; expected " in message and schema in message
    assert isinstance(info.value, ValueError) and info.value.path == path
    assert info.value.problem in message and info.value.expected in message


def test_wrong_length_message_spells_out_the_expected_count(tmp_path: Path) -> None:
    path = write(tmp_path / "w.parquet", {"image": [[0.0] * 12, [0.0] * 5, [0.0] * 7]})
    with pytest.raises(DataError) as info:
        open_data(path, 2, channels=3)
    assert "row 1 has 5 values, not channels*image_size^2 = 3*2^2 = 12 (2 rows are wrong)" in str(
        info.value
    )
    assert "= 12 values per row" in info.value.expected


def test_an_image_column_read_as_points_hints_at_image_size(tmp_path: Path) -> None:
    path = write(tmp_path / "img.parquet", {"image": [[0.0] * 4]})
    with pytest.raises(DataError, match=r"\(set data.image_size for an image column\)"):
        open_data(path)


# --- points --------------------------------------------------------------------------------------


def test_points_keep_int_and_float_columns_in_order_with_labels_on_their_rows(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "points.parquet",
        {"x": [1.0, 2.0, 3.0], "label": [10, 11, 12], "y": pa.array([-4, 5, 6], pa.int32())},
    )
    data = open_data(path)
    assert (data.layout, data.kind, data.shape) == (POINTS, "points", (2,))
    assert data.columns == ["x", "y", "label"] and data.labelled and data.num_rows == 3
    x, labels = data.read_all()
    assert x.dtype == np.float32 and x.tolist() == [[1.0, -4.0], [2.0, 5.0], [3.0, 6.0]]
    assert labels is not None and labels.dtype == np.int64 and labels.tolist() == [10, 11, 12]
    # 12 bytes of float32 coordinates and an 8-byte label per row.
    assert data.decoded_bytes == 3 * (2 * 4 + 8)


def test_labels_travel_with_their_rows_through_the_reference(tmp_path: Path) -> None:
    data = open_data(points_file(tmp_path / "p.parquet", [30, 30, 40], labels=True))
    x, labels = data.reference(50, seed=3)
    assert labels is not None and x.shape == (50, 1) and len(set(x[:, 0].tolist())) == 50
    assert torch.equal(x[:, 0].long() % 7, labels)


def test_a_folder_of_parquet_files_is_read_in_name_order_skipping_hidden_files(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "parts"
    (folder / "sub").mkdir(parents=True)
    write(folder / "part-1.parquet", {"x": [3.0, 4.0, 5.0]})
    write(folder / "part-0.parquet", {"x": [1.0, 2.0]})
    write(folder / "sub" / "part-2.parquet", {"x": [6.0]})
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-0.parquet.crc").write_text("checksum")
    data = open_data(str(folder))
    assert data.files == [str(folder / n) for n in ("part-0.parquet", "part-1.parquet")] + [
        str(folder / "sub" / "part-2.parquet")
    ]
    assert [u.rows for u in data.units] == [2, 3, 1] and data.num_rows == 6
    assert data.read_all()[0][:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_files_of_a_folder_must_share_one_schema(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    write(folder / "a.parquet", {"x": [1.0]})
    write(folder / "b.parquet", {"x": [1.0], "y": [2.0]})
    with pytest.raises(DataError) as info:
        open_data(str(folder))
    assert info.value.path == str(folder / "b.parquet")
    assert f"its schema differs from {folder / 'a.parquet'}'s" in str(info.value)


def test_an_empty_folder_holds_no_data_files(tmp_path: Path) -> None:
    (tmp_path / "empty" / "_temporary").mkdir(parents=True)
    (tmp_path / "empty" / "_temporary" / "x.parquet").write_text("")
    with pytest.raises(DataError, match="the folder holds no data files"):
        open_data(str(tmp_path / "empty"))


def test_file_uris_are_opened_through_pyarrow_and_named_as_plain_paths(tmp_path: Path) -> None:
    path = write(tmp_path / "uri.parquet", {"x": [7.0]})
    data = open_data(f"file://{path}")
    assert isinstance(data.filesystem, pafs.LocalFileSystem) and data.root == path
    assert data.read_all()[0].tolist() == [[7.0]] and data.display(data.root) == path
    folder = tmp_path / "parts"
    folder.mkdir()
    write(folder / "a.parquet", {"x": [1.0]})
    write(folder / "b.parquet", {"x": [float("inf")]})
    with pytest.raises(DataError) as info:
        open_data(f"file://{folder}")
    assert info.value.path == f"{folder / 'b.parquet'} (row group 0)"


def s3_spy(monkeypatch: pytest.MonkeyPatch, bucket_root: Path) -> list[str]:
    """Make gan_core.files see ``s3://bucket/...`` as ``bucket_root/bucket/...``, through
    ``pafs.FileSystem.from_uri``; returns the URIs it was asked for."""
    seen: list[str] = []

    class SpyFileSystem:
        @staticmethod
        def from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
            seen.append(uri)
            assert uri.startswith("s3://")
            local = pafs.SubTreeFileSystem(str(bucket_root), pafs.LocalFileSystem())
            return local, uri[len("s3://") :]

    # Only gan_core.files sees the spy; pyarrow itself keeps its real FileSystem class.
    spy = SimpleNamespace(**{k: getattr(pafs, k) for k in dir(pafs) if not k.startswith("__")})
    spy.FileSystem = SpyFileSystem
    monkeypatch.setattr(files, "pafs", spy)
    return seen


def test_s3_uris_go_through_from_uri_and_errors_name_s3_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "bucket" / "data"
    folder.mkdir(parents=True)
    write(folder / "part-0.parquet", {"x": [7.0, 8.0]})
    write(folder / "part-1.parquet", {"x": [9.0]})
    seen = s3_spy(monkeypatch, tmp_path)
    data = open_data("s3://bucket/data")
    assert seen == ["s3://bucket/data"]
    assert data.files == ["bucket/data/part-0.parquet", "bucket/data/part-1.parquet"]
    assert data.display(data.files[1]) == "s3://bucket/data/part-1.parquet"
    assert data.read_all()[0].tolist() == [[7.0], [8.0], [9.0]]
    assert pickle.loads(pickle.dumps(data)).read_all()[0].tolist() == [[7.0], [8.0], [9.0]]

    write(folder / "part-1.parquet", {"x": [float("nan")]})
    with pytest.raises(DataError) as info:
        open_data("s3://bucket/data")
    assert info.value.path == "s3://bucket/data/part-1.parquet (row group 0)"
    (folder / "part-1.parquet").write_text("not parquet")
    with pytest.raises(DataError) as info:
        open_data("s3://bucket/data")
    assert info.value.path == "s3://bucket/data/part-1.parquet"
    assert "cannot read it as Parquet" in info.value.problem
    with pytest.raises(DataError) as info:
        open_data("s3://bucket/nothing")
    assert str(info.value).startswith("s3://bucket/nothing: no such file, folder or object")


def test_a_given_filesystem_serves_scheme_paths_without_from_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "bucket" / "data"
    folder.mkdir(parents=True)
    write(folder / "part-0.parquet", {"x": [1.0, 2.0]})
    seen = s3_spy(monkeypatch, tmp_path / "elsewhere")
    local = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    data = open_file_data(DataConfig(name="parquet", path="s3://bucket/data/"), filesystem=local)
    assert seen == [] and data.root == "bucket/data" and data.filesystem is local
    assert data.read_all()[0].tolist() == [[1.0], [2.0]]
    assert data.display(data.files[0]) == "s3://bucket/data/part-0.parquet"


# --- pixel lists ---------------------------------------------------------------------------------


def test_float_pixel_lists_are_row_major_channels_height_width(tmp_path: Path) -> None:
    first = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    second = [0.1] * 8
    path = write(tmp_path / "img.parquet", {"image": [first, second], "label": [3, 4]})
    data = open_data(path, 2, channels=2)
    assert (data.layout, data.kind, data.shape) == (IMAGE_LISTS, "images", (2, 2, 2))
    x, labels = data.read_all()
    assert x.shape == (2, 2, 2, 2) and x.dtype == np.float32
    # Row-major (C, H, W): index c*4 + h*2 + w.
    assert x[0, 1, 0, 1] == 0.25 and x[0, 0, 1, 0] == -0.5 and x[0, 1, 1, 1] == 1.0
    np.testing.assert_allclose(x[1], np.full((2, 2, 2), 0.1, np.float32))
    assert labels is not None and labels.tolist() == [3, 4]


def test_fixed_size_pixel_lists_work_like_lists(tmp_path: Path) -> None:
    pixels = pa.array([[0, 255, 0, 255], [255, 255, 0, 0]], pa.list_(pa.uint8(), 4))
    x, _ = open_data(write(tmp_path / "f.parquet", {"image": pixels}), 2).read_all()
    assert x.tolist() == [[[[-1.0, 1.0], [-1.0, 1.0]]], [[[1.0, 1.0], [-1.0, -1.0]]]]


def test_uint8_pixel_lists_are_scaled_to_unit_range(tmp_path: Path) -> None:
    pixels = pa.array([[0, 255, 51, 102]], pa.list_(pa.uint8()))
    data = open_data(write(tmp_path / "u8.parquet", {"image": pixels}), 2)
    x, labels = data.read_all()
    expected = [[[[-1.0, 1.0], [51 / 127.5 - 1, 102 / 127.5 - 1]]]]
    np.testing.assert_allclose(x, np.array(expected, np.float32), rtol=0, atol=1e-7)
    assert labels is None and not data.labelled


# --- encoded images ------------------------------------------------------------------------------


def test_hf_png_digits_decode_to_their_exact_pixels_and_labels(tmp_path: Path) -> None:
    pixels, labels = digits_u8()
    path = write_hf(tmp_path / "digits.parquet", [encode(p[0]) for p in pixels], labels.tolist())
    data = open_data(path, 8)
    assert (data.layout, data.shape, data.columns) == (ENCODED, (1, 8, 8), ["image", "label"])
    x, got = data.read_all()
    assert x.dtype == np.uint8 and np.array_equal(x, pixels)  # PNG is lossless
    assert got is not None and got.tolist() == labels.tolist()
    # One byte a pixel and 8 per label, decoded.
    assert data.decoded_bytes == 40 * (64 + 8)


def test_encoded_images_are_resized_to_image_size(tmp_path: Path) -> None:
    half = np.zeros((8, 8), np.uint8)
    half[:, 4:] = 255  # left half black, right half white
    pixels, _ = digits_u8(4)
    path = write_hf(tmp_path / "r.parquet", [encode(half)] + [encode(p[0]) for p in pixels])
    x, _ = open_data(path, 16).read_all()
    assert x.shape == (5, 1, 16, 16)
    # Bilinear upsampling blends only the two columns at the edge.
    assert (x[0, 0, :, :7] == 0).all() and (x[0, 0, :, 9:] == 255).all()
    assert (x[0, 0, :, 7] < x[0, 0, :, 8]).all()
    # The digits keep their brightness.
    np.testing.assert_allclose(x[1:].mean((1, 2, 3)), pixels.mean((1, 2, 3)), atol=4)


def test_pad_adds_a_black_border_around_the_unscaled_digit(tmp_path: Path) -> None:
    pixels, _ = digits_u8(10)
    pixels[:, :, 0, :] = 255  # a white first row shows the border is really added
    path = write_hf(tmp_path / "p.parquet", [encode(p[0]) for p in pixels])
    x, _ = open_data(path, 12, pad=2).read_all()
    assert x.shape == (10, 1, 12, 12)
    assert np.array_equal(x[:, :, 2:10, 2:10], pixels)
    border = np.ones((12, 12), bool)
    border[2:10, 2:10] = False
    assert (x[:, 0][:, border] == 0).all()


def test_grayscale_images_decoded_to_three_channels_repeat_the_gray(tmp_path: Path) -> None:
    pixels, _ = digits_u8(10)
    x, _ = open_data(
        write_hf(tmp_path / "g.parquet", [encode(p[0]) for p in pixels]), 8, channels=3
    ).read_all()
    assert x.shape == (10, 3, 8, 8)
    for channel in range(3):
        assert np.array_equal(x[:, channel], pixels[:, 0])


def test_rgb_images_keep_their_channels(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    path = write_hf(tmp_path / "rgb.parquet", [encode(rgb)])
    x, _ = open_data(path, 8, channels=3).read_all()
    assert x[0, :, 3, 3].tolist() == [200, 100, 50]
    gray, _ = open_data(path, 8, channels=1).read_all()
    # Pillow's luma: L = (299 R + 587 G + 114 B) / 1000.
    assert gray[0, 0, 3, 3] == round((299 * 200 + 587 * 100 + 114 * 50) / 1000)


@pytest.mark.parametrize("kind", [pa.binary(), pa.large_binary()])
def test_a_plain_binary_column_of_pngs_works(tmp_path: Path, kind: pa.DataType) -> None:
    pixels, labels = digits_u8(12)
    column = pa.array([encode(p[0]) for p in pixels], kind)
    path = write(tmp_path / "b.parquet", {"label": labels, "image": column})
    data = open_data(path, 8)
    x, got = data.read_all()
    assert data.layout == ENCODED and np.array_equal(x, pixels)
    assert got is not None and got.tolist() == labels.tolist()


def test_mixed_image_sizes_all_come_out_at_image_size(tmp_path: Path) -> None:
    small = [encode(np.full((8, 8), 10 * (i + 1), np.uint8)) for i in range(3)]
    large = [encode(np.full((12, 12), 100 + i, np.uint8)) for i in range(3)]
    path = write_hf(tmp_path / "mixed.parquet", [small[0], large[0], small[1], large[1]])
    x, _ = open_data(path, 8).read_all()
    assert x.shape == (4, 1, 8, 8)
    # A constant image stays that constant whatever the resize.
    assert [np.unique(row).tolist() for row in x] == [[10], [100], [20], [101]]


def test_non_square_images_are_resized_on_the_short_side_and_centre_cropped() -> None:
    columns = np.tile(np.arange(16, dtype=np.uint8) * 10, (8, 1))  # 8 high, 16 wide
    wide = decode_image(encode(columns), 1, 8)
    assert wide.shape == (1, 8, 8) and (wide[0] == np.arange(4, 12) * 10).all()
    tall = decode_image(encode(np.ascontiguousarray(columns.T)), 1, 8)  # 16 high, 8 wide
    assert (tall[0] == (np.arange(4, 12) * 10)[:, None]).all()
    # 16 x 48 in thirds (0 | 200 | 50) at side 8: 8 x 24 after resizing, the middle third kept.
    thirds = np.zeros((16, 48), np.uint8)
    thirds[:, 16:32], thirds[:, 32:] = 200, 50
    middle = decode_image(encode(thirds), 1, 8)
    assert middle.shape == (1, 8, 8) and (middle[0, :, 1:7] == 200).all()
    assert (middle[0, :, 0] > 0).all() and (middle[0, :, 7] > 50).all()


def test_sixteen_bit_pngs_are_scaled_to_eight_bits_not_clipped() -> None:
    levels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4
    wide = encode(levels * 257)  # 16-bit values v * 257 are the 8-bit values v
    with Image.open(io.BytesIO(wide)) as image:
        assert image.mode.startswith("I;16")
    assert np.array_equal(decode_image(wide, 1, 8)[0], levels)
    assert np.array_equal(decode_image(wide, 3, 8)[2], levels)


def test_a_corrupt_image_is_refused_naming_the_file_and_row(tmp_path: Path) -> None:
    pixels, _ = digits_u8(5)
    blobs = [encode(p[0]) for p in pixels]
    blobs[3] = blobs[3][:40]  # truncated PNG
    path = write_hf(tmp_path / "bad.parquet", blobs)
    with pytest.raises(DataError) as info:
        open_data(path, 8)
    assert info.value.path == f"{path} row 3"
    assert str(info.value).startswith(f"{path} row 3: cannot decode the image (")
    assert "PNG/JPEG bytes" in info.value.expected
    blobs[3] = b"not an image at all"
    with pytest.raises(DataError, match="row 3: cannot decode the image"):
        open_data(write_hf(tmp_path / "bad2.parquet", blobs), 8)


def test_an_image_too_large_to_decode_safely_is_a_data_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pillow refuses more than 2 * MAX_IMAGE_PIXELS pixels (a decompression bomb).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataError) as info:
        decode_image(encode(np.zeros((8, 8), np.uint8)), 1, 8, name="big.png")
    assert info.value.path == "big.png" and "cannot decode the image" in info.value.problem


def test_null_images_and_negative_labels_are_refused(tmp_path: Path) -> None:
    blob = encode(np.zeros((8, 8), np.uint8))
    images = pa.array([{"bytes": blob, "path": "a"}, None, {"bytes": None, "path": "c"}], HF_IMAGE)
    path = write(tmp_path / "nulls.parquet", {"image": images})
    with pytest.raises(DataError, match="column 'image' has 2 null images"):
        open_data(path, 8)
    path = write_hf(tmp_path / "neg.parquet", [blob, blob], labels=[0, -1])
    with pytest.raises(DataError, match=r"holds a negative label \(-1\)"):
        open_data(path, 8)


def test_encoded_images_decode_to_one_or_three_channels_only(tmp_path: Path) -> None:
    path = write_hf(tmp_path / "c.parquet", [encode(np.zeros((8, 8), np.uint8))])
    with pytest.raises(DataError, match=r"data.channels=2 cannot be decoded; allowed: 1 or 3"):
        open_data(path, 8, channels=2)


# --- image folders -------------------------------------------------------------------------------


def image_folder(root: Path, layout: dict[str, int]) -> None:
    """``layout`` maps a subfolder ('' = the top) to its count of 8x8 PNGs; image j of the
    k-th entry is the constant 10 * k + j + 1, so its pixels say where it came from."""
    for k, (sub, count) in enumerate(layout.items()):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            pixels = np.full((8, 8), 10 * k + j + 1, np.uint8)
            (root / sub / f"img{j}.png").write_bytes(encode(pixels))


def test_class_subfolders_are_labels_in_sorted_name_order(tmp_path: Path) -> None:
    image_folder(tmp_path / "pets", {"dog": 3, "cat": 2, "bird": 4})  # values 1.., 11.., 21..
    data = open_data(str(tmp_path / "pets"), 8, name="image_folder")
    assert (data.layout, data.shape, data.labelled) == (IMAGE_FILES, (1, 8, 8), True)
    assert data.classes == ["bird", "cat", "dog"] and data.num_rows == 9
    x, labels = data.read_all()
    assert labels is not None
    created = (x[:, 0, 0, 0].astype(int) - 1) // 10  # 0 dog, 1 cat, 2 bird
    assert labels.tolist() == [{0: 2, 1: 1, 2: 0}[c] for c in created]
    assert Counter(labels.tolist()) == {0: 4, 1: 2, 2: 3}
    assert all((row == row[0, 0, 0]).all() for row in x)


def test_a_flat_folder_is_unlabelled_and_odd_files_are_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "flat"
    image_folder(folder, {"": 5})
    (folder / "notes.txt").write_text("not an image")
    (folder / ".thumb.png").write_bytes(b"hidden")
    (folder / "_tmp").mkdir()
    (folder / "_tmp" / "x.png").write_bytes(b"skipped")
    image_folder(folder / ".cache", {"": 1})
    data = open_data(str(folder), 8, name="image_folder")
    assert not data.labelled and data.classes == [] and data.num_rows == 5
    x, labels = data.read_all()
    assert labels is None and x[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 5]


def test_images_beside_class_folders_make_the_folder_unlabelled(tmp_path: Path) -> None:
    image_folder(tmp_path / "some", {"a": 2, "": 1})
    data = open_data(str(tmp_path / "some"), 8, name="image_folder")
    assert not data.labelled and data.num_rows == 3


def test_image_folders_are_read_in_units_of_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "FILES_PER_UNIT", 3)
    image_folder(tmp_path / "many", {"a": 4, "b": 4})
    data = open_data(str(tmp_path / "many"), 8, name="image_folder")
    assert [u.rows for u in data.units] == [3, 3, 2] and all(u.row_group == -1 for u in data.units)
    x, labels = data.read_unit(data.units[1])
    assert x[:, 0, 0, 0].tolist() == [4, 11, 12] and labels is not None
    assert labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("empty", "the folder holds no image files (.png, .jpg, .jpeg)"),
        ("file", "it is a file, not a folder"),
        ("missing", "no such file or folder"),
    ],
)
def test_unusable_image_folders_are_refused(tmp_path: Path, case: str, problem: str) -> None:
    path = tmp_path / "images"
    if case == "empty":
        path.mkdir()
        (path / "readme.txt").write_text("no images")
    elif case == "file":
        path.write_bytes(encode(np.zeros((8, 8), np.uint8)))
    with pytest.raises(DataError) as info:
        open_data(str(path), 8, name="image_folder")
    assert str(info.value).startswith(f"{path}: {problem}")
    assert info.value.expected == files._FOLDER_SCHEMA


def test_an_undecodable_image_file_is_named_by_its_path(tmp_path: Path) -> None:
    image_folder(tmp_path / "imgs", {"a": 2})
    bad = tmp_path / "imgs" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError) as info:
        open_data(str(tmp_path / "imgs"), 8, name="image_folder")
    assert info.value.path == str(bad)
    assert str(info.value).startswith(f"{bad}: cannot decode the image")


def test_s3_image_folders_name_their_files_by_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_folder(tmp_path / "bucket" / "imgs", {"x": 1, "y": 2})
    s3_spy(monkeypatch, tmp_path)
    data = open_data("s3://bucket/imgs", 8, name="image_folder")
    assert data.classes == ["x", "y"] and data.read_all()[1].tolist() == [0, 1, 1]
    (tmp_path / "bucket" / "imgs" / "y" / "zz.png").write_bytes(b"junk")
    with pytest.raises(DataError) as info:
        open_data("s3://bucket/imgs", 8, name="image_folder")
    assert info.value.path == "s3://bucket/imgs/y/zz.png"


def test_jpeg_files_decode_close_to_the_original(tmp_path: Path) -> None:
    pixels, _ = digits_u8(20)
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for i, p in enumerate(pixels):
        suffix = ".JPG" if i % 2 else ".jpeg"
        (folder / f"{i:02d}{suffix}").write_bytes(encode(p[0], "JPEG", quality=95))
    data = open_data(str(folder), 8, name="image_folder")
    x, _ = data.read_all()
    assert x.shape == (20, 1, 8, 8) and data.num_rows == 20
    error = np.abs(x.astype(int) - pixels.astype(int))
    assert error.mean() < 4 and error.max() < 64  # lossy, but the same digits


def test_folder_images_are_converted_padded_and_resized(tmp_path: Path) -> None:
    image_folder(tmp_path / "imgs", {"": 2})
    x, _ = open_data(str(tmp_path / "imgs"), 12, name="image_folder", channels=3, pad=2).read_all()
    assert x.shape == (2, 3, 12, 12)
    assert (x[:, :, 2:10, 2:10] == np.array([1, 2])[:, None, None, None]).all()
    assert x[:, :, :2].max() == 0 and x[:, :, :, 10:].max() == 0


def test_image_folders_decode_to_one_or_three_channels_only(tmp_path: Path) -> None:
    image_folder(tmp_path / "imgs", {"": 1})
    with pytest.raises(DataError, match="data.channels=4 cannot be decoded"):
        open_data(str(tmp_path / "imgs"), 8, name="image_folder", channels=4)


# --- checking big data sets ----------------------------------------------------------------------


def test_big_data_sets_are_checked_on_their_first_unit_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = [0.0, 1.0, 2.0, float("nan"), 4.0, 5.0]
    path = write(tmp_path / "big.parquet", {"x": values}, row_group_size=3)
    with pytest.raises(DataError, match=r"\(row group 1\): columns \['x'\] hold 1 NaN"):
        open_data(path)  # small: every unit is checked
    monkeypatch.setattr(files, "CHECK_ALL_BYTES", 0)
    data = open_data(path)
    assert [u.rows for u in data.units] == [3, 3]
    assert data.read_unit(data.units[0])[0][:, 0].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(DataError) as info:
        data.read_unit(data.units[1])
    assert info.value.path == f"{path} (row group 1)"
    monkeypatch.setattr(files, "CHECK_ALL_BYTES", 10**9)
    assert open_file_data(DataConfig(name="parquet", path=path), check=False).num_rows == 6


# --- FileStream ----------------------------------------------------------------------------------

# Row groups of odd and even sizes: a rank's rows per epoch depend on how units fall in windows.
ODD_SIZES = [1, 2, 3, 1, 2, 3, 2, 5, 1]
EVEN_SIZES = [2, 4, 6, 2, 4, 2, 6, 4, 2, 8]


def test_a_stream_is_a_function_of_seed_rank_and_world(tmp_path: Path) -> None:
    data = open_data(points_file(tmp_path / "s.parquet", ODD_SIZES))

    def batches(seed: int, rank: int = 0, world: int = 1) -> list[list[float]]:
        stream = FileStream(data, seed, rank, world)
        return [stream.next_batch(7)[:, 0].tolist() for _ in range(6)]

    first = batches(5)
    assert first == batches(5)
    assert first != batches(6)
    assert batches(5, 1, 2) == batches(5, 1, 2) != batches(5, 0, 2)
    # Each unit is read as a whole but the rows are shuffled across units.
    assert first[0] != sorted(first[0])


def test_with_one_rank_every_row_comes_once_per_epoch(tmp_path: Path) -> None:
    data = open_data(points_file(tmp_path / "s.parquet", ODD_SIZES))
    total = data.num_rows
    stream = FileStream(data, seed=1)
    epochs = [stream.next_batch(total)[:, 0].tolist() for _ in range(3)]
    assert all(sorted(e) == list(range(total)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # every epoch has its own order
    assert stream.position == 3 * total


def test_two_ranks_split_every_epoch_into_disjoint_halves(tmp_path: Path) -> None:
    data = open_data(points_file(tmp_path / "s.parquet", EVEN_SIZES))
    half = data.num_rows // 2  # every window holds an even number of rows: exactly half each
    ranks = [FileStream(data, seed=2, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        rows = [s.next_batch(half)[:, 0].tolist() for s in ranks]
        assert not set(rows[0]) & set(rows[1])
        assert sorted(rows[0] + rows[1]) == list(range(data.num_rows))


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (0, 2), (1, 2), (2, 3)])
def test_a_stream_started_at_a_position_continues_bit_identically(
    tmp_path: Path, rank: int, world: int
) -> None:
    # Odd row-group sizes: with seed 0 a rank's rows per epoch differ between epochs under
    # world > 1 (rank 0 of 2 gets 10, then 11), so whole epochs cannot be skipped by one count.
    data = open_data(points_file(tmp_path / "s.parquet", ODD_SIZES))
    straight = FileStream(data, 0, rank, world)
    reference = straight.next_batch(4 * data.num_rows // world)
    assert straight.position == len(reference)
    for position in range(0, len(reference) - 5, 3):
        resumed = FileStream(data, 0, rank, world, position=position)
        assert resumed.position == position
        assert torch.equal(resumed.next_batch(5), reference[position : position + 5]), position


def test_cached_and_streamed_readers_give_the_same_batches(tmp_path: Path) -> None:
    path = points_file(tmp_path / "s.parquet", ODD_SIZES)
    cached, streamed = open_data(path, cache_mb=1), open_data(path, cache_mb=0)
    assert cached.cached and not streamed.cached
    reads: Counter[str] = Counter()
    for name, data in (("cached", cached), ("streamed", streamed)):
        read = data.read_unit

        def counting(unit: files.Unit, read=read, name=name) -> tuple:
            reads[name] += 1
            return read(unit)

        data.read_unit = counting  # type: ignore[method-assign]
    a, b = FileStream(cached, 9), FileStream(streamed, 9)
    for _ in range(3 * cached.num_rows // 4):  # three epochs in batches of 4
        assert torch.equal(a.next_batch(4), b.next_batch(4))
    units = len(cached.units)
    assert reads["cached"] == units and reads["streamed"] == 3 * units


def test_a_stream_batch_of_encoded_images_is_training_floats(tmp_path: Path) -> None:
    pixels, _ = digits_u8(20)
    data = open_data(write_hf(tmp_path / "d.parquet", [encode(p[0]) for p in pixels]), 8)
    batch = FileStream(data, 0).next_batch(20)
    assert batch.dtype == torch.float32 and batch.shape == (20, 1, 8, 8)
    expected = torch.from_numpy(pixels).float() / 127.5 - 1
    # Each row is one digit, each digit once: sort both by their bytes to compare.
    assert sorted(map(tuple, batch.flatten(1).tolist())) == sorted(
        map(tuple, expected.flatten(1).tolist())
    )


def test_fewer_rows_than_ranks_are_refused_on_every_rank(tmp_path: Path) -> None:
    path = points_file(tmp_path / "three.parquet", [3])
    data = open_data(path)
    last = FileStream(data, 0, rank=2, world_size=3)  # one row each is enough
    assert set(last.next_batch(4)[:, 0].tolist()) <= {0.0, 1.0, 2.0}
    for rank in range(4):  # rank 0 would get a row, but its peers cannot train with it
        with pytest.raises(DataError) as info:
            FileStream(data, 0, rank=rank, world_size=4)
        assert str(info.value).startswith(f"{path}: 3 rows cannot feed 4 ranks")


# --- reference and to_training -------------------------------------------------------------------


def test_reference_is_deterministic_and_capped_by_the_rows(tmp_path: Path) -> None:
    data = open_data(points_file(tmp_path / "r.parquet", [10] * 8, labels=True))
    x, labels = data.reference(25, seed=1)
    again, labels_again = data.reference(25, seed=1)
    assert x.shape == (25, 1) and torch.equal(x, again) and torch.equal(labels, labels_again)
    assert len(set(x[:, 0].tolist())) == 25  # distinct rows
    assert not torch.equal(x, data.reference(25, seed=2)[0])
    everything, all_labels = data.reference(1000)
    assert sorted(everything[:, 0].tolist()) == list(range(80))
    assert all_labels is not None and torch.equal(everything[:, 0].long() % 7, all_labels)
    unlabelled = open_data(points_file(tmp_path / "u.parquet", [5]))
    assert unlabelled.reference(3)[1] is None


def test_to_training_scales_pixels_and_keeps_floats() -> None:
    pixels = np.array([[0, 255, 51, 204]], np.uint8)
    expected = torch.tensor([[-1.0, 1.0, 51 / 127.5 - 1, 204 / 127.5 - 1]])
    torch.testing.assert_close(to_training(pixels), expected, rtol=0, atol=1e-7)
    floats = np.array([[0.25, -3.5, 1e3]], np.float64)
    out = to_training(floats)
    assert out.dtype == torch.float32 and out.tolist() == [[0.25, -3.5, 1000.0]]
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    assert to_training(strided).tolist() == [[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]]
