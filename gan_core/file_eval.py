"""What an evaluation measures on a user's file data, where no mode centers are known.

- Points: the Frechet distance between the generated samples and the real reference sample, in
  raw coordinates, and precision, recall, density and coverage (``gan_core.manifold``: k-NN
  balls; coverage is the share of real points with a generated one nearby, so a generator that
  drops a cluster loses its share of coverage, labels or not).
- Labelled images (a ``label`` column, or an image folder's class subfolders): a small classifier
  is trained on the data set's own labels (``gan_core.classifier.get_label_classifier``, cached on
  disk by a hash of its training rows, so every process of a run and every later run shares it);
  then "modes" = classes the generator covers, "kl" = KL(generated classes || real classes) and
  "fd" = the Frechet distance in the classifier's features.
- Every image data set, labelled or not: "fd" and precision, recall, density and coverage in the
  feature space ``eval.features`` picks (``gan_core.features``: the label classifier's, the digit
  classifier's, a fixed random conv net's, or a user's TorchScript extractor); ``auto`` is the
  label classifier's with labels, else the random net's. The real side (features, Gaussian fit,
  k-NN balls) is computed at the first evaluation and reused at every later one.
"""

from __future__ import annotations

import math

import pyarrow.fs as pafs
import torch
from torch import Tensor

from gan_core import features as spaces
from gan_core.classifier import LABEL_CHANNELS, LABEL_SIDES, LabelClassifier, get_label_classifier
from gan_core.config import ConfigError
from gan_core.files import FileData
from gan_core.metrics import RealFeatures, label_metrics

# Rows of the data set the classifier learns from and is scored on (a fixed sample, seed 1),
# bounded in memory: 64x64 RGB rows as float32 would take 590 MiB at 12,000.
CLASSIFIER_ROWS = 12_000
TEST_FRACTION = 1 / 6
MAX_CLASSIFIER_BYTES = 256 * 2**20


def can_classify(data: FileData) -> bool:
    """Whether ``data`` has labels and images of a shape the label classifier takes."""
    return (
        data.kind == "images"
        and data.labelled
        and data.shape[0] in LABEL_CHANNELS
        and data.shape[1] in LABEL_SIDES
    )


def label_classifier(data: FileData) -> tuple[LabelClassifier, Tensor]:
    """The classifier of ``data``'s labels (trained on first use, else loaded from the cache)
    and the real class frequencies it is compared against."""
    rows = min(CLASSIFIER_ROWS, MAX_CLASSIFIER_BYTES // (4 * math.prod(data.shape)))
    images, labels = data.reference(rows, seed=1)
    cut = len(images) - max(1, round(len(images) * TEST_FRACTION))
    classifier = get_label_classifier(images[:cut], labels[:cut], images[cut:], labels[cut:])
    counts = torch.bincount(labels[:cut], minlength=classifier.num_classes).to(torch.float64)
    return classifier, counts / counts.sum()


def file_extractor(
    data: FileData,
    value: str = "auto",
    filesystem: pafs.FileSystem | None = None,
    classifier: LabelClassifier | None = None,
) -> spaces.Embed | None:
    """The embedding ``eval.features=value`` names for ``data``'s images, checked on a test
    batch (None for points, which are scored in raw coordinates). An ``s3://`` extractor is read
    through ``filesystem`` if given, else through the data's own when the data is on S3 too (the
    run's endpoint and credentials), else as ``resolve_filesystem`` reads a URI. Raises
    ConfigError naming eval.features for a value the data cannot use or an extractor that
    fails. ``classifier``: ``data``'s label classifier when the caller has it already."""
    if data.kind == "points":
        if value != "auto":
            raise ConfigError(
                "eval.features",
                value,
                "auto for point data (metrics in raw coordinates)",
                "features",
            )
        return None
    labels_embed = None
    if can_classify(data) and spaces.resolve(value, True) == "labels":
        classifier = classifier or label_classifier(data)[0]
        labels_embed = spaces.batched(classifier.features)
    # An s3:// extractor is read like the data: with the run's S3 filesystem and credentials.
    if filesystem is None and "://" in data.uri and "://" in value:
        filesystem = data.filesystem
    return spaces.image_extractor(value, data.shape, labels_embed, filesystem)


class FileEvaluator:
    """Metrics of generated samples against ``real`` rows of a file data set; ``features`` is
    eval.features (images only)."""

    def __init__(self, data: FileData, real: Tensor, features: str = "auto") -> None:
        self.data, self.real, self.features = data, real, features
        self._classifier: tuple[LabelClassifier, Tensor] | None = None
        self._embed: spaces.Embed | None = None
        self._reference: RealFeatures | None = None

    def __call__(self, samples: Tensor) -> dict[str, float]:
        if self._reference is None:  # the real side once per run
            if can_classify(self.data):
                self._classifier = label_classifier(self.data)
            classifier = self._classifier[0] if self._classifier else None
            self._embed = file_extractor(self.data, self.features, classifier=classifier)
            real = self.real if self._embed is None else self._embed(self.real)
            self._reference = RealFeatures(real)
        metrics: dict[str, float] = {}
        if self._classifier is not None:
            classifier, prior = self._classifier
            # Modes and KL only: "fd" comes from the chosen feature space below.
            metrics = label_metrics(samples, None, classifier, prior)
        fake = samples if self._embed is None else self._embed(samples)
        metrics.update(self._reference.score(fake))
        return metrics
