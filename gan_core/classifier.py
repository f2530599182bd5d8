"""The digit classifier that labels generated digits for the stacked-digits and digits metrics.

A small CNN for 1x8x8 digits, trained deterministically (fixed seed, fixed epochs, one thread) on
the digits' own train split and scored on the test split. Since the metrics are only comparable
when every process uses the same classifier, the trained weights are cached on disk under a hash
of the training recipe and the training data, and rebuilt bit-for-bit when the cache is missing.

The label classifier does the same for any labelled image data set (1 or 3 channels, 8 to 64
px): a small CNN trained on the set's images and labels, whose penultimate features give the
Frechet distance and whose predictions give the class coverage of generated samples.
"""

from __future__ import annotations

import hashlib
import json
import math
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
def _deterministic(seed: int | None = None) -> Iterator[None]:
    """One thread and a seeded global RNG, both restored on exit so callers are unaffected.

    The seed defaults to RECIPE's; the label classifier passes its own recipe's.
    """
    with single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"] if seed is None else seed)
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


def _save_atomically(model: nn.Module, path: Path, what: str = "digit classifier") -> None:
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
        warnings.warn(f"could not cache the {what} at {path}: {exc}", stacklevel=3)


# --- A classifier for any labelled image data set -------------------------------------------

# The recipe of every LabelClassifier: the cache file name hashes this whole dict, so bump
# "version" whenever the architecture or the training code changes. Training runs for "epochs"
# but never more than "max_steps" batches, so a large data set costs no more than ~96,000 images:
# on one CPU thread the 1,256 steps of a 10,000-image 32x32 set take about a minute (Fashion-MNIST
# reaches ~89 % held out), and 1,500 steps at 64x64 RGB about two minutes. The learning rate
# follows a cosine decay to 0 over the steps.
LABEL_RECIPE = {
    "version": 1,
    "seed": 0,
    "epochs": 8,
    "max_steps": 1500,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
}
LABEL_SIDES = (8, 16, 32, 64)
LABEL_CHANNELS = (1, 3)
# Width of the last conv stage and of the penultimate features the Frechet distance is taken on.
_LABEL_WIDTH = 128


