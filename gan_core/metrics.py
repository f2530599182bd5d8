"""Mode-collapse metrics: the exact protocols of docs/PROTOCOLS.md sections 1 and 2.

- 2D mixtures (PacGAN): modes captured, % high-quality samples, reverse KL over the modes.
- Stacked digits / digits: a fixed digit classifier labels each channel; modes captured and
  KL(generated || uniform) over the 1,000 (or 10) label combinations.
- Frechet distance between Gaussian fits of the classifier's penultimate features.
- On every data set, against a real reference sample: precision, recall, density and coverage
  (``gan_core.manifold``) and the Frechet distance, in raw coordinates for the mixtures and in
  the digit classifier's features for digits. ``SampleEvaluator`` computes the real side once.

All functions take torch tensors or numpy arrays and return plain Python floats, so the results
can go straight into JSON, Ray reports and MLflow.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gan_core import data
from gan_core.classifier import DigitClassifier, LabelClassifier, get_classifier, single_thread
from gan_core.manifold import DC_K, RealManifold

# Data names evaluate_samples understands, with the per-sample shape each expects.
SAMPLE_SHAPES: dict[str, tuple[int, ...]] = {
    "ring8": (2,),
    "grid25": (2,),
    "stacked_digits": (3, 8, 8),
    "digits": (1, 8, 8),
}
DATA_NAMES = tuple(SAMPLE_SHAPES)

# Measured fastest for the 8x8 CNN on one CPU thread; larger chunks spill out of cache.
_BATCH = 1024


def mixture_metrics(
    samples: Tensor | np.ndarray, centers: Tensor | np.ndarray, std: float
) -> dict[str, float]:
    """Modes captured, % high-quality samples and reverse KL on a 2D Gaussian mixture.

    A sample is high quality (HQ) when its Euclidean distance to its nearest mean is < 3 std; a
    mode is captured when it is the nearest mean of at least one HQ sample. The reverse KL assigns
    every sample to its nearest mean: sum_m p(m) log(p(m) * M). Non-finite samples have no
    nearest mean: they count as not HQ and are left out of the reverse KL (NaN if none is finite).
    """
    means = _numpy(centers)
    means = means.reshape(len(means), -1)
    points = _numpy(samples).reshape(-1, means.shape[1])
    finite = np.isfinite(points).all(axis=1)
    dist = np.linalg.norm(points[finite, None, :] - means[None, :, :], axis=2)
    nearest = dist.argmin(axis=1)
    hq = dist[np.arange(len(nearest)), nearest] < 3 * std
    num_modes = len(means)
    counts = np.bincount(nearest, minlength=num_modes)
    return {
        "modes": float(len(np.unique(nearest[hq]))),
        "hq_pct": float(100.0 * hq.sum() / max(len(points), 1)),
        "reverse_kl": _kl_to_uniform(counts, num_modes),
    }


def stacked_digits_metrics(
    samples: Tensor, classifier: DigitClassifier | None = None
) -> dict[str, float]:
    """Distinct label triples among ``(n, 3, 8, 8)`` samples and KL(generated || uniform over 1000).

    Each channel is labelled by the digit classifier; the triple (l0, l1, l2) is the mode.
    """
    _check_shape("samples", samples, "stacked_digits")
    model = _model(classifier)
    return _mode_metrics(_labels(_channel_features(samples, model), model))


def digits_metrics(samples: Tensor, classifier: DigitClassifier | None = None) -> dict[str, float]:
    """Distinct digit classes among ``(n, 1, 8, 8)`` samples and KL(generated || uniform)."""
    _check_shape("samples", samples, "digits")
    model = _model(classifier)
    return _mode_metrics(_labels(_channel_features(samples, model), model))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)) between Gaussian fits of two sets.

    ``feats_*`` are ``(n, d)`` (a 1-D array is n scalars).
    """
    return _GaussianFit(feats_a).distance(feats_b)


