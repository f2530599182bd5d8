"""The digit classifier that labels generated digits for the stacked-digits and digits metrics.

A small CNN for 1x8x8 digits, trained deterministically (fixed seed, fixed epochs, one thread) on
the digits' own train split and scored on the test split. Since the metrics are only comparable
when every process uses the same classifier, the trained weights are cached on disk under a hash
of the training recipe and the training data, and rebuilt bit-for-bit when the cache is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from gan_core.data import load_digits

# Bump "version" whenever the architecture or the training code changes, so stale caches are
# never loaded: the cache file name hashes this whole dict.
RECIPE = {
    "version": 1,
    "seed": 0,
    "epochs": 30,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 1e-4,
}


class DigitClassifier(nn.Module):
    """CNN: 1x8x8 digit in [-1, 1] -> 10 logits; ``features`` is the 64-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        # Two conv + pool stages are plenty for 8x8 inputs (~99 % held out) and keep scoring the
        # 78,000 channels of 26,000 stacked samples to about two seconds on one CPU core.
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, 64),
        )
        # The features are taken before this ReLU: units that are dead after it would make the
        # feature covariance singular, and the Frechet distance's matrix square root ill-posed.
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(64, 10))
        self.test_accuracy = float("nan")

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# In-process memo, keyed by cache file: every metric call in a process shares one classifier.
_MEMO: dict[str, DigitClassifier] = {}


def get_classifier(cache_dir: str | Path | None = None) -> DigitClassifier:
    """The trained classifier in eval mode: memoised, else loaded from the cache, else trained."""
    train_x, train_y = load_digits("train")
    path = _cache_dir(cache_dir) / f"digit_classifier_{_recipe_hash(train_x, train_y)}.pt"
    key = str(path.resolve())
    if key in _MEMO:
        return _MEMO[key]
    model = DigitClassifier()
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        model.test_accuracy = float(saved["test_accuracy"])
    else:
        _train(model, train_x, train_y)
        model.test_accuracy = accuracy(model, *load_digits("test"))
        _save_atomically(model, path)
    model.eval().requires_grad_(False)
    _MEMO[key] = model
    return model


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` whose argmax logit equals the label."""
    model.eval()
    with torch.inference_mode():
        return (model(images).argmax(dim=1) == labels).float().mean().item()


def _cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("RAYGAN_CACHE", Path.home() / ".cache" / "raygan"))


def _recipe_hash(train_x: Tensor, train_y: Tensor) -> str:
    # The data is hashed too: a changed train split must not reuse a classifier fit on another.
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    digest.update(train_x.numpy().tobytes())
    digest.update(train_y.numpy().tobytes())
    return digest.hexdigest()[:16]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, restoring the caller's setting on exit.

    One thread makes training bit-reproducible, and the net is so small that extra threads gain
    little on 8x8 inputs; when processes share the cores (Ray workers, parallel test runs) two
    threads made scoring 26,000 stacked samples 5x slower than one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _deterministic() -> Iterator[None]:
    """One thread and a seeded global RNG, both restored on exit so callers are unaffected."""
    with single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        yield


def _train(model: DigitClassifier, images: Tensor, labels: Tensor) -> None:
    with _deterministic():
        # Re-initialise under the fixed seed: the model may have been built outside it.
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        optim = torch.optim.Adam(
            model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"]
        )
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(RECIPE["epochs"]):
            order = torch.randperm(len(images))
            for batch in order.split(RECIPE["batch_size"]):
                optim.zero_grad(set_to_none=True)
                loss_fn(model(images[batch]), labels[batch]).backward()
                optim.step()
        model.eval()


def _save_atomically(model: DigitClassifier, path: Path) -> None:
    # tmp file + os.replace: a process loading in parallel sees the whole file or none of it.
    saved = {"state_dict": model.state_dict(), "test_accuracy": model.test_accuracy}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(saved, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        # An unwritable cache only costs a retrain in the next process; the metrics still work.
        warnings.warn(f"could not cache the digit classifier at {path}: {exc}", stacklevel=3)
