"""services.storage against a local folder and a real S3 HTTP endpoint (moto on loopback)."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest

from gan_core.config import StorageConfig
from services.storage import (
    StorageError,
    open_storage,
    ray_storage_args,
    redact,
)


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- local folder -----------------------------------------------------------------------------


def test_local_round_trip(tmp_path: Path) -> None:
    storage = open_storage(StorageConfig(uri=str(tmp_path / "runs")))
    assert not storage.is_s3
    assert storage.uri == str(tmp_path / "runs") and Path(storage.root).is_dir()

    uri = storage.write_bytes("ring8/checkpoint_000001/state.pt", b"\x00\x01weights")
    storage.write_bytes("ring8/grid.png", b"png")
    storage.write_bytes("other/notes.txt", b"n")

    assert uri == f"{tmp_path}/runs/ring8/checkpoint_000001/state.pt"
    assert (tmp_path / "runs/ring8/checkpoint_000001/state.pt").read_bytes() == b"\x00\x01weights"
    assert storage.read_bytes("ring8/grid.png") == b"png"
    assert storage.exists("ring8/grid.png") and storage.exists("ring8")
    assert not storage.exists("ring8/missing.png")
    assert storage.list() == [
        "other/notes.txt",
        "ring8/checkpoint_000001/state.pt",
        "ring8/grid.png",
    ]
    assert storage.list("ring8") == ["checkpoint_000001/state.pt", "grid.png"]
    assert storage.list("nothing-here") == []
    assert storage.run_uri("ring8") == f"{tmp_path}/runs/ring8"


def test_local_overwrite_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = open_storage(StorageConfig(uri=str(tmp_path)))
    storage.write_bytes("a/meta.json", b"old")
    storage.write_bytes("a/meta.json", b"new")
    assert storage.read_bytes("a/meta.json") == b"new"
    assert os.listdir(tmp_path / "a") == ["meta.json"]


def test_local_relative_uri_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage(StorageConfig(uri="./runs/"))
    assert storage.uri == str(tmp_path / "runs")
    args = ray_storage_args(storage)
    assert args == {"storage_path": str(tmp_path / "runs")}
    assert os.path.isabs(args["storage_path"])


def test_paths_cannot_escape_the_root(tmp_path: Path) -> None:
    storage = open_storage(StorageConfig(uri=str(tmp_path / "root")))
    for bad in ("../outside.txt", "a/../../outside.txt", "/etc/passwd", ""):
        with pytest.raises(StorageError):
            storage.write_bytes(bad, b"x")
    assert not (tmp_path / "outside.txt").exists()


def test_local_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("I am a file")
    with pytest.raises(StorageError, match="runs"):
        open_storage(StorageConfig(uri=str(blocker)))


@pytest.mark.parametrize(
    "uri",
    [
        "s3:/x",
        "s3://",
        "s3:///prefix",
        "gs://bucket/runs",
        "S3://bucket",
        "https://example.com/runs",
        "",
    ],
)
def test_malformed_uris_name_the_allowed_forms(uri: str) -> None:
    with pytest.raises(StorageError) as err:
        open_storage(StorageConfig(uri=uri))
    message = str(err.value)
    assert repr(uri) in message
    assert "s3://bucket" in message and "local folder" in message


def test_malformed_endpoint_is_refused(s3_env: str) -> None:
    with pytest.raises(StorageError, match="ftp://host"):
        open_storage(StorageConfig(uri="s3://bucket", endpoint="ftp://host:21"))


def test_redact_hides_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-abcdef")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "abc")  # too short to redact safely
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    text = "key=s3cr3t-value token=tok-abcdef short=abc again s3cr3t-value"
    assert redact(text) == "key=*** token=*** short=abc again ***"


# --- S3 (moto server) -------------------------------------------------------------------------


def test_s3_round_trip_is_visible_to_boto3(s3_env: str, s3_bucket: str) -> None:
    storage = open_storage(StorageConfig(uri=f"s3://{s3_bucket}/pre/", endpoint=s3_env))
    assert storage.is_s3
    assert storage.uri == f"s3://{s3_bucket}/pre" and storage.root == f"{s3_bucket}/pre"

    uri = storage.write_bytes("ring8/checkpoint_000001/state.pt", b"weights")
    storage.write_bytes("ring8/grid.png", b"png")

    assert uri == f"s3://{s3_bucket}/pre/ring8/checkpoint_000001/state.pt"
    assert storage.read_bytes("ring8/checkpoint_000001/state.pt") == b"weights"
    assert storage.exists("ring8/grid.png") and storage.exists("ring8")
    assert not storage.exists("ring8/missing.png")
    assert storage.list() == ["ring8/checkpoint_000001/state.pt", "ring8/grid.png"]
    assert storage.list("ring8/checkpoint_000001/") == ["state.pt"]
    assert storage.run_uri("ring8") == f"s3://{s3_bucket}/pre/ring8"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("ring8/missing.png")

    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="pre/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "pre/ring8/checkpoint_000001/state.pt",
        "pre/ring8/grid.png",
    ]
    body = client.get_object(Bucket=s3_bucket, Key="pre/ring8/grid.png")["Body"].read()
    assert body == b"png"


def test_s3_endpoint_from_environment(
    s3_env: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    storage = open_storage(StorageConfig(uri=f"s3://{s3_bucket}"))
    assert storage.root == s3_bucket
    storage.write_bytes("x.bin", b"1")
    assert storage.list() == ["x.bin"]


def test_s3_ray_storage_args_carry_a_working_filesystem(s3_env: str, s3_bucket: str) -> None:
    storage = open_storage(StorageConfig(uri=f"s3://{s3_bucket}/runs", endpoint=s3_env))
    storage.write_bytes("r/a.txt", b"A")
    args = ray_storage_args(storage)
    assert args["storage_path"] == f"{s3_bucket}/runs"
    assert not args["storage_path"].startswith("s3://")
    # Ray pickles the filesystem to its workers: the copy must reach the same endpoint.
    clone = pickle.loads(pickle.dumps(args["storage_filesystem"]))
    assert isinstance(clone, pafs.PyFileSystem)
    assert clone.type_name == "py::raygan-retrying-s3"
    with clone.open_input_file(f"{s3_bucket}/runs/r/a.txt") as src:
        assert src.read() == b"A"
    with clone.open_output_stream(f"{s3_bucket}/runs/r/b.txt") as out:
        out.write(b"B")
    assert storage.read_bytes("r/b.txt") == b"B"
    infos = clone.get_file_info(pafs.FileSelector(f"{s3_bucket}/runs/r"))
    assert sorted(i.base_name for i in infos) == ["a.txt", "b.txt"]


def test_many_files_copied_through_the_retrying_filesystem_do_not_deadlock(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    """Tune syncs a sweep's folder with ``pyarrow.fs.copy_files``: each file is closed on one of
    pyarrow's I/O threads, which calls our retrying upload, which writes to S3. With the SDK's
    background writes that write waited for another I/O thread, and once every I/O thread was
    inside a close the copy hung for ever (a sweep on S3 under ``ray job submit`` did). A child
    process, so that a regression fails by timeout instead of hanging pytest."""
    src = tmp_path / "many"
    for i in range(64):  # several times pyarrow's default of 8 I/O threads, in trial folders
        (src / f"trial_{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"trial_{i % 4}" / f"f{i:02d}.json").write_text(f'{{"i": {i}}}')
    script = textwrap.dedent(
        f"""
        import pyarrow.fs as pafs
        from gan_core.config import StorageConfig
        from services.storage import open_storage, ray_storage_args
        storage = open_storage(StorageConfig(uri="s3://{s3_bucket}/sync", endpoint="{s3_env}"))
        fs = ray_storage_args(storage)["storage_filesystem"]
        # As ray.train._internal.storage uploads a folder (threads on: fs is no S3FileSystem).
        pafs.copy_files("{src}", "{s3_bucket}/sync/many", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs, chunk_size=64 * 1024 * 1024)
        print(len(storage.list("many")))
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )
    except subprocess.TimeoutExpired:
        pytest.fail("copy_files through the retrying S3 filesystem hung (I/O thread deadlock)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "64"
    storage = open_storage(StorageConfig(uri=f"s3://{s3_bucket}/sync", endpoint=s3_env))
    assert storage.read_bytes("many/trial_3/f63.json") == b'{"i": 63}'


def test_s3_missing_bucket_names_the_uri(s3_env: str) -> None:
    with pytest.raises(StorageError) as err:
        open_storage(StorageConfig(uri="s3://no-such-bucket/pre", endpoint=s3_env))
    assert "s3://no-such-bucket/pre" in str(err.value)
    assert "does not exist" in str(err.value)


def test_s3_unreachable_endpoint_fails_fast_without_leaking_secrets(s3_env: str) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        open_storage(StorageConfig(uri="s3://bucket/pre", endpoint=endpoint))
    assert time.monotonic() - started < 15
    message = str(err.value)
    assert "s3://bucket/pre" in message and endpoint in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    assert os.environ["AWS_ACCESS_KEY_ID"] not in message


def test_storage_errors_are_redacted(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A secret that leaked into a URI (e.g. pasted by mistake) must not reach logs either.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leaked-secret")
    with pytest.raises(StorageError) as err:
        open_storage(StorageConfig(uri="s3://bucket-leaked-secret/pre", endpoint=s3_env))
    assert "leaked-secret" not in str(err.value)
    assert "s3://bucket-***/pre" in str(err.value)
