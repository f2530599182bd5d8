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
        # Two conv + pool stages are plenty for 8x8 inputs and keep scoring 78,000 channels (26,000
        # stacked samples) to about a second on one CPU core.
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)
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
def _deterministic() -> Iterator[None]:
    """Seeded global RNG and one thread, both restored on exit so callers are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RECIPE["seed"])
            yield
    finally:
        torch.set_num_threads(threads)


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
