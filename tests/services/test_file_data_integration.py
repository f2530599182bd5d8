"""A user's own data through the service, on real parts: the default storage from a fresh folder
(``python -m services.train`` starting its own Ray), points of 3 dimensions, encoded-image Parquet
on a moto S3 server streamed by Ray Data into 2 workers, and an image folder on S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gan_core.datasets import digit_images, write_image_folder, write_image_parquet
from services import train
from tests.conftest import RAY_TEST_ENV

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY_POINTS = [
    "generators.width=32",
    "generators.depth=2",
    "discriminator.width=32",
    "discriminator.maxout_pieces=1",
    "train.batch_size=32",
    "eval.samples=400",
    "eval.every=10",
    "checkpoint.every=10",
]
TINY_IMAGES = [
    "generators.arch=dcgan",
    "discriminator.arch=dcgan",
    "generators.z_dim=16",
    "generators.width=8",
    "discriminator.width=8",
    "train.batch_size=32",
    "eval.samples=300",
    "eval.grid=16",
    "eval.every=10",
    "checkpoint.every=10",
]


def _points3(path: Path, rows: int = 3000, row_group: int = 500) -> None:
    """Five tight clusters in 3-D, one row group every ``row_group`` rows."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 3)) * 2
    x = centers[rng.integers(0, 5, rows)] + 0.05 * rng.normal(size=(rows, 3))
    table = pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2].astype(np.float32)})
    pq.write_table(table, path, row_group_size=row_group)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Ray's socket paths must stay under ~107 characters: pytest's tmp_path can be too long.
    folder = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_default_storage_job_through_ray_leaves_its_outputs_where_it_was_started(
    tmp_path: Path, short_tmp: Path
) -> None:
    """What ``make demo`` does, on a user's 3-D points: a fresh folder, a relative data path, the
    default storage (./runs) and MLflow store, a private Ray with 2 workers. Ray Train V2 runs
    each worker in its own folder; everything must still land under the folder the job was
    started from, where the printed paths say."""
    work = tmp_path / "fresh"
    work.mkdir()
    _points3(work / "points.parquet")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(RAY_TMPDIR=str(short_tmp), AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=str(REPO))
    env.update(RAY_TEST_ENV)  # the suite's Ray Train settings (tests/conftest.py)
    command = [
        sys.executable,
        "-m",
        "services.train",
        "--config",
        "ring8",
        "--summary-json",
        "summary.json",
        "name=points3",
        "data.name=parquet",
        "data.path=points.parquet",
        "resources.num_workers=2",
        "train.steps=20",
        *TINY_POINTS,
    ]
    done = subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    runs = work / "runs"
    assert summary["storage_uri"] == str(runs / "points3")
    assert summary["backend"] == "ray" and summary["num_workers"] == 2
    assert summary["steps"] == 20 and np.isfinite(summary["metrics"]["fd"])
    samples = runs / "points3" / "samples"
    assert summary["samples_uri"] == str(samples)
    assert sorted(p.name for p in samples.glob("*.png")) == [
        "step_0000010.png",
        "step_0000020.png",
    ]
    checkpoints = [c for c in (runs / "points3").glob("checkpoint_*") if c.is_dir()]
    assert checkpoints and all((c / "state.pt").is_file() for c in checkpoints)
    assert Path(summary["checkpoint_uri"]).parent == runs / "points3"
    # Every path the job printed exists.
    last = done.stdout.strip().splitlines()[-1]
    assert f"samples: {samples}" in last and f"sqlite:///{runs / 'mlflow.db'}" in last
    assert Path(summary["checkpoint_uri"]).is_dir()
    # Nothing went to the workers' own folders in Ray's session directory.
    assert not list(short_tmp.rglob("mlflow.db")) and not list(short_tmp.rglob("step_*.png"))

    # The README's `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`, from that folder.
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.path"] == str(work / "points.parquet")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fd")] == [10, 20]
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert len([p for p in pictures if p.endswith(".png")]) == 2


