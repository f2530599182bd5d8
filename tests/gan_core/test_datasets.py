"""Tests for gan_core.datasets: digits and hand-made Fashion-MNIST IDX files to Parquet and folders.

Everything is built from scikit-learn's bundled digits or tiny IDX files written here; the real
Fashion-MNIST files are used only by one optional test that skips where they are not installed.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits as sklearn_digits

from gan_core.data import load_digits
from gan_core.datasets import (
    FASHION_CLASSES,
    FASHION_MNIST_DIR,
    SourceError,
    digit_images,
    fashion_mnist,
    main,
    read_idx,
    write_image_folder,
    write_image_parquet,
)

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
EXPECTED_SCHEMA = pa.schema([("image", IMAGE_STRUCT), ("label", pa.int64())])


def _decode(path: str | Path, filesystem: pafs.FileSystem | None = None) -> tuple[np.ndarray, ...]:
    """A written Parquet file's PNGs decoded with Pillow, and its labels."""
    table = pq.read_table(str(path), filesystem=filesystem)
    images = [
        np.asarray(Image.open(io.BytesIO(row["bytes"]))) for row in table["image"].to_pylist()
    ]
    return np.stack(images), table["label"].to_numpy()


def _digits_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_digits(split)
    return np.rint((images[:, 0].numpy() + 1) * 127.5).astype(np.uint8), labels.numpy()


