"""Session-wide test settings: nothing a test builds or caches lands in the user's home."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Test nets are tiny: a second intra-op thread only adds contention, several-fold slower on
    # a busy 2-core machine. Session-wide, so module fixtures and tests use the same count (a
    # bit-identical resume needs the same summation order). Code needing more sets its own.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
