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
- Unlabelled images: nothing here yet (no feature space is fixed for them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gan_core.classifier import LABEL_CHANNELS, LABEL_SIDES, LabelClassifier, get_label_classifier
from gan_core.files import FileData
from gan_core.manifold import DC_K, RealManifold
from gan_core.metrics import frechet_distance, label_metrics

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


class FileEvaluator:
    """Metrics of generated samples against ``real`` rows of a file data set."""

    def __init__(self, data: FileData, real: Tensor) -> None:
        self.data, self.real = data, real
        self._classifier: tuple[LabelClassifier, Tensor] | None = None
        self._manifold: RealManifold | None = None

    def __call__(self, samples: Tensor) -> dict[str, float]:
        if self.data.kind == "points":
            metrics = {"fd": frechet_distance(self.real.numpy(), samples.numpy())}
            # k-NN balls need more points than k on both sides.
            if len(self.real) > DC_K and len(samples) > DC_K:
                if self._manifold is None:  # the real side once per run
                    self._manifold = RealManifold(self.real)
                metrics.update(self._manifold.score(samples))
            return metrics
        if not can_classify(self.data):
            return {}
        if self._classifier is None:
            self._classifier = label_classifier(self.data)
        classifier, prior = self._classifier
        return label_metrics(samples, self.real, classifier, prior)
