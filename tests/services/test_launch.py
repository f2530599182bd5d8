"""services/launch.py: the pure parts (a private Ray: test_loopback.py, test_train_integration)."""

from __future__ import annotations

import pytest

from gan_core.config import load_config
from services.launch import worker_threads


@pytest.mark.parametrize(
    ("threads", "cpus", "expected"),
    [(0, 1.0, 1), (0, 2.5, 2), (0, 0.5, 1), (3, 1.0, 3), (1, 4.0, 1)],
)
def test_a_process_outside_ray_trains_on_the_threads_a_ray_worker_would_get(
    threads: int, cpus: float, expected: int
) -> None:
    cfg = load_config("ring8", [f"train.threads={threads}", f"resources.cpus_per_worker={cpus}"])
    assert worker_threads(cfg) == expected