def _train(tmp_path: Path, *overrides: str) -> dict:
    """``services.train.main`` in this process on ``overrides``; returns the summary."""
    summary = tmp_path / "summary.json"
    args = ["--config", "ring8", "--quiet", "--summary-json", str(summary)]
    assert train.main([*args, *overrides]) == 0
    return json.loads(summary.read_text())


def test_three_dimensional_points_on_the_local_backend(tmp_path: Path) -> None:
    _points3(tmp_path / "p.parquet")
    summary = _train(
        tmp_path,
        "name=local3",
        "data.name=parquet",
        f"data.path={tmp_path / 'p.parquet'}",
        f"storage.uri={tmp_path / 'runs'}",
        "resources.backend=local",
        "train.steps=20",
        *TINY_POINTS,
    )
    assert summary["steps"] == 20 and np.isfinite(summary["metrics"]["fd"])
    assert (tmp_path / "runs" / "local3" / "samples" / "step_0000020.png").is_file()


@pytest.fixture
def bucket(s3_server: str) -> str:
    name = "raygan-data"
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    if name not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=name)
    return name


def _s3_job(endpoint: str, bucket: str, tracking: str) -> list[str]:
    """Storage on the S3 server (its endpoint also serves the data), MLflow in SQLite."""
    return [
        f"storage.uri=s3://{bucket}/runs",
        f"storage.endpoint={endpoint}",
        f"tracking.uri={tracking}",
    ]


def _s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    # Only this process writes the data; the job itself gets the endpoint from storage.endpoint.
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)


def test_image_parquet_on_s3_streams_into_two_workers_each_reading_its_shard(
    ray_cluster: Path,
    s3_server: str,
    bucket: str,
    tmp_path: Path,
    mlflow_db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3 passes over the digits at 16 px, jittered and noised so every row is distinct.
    chunks = digit_images("all", size=16, copies=3, jitter=2, noise=6.0, seed=1)
    with monkeypatch.context() as patch:
        _s3_env(patch, s3_server)
        written = write_image_parquet(
            chunks, f"s3://{bucket}/digits16/train.parquet", rows_per_group=400
        )
    assert written["rows"] == 3 * 1797
    shards = tmp_path / "shards"
    shards.mkdir()
    monkeypatch.setenv("RAYGAN_SHARD_DIR", str(shards))
    summary = _train(
        tmp_path,
        "name=digits16",
        "data.name=parquet",
        f"data.path=s3://{bucket}/digits16/train.parquet",
        "data.image_size=16",
        "data.cache_mb=0",  # streamed, decoded as it is read: nothing materialized
        *_s3_job(s3_server, bucket, mlflow_db),
        "resources.num_workers=2",
        "train.steps=20",
        *TINY_IMAGES,
    )
    assert summary["steps"] == 20
    assert {"modes", "kl", "fd"} <= set(summary["metrics"]), summary["metrics"]
    # Each worker trained on rows of its own: 20 steps x 32 rows, no row on both ranks.
    seen = [set((shards / f"rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert all(len(s) >= 20 * 32 for s in seen), [len(s) for s in seen]
    assert not seen[0] & seen[1]
    keys = _keys(s3_server, bucket, "runs/digits16/")
    assert "runs/digits16/samples/step_0000020.png" in keys
    assert any(k.endswith("/state.pt") for k in keys)


def test_image_folder_on_s3_trains_with_its_class_folders_as_labels(
    ray_cluster: Path,
    s3_server: str,
    bucket: str,
    tmp_path: Path,
    mlflow_db: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with monkeypatch.context() as patch:
        _s3_env(patch, s3_server)
        written = write_image_folder(digit_images("test", size=8), f"s3://{bucket}/digit-folder")
    assert written["rows"] > 300
    summary = _train(
        tmp_path,
        "name=folder8",
        "data.name=image_folder",
        f"data.path=s3://{bucket}/digit-folder",
        "data.image_size=8",
        *_s3_job(s3_server, bucket, mlflow_db),
        "resources.num_workers=1",
        "train.steps=10",
        *TINY_IMAGES,
    )
    assert summary["steps"] == 10 and {"modes", "kl", "fd"} <= set(summary["metrics"])
    assert "runs/folder8/samples/step_0000010.png" in _keys(s3_server, bucket, "runs/folder8/")


def _keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]
