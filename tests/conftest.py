"""Session-wide test settings: nothing a test builds or caches lands in the user's home."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # The digit classifier is cached under RAYGAN_CACHE: one folder per session, so it is
    # trained once and every module (and every Ray worker started later) reuses it.
    # HOME is one session folder too: Ray writes its auth token under $HOME/.ray and keeps the
    # token state per process, so every ray.init of this process must see the same HOME.
    folder = tmp_path_factory.getbasetemp() / "raygan_cache"
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("RAYGAN_CACHE", "HOME", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(
        {"RAYGAN_CACHE": str(folder), "HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true"}
    )
    yield folder
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# For every Ray the suite starts (the fixtures' clusters, and the CLIs run in subprocesses, which
# inherit the environment): set before any ray.init, so the raylet and every actor have them;
# Ray Train also hands them from the driver to each run's controller.
RAY_TEST_ENV = {
    # The Train controller polls its workers every 2 s by default and takes one report per
    # poll per worker, so a worker waits up to 2 s on each report after the first (and a run
    # ends up to 2 s after its last step): most of a tiny test job's wall time was that wait.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # One more actor process per fit that watches cloud nodes for preemption notices: nothing
    # to watch on a loopback test cluster, and a process start on a 2-core machine.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


@pytest.fixture(scope="session", autouse=True)
def _ray_test_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in RAY_TEST_ENV}
    os.environ.update(RAY_TEST_ENV)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Test nets are tiny: a second intra-op thread only adds contention, several-fold slower on
    # a busy 2-core machine. Session-wide, so module fixtures and tests use the same count (a
    # bit-identical resume needs the same summation order). Code needing more sets its own.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created once per session: a new store runs all of MLflow's
    schema migrations (5-20 s on a 2-core machine), which every test with a store of its own
    would otherwise pay again."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def copy_mlflow_store(template: Path, target: Path) -> str:
    """A fresh, empty MLflow store at ``target`` (a copy of the session's migrated template, as
    MLflow itself would have created it); returns its tracking URI."""
    # SQLite's backup API: a consistent copy even while the template has an open connection.
    src, dst = sqlite3.connect(template), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return f"sqlite:///{target}"


@pytest.fixture
def mlflow_db(_mlflow_template: Path, tmp_path: Path) -> str:
    """The tracking URI of a fresh, empty MLflow store at ``tmp_path / "mlflow.db"``."""
    return copy_mlflow_store(_mlflow_template, tmp_path / "mlflow.db")