class _GaussianFit:
    """Mean, covariance and covariance square root of a set of features, fitted once: the
    Frechet distance of many generated sets to one real set then needs no refit of the real."""

    def __init__(self, feats: np.ndarray | Tensor) -> None:
        a = _numpy(feats).reshape(len(feats), -1)
        self.mu, self.cov = a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False))
        eig, vec = np.linalg.eigh(self.cov)
        self.root = (vec * np.sqrt(eig.clip(min=0))) @ vec.T

    def distance(self, feats: np.ndarray | Tensor) -> float:
        b = _numpy(feats).reshape(len(feats), -1)
        mu_b, cov_b = b.mean(axis=0), np.atleast_2d(np.cov(b, rowvar=False))
        diff = self.mu - mu_b
        trace_sqrt = _trace_sqrt_product(self.root, cov_b)
        distance = diff @ diff + np.trace(self.cov) + np.trace(cov_b) - 2 * trace_sqrt
        # Identical sets can come out a hair below 0 from rounding; the distance itself never is.
        return max(float(distance), 0.0)


def _trace_sqrt_product(root_a: np.ndarray, cov_b: np.ndarray) -> float:
    """Tr sqrt(S_a S_b), from the eigenvalues of the symmetric sqrt(S_a) S_b sqrt(S_a).

    Both matrices have the same eigenvalues, so this equals the real part of
    Tr(scipy.linalg.sqrtm(S_a S_b)). Classifier features often have a singular covariance (and a
    collapsed generator always does); there sqrtm of the non-symmetric product warned and took
    seconds, while symmetric eigendecompositions stay fast and accurate.
    """
    eig = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(np.sqrt(eig.clip(min=0)).sum())


class RealFeatures:
    """The real side of "fd" and of precision, recall, density and coverage, computed once.

    ``real`` are the real samples' features (raw coordinates for points), ``(n, d)``. Exact
    duplicate rows are dropped first: a reference drawn with replacement from a small set (the
    digits) would otherwise give balls of radius 0 around any row drawn more than k times. The
    k-NN measures need more than DC_K distinct real rows and generated samples; below that only
    "fd" is reported."""

    def __init__(self, real: Tensor | np.ndarray) -> None:
        feats = torch.as_tensor(real).detach().to("cpu", torch.float32)
        self.feats = feats.reshape(len(feats), -1)
        self.fit = _GaussianFit(self.feats)
        distinct = torch.unique(self.feats, dim=0)
        self.manifold = RealManifold(distinct) if len(distinct) > DC_K else None

    def score(self, fake: Tensor | np.ndarray) -> dict[str, float]:
        """ "fd", and precision, recall, density and coverage, of generated features ``fake``."""
        fake = torch.as_tensor(fake).detach().to("cpu", torch.float32).reshape(len(fake), -1)
        finite = torch.isfinite(fake).all(dim=1)
        # A Gaussian fit of samples with a NaN is undefined: NaN, as a loss would be.
        metrics = {"fd": self.fit.distance(fake) if bool(finite.all()) else float("nan")}
        if self.manifold is not None and len(fake) > DC_K:
            if bool(finite.all()):
                metrics.update(self.manifold.score(fake))
            else:
                # A diverged generator's NaN samples are in no ball and hold none; the k-NN
                # measures stay defined (and low) instead of failing the evaluation.
                metrics.update(_prdc_with_nonfinite(self.manifold, fake[finite], len(fake)))
        return metrics


