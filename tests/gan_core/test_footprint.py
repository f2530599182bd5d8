"""The memory estimate that refuses configs no worker could hold, before Ray starts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gan_core import footprint as fp
from gan_core.config import ConfigError, load_config, preset_names
from gan_core.nets import build_discriminator, build_generator


def test_activations_count_every_leaf_output_on_a_hand_made_net() -> None:
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
        counted = fp._activations(meta, torch.zeros(4, 3))
    # 4 samples x (5 + 5 + 2) outputs; the meta copy of the net counts what the real one outputs.
    assert counted == 4 * (5 + 5 + 2)
    assert fp._activations(net, torch.zeros(4, 3)) == counted


def test_parameter_bytes_are_the_real_nets_parameter_counts() -> None:
    cfg = load_config("stacked_digits")
    estimate = fp.footprint(cfg)
    g = sum(p.numel() for p in build_generator(cfg, (3, 8, 8)).parameters())
    d = sum(p.numel() for p in build_discriminator(cfg, (3, 8, 8)).parameters())
    # Adam training: weights, gradients, two moments (16 bytes); G also has its EMA copy (+4).
    assert estimate.parts["generators.width"] == 20 * g
    assert estimate.parts["discriminator.width"] == 16 * d
    assert estimate.parts["encoder.width"] == 0  # no encoder outside MRGAN


# Nets small enough to count by hand (the tests below and test_config_hardening's look-ahead).
HAND_NETS = [
    "generators.width=4",
    "generators.depth=1",
    "discriminator.width=3",
    "discriminator.depth=1",
    "discriminator.maxout_pieces=1",
    "train.batch_size=10",
]


def test_ring8_generator_activations_by_hand() -> None:
    # G: Linear(2 -> 4), BN, ReLU, then the output Linear(4 -> 2) and its Unflatten: 4+4+4+2+2
    # elements per sample; D: Flatten (2), Linear(2 -> 3), LeakyReLU, Linear(3 -> 1): 2+3+3+1.
    cfg = load_config("ring8", [*HAND_NETS, "eval.samples=7"])
    parts = fp.footprint(cfg).parts
    per_g, per_d = 16, 9
    assert parts["train.batch_size"] == 2 * 4 * 10 * (per_g + 2 * per_d)
    # Evaluation runs without autograd: at most one leaf's input and output are alive (the BN's
    # 4 in and 4 out), besides the 7 two-coordinate samples kept.
    assert parts["eval.samples"] == 4 * (7 * 2 + 7 * 8)


def test_inference_peak_is_the_largest_input_plus_output_on_a_hand_made_net() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(3, 50), nn.ReLU(), nn.Linear(50, 2))
        # 4 samples: input 12, then outputs 200, 200, 8; the ReLU holds 200 in and 200 out.
        assert fp._inference_peak(net, torch.zeros(4, 3)) == 400
        assert fp._activations(net, torch.zeros(4, 3)) == 408


def test_batch_scales_the_step_part_and_unroll_has_its_own() -> None:
    base = fp.footprint(load_config("ring8")).parts
    assert base["unroll.steps"] == 0
    double = fp.footprint(load_config("ring8", ["train.batch_size=200"])).parts
    assert double["train.batch_size"] == pytest.approx(2 * base["train.batch_size"])
    unrolled = fp.footprint(load_config("ring8", ["unroll.steps=5"])).parts
    assert unrolled["train.batch_size"] == base["train.batch_size"]
    assert unrolled["unroll.steps"] > 0


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_fits_far_under_the_limit(name: str) -> None:
    assert fp.footprint(load_config(name)).total < 2**30


@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [
        (["generators.width=1000000"], "generators.width", 10**6),
        (["discriminator.width=100000"], "discriminator.width", 10**5),
        (["train.batch_size=1000000000"], "train.batch_size", 10**9),
        (["eval.samples=100000000000"], "eval.samples", 10**11),
    ],
)
def test_a_config_no_worker_holds_is_refused_naming_its_costliest_key(
    overrides: list[str], key: str, value: int
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("ring8", overrides)
    err = info.value
    assert (err.key, err.value) == (key, value)
    assert "fits 256 GiB" in err.allowed and "GiB" in err.allowed


def test_the_limit_is_a_parameter() -> None:
    cfg = load_config("ring8")
    total = fp.footprint(cfg).total
    assert fp.check_footprint(cfg, limit=total).total == total
    with pytest.raises(ConfigError) as info:
        fp.check_footprint(cfg, limit=total - 1)
    # G's 4 x 400 MLP with Adam and an EMA copy: ~9.7 MB, the largest part.
    assert info.value.key == "generators.width"


def test_parquet_shapes_come_from_the_config() -> None:
    images = load_config(
        "ring8",
        ["data.name=parquet", "data.path=x.parquet", "data.image_size=16", "data.channels=3"],
    )
    assert fp.data_shape(images) == (3, 16, 16)
    points = load_config("ring8", ["data.name=parquet", "data.path=x.parquet"])
    assert fp.data_shape(points) == (1,)  # columns unknown until read: a lower bound


@pytest.mark.parametrize("shared", [False, True])
def test_a_generator_bank_is_counted_without_building_every_generator(shared: bool) -> None:
    # Scaled from one (and for a shared body two) generators: equal to the real bank's count.
    cfg = load_config(
        "ring8", ["generators.count=7", f"generators.shared={shared}", "train.batch_size=70"]
    )
    real = sum(p.numel() for p in build_generator(cfg, (2,)).parameters())
    assert fp.footprint(cfg).parts["generators.width"] == 20 * real


def test_mrgan_counts_g_on_the_codes_and_the_schedules_second_discriminator() -> None:
    # HAND_NETS plus an encoder of one hidden layer of 3: Flatten (2), Linear(2 -> 3),
    # LeakyReLU, Linear(3 -> 2) = 10 elements per sample. MRGAN's G phase runs G on z and on
    # E(x): twice G's 16 per sample, with D's 9 and E's 10 counted twice as before.
    encoder = ["encoder.width=3", "encoder.depth=1"]
    mrgan = fp.footprint(load_config("ring8_mrgan", [*HAND_NETS, *encoder])).parts
    assert mrgan["train.batch_size"] == 2 * 4 * 10 * (2 * 16 + 2 * 9 + 2 * 10)
    cfg = load_config("ring8_mrgan_diffusion", [*HAND_NETS, *encoder])
    diffusion = fp.footprint(cfg).parts
    d = sum(p.numel() for p in build_discriminator(cfg, (2,)).parameters())
    # D_D: D's architecture, its own weights, gradients and Adam moments.
    assert mrgan["discriminator.width"] == 16 * d
    assert diffusion["discriminator.width"] == 2 * 16 * d
    # The schedule's updates run one after another: no more activations alive than MRGAN's.
    assert diffusion["train.batch_size"] == mrgan["train.batch_size"]
