"""Checks of a run's input data on the driver, before any Ray worker starts.

A config can be valid and still name data the workers cannot train on: a path that is misspelt,
a bucket that does not exist, an empty file or folder, another table's schema, a NaN, an image
that does not decode. Each worker would find out only after Ray had started the cluster,
scheduled the workers and built the model, and would fail with a traceback in its log.
``preflight`` opens the data with the reader the workers use (``gan_core.files``): it reads the
metadata and decodes the first rows (all rows of a small data set), so whatever they would refuse
is refused here first, as a ``DataError`` naming the path, the problem and the expected layout.
"""

from __future__ import annotations

from gan_core.config import FILE_DATA, LABEL_METRICS, POINT_METRICS, ConfigError, GanConfig
from gan_core.file_eval import can_classify, file_extractor, label_classifier
from gan_core.files import DataError, FileData, open_file_data
from services.storage import s3_filesystem

__all__ = ["DataError", "open_data", "preflight"]


def open_data(cfg: GanConfig, check: bool = True) -> FileData | None:
    """The description of ``cfg``'s file data (None for generated data). ``s3://`` data is read
    with the storage's endpoint and credentials (``storage.endpoint`` or AWS_ENDPOINT_URL)."""
    if cfg.data.name not in FILE_DATA:
        return None
    filesystem = s3_filesystem(cfg.storage) if cfg.data.path.startswith("s3://") else None
    return open_file_data(cfg.data, check=check, filesystem=filesystem)


def preflight(cfg: GanConfig) -> FileData | None:
    """Raise ``DataError`` (or ``ConfigError`` for a checkpoint metric the data cannot report)
    when ``cfg``'s data cannot be trained on; return the file data's description, or None for
    the generated data sets (ring8, grid25, digits, stacked_digits: nothing to check)."""
    data = open_data(cfg)
    if data is None:
        return None
    # Every file data set reports the k-NN measures and fd (images: in eval.features' space);
    # modes and kl need labels the label classifier takes.
    reported: tuple[str, ...] = POINT_METRICS
    if can_classify(data):
        reported = tuple(dict.fromkeys(LABEL_METRICS + POINT_METRICS))
    metric = cfg.checkpoint.metric
    if metric in LABEL_METRICS + POINT_METRICS and metric not in reported:
        why = (
            "it holds points"
            if data.kind == "points"
            else "no labels, or a shape without a classifier"
        )
        raise ConfigError(
            "checkpoint.metric",
            metric,
            f"a metric {cfg.data.path} reports ({', '.join(reported) or 'none'}: {why}), a "
            "training metric (d_loss, g_loss, step), or empty for the latest",
            "preflight",
        )
    classifier = None
    if can_classify(data):
        # Trained (or loaded) here, once: the workers then load it from the cache instead of
        # each training the same classifier at their first evaluation.
        classifier = label_classifier(data)[0]
    # eval.features is checked against the data (labels for 'labels', 8x8 for 'digits', points
    # take 'auto' only) and a TorchScript extractor loaded and run on a test batch: a bad one
    # fails here, naming the key and the value, not in every worker at its first evaluation.
    features = cfg.eval.features
    filesystem = s3_filesystem(cfg.storage) if features.startswith("s3://") else None
    file_extractor(data, features, filesystem, classifier)
    return data
