"""Fixtures shared by the gan_core tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from gan_core.classifier import DigitClassifier, get_classifier


@pytest.fixture(scope="session")
def cache_dir(_isolated_cache: Path) -> Path:
    return _isolated_cache


@pytest.fixture(scope="session")
def digit_classifier(cache_dir: Path) -> DigitClassifier:
    return get_classifier(cache_dir)
