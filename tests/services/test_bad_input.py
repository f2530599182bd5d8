"""Bad input to the training job: each refused by ``services.train.main`` before Ray starts.

Parquet data with another schema, empty, with NaN or missing (locally and on the moto S3
server), and storage URIs that are misspelt, point at a missing bucket or at an endpoint nobody
listens on. Every case must return 2 with one ``raygan: ...`` line naming the path or URI and
the problem, start no Ray, and leave the storage exactly as it was: an earlier run's files keep
their bytes and mtimes, and no file or folder appears.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gan_core.config import load_config
from gan_core.data import DataError
from services import train
from services.preflight import preflight

# Small and fast, so that a case that wrongly got through would at least fail quickly.
TINY = [
    "generators.width=8",
    "discriminator.width=8",
    "train.steps=2",
    "eval.every=2",
    "checkpoint.every=2",
    "tracking.enabled=false",
]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _points(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.fixture(autouse=True)
def _no_ray_before_or_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import ray

    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("main() went on to start Ray for input it should have refused")

    # A regression fails here, fast, instead of starting a real cluster inside the test run.
    monkeypatch.setattr(train, "init_ray", tripwire)
    assert not ray.is_initialized()
    yield
    # main() must refuse before init_ray: a started Ray here would mean a worker could run.
    assert not ray.is_initialized(), "Ray was started for input that cannot run"


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    """A storage folder holding an earlier run's files, which a refused run must not touch."""
    root = tmp_path / "runs"
    ckpt = root / "ring8" / "local_checkpoints" / "step_0000010"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text('{"step": 10}')
    (root / "ring8" / "samples").mkdir()
    (root / "ring8" / "samples" / "step_0000010.png").write_bytes(b"\x89PNG old picture")
    return root


