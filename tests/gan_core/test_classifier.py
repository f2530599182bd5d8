"""Tests for gan_core.classifier: held-out accuracy, deterministic training and the disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gan_core import classifier
from gan_core.classifier import DigitClassifier, accuracy, get_classifier
from gan_core.data import load_digits


def test_held_out_accuracy_is_at_least_97_percent(digit_classifier: DigitClassifier) -> None:
    images, labels = load_digits("test")
    assert digit_classifier.test_accuracy >= 0.97
    assert accuracy(digit_classifier, images, labels) == pytest.approx(
        digit_classifier.test_accuracy
    )


def test_outputs_logits_and_64d_features(digit_classifier: DigitClassifier) -> None:
    images, labels = load_digits("train")
    assert not digit_classifier.training
    with torch.no_grad():
        logits = digit_classifier(images[:5])
        feats = digit_classifier.features(images[:5])
    assert logits.shape == (5, 10) and feats.shape == (5, 64)
    assert torch.equal(logits, digit_classifier.head(feats))


def test_cache_file_is_written_and_reloaded_with_weights_only(
    digit_classifier: DigitClassifier, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (saved,) = cache_dir.glob("digit_classifier_*.pt")
    assert not list(cache_dir.glob("*.tmp"))  # the atomic write left no temporary file behind

    load_kwargs = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        load_kwargs.append(kwargs)
        return real_load(*args, **kwargs)

    def no_training(*args):
        raise AssertionError("the cached classifier must be loaded, not retrained")

    monkeypatch.setattr(classifier, "_MEMO", {})
    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(classifier, "_train", no_training)
    loaded = get_classifier(cache_dir)

    assert loaded is not digit_classifier
    assert [kw.get("weights_only") for kw in load_kwargs] == [True]
    assert loaded.test_accuracy == digit_classifier.test_accuracy
    for name, tensor in digit_classifier.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not loaded.training
    assert get_classifier(cache_dir) is loaded  # memoised in-process


def test_training_is_deterministic_and_restores_threads(
    digit_classifier: DigitClassifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classifier, "_MEMO", {})
    threads = torch.get_num_threads()
    rebuilt = get_classifier(tmp_path)
    assert torch.get_num_threads() == threads
    assert rebuilt.test_accuracy == digit_classifier.test_accuracy
    for name, tensor in digit_classifier.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name


def test_cache_name_changes_with_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = load_digits("train")
    before = classifier._recipe_hash(images, labels)
    monkeypatch.setitem(classifier.RECIPE, "version", classifier.RECIPE["version"] + 1)
    assert classifier._recipe_hash(images, labels) != before


def test_unwritable_cache_warns_but_still_returns_a_classifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classifier, "_MEMO", {})
    monkeypatch.setattr(classifier, "_train", lambda model, images, labels: None)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.warns(UserWarning, match="could not cache the digit classifier"):
        model = get_classifier(not_a_folder)
    assert isinstance(model, DigitClassifier) and 0.0 <= model.test_accuracy <= 1.0
