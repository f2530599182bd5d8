"""Checks of a run's input data on the driver, before any Ray worker starts.

A config can be valid and still name data the workers cannot train on: a Parquet path that is
misspelt, an empty file, another table's schema, a NaN in one row. Each worker would find out
only after Ray had started the cluster, scheduled the workers and built the model, and would fail
with a traceback in its log. ``preflight`` reads the data once on the driver with the very loader
the workers use (``gan_core.data.ParquetDataset``), so whatever they would refuse is refused
here first, as a ``DataError`` naming the path, the problem and the expected schema.
"""

from __future__ import annotations

from gan_core.config import GanConfig
from gan_core.data import DataError, ParquetDataset

__all__ = ["DataError", "preflight"]


def preflight(cfg: GanConfig) -> None:
    """Raise ``DataError`` when ``cfg``'s data cannot be trained on; return quietly otherwise.

    Built-in datasets (ring8, grid25, digits, stacked_digits) are generated or bundled with
    scikit-learn: nothing to check. Parquet data is read whole: it costs one extra read on the
    driver, the price of checking every row for NaN/Inf and every image list for its length.
    """
    if cfg.data.name != "parquet":
        return
    ParquetDataset(cfg.data.path, cfg.data.image_size, cfg.data.channels)
