"""eval.features: the feature spaces of the image metrics, their checks and config validation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from gan_core.config import ConfigError, load_config
from gan_core.data import load_digits
from gan_core.features import RANDOM_DIM, RandomFeatures, batched, image_extractor
from gan_core.file_eval import FileEvaluator, file_extractor
from gan_core.files import open_file_data
from gan_core.metrics import RealFeatures


def _digits(side: int = 8, channels: int = 1) -> tuple[Tensor, Tensor]:
    """The digits (upsampled to ``side``, repeated over ``channels``) and their labels."""
    images, labels = load_digits("all")
    if side != 8:
        images = nn.functional.interpolate(images, size=side, mode="nearest")
    return images.repeat(1, channels, 1, 1), labels


def _coverage(embed, real: Tensor, fake: Tensor) -> float:
    return RealFeatures(embed(real)).score(embed(fake))["coverage"]


def _split(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Real (even rows), a good generator (odd rows), a collapsed one (odd rows of 2 digits)."""
    real, good, good_labels = images[0::2][:600], images[1::2], labels[1::2]
    return real, good[:600], good[good_labels < 2][:600]


@pytest.mark.parametrize(("side", "channels"), [(8, 1), (32, 3)])
def test_random_features_are_fixed_and_separate_a_collapsed_set(side: int, channels: int) -> None:
    images, labels = _digits(side, channels)
    embed = batched(RandomFeatures(channels, side))
    feats = embed(images[:10])
    assert feats.shape == (10, RANDOM_DIM)
    # Same seed, same weights: another process (another worker, a later run) gets these numbers.
    assert torch.equal(batched(RandomFeatures(channels, side))(images[:10]), feats)
    real, good, collapsed = _split(images, labels)
    good_cov, collapsed_cov = _coverage(embed, real, good), _coverage(embed, real, collapsed)
    # Two of ten digits: about a fifth of the real balls at most.
    assert good_cov > 0.8 and collapsed_cov < 0.35, (good_cov, collapsed_cov)


class _Pool(nn.Module):
    """A tiny extractor: 2x2 average pooling, flattened; (n, 1, 8, 8) -> (n, 16)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.avg_pool2d(x, 2).flatten(1)


class _Scalar(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.sum()


def _script(module: nn.Module, path: Path) -> str:
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def test_a_torchscript_extractor_from_a_path_gives_its_features(tmp_path: Path) -> None:
    value = _script(_Pool(), tmp_path / "pool.pt")
    embed = image_extractor(value, (1, 8, 8))
    images, labels = _digits()
    expected = nn.functional.avg_pool2d(images[:5], 2).flatten(1)
    assert torch.allclose(embed(images[:5]), expected)
    real, good, collapsed = _split(images, labels)
    assert _coverage(embed, real, good) > 0.8 > 0.35 > _coverage(embed, real, collapsed)


def test_bad_torchscript_values_are_refused_naming_the_key(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.pt")
    with pytest.raises(ConfigError, match=r"eval.features='.*none.pt'.*readable TorchScript"):
        image_extractor(missing, (1, 8, 8))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a TorchScript archive")
    with pytest.raises(ConfigError, match=r"junk.pt'.*saved by torch.jit.save"):
        image_extractor(str(junk), (1, 8, 8))
    scalar = _script(_Scalar(), tmp_path / "scalar.pt")
    with pytest.raises(ConfigError, match=r"scalar.pt'.*\(n, 1, 8, 8\).*test batch.*shape \(\)"):
        image_extractor(scalar, (1, 8, 8))
    with pytest.raises(ConfigError, match=r"'digits'.*only for 8x8 images.*16x16"):
        image_extractor("digits", (1, 16, 16))
    with pytest.raises(ConfigError, match=r"'labels'.*label column"):
        image_extractor("labels", (1, 8, 8))


def test_digit_features_concatenate_the_channels() -> None:
    images, _ = _digits(8, 3)
    embed = image_extractor("digits", (3, 8, 8))
    single = image_extractor("digits", (1, 8, 8))(images[:4, :1])
    got = embed(images[:4])
    assert got.shape == (4, 192) and torch.equal(got[:, :64], single)


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_unlabelled_file_images_report_coverage_in_the_random_space(tmp_path: Path) -> None:
    images, labels = _digits()
    pixels = ((images[:, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    path = tmp_path / "digits.parquet"
    rows = [{"bytes": _png(p), "path": f"{i}.png"} for i, p in enumerate(pixels)]
    pq.write_table(pa.table({"image": rows}), path)
    cfg = load_config("ring8", ["data.name=parquet", f"data.path={path}", "data.image_size=8"]).data
    data = open_file_data(cfg)
    assert data.kind == "images" and not data.labelled
    real, good, collapsed = _split(images, labels)
    evaluator = FileEvaluator(data, real)  # eval.features=auto: random without labels
    good_metrics, collapsed_metrics = evaluator(good), evaluator(collapsed)
    assert set(good_metrics) == {"fd", "precision", "recall", "density", "coverage"}
    assert good_metrics["coverage"] > 0.8 and collapsed_metrics["coverage"] < 0.35
    assert collapsed_metrics["fd"] > good_metrics["fd"]
    # The same numbers as the random space computed by hand (one fixed net in every process).
    by_hand = RealFeatures(batched(RandomFeatures(1, 8))(real)).score(
        batched(RandomFeatures(1, 8))(good)
    )
    assert good_metrics == pytest.approx(by_hand)
    with pytest.raises(ConfigError, match="eval.features='labels'"):
        file_extractor(data, "labels")


@pytest.mark.parametrize(
    ("overrides", "allowed"),
    [
        (["eval.features=inception"], "one of auto, labels, digits, random, or a TorchScript"),
        (["eval.features=.pt"], "ending in .pt"),
        (["eval.features=random"], "auto for point data"),
        (["data.name=digits", "eval.features=labels"], "auto or digits for data.name=digits"),
        (["data.name=parquet", "data.path=x.parquet", "eval.features=digits"], "point data"),
    ],
)
def test_config_refuses_feature_spaces_the_data_cannot_use(
    overrides: list[str], allowed: str
) -> None:
    with pytest.raises(ConfigError, match="eval.features") as caught:
        load_config("ring8", overrides)
    assert allowed in caught.value.allowed


def test_config_accepts_feature_spaces_for_images() -> None:
    for value in ("auto", "random", "labels", "digits", "s3://models/inception.pt"):
        cfg = load_config(
            "ring8",
            [
                "data.name=parquet",
                "data.path=x.parquet",
                "data.image_size=8",
                "generators.arch=dcgan",
                "discriminator.arch=dcgan",
                f"eval.features={value}",
            ],
        )
        assert cfg.eval.features == value
    assert load_config("stacked_digits", ["eval.features=digits"]).eval.features == "digits"