def _write_digits(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / name
    assert main(["digits", "--out", str(out), *args]) == 0
    return out


# --- digits to Parquet ---------------------------------------------------------------------------


def test_parquet_round_trip_is_lossless_with_bounded_row_groups(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "er" / "digits.parquet"  # parent folders are created
    result = write_image_parquet(digit_images("all"), str(out), rows_per_group=500)
    assert result == {"rows": 1797, "row_groups": 4, "bytes": out.stat().st_size, "uri": str(out)}
    file = pq.ParquetFile(out)
    assert file.schema_arrow.equals(EXPECTED_SCHEMA)
    sizes = [file.metadata.row_group(i).num_rows for i in range(file.metadata.num_row_groups)]
    assert sizes == [500, 500, 500, 297]
    images, labels = _decode(out)
    # sklearn pixels are 0..16; scaled to [-1, 1] and back to 0..255 they are round(16ths of 255).
    bunch = sklearn_digits()
    expected = np.rint(bunch.data.reshape(-1, 8, 8) * 255 / 16).astype(np.uint8)
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    assert np.array_equal(images, expected)
    assert labels.dtype == np.int64 and np.array_equal(labels, bunch.target)
    assert pq.read_table(out)["image"].combine_chunks().field("path").null_count == 1797


def test_cli_parquet_records_class_names_for_hugging_face(tmp_path: Path, capsys) -> None:
    out = _write_digits(tmp_path, "d.parquet", "--split", "test", "--rows-per-group", "100")
    line = capsys.readouterr().out.strip()
    size = out.stat().st_size
    assert (
        line == f"wrote 359 rows in 4 row groups, {size} bytes ({size / 2**20:.1f} MiB), to {out}"
    )
    metadata = json.loads(pq.ParquetFile(out).schema_arrow.metadata[b"huggingface"])
    features = metadata["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert features["label"] == {"names": [str(d) for d in range(10)], "_type": "ClassLabel"}
    images, labels = _decode(out)
    clean, clean_labels = _digits_uint8("test")
    assert np.array_equal(images, clean) and np.array_equal(labels, clean_labels)


def test_size_upsamples_bilinearly(tmp_path: Path) -> None:
    out = _write_digits(tmp_path, "big.parquet", "--size", "16", "--split", "test", "--limit", "50")
    images, labels = _decode(out)
    assert images.shape == (50, 16, 16)
    clean, clean_labels = _digits_uint8("test")
    expected = [np.asarray(Image.fromarray(c).resize((16, 16), Image.BILINEAR)) for c in clean[:50]]
    assert np.array_equal(images, np.stack(expected))
    assert np.array_equal(labels, clean_labels[:50])
    # Interpolation keeps the ink roughly where it was: the means agree to within a few levels.
    assert np.abs(images.mean(axis=(1, 2)) - clean[:50].mean(axis=(1, 2))).max() < 12


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = image[y - dy, x - dx], zero where that falls outside."""
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_copies_pass_zero_is_clean_and_later_passes_are_shifts(tmp_path: Path) -> None:
    out = _write_digits(tmp_path, "j.parquet", "--split", "test", "--copies", "3", "--jitter", "2")
    images, labels = _decode(out)
    clean, clean_labels = _digits_uint8("test")
    assert images.shape == (3 * 359, 8, 8)
    assert np.array_equal(labels, np.tile(clean_labels, 3))
    assert np.array_equal(images[:359], clean)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    for copy in (1, 2):
        moved = images[copy * 359 : (copy + 1) * 359]
        for image, original in zip(moved, clean, strict=True):
            assert any(np.array_equal(image, _shifted(original, *s)) for s in shifts)
        # 24 of 25 shifts move the digit; blank borders hide a few of them.
        assert (moved != clean).any(axis=(1, 2)).mean() > 0.8
    assert (images[359:718] != images[718:]).any(axis=(1, 2)).mean() > 0.8


def test_noise_has_the_asked_std_and_is_deterministic_per_seed(tmp_path: Path) -> None:
    args = ["--split", "test", "--copies", "2", "--noise", "8", "--seed", "5"]
    first = _write_digits(tmp_path, "a.parquet", *args)
    again = _write_digits(tmp_path, "b.parquet", *args)
    other = _write_digits(tmp_path, "c.parquet", *args[:-1], "6")
    assert first.read_bytes() == again.read_bytes()
    images, _ = _decode(first)
    assert not np.array_equal(images, _decode(other)[0])
    assert np.array_equal(images[:359], _decode(other)[0][:359])  # pass 0 has no noise
    clean = _digits_uint8("test")[0].astype(np.float64)
    residual = images[359:] - clean
    mid = (clean > 40) & (clean < 215)  # far from the clipping at 0 and 255
    assert mid.sum() > 3000
    assert abs(residual[mid].std() - 8) < 0.4 and abs(residual[mid].mean()) < 0.3
    assert np.all(images[359:][clean == 0] >= 0)  # clipped, never wrapped around
    assert (images[359:][clean == 0] > 0).mean() > 0.4


def test_limit_and_row_groups_never_change_an_image(tmp_path: Path) -> None:
    chunks = list(digit_images("all", size=64, copies=2, jitter=3, noise=4, seed=1))
    # At size 64 a pass is drawn in two chunks (4 Mi pixels each at most).
    assert [len(labels) for _, labels in chunks] == [1024, 773, 1024, 773]
    everything = np.concatenate([images for images, _ in chunks])
    short = _write_digits(
        tmp_path,
        "s.parquet",
        *("--size", "64", "--copies", "2", "--jitter", "3", "--noise", "4", "--seed", "1"),
        *("--limit", "1900", "--rows-per-group", "333"),
    )
    images, labels = _decode(short)
    assert len(labels) == 1900 and pq.ParquetFile(short).metadata.num_row_groups == 6
    assert np.array_equal(images, everything[:1900])
    assert np.array_equal(labels, np.tile(load_digits("all")[1].numpy(), 2)[:1900])


def test_digit_images_is_lazy_for_any_number_of_copies() -> None:
    chunks = digit_images("all", size=64, copies=10**9, jitter=4, noise=8)
    images, labels = next(chunks)
    assert images.shape == (1024, 64, 64) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and len(labels) == 1024
    with pytest.raises(ValueError, match="copies=0"):
        digit_images(copies=0)
    # The two chunks of a pass draw independent noise, not the same stream twice.
    clean0, clean1, noisy0, noisy1 = (c[0] for c in digit_images(size=64, copies=2, noise=4))
    first = noisy0[:773].astype(float) - clean0[:773]
    second = noisy1.astype(float) - clean1
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.05


def test_writer_streams_chunk_by_chunk(tmp_path: Path, monkeypatch) -> None:
    log: list[tuple[str, int]] = []
    refs: list[weakref.ref] = []

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for k in range(5):
            # The writer may still hold the chunk it just finished, but none before it.
            alive = sum(ref() is not None for ref in refs)
            assert alive <= 1, f"{alive} earlier chunks still alive at chunk {k}"
            images = np.full((300, 4, 4), k, np.uint8)
            refs.append(weakref.ref(images))
            log.append(("chunk", k))
            yield images, np.full(300, k)

    class SpyWriter(pq.ParquetWriter):
        def write_table(self, table: pa.Table, *args, **kwargs) -> None:
            log.append(("write", table.num_rows))
            super().write_table(table, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetWriter", SpyWriter)
    result = write_image_parquet(chunks(), str(tmp_path / "s.parquet"), rows_per_group=200)
    # 300-row chunks into 200-row groups: each group is written as soon as it is full.
    w = ("write", 200)
    expected = [("chunk", 0), w, ("chunk", 1), w, w, ("chunk", 2), w, ("chunk", 3), w, w]
    assert log == [*expected, ("chunk", 4), w, ("write", 100)]
    assert (result["rows"], result["row_groups"]) == (1500, 8)
    images, labels = _decode(tmp_path / "s.parquet")
    assert np.array_equal(images[:, 0, 0], np.repeat(np.arange(5), 300))
    assert np.array_equal(labels, np.repeat(np.arange(5), 300))


def test_rgb_images_round_trip_and_a_failed_write_leaves_no_file(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    out = tmp_path / "rgb.parquet"
    assert write_image_parquet([(rgb, np.arange(7))], str(out), rows_per_group=3)["row_groups"] == 3
    images, labels = _decode(out)
    assert np.array_equal(images, rgb) and labels.tolist() == list(range(7))

    def broken() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield rgb, np.arange(7)
        yield rgb.astype(np.float32), np.arange(7)

    with pytest.raises(ValueError, match="uint8"):
        write_image_parquet(broken(), str(out), rows_per_group=3)
    # A footer written on the way out would make a truncated file look complete.
    assert not out.exists()


# --- image folders -------------------------------------------------------------------------------


def test_folder_layout_has_one_subfolder_per_class(tmp_path: Path, capsys) -> None:
    out = tmp_path / "folder"
    assert main(["digits", "--out", str(out), "--format", "folder", "--split", "test"]) == 0
    assert "wrote 359 rows in 10 class folders" in capsys.readouterr().out
    clean, labels = _digits_uint8("test")
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    counts = {p.name: len(list(p.iterdir())) for p in out.iterdir()}
    assert counts == {str(d): n for d, n in enumerate(np.bincount(labels, minlength=10))}
    index = 123
    png = out / str(labels[index]) / f"{index:06d}.png"
    assert np.array_equal(np.asarray(Image.open(png)), clean[index])
    # A second run would mix stale images into the data set, so it is refused.
    assert main(["digits", "--out", str(out), "--format", "folder", "--limit", "5"]) == 1
    assert "already holds files" in capsys.readouterr().err


def test_folder_layout_uses_the_given_class_names(tmp_path: Path) -> None:
    images = np.zeros((4, 3, 3), np.uint8)
    result = write_image_folder([(images, np.array([9, 0, 9, 1]))], str(tmp_path), FASHION_CLASSES)
    assert (result["rows"], result["classes"]) == (4, 3)
    found = Counter(p.parent.name for p in tmp_path.rglob("*.png"))
    assert found == {"ankle_boot": 2, "t-shirt_top": 1, "trouser": 1}
    assert (tmp_path / "ankle_boot" / "000002.png").is_file()
    with pytest.raises(ValueError, match="class names"):
        write_image_folder([(images, np.array([10, 0, 0, 0]))], str(tmp_path / "x"), ["a"])


# --- Fashion-MNIST IDX ---------------------------------------------------------------------------


def _idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """A gzip IDX file as the MNIST distribution has them: big-endian magic, dims, bytes."""
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return path


def _fake_fashion(folder: Path, train: int = 3, test: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (train + test, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, train + test).astype(np.uint8)
    for stem, part in (("train", slice(0, train)), ("t10k", slice(train, None))):
        _idx(folder / f"{stem}-images-idx3-ubyte.gz", images[part])
        _idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels[part])
    return images, labels.astype(np.int64)


def test_read_idx_parses_images_and_labels(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(str(_idx(tmp_path / "i.gz", images)))
    assert got.dtype == np.uint8 and np.array_equal(got, images)
    labels = np.array([7, 0, 255], np.uint8)
    assert np.array_equal(read_idx(str(_idx(tmp_path / "l.gz", labels))), labels)
    # An unpacked IDX file reads too.
    raw = tmp_path / "raw-idx1-ubyte"
    raw.write_bytes(gzip.decompress((tmp_path / "l.gz").read_bytes()))
    assert read_idx(str(raw)).tolist() == [7, 0, 255]


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("wrong magic", "magic number 2050"),
        ("truncated", "promises 2 x 3 x 4 = 24 bytes of data but the file holds 23"),
        ("trailing bytes", "promises 3 = 3 bytes of data but the file holds 4"),
        ("broken gzip", "cannot read it as a gzip IDX file"),
        ("missing", "no such file"),
    ],
)
def test_read_idx_errors_name_the_file(tmp_path: Path, case: str, problem: str) -> None:
    path = tmp_path / f"{case}.gz"
    if case == "wrong magic":
        _idx(path, np.zeros((2, 3, 4), np.uint8), magic=2050)
    elif case == "truncated":
        _idx(path, np.zeros((2, 3, 4), np.uint8))
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    elif case == "trailing bytes":
        path.write_bytes(
            gzip.compress((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"1234")
        )
    elif case == "broken gzip":
        path.write_bytes(gzip.compress(b"x" * 100)[:20])
    with pytest.raises(SourceError) as info:
        read_idx(str(path))
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


def test_fashion_mnist_reads_hand_made_splits_train_first(tmp_path: Path) -> None:
    images, labels = _fake_fashion(tmp_path)
    for split, part in (("train", slice(0, 3)), ("test", slice(3, None)), ("all", slice(None))):
        x, y = fashion_mnist(split, str(tmp_path))
        assert x.dtype == np.uint8 and y.dtype == np.int64
        assert np.array_equal(x, images[part]) and np.array_equal(y, labels[part])
    # Labels and images swapped: caught by the magic number, naming the file.
    (tmp_path / "train-labels-idx1-ubyte.gz").rename(tmp_path / "swap")
    (tmp_path / "train-images-idx3-ubyte.gz").rename(tmp_path / "train-labels-idx1-ubyte.gz")
    (tmp_path / "swap").rename(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(SourceError, match="train-images-idx3-ubyte.gz: holds IDX labels"):
        fashion_mnist("train", str(tmp_path))


def test_fashion_mnist_rejects_mismatched_counts(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(SourceError, match="2 images but 5 labels"):
        fashion_mnist("test", str(tmp_path))


def test_cli_fashion_mnist_from_env_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    source = tmp_path / "fm"
    source.mkdir()
    images, labels = _fake_fashion(source)
    monkeypatch.setenv("RAYGAN_FASHION_MNIST_DIR", str(source))
    out = tmp_path / "fm.parquet"
    assert main(["fashion-mnist", "--out", str(out), "--split", "all"]) == 0
    assert "wrote 5 rows in 1 row groups" in capsys.readouterr().out
    got, got_labels = _decode(out)
    assert np.array_equal(got, images) and np.array_equal(got_labels, labels)
    names = json.loads(pq.ParquetFile(out).schema_arrow.metadata[b"huggingface"])
    assert names["info"]["features"]["label"]["names"] == FASHION_CLASSES
    folder = tmp_path / "fm_folder"
    assert main(["fashion-mnist", "--out", str(folder), "--format", "folder"]) == 0
    assert Counter(p.parent.name for p in folder.rglob("*.png")) == Counter(
        FASHION_CLASSES[label] for label in labels[:3]
    )


def test_missing_fashion_mnist_exits_2_with_the_apt_hint(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["fashion-mnist", "--source", str(empty), "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert str(empty) in err and "train-images-idx3-ubyte.gz" in err
    assert "apt-get install dataset-fashion-mnist" in err and "apt-get update" in err
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["digits", "--out", "x", "--size", "0"],
        ["digits", "--out", "x", "--noise", "-1"],
        ["digits", "--out", "x", "--copies", "two"],
        ["digits", "--out", "x", "--split", "validation"],
        ["fashion-mnist", "--out", "x", "--rows-per-group", "0"],
        ["fashion-mnist", "--out", "x", "--format", "zip"],
        ["digits"],
        ["mnist", "--out", "x"],
    ],
)
def test_bad_arguments_are_argparse_errors(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
    reason="optional: Debian's dataset-fashion-mnist package is not installed",
)
def test_real_fashion_mnist_test_split() -> None:
    images, labels = fashion_mnist("test", FASHION_MNIST_DIR)
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10
    means = {FASHION_CLASSES[c]: images[labels == c].mean() for c in range(10)}
    # Trousers and sandals cover little of the frame, coats and pullovers much of it.
    assert max(means["trouser"], means["sandal"]) < min(means["coat"], means["pullover"])


# --- S3 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_writes_to_s3_through_aws_endpoint_url(tmp_path: Path, s3_endpoint: str, monkeypatch):
    import boto3

    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="bucket")
    args = ["--split", "test", "--rows-per-group", "100"]
    assert main(["digits", "--out", "s3://bucket/digits.parquet", *args]) == 0
    filesystem, where = pafs.FileSystem.from_uri("s3://bucket/digits.parquet")
    images, labels = _decode(where, filesystem)
    clean, clean_labels = _digits_uint8("test")
    assert np.array_equal(images, clean) and np.array_equal(labels, clean_labels)
    local = _write_digits(tmp_path, "local.parquet", *args)
    remote = s3.get_object(Bucket="bucket", Key="digits.parquet")["Body"].read()
    assert remote == local.read_bytes()
    assert (
        main(["digits", "--out", "s3://bucket/folder", "--format", "folder", "--limit", "12"]) == 0
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="bucket", Prefix="folder/")["Contents"]]
    all_labels = load_digits("all")[1].tolist()
    assert sorted(keys) == sorted(f"folder/{all_labels[i]}/{i:06d}.png" for i in range(12))