class LabelClassifier(nn.Module):
    """CNN: (C, S, S) image in [-1, 1] -> ``num_classes`` logits; ``features`` is 128-d.

    DCGAN-discriminator-like: stride-2 4x4 convolutions halve the side down to a 4x4 map (one
    stage for S = 8, four for S = 64), with widths doubling up to 128 at that last stage.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        _check_image_shape(image_shape)
        if num_classes < 1:
            raise ValueError(f"LabelClassifier: num_classes={num_classes} must be >= 1")
        channels, side, _ = image_shape
        stages = (side // 4).bit_length() - 1  # side = 4 * 2**stages
        # Widths end at 128 and halve towards the input, so every stage but the first costs the
        # same ~2M multiply-adds per image: a 64 px step costs ~1.8x a 32 px one, not 4x.
        widths = [_LABEL_WIDTH >> (stages - 1 - i) for i in range(stages)]
        layers: list[nn.Module] = []
        for width_in, width in zip([channels, *widths[:-1]], widths, strict=True):
            layers += [nn.Conv2d(width_in, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(widths[-1] * 4 * 4, _LABEL_WIDTH)
        )
        # Features are taken before this nonlinearity, as in DigitClassifier: units dead after
        # it would make the feature covariance singular.
        self.head = nn.Sequential(nn.LeakyReLU(0.2), nn.Linear(_LABEL_WIDTH, num_classes))
        self.num_classes = num_classes
        self.image_shape = (channels, side, side)
        self.test_accuracy = float("nan")

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# In-process memo of label classifiers, keyed by cache file like _MEMO.
_LABEL_MEMO: dict[str, LabelClassifier] = {}


def get_label_classifier(
    images: Tensor,
    labels: Tensor,
    test_images: Tensor | None = None,
    test_labels: Tensor | None = None,
    cache_dir: str | Path | None = None,
    recipe: dict[str, float] | None = None,
) -> LabelClassifier:
    """A classifier of ``labels`` from ``images``: memoised, else loaded from cache, else trained.

    ``images`` are ``(n, C, S, S)`` in [-1, 1] with C in LABEL_CHANNELS and S in LABEL_SIDES;
    ``labels`` are ``(n,)`` integers >= 0, and there are ``max(labels) + 1`` classes. The
    returned model is in eval mode without gradients; its ``test_accuracy`` is measured on
    ``test_images`` / ``test_labels`` when given, else NaN. ``recipe`` replaces LABEL_RECIPE
    (tests train a cheaper one). Raises ValueError for inputs of the wrong shape or type, or a
    negative label.
    """
    recipe = LABEL_RECIPE if recipe is None else recipe
    images, labels = _labelled_set("images", images, labels)
    image_shape = tuple(images.shape[1:])
    _check_image_shape(image_shape)
    num_classes = int(labels.max()) + 1
    test = None
    if test_images is not None or test_labels is not None:
        if test_images is None or test_labels is None:
            raise ValueError(
                "get_label_classifier: pass both test_images and test_labels, or neither"
            )
        test = _labelled_set("test_images", test_images, test_labels)
        if tuple(test[0].shape[1:]) != image_shape:
            raise ValueError(
                f"test_images have shape {tuple(test[0].shape)}; expected the images' "
                f"(n, {', '.join(map(str, image_shape))})"
            )
    digest = _label_hash(recipe, images, labels, num_classes, test)
    path = _cache_dir(cache_dir) / f"label_classifier_{digest}.pt"
    key = str(path.resolve())
    if key in _LABEL_MEMO:
        return _LABEL_MEMO[key]
    # Built under a forked RNG: the initial weights are redrawn in training or overwritten by the
    # cache, and a caller's global RNG (a GAN mid-training) must not depend on this call.
    with torch.random.fork_rng(devices=[]):
        model = LabelClassifier(image_shape, num_classes)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        model.test_accuracy = float(saved["test_accuracy"])
    else:
        _train_labels(model, images, labels, recipe)
        if test is not None:
            model.test_accuracy = _batched_accuracy(model, *test)
        _save_atomically(model, path, what="label classifier")
    model.eval().requires_grad_(False)
    _LABEL_MEMO[key] = model
    return model


def _check_image_shape(image_shape: tuple[int, ...]) -> None:
    if (
        len(image_shape) != 3
        or image_shape[0] not in LABEL_CHANNELS
        or image_shape[1] not in LABEL_SIDES
        or image_shape[2] != image_shape[1]
    ):
        raise ValueError(
            f"label classifier images have shape {tuple(image_shape)} per sample; expected "
            f"(C, S, S) with C in {LABEL_CHANNELS} and S in {LABEL_SIDES}"
        )


def _labelled_set(what: str, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``images`` as contiguous CPU float32 and ``labels`` as int64, checked against each other."""
    images = torch.as_tensor(images).detach().to("cpu", torch.float32).contiguous()
    labels = torch.as_tensor(labels).detach().to("cpu")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels of {what} have dtype {labels.dtype}; expected integers")
    labels = labels.to(torch.int64).contiguous()
    if images.ndim != 4 or labels.shape != (len(images),) or len(images) == 0:
        raise ValueError(
            f"{what} have shape {tuple(images.shape)} and labels {tuple(labels.shape)}; "
            "expected (n >= 1, C, S, S) and (n,)"
        )
    if labels.min() < 0:
        raise ValueError(f"labels of {what} must be >= 0 (class indices); got {int(labels.min())}")
    return images, labels


def _label_hash(
    recipe: dict[str, float],
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    test: tuple[Tensor, Tensor] | None,
) -> str:
    # Everything the saved file depends on is hashed: the recipe, the training data, and the
    # test set too, since its accuracy is saved with the weights (another test set would
    # otherwise be shown a stale accuracy).
    header = {"recipe": recipe, "image_shape": list(images.shape[1:]), "classes": num_classes}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    # The contiguous arrays are hashed in place: tobytes() would copy a large data set once more.
    digest.update(images.numpy())
    digest.update(labels.numpy())
    if test is not None:
        digest.update(b"test")
        digest.update(test[0].numpy())
        digest.update(test[1].numpy())
    return digest.hexdigest()[:16]


def _train_labels(
    model: LabelClassifier, images: Tensor, labels: Tensor, recipe: dict[str, float]
) -> None:
    seed = int(recipe["seed"])
    batch_size = min(int(recipe["batch_size"]), len(images))
    per_epoch = -(-len(images) // batch_size)
    steps = min(int(recipe["epochs"]) * per_epoch, int(recipe["max_steps"]))
    with _deterministic(seed):
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        optim = torch.optim.Adam(
            model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"]
        )
        # Cosine decay to 0: a short run ends at a settled minimum instead of the last noisy step.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optim, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / steps))
        )
        # A generator of its own makes the batch order depend on the seed alone.
        shuffle = torch.Generator().manual_seed(seed)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        step = 0
        while step < steps:
            for batch in torch.randperm(len(images), generator=shuffle).split(batch_size):
                if step == steps:
                    break
                optim.zero_grad(set_to_none=True)
                loss_fn(model(images[batch]), labels[batch]).backward()
                optim.step()
                schedule.step()
                step += 1
        model.eval()


def _batched_accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    # Chunks keep the activations of a large test set (64x64 RGB) out of memory.
    model.eval()
    with torch.inference_mode(), single_thread():
        hits = sum(
            int((model(chunk).argmax(dim=1) == truth).sum())
            for chunk, truth in zip(images.split(1024), labels.split(1024), strict=True)
        )
    return hits / len(images)
