"""Mode-collapse metrics: the exact protocols of docs/BENCHMARKS.md sections 1 and 2.

- 2D mixtures (PacGAN): modes captured, % high-quality samples, reverse KL over the modes.
- Stacked digits / digits: a fixed digit classifier labels each channel; modes captured and
  KL(generated || uniform) over the 1,000 (or 10) label combinations.
- Frechet distance between Gaussian fits of the classifier's penultimate features.

All functions take torch tensors or numpy arrays and return plain Python floats, so the results
can go straight into JSON, Ray reports and MLflow.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from gan_core import data
from gan_core.classifier import DigitClassifier, get_classifier

# Data names evaluate_samples understands, with the per-sample shape each expects.
SAMPLE_SHAPES: dict[str, tuple[int, ...]] = {
    "ring8": (2,),
    "grid25": (2,),
    "stacked_digits": (3, 8, 8),
    "digits": (1, 8, 8),
}
DATA_NAMES = tuple(SAMPLE_SHAPES)

# Enough to amortise per-call overhead, small enough to keep activations to a few hundred MB.
_BATCH = 4096


def mixture_metrics(
    samples: Tensor | np.ndarray, centers: Tensor | np.ndarray, std: float
) -> dict[str, float]:
    """Modes captured, % high-quality samples and reverse KL on a 2D Gaussian mixture.

    A sample is high quality (HQ) when its Euclidean distance to its nearest mean is < 3 std; a
    mode is captured when it is the nearest mean of at least one HQ sample. The reverse KL assigns
    every sample to its nearest mean: sum_m p(m) log(p(m) * M). Non-finite samples have no
    nearest mean: they count as not HQ and are left out of the reverse KL (NaN if none is finite).
    """
    points = _numpy(samples).reshape(len(samples), -1)
    means = _numpy(centers).reshape(-1, points.shape[1])
    finite = np.isfinite(points).all(axis=1)
    dist = np.linalg.norm(points[finite, None, :] - means[None, :, :], axis=2)
    nearest = dist.argmin(axis=1)
    hq = dist[np.arange(len(nearest)), nearest] < 3 * std
    num_modes = len(means)
    counts = np.bincount(nearest, minlength=num_modes)
    return {
        "modes": float(len(np.unique(nearest[hq]))),
        "hq_pct": 100.0 * hq.sum() / max(len(points), 1),
        "reverse_kl": _kl_to_uniform(counts, num_modes),
    }


def stacked_digits_metrics(
    samples: Tensor, classifier: DigitClassifier | None = None
) -> dict[str, float]:
    """Distinct label triples among ``(n, 3, 8, 8)`` samples and KL(generated || uniform)."""
    labels = classify_channels(samples, classifier)
    mode_ids = data.StackedDigitsDataset.mode_ids(labels).numpy()
    counts = np.bincount(mode_ids, minlength=data.StackedDigitsDataset.num_modes)
    return {"modes": float((counts > 0).sum()), "kl": _kl_to_uniform(counts, len(counts))}


def digits_metrics(samples: Tensor, classifier: DigitClassifier | None = None) -> dict[str, float]:
    """Distinct digit classes among ``(n, 1, 8, 8)`` samples and KL(generated || uniform)."""
    counts = np.bincount(classify_channels(samples, classifier).numpy().ravel(), minlength=10)
    return {"modes": float((counts > 0).sum()), "kl": _kl_to_uniform(counts, 10)}


def classify_channels(samples: Tensor, classifier: DigitClassifier | None = None) -> Tensor:
    """The digit label of every channel of ``(n, C, 8, 8)`` images, as ``(n, C)`` int64."""
    model = get_classifier() if classifier is None else classifier
    images = _as_tensor(samples)
    logits = _batched(model, images.reshape(-1, 1, *images.shape[2:]))
    return logits.argmax(dim=1).reshape(images.shape[0], images.shape[1])


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)) between Gaussian fits of two sets.

    ``feats_*`` are ``(n, d)`` (a 1-D array is n scalars).
    """
    a, b = (np.asarray(f, dtype=np.float64).reshape(len(f), -1) for f in (feats_a, feats_b))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # A singular product (e.g. a collapsed generator's constant features) has no finite
        # square root; a tiny ridge makes it computable without changing the value noticeably.
        ridge = 1e-6 * np.eye(len(cov_a))
        covmean = scipy.linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean.real))


def image_frechet_distance(
    real: Tensor, fake: Tensor, classifier: DigitClassifier | None = None
) -> float:
    """Frechet distance on the digit classifier's penultimate features.

    Each channel is embedded on its own and the per-channel features are concatenated, so for
    stacked digits the distance also sees how the three digits co-occur.
    """
    model = get_classifier() if classifier is None else classifier
    return frechet_distance(_channel_features(real, model), _channel_features(fake, model))


def evaluate_samples(
    data_name: str, samples: Tensor | np.ndarray, real: Tensor | np.ndarray | None = None
) -> dict[str, float]:
    """The metrics for ``data_name``'s protocol; with ``real`` images, also their "fd".

    Raises ValueError for an unknown data name or samples of the wrong shape.
    """
    if data_name not in SAMPLE_SHAPES:
        raise ValueError(f"data name {data_name!r} is not evaluable; allowed: {DATA_NAMES}")
    _check_shape("samples", samples, data_name)
    if data_name in ("ring8", "grid25"):
        mixture = data.ring8() if data_name == "ring8" else data.grid25()
        return mixture_metrics(samples, mixture.centers, mixture.std)
    fake = _as_tensor(samples)
    model = get_classifier()
    if data_name == "stacked_digits":
        metrics = stacked_digits_metrics(fake, model)
    else:
        metrics = digits_metrics(fake, model)
    if real is not None:
        _check_shape("real", real, data_name)
        metrics["fd"] = image_frechet_distance(_as_tensor(real), fake, model)
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


def _channel_features(images: Tensor, model: DigitClassifier) -> np.ndarray:
    images = _as_tensor(images)
    n, channels = images.shape[:2]
    feats = _batched(model.features, images.reshape(n * channels, 1, *images.shape[2:]))
    return feats.reshape(n, -1).numpy()


def _batched(fn: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    with torch.inference_mode():
        return torch.cat([fn(chunk) for chunk in images.split(_BATCH)])


def _as_tensor(values: Tensor | np.ndarray) -> Tensor:
    # The classifier lives on the CPU: scoring 26,000 8x8 images there takes about a second.
    return torch.as_tensor(values).detach().to("cpu", torch.float32)


def _numpy(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)
