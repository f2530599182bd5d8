"""services/waiting.py: the pure parts (the cluster parts: test_node_loss.py)."""

from __future__ import annotations

import os

import pytest

from services.waiting import START_TIMEOUT_ENV, _fmt, is_start_timeout, set_start_timeout


class WorkerGroupStartupTimeoutError(RuntimeError):
    """Named as Ray Train's (matched by name: Ray's class lives in an internal module)."""


class ControllerError(RuntimeError):
    def __init__(self, failure: BaseException) -> None:
        super().__init__(str(failure))
        self.controller_failure = failure


def test_a_start_timeout_is_found_however_ray_wraps_it() -> None:
    timeout = WorkerGroupStartupTimeoutError("timed out after 20 s waiting for 2 workers")
    assert is_start_timeout(timeout)
    assert is_start_timeout(ControllerError(timeout))
    try:
        try:
            raise ControllerError(timeout)
        except ControllerError as inner:
            raise RuntimeError("Training failed") from inner
    except RuntimeError as outer:
        assert is_start_timeout(outer)
    # Another failure, even one that mentions the words, is not a timeout.
    assert not is_start_timeout(ControllerError(ValueError("WorkerGroupStartupTimeoutError?")))
    assert not is_start_timeout(RuntimeError("worker died"))


def test_resources_are_shown_by_what_workers_ask_for() -> None:
    assert _fmt({"CPU": 2.0, "memory": 1e9, "node:127.0.0.1": 1.0}) == "CPU 2"
    assert _fmt({"GPU": 1.0, "CPU": 0.5}) == "CPU 0.5, GPU 1"
    assert _fmt({"memory": 1.0}) == "nothing"


def test_the_start_timeout_reaches_ray_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    set_start_timeout(90)
    assert os.environ[START_TIMEOUT_ENV] == "90.0"
    # Ray Train forwards it from the driver to its controller only when set: check the name.
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    assert START_TIMEOUT_ENV in ENV_VARS_TO_PROPAGATE
