"""Tests for gan_core.config: presets, overrides, base chains, round trips, and ConfigError reports.

Every refused config must say which key, which value, what is allowed and where it came from, so
each error test checks all four on the exception's attributes and in its message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gan_core.config import (
    PRESET_DIR,
    ConfigError,
    GanConfig,
    GeneratorConfig,
    ObjectiveConfig,
    UnrollConfig,
    checkpoint_metric,
    flatten,
    from_dict,
    load_config,
    preset_names,
    to_dict,
    to_yaml,
    validate,
)

RING8 = str(PRESET_DIR / "ring8.yaml")
RING8_OVERRIDES = f"{RING8} + overrides"
MADGAN_OVERRIDES = f"{PRESET_DIR / 'ring8_madgan.yaml'} + overrides"
TOP_KEYS = "name, seed, data, generators, discriminator, encoder, objective, g_optim, d_optim"
DISCRIMINATOR_KEYS = "arch, width, depth, activation, maxout_pieces, batch_norm, pack, minibatch"


def expect_error(
    exc: pytest.ExceptionInfo[ConfigError], key: str, value: Any, allowed: str, source: str
) -> None:
    """The error names ``key``, ``value``, text containing ``allowed`` and ``source``."""
    err = exc.value
    assert err.key == key
    assert err.value == value
    assert type(err.value) is type(value)
    assert allowed in err.allowed
    assert err.source == source
    message = str(err)
    assert message.startswith(f"{source}: {key}={value!r} is invalid; allowed: ")
    assert allowed in message


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- presets and overrides ------------------------------------------------------------------


def test_preset_names_are_the_yaml_files() -> None:
    names = preset_names()
    assert names == sorted(names)
    assert {"ring8", "grid25", "digits", "stacked_digits", "ring8_madgan", "ring8_unrolled"} <= set(
        names
    )
    assert len(names) == len(list(PRESET_DIR.glob("*.yaml")))


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_validates(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, GanConfig)
    assert cfg.name == name  # each preset names its runs after itself
    validate(cfg, name)


def test_remedy_presets_inherit_ring8_and_change_one_thing() -> None:
    ring8 = load_config("ring8")
    madgan = load_config("ring8_madgan")
    assert (madgan.generators.count, madgan.objective.name) == (4, "madgan")
    # Everything the remedy does not name comes from its base, ring8, not from GanConfig defaults.
    assert madgan.discriminator.maxout_pieces == 5 != GanConfig().discriminator.maxout_pieces
    assert madgan.g_optim.beta1 == 0.8
    assert madgan.data == ring8.data and madgan.train == ring8.train
    unrolled = load_config("ring8_unrolled")
    assert unrolled.unroll == UnrollConfig(steps=5, second_order=True)
    assert unrolled.generators == ring8.generators
    assert load_config("ring8_pacgan").discriminator.pack == 2
    assert load_config("ring8_minibatch").discriminator.minibatch.kernels == 32


def test_overrides_apply_with_coerced_types() -> None:
    cfg = load_config(
        "ring8",
        [
            "unroll.steps=5",
            "g_optim.lr=0.001",
            "generators.batch_norm=false",
            "data.name=grid25",
            "train.ema=0.99",
        ],
    )
    assert cfg.unroll.steps == 5 and type(cfg.unroll.steps) is int
    assert cfg.g_optim.lr == 0.001 and type(cfg.g_optim.lr) is float
    assert cfg.generators.batch_norm is False
    assert cfg.data.name == "grid25"
    assert cfg.train.ema == 0.99
    assert cfg.d_optim.lr == 2e-3  # untouched keys keep the preset's value


def test_integer_override_of_a_float_key_becomes_float() -> None:
    cfg = load_config("ring8", ["d_optim.lr=1"])
    assert cfg.d_optim.lr == 1.0 and type(cfg.d_optim.lr) is float


def test_later_override_wins() -> None:
    assert load_config("ring8", ["unroll.steps=2", "unroll.steps=7"]).unroll.steps == 7


def test_malformed_override_is_refused() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8", ["unroll.steps"])
    expect_error(exc, "unroll.steps", "unroll.steps", "key=value", "<overrides>")


# --- unknown keys ---------------------------------------------------------------------------


def test_unknown_top_level_override_reports_its_value() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8", ["foo=1"])
    expect_error(exc, "foo", 1, f"known keys: {TOP_KEYS}", "overrides")


def test_unknown_nested_override_lists_the_sections_keys() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8", ["discriminator.bogus=3"])
    expect_error(exc, "discriminator.bogus", 3, f"known keys: {DISCRIMINATOR_KEYS}", "overrides")


def expect_hidden(
    exc: pytest.ExceptionInfo[ConfigError], key: str, allowed: str, source: str, hidden: str
) -> None:
    """A file's unknown key is named, its value never shown (it may be anything: a secret)."""
    err = exc.value
    assert (err.key, repr(err.value), err.source) == (key, "<not shown>", source)
    assert allowed in err.allowed
    assert str(err).startswith(f"{source}: {key}=<not shown> is invalid; allowed: ")
    assert hidden not in str(err)