def _snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every path under ``root`` with its bytes and mtime (None for folders)."""
    out: dict[str, tuple[bytes, int] | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else None
    return out


def _refused(capsys: pytest.CaptureFixture[str], overrides: list[str], *expected: str) -> str:
    """Run main() in this process; it must return 2 with one line naming ``expected``."""
    status = train.main(["--config", "ring8", *TINY, *overrides])
    captured = capsys.readouterr()
    assert status == 2, captured
    assert captured.err.startswith("raygan: "), captured.err
    assert captured.err.count("\n") == 1, captured.err  # one line, no traceback
    for text in expected:
        assert text in captured.err, (text, captured.err)
    assert "[raygan] done" not in captured.out
    return captured.err


# --- Parquet data, local -------------------------------------------------------------------------


def _bad_data(folder: Path, case: str) -> tuple[str, str, list[str]]:
    """Write one broken dataset: (data.path, problem text, extra overrides)."""
    file = folder / f"{case.replace(' ', '_')}.parquet"
    if case == "wrong schema":
        path = _points(file, {"x": [1.0, 2.0], "name": ["a", "b"]})
        return path, "non-numeric columns: name (string)", []
    if case == "empty file":
        file.write_bytes(b"")
        return str(file), "the file is empty (0 bytes)", []
    if case == "no rows":
        return _points(file, {"x": pa.array([], pa.float64())}), "it holds no rows", []
    if case == "nan":
        path = _points(file, {"x": [1.0, float("nan"), 3.0], "y": [0.0, 1.0, 2.0]})
        return path, "1 NaN/Inf values", []
    if case == "inf":
        return _points(file, {"x": [1.0, float("inf")]}), "NaN/Inf values", []
    if case == "missing file":
        return str(folder / "nowhere" / "data.parquet"), "no such file or folder", []
    if case == "empty folder":
        file.mkdir()
        return str(file), "the folder holds no data files", []
    if case == "not parquet":
        file.write_text("x,y\n1,2\n")
        return str(file), "cannot read it as Parquet", []
    if case == "images, wrong length":
        pixels = np.zeros((2, 60), dtype=np.float32).tolist()
        path = _points(file, {"image": pixels})
        overrides = ["data.image_size=8", "generators.arch=dcgan", "discriminator.arch=dcgan"]
        return path, "row 0 has 60 values, not channels*image_size^2 = 1*8^2 = 64", overrides
    if case == "misspelt scheme":
        return "s4://bucket/data.parquet", "Unrecognized filesystem type", []
    raise AssertionError(case)


DATA_CASES = [
    "wrong schema",
    "empty file",
    "no rows",
    "nan",
    "inf",
    "missing file",
    "empty folder",
    "not parquet",
    "images, wrong length",
    "misspelt scheme",
]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_parquet_is_refused_naming_path_problem_and_schema(
    tmp_path: Path, storage: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path, problem, extra = _bad_data(tmp_path, case)
    before = _snapshot(storage)
    message = _refused(
        capsys,
        ["data.name=parquet", f"data.path={path}", f"storage.uri={storage}", *extra],
        f"raygan: {path}: ",
        problem,
        "expected ",
    )
    schema = "a column 'image'" if extra else "numeric (float or int) columns"
    assert schema in message
    assert _snapshot(storage) == before


def test_refused_data_creates_no_storage_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Data is checked before open_storage, which would create a missing local folder.
    path, problem, _ = _bad_data(tmp_path, "nan")
    fresh = tmp_path / "new-runs"
    _refused(capsys, ["data.name=parquet", f"data.path={path}", f"storage.uri={fresh}"], problem)
    assert not fresh.exists()


def test_good_parquet_passes_preflight(tmp_path: Path) -> None:
    # The counterpart of the cases above: the same checks let clean data through.
    path = _points(tmp_path / "ok.parquet", {"x": [1.0, 2.0], "y": [3.0, 4.0], "label": [0, 1]})
    preflight(load_config("ring8", ["data.name=parquet", f"data.path={path}"]))


def test_preflight_ignores_builtin_datasets_and_raises_data_error(tmp_path: Path) -> None:
    for name in ("ring8", "grid25", "digits", "stacked_digits"):
        preflight(load_config(name))
    missing = str(tmp_path / "none.parquet")
    with pytest.raises(DataError) as info:
        preflight(load_config("ring8", ["data.name=parquet", f"data.path={missing}"]))
    assert (info.value.path, info.value.problem) == (missing, "no such file or folder")
    assert isinstance(info.value, ValueError)


# --- storage URIs --------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["s3:/bucket/runs", "S3://bucket/runs", "gs://bucket/runs"])
def test_misspelt_storage_scheme_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    uri: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # a scheme taken for a folder name would appear here
    _refused(capsys, [f"storage.uri={uri}"], repr(uri), "is not supported", "s3://bucket")
    assert list(tmp_path.iterdir()) == []


def test_storage_in_a_missing_bucket_is_refused(
    s3_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _refused(
        capsys,
        ["storage.uri=s3://no-such-bucket-7/runs", f"storage.endpoint={s3_env}"],
        "s3://no-such-bucket-7/runs",
        "bucket 'no-such-bucket-7' does not exist",
    )
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    names = [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert "no-such-bucket-7" not in names  # refused, not created on the way


def test_unreachable_storage_endpoint_is_refused(
    s3_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    message = _refused(
        capsys,
        ["storage.uri=s3://bucket/runs", f"storage.endpoint={endpoint}"],
        "cannot reach storage s3://bucket/runs",
        endpoint,
    )
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message


def test_bad_data_leaves_s3_storage_untouched(
    s3_env: str, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="runs/ring8/samples/old.png", Body=b"old")
    before = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    path, problem, _ = _bad_data(tmp_path, "wrong schema")
    _refused(
        capsys,
        [
            "data.name=parquet",
            f"data.path={path}",
            f"storage.uri=s3://{s3_bucket}/runs",
            f"storage.endpoint={s3_env}",
        ],
        problem,
    )
    after = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [(o["Key"], o["ETag"], o["LastModified"]) for o in after] == [
        (o["Key"], o["ETag"], o["LastModified"]) for o in before
    ]


# --- Parquet data on S3 --------------------------------------------------------------------------


@pytest.fixture
def s3_data(s3_env: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The bucket, with the endpoint where pyarrow's URI loader (and so the workers) look."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": [1.0, float("nan")]}), sink)
    client.put_object(Bucket=s3_bucket, Key="data/nan.parquet", Body=sink.getvalue().to_pybytes())
    client.put_object(Bucket=s3_bucket, Key="data/empty.parquet", Body=b"")
    return s3_bucket


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("data/nan.parquet", "1 NaN/Inf values"),
        ("data/empty.parquet", "the file is empty (0 bytes)"),
        ("data/typo.parquet", "no such key in bucket"),
    ],
)
def test_bad_parquet_on_s3_is_refused(
    s3_data: str, storage: Path, capsys: pytest.CaptureFixture[str], key: str, problem: str
) -> None:
    uri = f"s3://{s3_data}/{key}"
    before = _snapshot(storage)
    _refused(
        capsys,
        ["data.name=parquet", f"data.path={uri}", f"storage.uri={storage}"],
        f"raygan: {uri}: ",
        problem,
    )
    assert _snapshot(storage) == before


def test_parquet_in_a_missing_bucket_is_refused(
    s3_data: str, storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = "s3://no-such-data-bucket/data/points.parquet"
    _refused(
        capsys,
        ["data.name=parquet", f"data.path={uri}", f"storage.uri={storage}"],
        uri,
        "bucket 'no-such-data-bucket' does not exist",
    )


def test_parquet_behind_an_unreachable_endpoint_is_refused(
    s3_env: str, storage: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    uri = "s3://bucket/data/points.parquet"
    before = _snapshot(storage)
    _refused(
        capsys,
        ["data.name=parquet", f"data.path={uri}", f"storage.uri={storage}"],
        uri,
        "cannot open it",
    )
    assert _snapshot(storage) == before


# --- image data ----------------------------------------------------------------------------------

IMAGES = ["data.image_size=8", "generators.arch=dcgan", "discriminator.arch=dcgan"]


def _png(side: int = 8) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((side, side), 200, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_empty_image_folder_is_refused(
    tmp_path: Path, storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    (folder / "cats").mkdir(parents=True)
    (folder / "cats" / "notes.txt").write_text("not an image")
    before = _snapshot(storage)
    _refused(
        capsys,
        ["data.name=image_folder", f"data.path={folder}", f"storage.uri={storage}", *IMAGES],
        f"raygan: {folder}: ",
        "the folder holds no image files",
        "expected a folder of .png/.jpg/.jpeg files",
    )
    assert _snapshot(storage) == before


def test_undecodable_image_is_refused_naming_its_file(
    tmp_path: Path, storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "good.png").write_bytes(_png())
    (folder / "a" / "broken.png").write_bytes(_png()[:40])
    _refused(
        capsys,
        ["data.name=image_folder", f"data.path={folder}", f"storage.uri={storage}", *IMAGES],
        f"raygan: {folder / 'a' / 'broken.png'}: cannot decode the image",
    )


def test_undecodable_image_row_in_parquet_is_refused_naming_its_row(
    tmp_path: Path, storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "images.parquet"
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": _png(), "path": None}, {"bytes": b"\x89PNG nonsense", "path": None}]
    pq.write_table(pa.table({"image": pa.array(rows, struct)}), path)
    _refused(
        capsys,
        ["data.name=parquet", f"data.path={path}", f"storage.uri={storage}", *IMAGES],
        f"raygan: {path} row 1: cannot decode the image",
    )


def test_image_column_under_another_name_is_refused(
    tmp_path: Path, storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "img.parquet"
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"picture": pa.array([{"bytes": _png(), "path": None}], struct)}), path)
    _refused(
        capsys,
        ["data.name=parquet", f"data.path={path}", f"storage.uri={storage}", *IMAGES],
        "no usable columns: no 'image' column among ['picture']",
    )


def test_mixed_image_sizes_are_resized_not_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "small.png").write_bytes(_png(8))
    (folder / "large.png").write_bytes(_png(20))
    cfg = load_config("ring8", ["data.name=image_folder", f"data.path={folder}", *IMAGES])
    data = preflight(cfg)
    x, labels = data.read_all()
    assert x.shape == (2, 1, 8, 8) and labels is None
    assert (x == 200).all()  # a flat grey stays flat grey at any size


def test_image_folder_in_a_missing_bucket_is_refused(
    s3_data: str, storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = "s3://no-such-image-bucket/train"
    _refused(
        capsys,
        ["data.name=image_folder", f"data.path={uri}", f"storage.uri={storage}", *IMAGES],
        uri,
        "bucket 'no-such-image-bucket' does not exist",
    )


def test_label_metric_without_labels_is_refused(
    tmp_path: Path, storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "one.png").write_bytes(_png())
    _refused(
        capsys,
        [
            "data.name=image_folder",
            f"data.path={folder}",
            f"storage.uri={storage}",
            "checkpoint.metric=modes",
            *IMAGES,
        ],
        "checkpoint.metric='modes' is invalid",
        "no labels",
    )


def test_coverage_of_unlabelled_images_is_accepted_and_modes_refused(
    tmp_path: Path, storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Coverage is computed for images too now, in the eval.features space (auto: a fixed random
    # conv net for unlabelled images): ranking checkpoints by it passes preflight. Modes need
    # labels: asked of unlabelled images, refused before any worker starts, naming what is.
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [{"bytes": _png(), "path": "a.png"}] * 4}), path)
    common = ["data.name=parquet", f"data.path={path}", f"storage.uri={storage}", *IMAGES]
    data = preflight(load_config("ring8", [*common, "checkpoint.metric=coverage"]))
    assert data is not None and data.kind == "images" and not data.labelled
    _refused(
        capsys,
        [*common, "checkpoint.metric=modes"],
        "checkpoint.metric='modes' is invalid",
        "reports (fd, precision, recall, density, coverage: no labels",
    )


def test_bad_feature_spaces_are_refused_before_any_worker_starts(
    tmp_path: Path, storage: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [{"bytes": _png(), "path": "a.png"}] * 4}), path)
    common = ["data.name=parquet", f"data.path={path}", f"storage.uri={storage}", *IMAGES]
    missing = tmp_path / "inception.pt"
    _refused(
        capsys,
        [*common, f"eval.features={missing}"],
        f"eval.features='{missing}' is invalid",
        "a readable TorchScript file",
    )
    _refused(
        capsys,
        [*common, "eval.features=labels"],
        "eval.features='labels' is invalid",
        "labels only for images with a label column",
    )
    _refused(capsys, ["eval.features=inception"], "eval.features='inception' is invalid", "random")
