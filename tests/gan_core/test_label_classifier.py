"""Tests for the label classifier (gan_core.classifier) and label_metrics (gan_core.metrics).

Everything trains on the 8x8 digits (upsampled where another side is needed): the default recipe
fits them in a second or two on one thread.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gan_core import classifier
from gan_core.classifier import (
    LABEL_CHANNELS,
    LABEL_RECIPE,
    LABEL_SIDES,
    LabelClassifier,
    accuracy,
    get_label_classifier,
)
from gan_core.data import load_digits
from gan_core.metrics import label_metrics

# Two epochs at most: enough for > 90 % on the digits at 16 px, at a third of the cost.
_QUICK_RECIPE = {**LABEL_RECIPE, "epochs": 2}


@pytest.fixture(scope="module")
def label_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("label_cache")


@pytest.fixture(scope="module")
def digits_model(label_cache: Path) -> LabelClassifier:
    """The default recipe on the digits' train split, scored on the test split."""
    return get_label_classifier(*load_digits("train"), *load_digits("test"), cache_dir=label_cache)


@pytest.fixture(scope="module")
def prior() -> np.ndarray:
    _, labels = load_digits("train")
    return np.bincount(labels.numpy(), minlength=10) / len(labels)


def _resize(images: Tensor, side: int) -> Tensor:
    return F.interpolate(images, size=side, mode="bilinear", align_corners=False)


def _same_weights(a: LabelClassifier, b: LabelClassifier) -> None:
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor), name


def test_held_out_accuracy_is_above_90_percent(digits_model: LabelClassifier) -> None:
    images, labels = load_digits("test")
    assert digits_model.test_accuracy > 0.9
    assert accuracy(digits_model, images, labels) == pytest.approx(digits_model.test_accuracy)
    assert digits_model.num_classes == 10 and digits_model.image_shape == (1, 8, 8)
    assert not digits_model.training
    assert not any(p.requires_grad for p in digits_model.parameters())


@pytest.mark.parametrize(("side", "channels"), [(16, 1), (8, 3)])
def test_other_sides_and_rgb_also_learn_the_digits(
    side: int, channels: int, tmp_path: Path
) -> None:
    (train_x, train_y), (test_x, test_y) = load_digits("train"), load_digits("test")
    train_x, test_x = (_resize(x, side).expand(-1, channels, -1, -1) for x in (train_x, test_x))
    model = get_label_classifier(
        train_x, train_y, test_x, test_y, cache_dir=tmp_path, recipe=_QUICK_RECIPE
    )
    assert model.image_shape == (channels, side, side)
    assert model.test_accuracy > 0.9


def test_no_test_set_gives_nan_accuracy(tmp_path: Path) -> None:
    images, labels = load_digits("train")
    model = get_label_classifier(images, labels, cache_dir=tmp_path, recipe=_QUICK_RECIPE)
    assert math.isnan(model.test_accuracy)


def test_training_twice_gives_bit_identical_weights(
    digits_model: LabelClassifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classifier, "_LABEL_MEMO", {})
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    rebuilt = get_label_classifier(*load_digits("train"), *load_digits("test"), cache_dir=tmp_path)
    # The caller's thread count and global RNG come back untouched.
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    assert rebuilt is not digits_model
    assert rebuilt.test_accuracy == digits_model.test_accuracy
    _same_weights(digits_model, rebuilt)


