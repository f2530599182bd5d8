"""Feature spaces the image metrics are computed in (``eval.features``).

Precision, recall, density, coverage and the Frechet distance are distances between samples, and
pixel distances say little about images: they are taken in a feature space instead.

- ``digits``: the digit classifier's penultimate features, each channel embedded on its own and
  the per-channel features concatenated (8x8 images only: the classifier's input).
- ``labels``: the penultimate features of the classifier trained on the data set's own labels
  (``gan_core.classifier.get_label_classifier``, cached on disk); needs a label column.
- ``random``: a randomly initialised small conv net under a fixed seed: no training, no
  download, the same weights in every process and every run. Naeem et al. (2020) found random
  embeddings a usable space for these metrics outside ImageNet; bench/feature_spaces.py measured
  it against downsampled raw pixels (docs/METRICS.md).
- a TorchScript file (``*.pt``, local or ``s3://``): any extractor a user brings, such as an
  Inception network for a real FID. Loaded on the CPU; it must map ``(n, C, H, W)`` float
  images in [-1, 1] to ``(n, d)`` features, which is checked on a test batch when it is loaded.
  Nothing is ever downloaded: the file is read from where the user put it.

``auto`` is ``labels`` when the data has labels the label classifier takes, else ``random``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch import Tensor, nn

from gan_core.classifier import get_classifier, single_thread
from gan_core.config import EVAL_FEATURES, TORCHSCRIPT_SUFFIX, ConfigError
from gan_core.files import DataError, resolve_filesystem

Embed = Callable[[Tensor], Tensor]

RANDOM_SEED = 0  # the random net's weights: changing it changes every reported number
RANDOM_DIM = 128  # width of the random features
_BATCH = 512  # images per forward pass (bounded activations at 64x64 RGB)
_SOURCE = "features"


def _fail(value: str, problem: str) -> ConfigError:
    return ConfigError("eval.features", value, problem, _SOURCE)


class RandomFeatures(nn.Module):
    """Stride-2 4x4 convolutions with leaky ReLUs halve the side down to 4x4 (widths 32 doubling
    to 128), then a linear map to RANDOM_DIM features; weights drawn once under RANDOM_SEED.

    Kaiming-normal convolutions keep the activations' scale through the stages (PyTorch's default
    init shrinks them), so no stage's output is dominated by rounding; the last linear map is a
    random projection, which keeps the distances of its input up to a small distortion."""

    def __init__(self, channels: int, side: int) -> None:
        super().__init__()
        if channels < 1 or side < 1:
            raise ValueError(f"RandomFeatures: channels={channels}, side={side} must be >= 1")
        layers: list[nn.Module] = []
        width_in, width, now = channels, 32, side
        while now > 4:
            layers += [nn.Conv2d(width_in, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            width_in, width, now = width, min(2 * width, 128), now // 2
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.project = nn.Linear(width_in * 16, RANDOM_DIM, bias=False)
        generator = torch.Generator().manual_seed(RANDOM_SEED)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    fan_in = module.in_channels * 16
                    gain = (2 / (1 + 0.2**2)) ** 0.5
                    module.weight.normal_(0, gain / fan_in**0.5, generator=generator)
                    module.bias.zero_()
            self.project.weight.normal_(0, self.project.in_features**-0.5, generator=generator)
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.body(x))


def batched(model: Callable[[Tensor], Tensor]) -> Embed:
    """``model`` applied in chunks of _BATCH on one CPU thread, as (n, d) float32."""

    def embed(images: Tensor) -> Tensor:
        images = torch.as_tensor(images).detach().to("cpu", torch.float32)
        parts = []
        with torch.inference_mode(), single_thread():
            for chunk in images.split(_BATCH):
                out = model(chunk)
                if not isinstance(out, Tensor) or out.ndim < 2 or out.shape[0] != len(chunk):
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(f"{len(chunk)} images gave features of shape {got}")
                # (n, d, 1, 1), an Inception pool's output, is (n, d) flattened.
                parts.append(out.reshape(len(chunk), -1))
        return torch.cat(parts).float()

    return embed


def digit_features(images: Tensor) -> Tensor:
    """The digit classifier's features of every channel of ``(n, C, 8, 8)`` images: (n, 64 C)."""
    model = get_classifier()
    images = torch.as_tensor(images).detach().to("cpu", torch.float32)
    n, channels = images.shape[:2]
    flat = images.reshape(n * channels, 1, *images.shape[2:])
    return batched(model.features)(flat).reshape(n, -1)


