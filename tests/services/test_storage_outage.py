"""The S3 endpoint goes away and comes back (a TCP proxy in front of the moto server)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import boto3
import pytest

from gan_core.config import StorageConfig
from services import storage as storage_mod
from services.storage import StorageError, open_storage
from tests.services.faults import FlakyProxy


@pytest.fixture
def proxy(s3_env: str) -> Iterator[FlakyProxy]:
    flaky = FlakyProxy(s3_env)
    try:
        yield flaky
    finally:
        flaky.close()


def _direct(s3_env: str):
    return boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")


def test_write_during_a_short_outage_retries_and_lands(
    proxy: FlakyProxy, s3_env: str, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_storage(StorageConfig(uri=f"s3://{s3_bucket}/r", endpoint=proxy.url))
    proxy.down()
    threading.Timer(2.0, proxy.up).start()
    caplog.set_level(logging.WARNING, logger="raygan")
    started = time.monotonic()
    store.write_bytes("a/x.bin", b"new bytes")
    assert time.monotonic() - started >= 1.5, "the write cannot have waited for the outage"
    body = _direct(s3_env).get_object(Bucket=s3_bucket, Key="r/a/x.bin")["Body"].read()
    assert body == b"new bytes"
    # Which layer bridged the gap (the SDK's per-request retries or raygan's) depends on
    # timing; every raygan retry says where it was writing.
    for record in caplog.records:
        if "retry" in record.getMessage():
            assert f"s3://{s3_bucket}/r" in record.getMessage()


def test_outage_longer_than_the_budget_names_the_uri_and_keeps_the_old_object(
    proxy: FlakyProxy,
    s3_env: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="raygan")
    # Budget 1.55 s instead of 15.5 s, and no SDK retries inside each attempt (~8 s each).
    monkeypatch.setattr(storage_mod, "S3_FIRST_BACKOFF_S", 0.05)
    monkeypatch.setattr(storage_mod, "S3_SDK_ATTEMPTS", 1)
    store = open_storage(StorageConfig(uri=f"s3://{s3_bucket}/r", endpoint=proxy.url))
    store.write_bytes("ckpt/state.pt", b"old checkpoint")
    proxy.down()
    with pytest.raises(StorageError) as err:
        store.write_bytes("ckpt/state.pt", b"new checkpoint")
    message = str(err.value)
    assert f"s3://{s3_bucket}/r" in message and "'ckpt/state.pt'" in message
    assert f"failed after {storage_mod.S3_ATTEMPTS} attempts" in message
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == storage_mod.S3_ATTEMPTS - 1
    assert "retry 1 of 5 in 0.1 s" in retries[0] and "retry 5 of 5 in 0.8 s" in retries[-1]
    body = _direct(s3_env).get_object(Bucket=s3_bucket, Key="r/ckpt/state.pt")["Body"].read()
    assert body == b"old checkpoint"
    proxy.up()
    assert store.read_bytes("ckpt/state.pt") == b"old checkpoint"


def test_upload_cut_midway_never_leaves_a_partial_object(
    proxy: FlakyProxy, s3_env: str, s3_bucket: str
) -> None:
    store = open_storage(StorageConfig(uri=f"s3://{s3_bucket}/r", endpoint=proxy.url))
    payload = bytes(range(256)) * 4096  # 1 MiB: the cut lands inside the body
    store.write_bytes("ckpt/state.pt", b"previous")
    proxy.arm(rb"PUT /[^ ]*ckpt/state\.pt", outage_s=1.5)
    seen: list[bytes] = []

    def watch() -> None:
        # While the link is down, S3 must show the previous object, whole.
        while not proxy.outages or proxy.is_down:
            if proxy.is_down:
                obj = _direct(s3_env).get_object(Bucket=s3_bucket, Key="r/ckpt/state.pt")
                seen.append(obj["Body"].read())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    store.write_bytes("ckpt/state.pt", payload)
    watcher.join(timeout=10)
    assert proxy.cut_requests, "the upload was never cut: the test proves nothing"
    assert seen and set(seen) == {b"previous"}
    body = _direct(s3_env).get_object(Bucket=s3_bucket, Key="r/ckpt/state.pt")["Body"].read()
    assert body == payload