def test_unknown_top_level_key_in_yaml_names_the_key_not_its_value(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", "base: ring8\nfoo: 7654321\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    expect_hidden(exc, "foo", f"known keys: {TOP_KEYS}", str(path), "7654321")


def test_unknown_nested_key_in_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", "base: ring8\ndiscriminator: {bogus: 3456}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    expect_hidden(
        exc, "discriminator.bogus", f"known keys: {DISCRIMINATOR_KEYS}", str(path), "3456"
    )


def test_unknown_key_two_levels_down_in_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", "discriminator:\n  minibatch:\n    zz: [1, 2]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    expect_hidden(
        exc, "discriminator.minibatch.zz", "known keys: kernels, kernel_dims", str(path), "[1, 2]"
    )


def test_unknown_key_in_a_base_file_names_that_file(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "base: ring8\nencoder: {height: 9876}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nname: child\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(child))
    expect_hidden(exc, "encoder.height", "known keys: width, depth", str(base), "9876")


def test_unknown_key_in_from_dict_nested_and_dotted() -> None:
    with pytest.raises(ConfigError) as exc:
        from_dict({"discriminator": {"bogus": 3}}, source="trial-7")
    expect_error(exc, "discriminator.bogus", 3, f"known keys: {DISCRIMINATOR_KEYS}", "trial-7")
    with pytest.raises(ConfigError) as exc:
        from_dict({"discriminator.bogus": 3})
    expect_error(exc, "discriminator.bogus", 3, f"known keys: {DISCRIMINATOR_KEYS}", "<dict>")


# --- wrong types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "value", "allowed"),
    [
        ("generators.width=abc", "generators.width", "abc", "a value of type int"),
        ("g_optim.lr=fast", "g_optim.lr", "fast", "a value of type float"),
        ("generators.count=2.5", "generators.count", 2.5, "a value of type int"),
        ("unroll.second_order=maybe", "unroll.second_order", "maybe", "a value of type bool"),
    ],
)
def test_wrong_type_override(override: str, key: str, value: Any, allowed: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8", [override])
    expect_error(exc, key, value, allowed, "overrides")


@pytest.mark.parametrize(
    ("text", "key", "value", "allowed"),
    [
        ("generators: {width: abc}\n", "generators.width", "abc", "a value of type int"),
        ("generators: {count: [1, 2]}\n", "generators.count", [1, 2], "a value of type int"),
        ("generators: {width: 1.5}\n", "generators.width", 1.5, "a value of type int"),
        ("g_optim: {lr: fast}\n", "g_optim.lr", "fast", "a value of type float"),
    ],
)
def test_wrong_type_in_yaml(tmp_path: Path, text: str, key: str, value: Any, allowed: str) -> None:
    path = write(tmp_path / "run.yaml", "base: ring8\n" + text)
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    expect_error(exc, key, value, allowed, str(path))


def test_scalar_for_a_whole_section_names_the_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8", ["generators=3"])
    expect_error(exc, "generators", 3, "a mapping of arch, count, shared, z_dim", "overrides")
    path = write(tmp_path / "run.yaml", "discriminator: {minibatch: 8}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    expect_error(exc, "discriminator.minibatch", 8, "a mapping of kernels, kernel_dims", str(path))


def test_an_interpolation_is_refused_unresolved() -> None:
    # Even one between keys: configs resolve nothing (tests/gan_core/test_config_hardening.py).
    with pytest.raises(ConfigError) as exc:
        load_config("ring8", ["data.name=${nowhere}"])
    expect_error(exc, "data.name", "${nowhere}", "not an interpolation", "<overrides>")


# --- out-of-range values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "value", "allowed"),
    [
        ("unroll.steps=-1", "unroll.steps", -1, ">= 0"),
        ("generators.count=0", "generators.count", 0, ">= 1"),
        ("discriminator.minibatch.kernels=-1", "discriminator.minibatch.kernels", -1, ">= 0"),
        ("discriminator.minibatch.kernel_dims=0", "discriminator.minibatch.kernel_dims", 0, ">= 1"),
        ("g_optim.lr=0", "g_optim.lr", 0.0, "> 0"),
        ("d_optim.lr=-0.001", "d_optim.lr", -0.001, "> 0"),
        ("g_optim.beta1=1.0", "g_optim.beta1", 1.0, "in [0, 1)"),
        ("train.ema=1.5", "train.ema", 1.5, "in [0, 1)"),
        ("train.ema=-0.1", "train.ema", -0.1, "in [0, 1)"),
        ("discriminator.pack=0", "discriminator.pack", 0, ">= 1"),
        ("eval.every=0", "eval.every", 0, ">= 1"),
        ("objective.n_critic=0", "objective.n_critic", 0, ">= 1"),
        ("objective.gp_weight=-1", "objective.gp_weight", -1.0, ">= 0"),
        ("data.name=mnist", "data.name", "mnist", "one of ring8, grid25, digits"),
        ("objective.name=lsgan", "objective.name", "lsgan", "one of minimax, nonsaturating"),
        ("name=a/b", "name", "a/b", "without '/'"),
    ],
)
def test_out_of_range(override: str, key: str, value: Any, allowed: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8", [override])
    expect_error(exc, key, value, allowed, RING8_OVERRIDES)


def test_validate_a_hand_built_config_with_default_source() -> None:
    with pytest.raises(ConfigError) as exc:
        validate(GanConfig(generators=GeneratorConfig(count=0)))
    expect_error(exc, "generators.count", 0, ">= 1", "<config>")


def test_config_error_is_a_value_error() -> None:
    # Callers that only know ValueError (argparse handlers, Tune) still catch a bad config.
    with pytest.raises(ValueError, match="unroll.steps=-3"):
        load_config("ring8", ["unroll.steps=-3"])


# --- incompatible combinations and composition ----------------------------------------------


def test_madgan_with_one_generator() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8_madgan", ["generators.count=1"])
    expect_error(
        exc,
        "objective.name",
        "madgan",
        "madgan needs generators.count >= 2 (got 1)",
        MADGAN_OVERRIDES,
    )


def test_madgan_with_packing() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8_madgan", ["discriminator.pack=2"])
    expect_error(exc, "discriminator.pack", 2, "1 with objective madgan", MADGAN_OVERRIDES)


def test_ebgan_with_minibatch_discrimination() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8_ebgan", ["discriminator.minibatch.kernels=8"])
    expect_error(
        exc,
        "discriminator.minibatch.kernels",
        8,
        "0 with objective ebgan",
        f"{PRESET_DIR / 'ring8_ebgan.yaml'} + overrides",
    )


def test_batch_not_a_multiple_of_pack() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8_pacgan", ["train.batch_size=99"])
    expect_error(
        exc,
        "train.batch_size",
        99,
        "a multiple of discriminator.pack (2)",
        f"{PRESET_DIR / 'ring8_pacgan.yaml'} + overrides",
    )


def test_batch_smaller_than_generator_count() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8_madgan", ["train.batch_size=3"])
    expect_error(exc, "train.batch_size", 3, ">= generators.count (4)", MADGAN_OVERRIDES)


def test_batch_not_a_multiple_of_generator_count() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8_madgan", ["train.batch_size=10"])
    expect_error(
        exc, "train.batch_size", 10, "a multiple of generators.count (4)", MADGAN_OVERRIDES
    )


@pytest.mark.parametrize("net", ["generators", "discriminator"])
def test_dcgan_on_point_data(net: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring8", [f"{net}.arch=dcgan"])
    expect_error(exc, f"{net}.arch", "dcgan", "mlp for point data", RING8_OVERRIDES)


def test_dcgan_on_parquet_images_is_legal() -> None:
    cfg = load_config(
        "ring8",
        [
            "data.name=parquet",
            "data.path=/data/faces",
            "data.image_size=32",
            "generators.arch=dcgan",
            "discriminator.arch=dcgan",
        ],
    )
    assert (cfg.generators.arch, cfg.data.image_size) == ("dcgan", 32)


def test_unrolled_madgan_with_minibatch_discrimination_is_legal() -> None:
    cfg = load_config("ring8_madgan", ["unroll.steps=5", "discriminator.minibatch.kernels=8"])
    assert cfg.objective.name == "madgan"
    assert cfg.generators.count == 4
    assert cfg.unroll.steps == 5
    assert cfg.discriminator.minibatch.kernels == 8
    assert cfg.discriminator.minibatch.kernel_dims == 5  # the default C is kept
    assert cfg.discriminator.maxout_pieces == 5  # still ring8's discriminator


# --- base chains and files ------------------------------------------------------------------


def test_base_chain_from_user_yaml_to_presets(tmp_path: Path) -> None:
    # user file -> ring8_madgan -> ring8: three levels, the nearest file winning each key.
    path = write(
        tmp_path / "mine.yaml", "base: ring8_madgan\nname: mine\ntrain: {batch_size: 64}\n"
    )
    cfg = load_config(str(path))
    assert cfg.name == "mine"
    assert cfg.train.batch_size == 64
    assert cfg.train.steps == 6000  # same section, key not named here: from ring8
    assert cfg.generators.count == 4 and cfg.objective.name == "madgan"
    assert cfg.discriminator.maxout_pieces == 5


def test_base_relative_to_the_file_not_the_working_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "conf" / "parent.yaml", "base: ring8\nname: parent\nunroll: {steps: 3}\n")
    child = write(
        tmp_path / "conf" / "sub" / "child.yaml",
        "base: ../parent.yaml\nname: child\ndiscriminator: {pack: 2}\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(child), ["unroll.second_order=false"])
    assert cfg.name == "child"
    assert cfg.unroll == UnrollConfig(steps=3, second_order=False)
    assert cfg.discriminator.pack == 2
    assert cfg.data.name == "ring8" and cfg.generators.width == 400


def test_base_cycle_is_refused(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "base: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "base: a.yaml\nname: b\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(a))
    # a -> b -> a: the repeat is detected when a is reached again from b.
    expect_error(exc, "base", str(a), "without a cycle", str(a))


def test_file_that_is_its_own_base_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    expect_error(exc, "base", str(path), "without a cycle", str(path))


def test_unknown_base_names_the_file_and_lists_presets(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", "base: ring9\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    expect_error(exc, "base", "ring9", "a preset: " + ", ".join(preset_names()), str(path))


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("ring9")
    expect_error(
        exc,
        "--config",
        "ring9",
        "a YAML path or a preset: " + ", ".join(preset_names()),
        "<config argument>",
    )


def test_missing_file_lists_presets(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(missing)
    expect_error(
        exc,
        "--config",
        missing,
        "an existing YAML file or a preset: " + ", ".join(preset_names()),
        "<config argument>",
    )


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.yaml", "base: ring8\ngenerators: {count: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    expect_error(exc, "<file>", str(path), "valid YAML", str(path))


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    expect_error(exc, "<file>", str(path), "a YAML mapping", str(path))


def test_out_of_range_value_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", "base: ring8\nunroll: {steps: -2}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    expect_error(exc, "unroll.steps", -2, ">= 0", str(path))


# --- flatten, from_dict, to_yaml ------------------------------------------------------------


def test_flatten_gives_dotted_scalar_keys() -> None:
    cfg = load_config("ring8_madgan", ["unroll.steps=5", "discriminator.minibatch.kernels=8"])
    flat = flatten(cfg)
    assert flat["name"] == "ring8_madgan"
    assert flat["generators.count"] == 4
    assert flat["objective.name"] == "madgan"
    assert flat["unroll.steps"] == 5
    assert flat["discriminator.minibatch.kernels"] == 8
    assert flat["discriminator.minibatch.kernel_dims"] == 5
    assert flat["g_optim.lr"] == 2e-3 and flat["g_optim.beta1"] == 0.8
    assert flat["tracking.enabled"] is True
    assert all(not isinstance(v, dict) for v in flat.values())
    # Sections themselves are not keys, only their leaves are.
    assert not {"generators", "discriminator", "discriminator.minibatch"} & set(flat)


def test_from_dict_nested_and_dotted_agree_with_dataclasses() -> None:
    expected = GanConfig(generators=GeneratorConfig(count=2), objective=ObjectiveConfig("madgan"))
    assert from_dict({"generators": {"count": 2}, "objective": {"name": "madgan"}}) == expected
    assert from_dict({"generators.count": 2, "objective.name": "madgan"}) == expected


@pytest.mark.parametrize("name", ["ring8_madgan", "digits"])
def test_from_dict_round_trips(name: str) -> None:
    cfg = load_config(name, ["unroll.steps=2"])
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(flatten(cfg)) == cfg


def test_from_dict_validates() -> None:
    with pytest.raises(ConfigError) as exc:
        from_dict({"generators.count": 1, "objective.name": "madgan"}, source="tune")
    expect_error(exc, "objective.name", "madgan", "generators.count >= 2", "tune")


def test_to_yaml_reloads_to_an_equal_config(tmp_path: Path) -> None:
    cfg = load_config("ring8_madgan", ["unroll.steps=5", "discriminator.minibatch.kernels=8"])
    path = write(tmp_path / "dump.yaml", to_yaml(cfg))
    reloaded = load_config(str(path))
    assert reloaded == cfg
    assert reloaded is not cfg


# --- property: any integer either loads or is a ConfigError naming the bad key -----------------

BATCH = 100  # ring8's batch; a generator count must divide it


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    steps=st.integers(min_value=-20, max_value=20),
    count=st.integers(min_value=-5, max_value=120),
    kernels=st.integers(min_value=-20, max_value=64),
)
def test_integer_knobs_load_or_raise_config_error(steps: int, count: int, kernels: int) -> None:
    bad = {}
    if steps < 0:
        bad["unroll.steps"] = steps
    if count < 1:
        bad["generators.count"] = count
    elif BATCH % count:
        bad["train.batch_size"] = BATCH
    if kernels < 0:
        bad["discriminator.minibatch.kernels"] = kernels
    overrides = [
        f"unroll.steps={steps}",
        f"generators.count={count}",
        f"discriminator.minibatch.kernels={kernels}",
    ]
    try:
        cfg = load_config("ring8", overrides)
    except ConfigError as err:
        assert bad, f"{overrides} are in range but were refused: {err}"
        assert err.key in bad and err.value == bad[err.key]
        assert err.source == RING8_OVERRIDES
    else:
        assert not bad, f"{overrides} loaded although {sorted(bad)} are out of range"
        assert (cfg.unroll.steps, cfg.generators.count) == (steps, count)
        assert cfg.discriminator.minibatch.kernels == kernels


PARQUET = ["data.name=parquet", "data.path=/data/points.parquet"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ("modes", "max")),
        (["data.name=stacked_digits"], ("modes", "max")),
        (PARQUET, ("step", "max")),  # unlabelled data: keep the latest checkpoints
        (["checkpoint.metric=reverse_kl", "checkpoint.mode=min"], ("reverse_kl", "min")),
        ([*PARQUET, "checkpoint.metric=g_loss", "checkpoint.mode=min"], ("g_loss", "min")),
    ],
)
def test_checkpoint_metric_defaults_to_what_the_data_reports(
    overrides: list[str], expected: tuple[str, str]
) -> None:
    assert checkpoint_metric(load_config("ring8", overrides)) == expected


@pytest.mark.parametrize(
    ("overrides", "metric"),
    [
        (PARQUET, "reverse_kl"),  # no mode centers in a user's data (labels: preflight)
        ([], "kl"),  # ring-8 reports reverse_kl, not kl
        (["data.name=stacked_digits"], "hq_pct"),
    ],
)
def test_checkpoint_metric_the_data_never_reports_is_refused(
    overrides: list[str], metric: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("ring8", [*overrides, f"checkpoint.metric={metric}"])
    message = str(err.value)
    assert "checkpoint.metric" in message and repr(metric) in message
    assert "a training metric" in message
