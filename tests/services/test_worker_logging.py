"""The worker's own output stays readable: Ray Train's per-report INFO line is silenced."""

from __future__ import annotations

import logging

from ray.train.v2._internal.execution import context

from services.worker import _quiet_ray_reports


def test_ray_report_lines_are_raised_to_warning() -> None:
    logger, root = logging.getLogger(context.__file__), logging.getLogger()
    saved = logger.level, root.level
    try:
        # As in a Ray worker: the root logger at INFO, Ray's logger inheriting it.
        logger.setLevel(logging.NOTSET)
        root.setLevel(logging.INFO)
        assert logger.isEnabledFor(logging.INFO)
        _quiet_ray_reports()
        assert not logger.isEnabledFor(logging.INFO)  # "Reporting training result ..." is INFO
        assert logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(saved[0])
        root.setLevel(saved[1])