def read_torchscript(value: str, filesystem: pafs.FileSystem | None = None) -> nn.Module:
    """The TorchScript module at ``value`` (local, or ``s3://`` through ``filesystem`` when given,
    else pyarrow's from the URI: AWS_ENDPOINT_URL and the usual credentials), on the CPU."""
    try:
        if filesystem is not None and "://" in value:
            inner = value.split("://", 1)[1]
        else:
            filesystem, inner = resolve_filesystem(value, "a TorchScript file")
        with filesystem.open_input_file(inner) as handle:
            blob = handle.read()
    except (OSError, pa.ArrowException, DataError) as exc:
        raise _fail(value, f"a readable TorchScript file (cannot read it: {exc})") from None
    try:
        # TorchScript holds its own code and tensors, not arbitrary pickled Python objects.
        with warnings.catch_warnings():
            # torch 2.13 marks TorchScript deprecated; it is still the one portable format a
            # user's extractor (an Inception network for a real FID) comes in.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(blob), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, ... for a non-TorchScript
        raise _fail(value, f"a TorchScript file saved by torch.jit.save ({exc})") from None
    return module.eval()


def check_extractor(value: str, embed: Embed, shape: tuple[int, ...]) -> int:
    """Run ``embed`` on a test batch of 4 images of ``shape``: the feature width, or a
    ConfigError naming eval.features when it fails or returns something else than (4, d)."""
    test = torch.linspace(-1, 1, 4 * int(torch.tensor(shape).prod())).reshape(4, *shape)
    want = f"an extractor mapping (n, {', '.join(map(str, shape))}) images in [-1, 1] to (n, d)"
    try:
        out = embed(test)
    except Exception as exc:  # whatever the user's module raises, it is reported as the cause
        raise _fail(value, f"{want}; it failed on a test batch: {exc}") from None
    if out.shape[1] < 1:
        raise _fail(value, f"{want}; it returned {tuple(out.shape)} for 4 test images")
    if not torch.isfinite(out).all():
        raise _fail(value, f"{want}; it returned NaN or Inf for 4 test images")
    return int(out.shape[1])


def resolve(value: str, labelled: bool) -> str:
    """The feature space ``value`` names for images: ``auto`` made concrete."""
    if value == "auto":
        return "labels" if labelled else "random"
    return value


def image_extractor(
    value: str,
    shape: tuple[int, ...],
    labels_embed: Embed | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> Embed:
    """The embedding ``eval.features=value`` names for images of per-sample ``shape`` (C, H, W),
    checked on a test batch. ``labels_embed`` is the label classifier's (None: the data has no
    labels it takes); ``filesystem`` reads an ``s3://`` TorchScript path. Raises ConfigError
    naming eval.features, the value and what is allowed."""
    if len(shape) != 3:
        raise _fail(value, f"auto for point data (samples of shape {tuple(shape)})")
    value = resolve(value, labels_embed is not None)
    if value == "labels":
        if labels_embed is None:
            raise _fail(
                value,
                "labels only for images with a label column (or class folders) of 1 or 3 "
                "channels and a side of 8, 16, 32 or 64; auto, random, digits or a *.pt file "
                "otherwise",
            )
        embed = labels_embed
    elif value == "digits":
        if shape[1:] != (8, 8):
            raise _fail(
                value,
                f"digits only for 8x8 images (the digit classifier's input); these are "
                f"{shape[1]}x{shape[2]}",
            )
        embed = digit_features
    elif value == "random":
        embed = batched(RandomFeatures(shape[0], shape[1]))
    elif value.endswith(TORCHSCRIPT_SUFFIX):
        embed = batched(read_torchscript(value, filesystem))
    else:
        raise _fail(
            value, f"one of {', '.join(EVAL_FEATURES)}, or a TorchScript file ending in .pt"
        )
    check_extractor(value, embed, shape)
    return embed