def test_cache_file_is_written_and_reloaded_with_weights_only(
    digits_model: LabelClassifier, label_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (saved,) = label_cache.glob("label_classifier_*.pt")
    assert not list(label_cache.glob("*.tmp"))  # the atomic write left no temporary file behind

    load_kwargs = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        load_kwargs.append(kwargs)
        return real_load(*args, **kwargs)

    def no_training(*args):
        raise AssertionError("the cached classifier must be loaded, not retrained")

    monkeypatch.setattr(classifier, "_LABEL_MEMO", {})
    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(classifier, "_train_labels", no_training)
    args = (*load_digits("train"), *load_digits("test"))
    loaded = get_label_classifier(*args, cache_dir=label_cache)

    assert loaded is not digits_model
    assert [kw.get("weights_only") for kw in load_kwargs] == [True]
    assert loaded.test_accuracy == digits_model.test_accuracy
    _same_weights(digits_model, loaded)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert get_label_classifier(*args, cache_dir=label_cache) is loaded  # memoised in-process
    assert len(load_kwargs) == 1


def test_different_data_or_recipe_gets_a_different_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the file names matter here: skip the training.
    monkeypatch.setattr(classifier, "_train_labels", lambda model, images, labels, recipe: None)
    monkeypatch.setattr(classifier, "_LABEL_MEMO", {})
    images, labels = load_digits("train")
    relabelled = labels.clone()
    relabelled[0] = (relabelled[0] + 1) % 10
    brighter = images.clone()
    brighter[0, 0, 0, 0] += 0.5
    variants = [
        (images, labels, {}),
        (images, relabelled, {}),
        (brighter, labels, {}),
        (_resize(images, 16), labels, {}),
        (images, labels, {"recipe": {**LABEL_RECIPE, "version": LABEL_RECIPE["version"] + 1}}),
        (images, labels, {"test_images": images[:9], "test_labels": labels[:9]}),
    ]
    models = [get_label_classifier(x, y, cache_dir=tmp_path, **kw) for x, y, kw in variants]
    assert len(list(tmp_path.glob("label_classifier_*.pt"))) == len(variants)
    assert len({id(model) for model in models}) == len(variants)
    # The same inputs again are one memoised model, with no new file.
    assert get_label_classifier(images, labels, cache_dir=tmp_path) is models[0]
    assert len(list(tmp_path.glob("label_classifier_*.pt"))) == len(variants)


@pytest.mark.parametrize("channels", LABEL_CHANNELS)
@pytest.mark.parametrize("side", LABEL_SIDES)
def test_outputs_logits_and_128d_features_for_every_shape(side: int, channels: int) -> None:
    torch.manual_seed(0)
    model = LabelClassifier((channels, side, side), num_classes=7).eval()
    batch = torch.rand(5, channels, side, side) * 2 - 1
    with torch.no_grad():
        logits, feats = model(batch), model.features(batch)
    assert logits.shape == (5, 7) and feats.shape == (5, 128)
    assert torch.equal(logits, model.head(feats))
    assert model.image_shape == (channels, side, side) and model.num_classes == 7


@pytest.mark.parametrize("shape", [(1, 28, 28), (2, 16, 16), (1, 16, 32), (16, 16)])
def test_unsupported_image_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected \\(C, S, S\\)"):
        LabelClassifier(shape, num_classes=10)
    with pytest.raises(ValueError):
        get_label_classifier(torch.zeros(4, *shape), torch.zeros(4, dtype=torch.int64))


def test_negative_or_non_integer_labels_are_refused(tmp_path: Path) -> None:
    images, labels = load_digits("train")
    negative = labels.clone()
    negative[3] = -1
    with pytest.raises(ValueError, match="labels of images must be >= 0.*got -1"):
        get_label_classifier(images, negative, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="labels of test_images must be >= 0"):
        get_label_classifier(images, labels, images[:5], negative[:5], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="expected integers"):
        get_label_classifier(images, labels.float(), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="expected \\(n >= 1, C, S, S\\) and \\(n,\\)"):
        get_label_classifier(images, labels[:-1], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="both test_images and test_labels"):
        get_label_classifier(images, labels, images[:5], cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before any training or caching


def test_unwritable_cache_warns_but_still_returns_a_classifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classifier, "_LABEL_MEMO", {})
    monkeypatch.setattr(classifier, "_train_labels", lambda model, images, labels, recipe: None)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.warns(UserWarning, match="could not cache the label classifier"):
        model = get_label_classifier(*load_digits("train"), cache_dir=not_a_folder)
    assert isinstance(model, LabelClassifier)


def test_real_digits_against_themselves(digits_model: LabelClassifier, prior: np.ndarray) -> None:
    images, _ = load_digits("test")
    metrics = label_metrics(images, images, digits_model, prior)
    assert set(metrics) == {"modes", "kl", "fd"}
    assert metrics["fd"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["modes"] == 10.0
    # The stratified test split has the train split's class frequencies, up to rounding and the
    # ~3 % misclassified.
    assert 0.0 <= metrics["kl"] < 0.01
    assert "fd" not in label_metrics(images.numpy(), None, digits_model, torch.as_tensor(prior))


def test_a_single_class_covers_one_mode_at_kl_log_one_over_its_prior(
    digits_model: LabelClassifier, prior: np.ndarray
) -> None:
    images, labels = load_digits("test")
    with torch.no_grad():
        predicted = digits_model(images).argmax(dim=1)
    # The test 3s the classifier calls 3s: the predicted distribution is all on class 3.
    threes = images[(labels == 3) & (predicted == 3)]
    assert len(threes) > 30
    metrics = label_metrics(threes, images, digits_model, prior)
    train_counts = np.bincount(load_digits("train")[1].numpy())
    expected = math.log(train_counts.sum() / train_counts[3])  # log(1 / p(3)), p(3) = 146 / 1437
    assert metrics["modes"] == 1.0
    assert metrics["kl"] == pytest.approx(expected, rel=1e-12)
    assert metrics["fd"] > 10 * label_metrics(images[1::2], images[::2], digits_model, prior)["fd"]


def test_frechet_distance_grows_with_noise(
    digits_model: LabelClassifier, prior: np.ndarray
) -> None:
    real, _ = load_digits("train")
    samples, _ = load_digits("test")
    noise = torch.Generator().manual_seed(0)
    fds = []
    for scale in (0.0, 0.3, 1.0):
        noisy = (samples + scale * torch.randn(samples.shape, generator=noise)).clamp(-1, 1)
        fds.append(label_metrics(noisy, real, digits_model, prior)["fd"])
    uniform = torch.rand(samples.shape, generator=noise) * 2 - 1
    fds.append(label_metrics(uniform, real, digits_model, prior)["fd"])
    assert fds == sorted(fds)
    assert fds[-1] > 10 * fds[0]


def test_kl_is_infinite_without_division_by_zero_for_a_class_absent_from_the_prior(
    digits_model: LabelClassifier, prior: np.ndarray
) -> None:
    images, labels = load_digits("test")
    no_threes = prior.copy()
    no_threes[3] = 0.0
    no_threes /= no_threes.sum()
    zero_fours = prior.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert label_metrics(images[labels == 3], None, digits_model, no_threes)["kl"] == math.inf
        # A prior of 0 on a class no sample falls in is fine: that class adds 0.
        zero_fours[4] = 0.0
        zero_fours /= zero_fours.sum()
        kl = label_metrics(images[labels == 3], None, digits_model, zero_fours)["kl"]
    assert math.isfinite(kl)


def test_label_metrics_refuses_mismatched_shapes_and_priors(
    digits_model: LabelClassifier, prior: np.ndarray
) -> None:
    images, _ = load_digits("test")
    with pytest.raises(ValueError, match="class_prior has 9 entries; the classifier has 10"):
        label_metrics(images, None, digits_model, prior[:9])
    with pytest.raises(
        ValueError, match="samples have shape \\(\\d+, 1, 16, 16\\); expected \\(n >= 1, 1, 8, 8\\)"
    ):
        label_metrics(_resize(images, 16), None, digits_model, prior)
    with pytest.raises(ValueError, match="real have shape"):
        label_metrics(images, images[:, :, :4], digits_model, prior)
