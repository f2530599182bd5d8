"""Tests for tuning.spaces: the shipped spaces, space-file errors, grid expansion, Tune domains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gan_core.config import ConfigError, flatten, load_config
from tuning.spaces import (
    Distribution,
    architecture_mutations,
    grid_points,
    load_space,
    pbt_mutations,
    space_names,
    trial_count,
    tune_param_space,
    validate_space,
)

RING8 = flatten(load_config("ring8"))


def write_space(tmp_path: Path, text: str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_shipped_spaces_parse_and_validate_on_ring8() -> None:
    assert {"collapse", "unroll", "generators", "minibatch", "lr"} <= set(space_names())
    for name in space_names():
        space = load_space(name)
        assert validate_space(space, {**RING8, **space.fixed}) == space  # already typed
        assert len(grid_points(space)) >= 1


def test_collapse_is_the_full_4x4x4_grid() -> None:
    space = load_space("collapse")
    assert space.grid == {
        "unroll.steps": [0, 1, 5, 10],
        "generators.count": [1, 2, 4, 8],
        "discriminator.minibatch.kernels": [0, 8, 32, 100],
    }
    points = grid_points(space)
    assert len(points) == 64 == trial_count(space, 1)
    assert trial_count(space, 3) == 192  # Tune repeats the grid num_samples times
    assert len({tuple(p.items()) for p in points}) == 64
    assert points[:2] == [  # Tune's order: the first key in sorted order varies fastest
        {"unroll.steps": 0, "generators.count": 1, "discriminator.minibatch.kernels": 0},
        {"unroll.steps": 0, "generators.count": 1, "discriminator.minibatch.kernels": 8},
    ]
    assert points[-1] == {
        "unroll.steps": 10,
        "generators.count": 8,
        "discriminator.minibatch.kernels": 100,
    }


def test_grid_points_follow_tunes_trial_order() -> None:
    from ray.tune.search.variant_generator import generate_variants

    for name in ("collapse", "unroll"):
        space = load_space(name)
        tune_order = [variant for _, variant in generate_variants(tune_param_space(space))]
        assert tune_order == grid_points(space)


def test_single_knob_spaces() -> None:
    assert load_space("unroll").knobs == ["unroll.steps"]
    assert load_space("generators").knobs == ["generators.count"]
    assert load_space("minibatch").knobs == ["discriminator.minibatch.kernels"]


def test_a_space_file_by_path_with_kernel_dims_tuned(tmp_path: Path) -> None:
    path = write_space(
        tmp_path,
        "grid:\n  discriminator.minibatch.kernels: [8, 32]\n"
        "  discriminator.minibatch.kernel_dims: [3, 5, 8]\n",
    )
    space = load_space(path)
    assert space.name == "space" and space.source == path
    assert len(grid_points(validate_space(space, RING8))) == 6


def test_the_failing_combination_is_named(tmp_path: Path) -> None:
    # ring8's batch of 100 cannot be split over 8 generators: refused before anything runs.
    space = load_space("generators")
    with pytest.raises(ConfigError) as err:
        validate_space(space, RING8)  # without the space's fixed batch of 96
    assert err.value.key == "train.batch_size"
    assert err.value.value == 100
    assert "multiple of generators.count (8)" in err.value.allowed
    assert err.value.source == f"{space.source}: trial generators.count=8"
    assert "trial generators.count=8: train.batch_size=100 is invalid" in str(err.value)


@pytest.mark.parametrize(
    ("text", "key", "value", "allowed_part"),
    [
        (
            "grid:\n  unroll.stepz: [0, 1]\n",
            "unroll.stepz",
            [0, 1],
            "known under 'unroll': second_order, steps",
        ),
        ("grid:\n  unrol.steps: [0, 1]\n", "unrol.steps", [0, 1], "known at the top level"),
        ("grid:\n  unroll.steps: []\n", "unroll.steps", [], "a non-empty list of values"),
        ("grid:\n  unroll.steps: 5\n", "unroll.steps", 5, "a non-empty list of values"),
        ("grid:\n  unroll.steps: [0, many]\n", "unroll.steps", "many", "a value of type int"),
        ("grd:\n  unroll.steps: [0]\n", "grd", {"unroll.steps": [0]}, "a section: description"),
        (
            "sample:\n  g_optim.lr: {lognormal: [1, 2]}\n",
            "g_optim.lr",
            {"lognormal": [1, 2]},
            "one of {uniform",
        ),
        (
            "sample:\n  g_optim.lr: {loguniform: [0, 1]}\n",
            "g_optim.lr",
            {"loguniform": [0, 1]},
            "low > 0",
        ),
        (
            "sample:\n  g_optim.lr: {uniform: [0.1]}\n",
            "g_optim.lr",
            {"uniform": [0.1]},
            "uniform: [low, high]",
        ),
        ("fixed:\n  train.batch_size: 64\n", "grid", {}, "at least one knob"),
        ("grid:\n  g_optim.lr: [-0.1]\n", "g_optim.lr", -0.1, "> 0"),
    ],
)
def test_bad_space_files_name_the_key(
    tmp_path: Path, text: str, key: str, value: Any, allowed_part: str
) -> None:
    path = write_space(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        validate_space(load_space(path), RING8)
    assert err.value.key == key
    assert err.value.value == value
    assert allowed_part in err.value.allowed
    assert err.value.source.startswith(path)
    assert key in str(err.value)


def test_unknown_space_name_lists_the_named_spaces() -> None:
    with pytest.raises(ConfigError) as err:
        load_space("colapse")
    assert err.value.key == "--space"
    assert "collapse" in err.value.allowed and "unroll" in err.value.allowed


def test_values_get_their_config_types(tmp_path: Path) -> None:
    # YAML 1.1 reads 1.0e30 (no exponent sign) as a string; trials must get a float.
    path = write_space(
        tmp_path,
        "grid:\n  g_optim.lr: [2.0e-3, 1.0e30]\n  unroll.steps: ['5']\n"
        "mutations:\n  d_optim.lr: {choice: [1e-3, 2.0e-3]}\n",
    )
    raw = load_space(path)
    assert raw.grid["g_optim.lr"] == [0.002, "1.0e30"]
    space = validate_space(raw, RING8)
    assert space.grid == {"g_optim.lr": [0.002, 1e30], "unroll.steps": [5]}
    assert space.mutations["d_optim.lr"].args == (0.001, 0.002)


def test_distribution_bounds_and_choices_are_validated(tmp_path: Path) -> None:
    path = write_space(
        tmp_path,
        "sample:\n  unroll.steps: {randint: [0, 3]}\n"
        "mutations:\n  objective.n_critic: {choice: [1, 0]}\n",
    )
    space = load_space(path)
    assert space.sample["unroll.steps"].probe_values() == [0, 2]  # randint's high is exclusive
    with pytest.raises(ConfigError) as err:
        validate_space(space, RING8)
    assert err.value.key == "objective.n_critic" and err.value.value == 0
    assert err.value.source == f"{path}: trial objective.n_critic=0"


def test_tune_domains() -> None:
    from ray.tune.search.sample import Float

    space = load_space("lr")
    params = tune_param_space(space)
    assert set(params) == {"g_optim.lr", "d_optim.lr", "unroll.steps"}
    lr = params["g_optim.lr"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (2.0e-4, 5.0e-3)
    assert params["unroll.steps"] == [0, 1, 5]  # mutation-only key starts from a choice
    assert pbt_mutations(space)["unroll.steps"] == [0, 1, 5]
    grid = tune_param_space(load_space("unroll"))
    assert grid == {"unroll.steps": {"grid_search": [0, 1, 5, 10]}}


def test_pbt_may_not_mutate_the_architecture(tmp_path: Path) -> None:
    path = write_space(
        tmp_path,
        "mutations:\n  g_optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "  generators.width: {choice: [32, 64]}\n"
        "  unroll.steps: {choice: [0, 5]}\n",
    )
    assert architecture_mutations(load_space(path), RING8) == ["generators.width"]


def test_space_round_trips_through_plain_data() -> None:
    from tuning.spaces import space_from_data

    space = load_space("lr")
    again = space_from_data(space.name, space.to_data(), space.source)
    assert again == space
    assert again.mutations["unroll.steps"] == Distribution("choice", (0, 1, 5))
