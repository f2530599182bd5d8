"""Shared fixtures for the service tests: a real S3 HTTP endpoint (moto) on loopback."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

DUMMY_KEY_ID = "testing-key-id"
DUMMY_SECRET = "testing-secret-key-0123456789"
# Planted in the environment of every Ray job the integration tests run (moto accepts any
# credentials): tests search every output for these strings.
PLANTED_SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-7f1c9e2d4b",
    "AWS_SESSION_TOKEN": "planted-session-token-51a8c3",
    "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-c0ffee42",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-password-9d7e",
}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One private Ray for the module. Credentials and RAY_TMPDIR are set BEFORE ray.init so
    that the raylet and every worker it starts inherit them (docs/PLATFORM.md). Yields the folder
    that holds Ray's session (its logs included)."""
    import ray

    root = tmp_path_factory.mktemp("ray")
    saved = dict(os.environ)
    os.environ.update(
        {
            "RAY_TMPDIR": str(root),
            "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            **PLANTED_SECRETS,
        }
    )
    from services.launch import _loopback_node

    # As services.launch.init_ray: without it Ray swaps 127.0.0.1 for the machine's address and
    # its servers listen on every interface.
    with _loopback_node():
        ray.init(
            num_cpus=2,
            _node_ip_address="127.0.0.1",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _temp_dir=str(root / "t"),
        )
    try:
        yield root
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """One in-memory S3 server for the whole session; yields its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Dummy credentials and region for one test; no client may probe the cloud metadata
    address. Returns the endpoint URL, which is deliberately NOT put in AWS_ENDPOINT_URL so a
    test sees whether code passes the endpoint through."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A fresh bucket per test (moto keeps state for the whole session); returns its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=name)
    return name