def _prdc_with_nonfinite(manifold: RealManifold, finite: Tensor, total: int) -> dict[str, float]:
    if len(finite) <= DC_K:
        return {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    got = manifold.score(finite)
    share = len(finite) / total  # precision and density are per generated sample
    return {
        "precision": got["precision"] * share,
        "recall": got["recall"],
        "density": got["density"] * share,
        "coverage": got["coverage"],
    }


def image_frechet_distance(
    real: Tensor, fake: Tensor, classifier: DigitClassifier | None = None
) -> float:
    """Frechet distance on the digit classifier's penultimate features.

    Each channel is embedded on its own and the per-channel features are concatenated, so for
    stacked digits the distance also sees how the three digits co-occur.
    """
    model = _model(classifier)
    return _feature_distance(_channel_features(real, model), _channel_features(fake, model))


def evaluate_samples(
    data_name: str, samples: Tensor | np.ndarray, real: Tensor | np.ndarray | None = None
) -> dict[str, float]:
    """The metrics for ``data_name``'s protocol; with ``real`` samples, also "fd" and
    precision, recall, density and coverage against them (one-off ``SampleEvaluator``).

    Raises ValueError for an unknown data name or samples of the wrong shape.
    """
    return SampleEvaluator(data_name, real)(samples)


class SampleEvaluator:
    """``evaluate_samples`` for one data set and one real reference, whose side (features, fit,
    k-NN balls) is computed here once and reused at every call: a run builds one."""

    def __init__(self, data_name: str, real: Tensor | np.ndarray | None = None) -> None:
        if data_name not in SAMPLE_SHAPES:
            raise ValueError(f"data name {data_name!r} is not evaluable; allowed: {DATA_NAMES}")
        self.data_name = data_name
        self.points = data_name in ("ring8", "grid25")
        if real is not None:
            _check_shape("real", real, data_name)
        if self.points:
            self.mixture = data.ring8() if data_name == "ring8" else data.grid25()
        else:
            self.model = get_classifier()
        self.real: RealFeatures | None = None
        if real is not None:
            self.real = RealFeatures(_as_tensor(real) if self.points else self._feats(real))

    def _feats(self, images: Tensor | np.ndarray) -> Tensor:
        return _channel_features(images, self.model)

    def __call__(self, samples: Tensor | np.ndarray) -> dict[str, float]:
        _check_shape("samples", samples, self.data_name)
        if self.points:
            metrics = mixture_metrics(samples, self.mixture.centers, self.mixture.std)
            feats = _as_tensor(samples)
        else:
            # The generated samples' features serve both the mode labels and the distance.
            feats = self._feats(samples)
            metrics = _mode_metrics(_labels(feats, self.model))
        if self.real is not None:
            metrics.update(self.real.score(feats.flatten(1)))
        return metrics


def _check_shape(what: str, values: Tensor | np.ndarray, data_name: str) -> None:
    expected = (len(values) if values.ndim else 0, *SAMPLE_SHAPES[data_name])
    if tuple(values.shape) != expected or len(values) == 0:
        want = ", ".join(["n >= 1", *map(str, SAMPLE_SHAPES[data_name])])
        raise ValueError(
            f"{what} for {data_name!r} have shape {tuple(values.shape)}; expected ({want})"
        )


def _kl_to_uniform(counts: np.ndarray, num_modes: int) -> float:
    """sum_m p(m) log(p(m) * M) for the empirical distribution ``counts``; p(m) = 0 adds 0."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(np.sum(p * np.log(p * num_modes)))


def _model(classifier: DigitClassifier | None) -> DigitClassifier:
    return get_classifier() if classifier is None else classifier


def _channel_features(images: Tensor | np.ndarray, model: DigitClassifier) -> Tensor:
    """Penultimate features of every channel of ``(n, C, H, W)`` images, as ``(n, C, k)``."""
    images = _as_tensor(images)
    n, channels = images.shape[:2]
    flat = images.reshape(n * channels, 1, *images.shape[2:])
    with torch.inference_mode(), single_thread():
        feats = torch.cat([model.features(chunk) for chunk in flat.split(_BATCH)])
    return feats.reshape(n, channels, -1)


def _labels(feats: Tensor, model: DigitClassifier) -> Tensor:
    with torch.inference_mode():
        return model.head(feats).argmax(dim=-1)


def _mode_metrics(labels: Tensor) -> dict[str, float]:
    """Modes and KL to uniform when each of the C channel labels (0..9) is one base-10 digit."""
    channels = labels.shape[1]
    num_modes = 10**channels
    powers = 10 ** torch.arange(channels - 1, -1, -1)
    counts = np.bincount((labels * powers).sum(dim=1).numpy(), minlength=num_modes)
    return {"modes": float((counts > 0).sum()), "kl": _kl_to_uniform(counts, num_modes)}


def _feature_distance(real_feats: Tensor, fake_feats: Tensor) -> float:
    return frechet_distance(real_feats.flatten(1).numpy(), fake_feats.flatten(1).numpy())


def _as_tensor(values: Tensor | np.ndarray) -> Tensor:
    # The classifier lives on the CPU: scoring 26,000 8x8 images there takes about two seconds.
    return torch.as_tensor(values).detach().to("cpu", torch.float32)


def _numpy(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def label_metrics(
    samples: Tensor | np.ndarray,
    real: Tensor | np.ndarray | None,
    classifier: LabelClassifier,
    class_prior: Tensor | np.ndarray,
) -> dict[str, float]:
    """Classes covered by ``samples``, KL to the real class distribution, and "fd" to ``real``.

    For a labelled image data set: ``classifier`` (from get_label_classifier) labels each
    ``(n, C, S, S)`` sample; "modes" counts the distinct predicted classes and "kl" is
    KL(predicted class distribution || ``class_prior``), the real class frequencies (length
    ``classifier.num_classes``, summing to 1). "fd" is the Frechet distance between the
    classifier's penultimate features of ``real`` and of ``samples``, present only with ``real``.
    Raises ValueError for images of another shape than the classifier's or a prior of another
    length than its classes.
    """
    prior = _numpy(class_prior).reshape(-1)
    if len(prior) != classifier.num_classes:
        raise ValueError(
            f"class_prior has {len(prior)} entries; the classifier has "
            f"{classifier.num_classes} classes"
        )
    for what, images in (("samples", samples), ("real", real)):
        if images is not None and (
            tuple(images.shape[1:]) != classifier.image_shape or len(images) == 0
        ):
            raise ValueError(
                f"{what} have shape {tuple(images.shape)}; expected (n >= 1, "
                f"{', '.join(map(str, classifier.image_shape))})"
            )
    # The samples' features serve both the class labels and the distance: embed once.
    fake_feats = _image_features(samples, classifier)
    with torch.inference_mode():
        predicted = classifier.head(fake_feats).argmax(dim=1)
    counts = np.bincount(predicted.numpy(), minlength=classifier.num_classes)
    metrics = {"modes": float((counts > 0).sum()), "kl": _kl_to_prior(counts, prior)}
    if real is not None:
        metrics["fd"] = _feature_distance(_image_features(real, classifier), fake_feats)
    return metrics


def _kl_to_prior(counts: np.ndarray, prior: np.ndarray) -> float:
    """sum_m p(m) log(p(m) / q(m)) for the empirical ``counts`` against ``prior`` q.

    p(m) = 0 adds 0. A class the samples fall in that the prior gives 0 makes the KL infinite:
    returned as inf outright rather than through a division by zero.
    """
    total = counts.sum()
    if total == 0:
        return float("nan")
    seen = counts > 0
    if np.any(prior[seen] <= 0):
        return float("inf")
    p = counts[seen] / total
    return float(np.sum(p * np.log(p / prior[seen])))


def _image_features(images: Tensor | np.ndarray, model: LabelClassifier) -> Tensor:
    """Penultimate features ``(n, k)`` of whole ``(n, C, S, S)`` images, in chunks of _BATCH."""
    images = _as_tensor(images)
    with torch.inference_mode(), single_thread():
        return torch.cat([model.features(chunk) for chunk in images.split(_BATCH)])
