"""Config fuzzing: random override lists built from the real schema either load or are refused.

The strategies walk the dataclasses of ``gan_core.config`` (so a new key is fuzzed the day it is
added) and draw known keys with values of random types (huge, negative, zero, NaN, inf, empty
strings, lists, mappings, interpolations), unknown keys at every level and malformed items.
Every case must end in one of two ways:

- a ``GanConfig``, which then builds a model and trains 2 steps (a crash there is a gap in
  ``validate``: the config should have been refused before any Ray worker started), or
- a ``ConfigError`` naming the offending key, its value and what is allowed.

Any other exception is a bug in ``gan_core.config``. Runs derandomized, so CI sees the same
examples every time; the example counts keep the whole file near 25 s of CPU (2-core machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, note, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from gan_core import config as config_module
from gan_core.config import ConfigError, GanConfig, flatten, load_config, preset_names
from gan_core.data import DataError
from gan_core.loop import GanRun

PRESETS = preset_names()

# Enumerated string keys and what they accept: known-good values are drawn often so that the
# fuzzer also reaches the combination checks, not only the one-key range checks.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": config_module.DATASETS,
    "objective.name": config_module.OBJECTIVES,
    "generators.arch": config_module.ARCHS,
    "discriminator.arch": config_module.ARCHS,
    "generators.activation": config_module.ACTIVATIONS,
    "discriminator.activation": config_module.ACTIVATIONS,
    "g_optim.name": config_module.OPTIMIZERS,
    "d_optim.name": config_module.OPTIMIZERS,
    "train.lr_schedule": config_module.LR_SCHEDULES,
    "train.on_nonfinite": config_module.NONFINITE_POLICIES,
    "train.precision": config_module.PRECISIONS,
    "resources.backend": ("ray", "local"),
    "checkpoint.mode": ("max", "min"),
}


def _walk(schema: type, prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """(leaf key -> default value, section keys) of a config dataclass, recursively."""
    leaves: dict[str, Any] = {}
    sections: list[str] = []
    defaults = schema()
    for f in dataclasses.fields(schema):
        value = getattr(defaults, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            sections.append(key)
            sub_leaves, sub_sections = _walk(type(value), key + ".")
            leaves.update(sub_leaves)
            sections.extend(sub_sections)
        else:
            leaves[key] = value
    return leaves, sections


LEAVES, SECTIONS = _walk(GanConfig)
LEAF_KEYS = sorted(LEAVES)


def test_the_schema_walk_sees_every_section_and_key() -> None:
    # Guards the strategies themselves: a walk that silently found nothing would fuzz nothing.
    assert {"generators", "discriminator", "discriminator.minibatch", "train"} <= set(SECTIONS)
    assert {"generators.count", "discriminator.minibatch.kernels", "g_optim.lr"} <= set(LEAVES)
    assert set(CHOICES) <= set(LEAVES)
    assert len(LEAVES) == len(flatten(GanConfig()))


# --- value and key strategies ------------------------------------------------------------------

EXTREME_INTS = [0, -1, 1, 2, 3, 2**31, -(2**31), 2**63, -(2**63) - 1, 10**30, -(10**30)]
EXTREME_FLOATS = ["nan", "inf", "-inf", ".nan", ".inf", "-.inf", "1e308", "1e-320", "-0.0", "0.0"]
JUNK = [
    "",
    "null",
    "~",
    "[]",
    "[1, 2]",
    "{}",
    "{a: 1}",
    "???",
    "${nowhere}",
    "${name}",
    "${generators}",
    "${oc.env:HOME}",
    "${oc.env:RAYGAN_FUZZ_UNSET}",
    "${oc.decode:'[1'}",
    "'quoted'",
    '"double"',
    "a:b",
    "#comment",
    "[unclosed",
    "{unclosed",
    "x=y",
    "\\",
    "\x00",
    "é∂",
]
# Text with the characters YAML, OmegaConf interpolation and dotted keys give meaning to.
TEXT = st.text(alphabet=st.sampled_from("az09_-.:/=$ {}[],'\"#!&*?%@`|>\\\t"), max_size=12)


def _int_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(EXTREME_INTS),
        st.integers(min_value=-(10**40), max_value=10**40),
        st.integers(min_value=-5, max_value=40),
    ).map(str)


def _float_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(EXTREME_FLOATS),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.floats(min_value=-2.0, max_value=2.0).map(repr),
    )


def value_text(key: str) -> st.SearchStrategy[str]:
    """The text after ``=`` for a known ``key``: mostly its own type, sometimes anything."""
    default = LEAVES[key]
    if isinstance(default, bool):
        own = st.sampled_from(["true", "false", "True", "yes", "no", "on", "0", "1", "2"])
    elif isinstance(default, int):
        own = _int_text()
    elif isinstance(default, float):
        own = st.one_of(_float_text(), _int_text())
    elif key in CHOICES:
        own = st.one_of(st.sampled_from(CHOICES[key]), st.sampled_from(CHOICES[key]), TEXT)
    else:
        own = TEXT
    other = st.one_of(st.sampled_from(JUNK), TEXT, _int_text(), _float_text())
    return st.one_of(own, own, own, other)


def _unknown_name() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["bogus", "foo", "width2", "lr_g", "gen", "count_", "_x"]),
        st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
    ).filter(lambda name: name not in LEAVES and name not in SECTIONS)


@st.composite
def override_item(draw: st.DrawFn) -> str:
    """One ``key=value`` item: a known key, a section, an unknown key or a malformed item."""
    kind = draw(st.sampled_from(["known"] * 6 + ["section", "unknown", "under_leaf", "bad_key"]))
    if kind == "known":
        key = draw(st.sampled_from(LEAF_KEYS))
        return f"{key}={draw(value_text(key))}"
    if kind == "section":
        key = draw(st.sampled_from(SECTIONS))
        return f"{key}={draw(st.one_of(_int_text(), st.sampled_from(JUNK), TEXT))}"
    if kind == "unknown":
        parent = draw(st.sampled_from(["", *SECTIONS]))
        key = f"{parent}.{draw(_unknown_name())}" if parent else draw(_unknown_name())
        return f"{key}={draw(st.one_of(_int_text(), TEXT, st.sampled_from(JUNK)))}"
    if kind == "under_leaf":
        # A leaf used as if it were a section: "generators.count.x=1".
        key = f"{draw(st.sampled_from(LEAF_KEYS))}.{draw(_unknown_name())}"
        return f"{key}={draw(_int_text())}"
    leaf = draw(st.sampled_from(LEAF_KEYS))
    bad = draw(
        st.sampled_from(
            [
                leaf,  # no "=" at all
                f"={leaf}",
                f"{leaf}.=1",
                f".{leaf}=1",
                leaf.replace(".", "..") + "=1",
                f" {leaf}=1",
                f"{leaf} =1",
                f"{leaf}[0]=1",
                f"${{{leaf}}}=1",
                f"{leaf}==1",
                "=",
                ".=1",
                "a..b=1",
            ]
        )
    )
    return bad


OVERRIDES = st.lists(override_item(), min_size=1, max_size=6)


# --- what a refusal must say -------------------------------------------------------------------

_PRESET_FLAT = {name: flatten(load_config(name)) for name in PRESETS}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b and type(a) is type(b)
    return a == b


def _given(overrides: list[str]) -> Any:
    """The nested values OmegaConf reads from the override items (later items win)."""
    items = [item for item in overrides if "=" in item and not item.startswith("=")]
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items), resolve=False)
    except Exception:
        return {}


def check_refusal(err: ConfigError, preset: str, overrides: list[str]) -> None:
    """``err`` names a key the input really contains, the value it really has, and what is
    allowed; its message shows all three."""
    note(f"ConfigError: {err}")
    assert isinstance(err.key, str) and err.key and err.key not in ("?", "overrides"), err
    assert isinstance(err.allowed, str) and err.allowed.strip(), err
    assert str(err) == f"{err.source}: {err.key}={err.value!r} is invalid; allowed: {err.allowed}"
    if err.key in overrides:
        # An item without "=" is named whole.
        assert err.value == err.key
        return
    raw = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0] == err.key]
    if raw and isinstance(err.value, str) and err.value in raw:
        # Refused while parsing (a malformed key or a value YAML cannot read): the text as given.
        return
    given = config_module._lookup(_given(overrides), err.key)
    if given is not config_module._ABSENT:
        # The given key (or the parent that a mapping was given for) with the value given, as
        # parsed or after coercion to the key's type ("g_optim.lr=1" is reported as 1.0).
        ok = _same(err.value, given) or str(err.value) == str(given)
        if isinstance(err.value, int | float) and isinstance(given, int | float | str):
            with contextlib.suppress(ValueError, OverflowError):
                ok = ok or _same(float(err.value), float(given))
        assert ok, f"{err.key}: reported {err.value!r}, given {given!r}"
        return
    # Not overridden: a preset value refused in combination with an overridden one.
    assert err.key in _PRESET_FLAT[preset], f"{err.key!r} is neither given nor known: {overrides}"
    assert _same(err.value, _PRESET_FLAT[preset][err.key]), err


# --- 1. validation alone: anything goes --------------------------------------------------------


# Found while building this fuzzer, kept as explicit examples: the first seven escaped as raw
# YAML errors or as a ConfigError keyed "?" or "overrides" instead of the item at fault; the last
# two loaded (see the finiteness assertion below) and failed only inside the workers.
FOUND_BY_FUZZING = [
    ['name="'],  # yaml ScannerError
    ["data=\x00"],  # yaml ReaderError
    ["checkpoint.mode=="],  # yaml ConstructorError
    ["checkpoint.mode=:"],  # yaml ParserError
    ["checkpoint.mode=?"],  # a mapping with a null key: key "overrides"
    ["name=${x"],  # interpolation grammar error: key "overrides"
    [".=1"],  # empty key: key "?"
    ["g_optim.lr=inf"],  # loaded, then NaN weights in every worker
    ["resources.cpus_per_worker=.inf"],  # loaded, then refused by Ray's scheduler
]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(preset=st.sampled_from(PRESETS), overrides=OVERRIDES)
@example(preset="ring8", overrides=FOUND_BY_FUZZING[0])
@example(preset="ring8", overrides=FOUND_BY_FUZZING[1])
@example(preset="ring8", overrides=FOUND_BY_FUZZING[2])
@example(preset="ring8", overrides=FOUND_BY_FUZZING[3])
@example(preset="ring8", overrides=FOUND_BY_FUZZING[4])
@example(preset="ring8", overrides=FOUND_BY_FUZZING[5])
@example(preset="ring8", overrides=FOUND_BY_FUZZING[6])
@example(preset="ring8", overrides=FOUND_BY_FUZZING[7])
@example(preset="ring8", overrides=FOUND_BY_FUZZING[8])
def test_any_overrides_load_or_raise_a_config_error(preset: str, overrides: list[str]) -> None:
    note(f"load_config({preset!r}, {overrides!r})")
    try:
        cfg = load_config(preset, overrides)
    except ConfigError as err:
        check_refusal(err, preset, overrides)
    else:
        assert isinstance(cfg, GanConfig)
        # What loads is usable as it is: no NaN/inf and no integer beyond 64 bits slipped in.
        for key, value in flatten(cfg).items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, value)
            elif isinstance(value, int):
                assert -(2**63) <= value < 2**63, (key, value)


# --- 2. what validates must train: tiny nets, random variants, 2 steps -------------------------


# Small sizes so that every example builds and steps in milliseconds; the edges (0, -1) are
# still drawn so the range checks are exercised on the way. Other keys get any value.
def _small(low: int, high: int, *edges: int) -> st.SearchStrategy[int]:
    # Edges drawn often: the crashes hide at 0, 1 and "one sample per generator/pack".
    return st.one_of(st.sampled_from([low, low + 1, 1, 2, *edges]), st.integers(low, high))


SMALL: dict[str, st.SearchStrategy[int]] = {
    "generators.count": _small(-1, 5, 4),
    "generators.z_dim": _small(-1, 6),
    "generators.width": _small(-1, 9),
    "generators.depth": _small(-1, 3),
    "discriminator.width": _small(-1, 9),
    "discriminator.depth": _small(-1, 3),
    "discriminator.maxout_pieces": _small(0, 4),
    "discriminator.pack": _small(0, 5, 4),
    "discriminator.minibatch.kernels": _small(-1, 6),
    "discriminator.minibatch.kernel_dims": _small(0, 4),
    "encoder.width": _small(-1, 9),
    "encoder.depth": _small(-1, 3),
    "unroll.steps": _small(-1, 3),
    "objective.n_critic": _small(0, 3),
    "train.batch_size": _small(0, 24, 4, 8, 12),
    "train.threads": _small(0, 2),
    "eval.samples": _small(0, 40, 3),
    "eval.grid": _small(0, 10, 3),
    "data.image_size": st.sampled_from([0, 0, 8, 16, -1, 1, 3, 4, 5, 12]),
    "data.channels": _small(0, 3),
}
TINY = [
    "generators.width=8",
    "generators.depth=1",
    "discriminator.width=8",
    "discriminator.depth=1",
    "discriminator.maxout_pieces=2",
    "encoder.width=8",
    "encoder.depth=1",
    "train.batch_size=8",
    "eval.samples=16",
    "eval.grid=4",
    "data.path=replaced-by-the-test.parquet",
    "train.compile=false",
]
# The data path is the test's to choose (a random one could name a huge folder to scan), and
# torch.compile costs minutes per example on a CPU (tests/gan_core/test_precision.py has it).
TRAIN_KEYS = [key for key in LEAF_KEYS if key not in ("data.path", "train.compile")]
BOOL_KEYS = [key for key in TRAIN_KEYS if isinstance(LEAVES[key], bool)]


@st.composite
def train_item(draw: st.DrawFn) -> str:
    # Sizes and choices are where variants combine; other keys get their share too.
    key = draw(
        st.one_of(
            st.sampled_from(sorted(SMALL)),
            st.sampled_from(sorted(CHOICES)),
            st.sampled_from(BOOL_KEYS),
            st.sampled_from(TRAIN_KEYS),
        )
    )
    junk = st.one_of(st.sampled_from(JUNK), TEXT, value_text(key))
    if key in SMALL:
        # Huge sizes are the validation test's business: here they would only exhaust memory.
        legal, junk = SMALL[key].map(str), st.sampled_from(JUNK)
    elif key in BOOL_KEYS:
        legal = st.sampled_from(["true", "false"])
    elif key in CHOICES:
        # Mostly legal choices: the interesting crashes hide in legal combinations.
        legal = st.sampled_from(CHOICES[key])
    else:
        legal = value_text(key)
    # One item in eight is junk: enough to cross the parser, few enough that most lists load.
    return f"{key}={draw(junk if draw(st.integers(0, 7)) == 7 else legal)}"


# The knobs whose combinations decide what a batch looks like to each net: drawn for every
# example (or left at the preset's value), so combinations are met often, not by luck.
VARIANT: dict[str, st.SearchStrategy[Any]] = {
    "train.batch_size": st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]),
    "generators.count": st.sampled_from([1, 2, 3, 4]),
    "discriminator.pack": st.sampled_from([1, 2, 3, 4]),
    "objective.name": st.sampled_from(config_module.OBJECTIVES),
    "data.name": st.sampled_from(config_module.DATASETS),
    "data.image_size": st.sampled_from([0, 4, 8, 16]),
    "data.channels": st.sampled_from([1, 3]),
    "generators.arch": st.sampled_from(config_module.ARCHS),
    "discriminator.arch": st.sampled_from(config_module.ARCHS),
    "generators.batch_norm": st.booleans(),
    "discriminator.batch_norm": st.booleans(),
    "generators.shared": st.booleans(),
    "discriminator.minibatch.kernels": st.sampled_from([0, 2]),
    "unroll.steps": st.sampled_from([0, 1, 2]),
}


@st.composite
def variant_items(draw: st.DrawFn) -> list[str]:
    items = []
    for key, values in VARIANT.items():
        # The dataset is always drawn: otherwise the presets' own (never Parquet) would win.
        value = draw(values if key == "data.name" else st.one_of(st.none(), values))
        if value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            items.append(f"{key}={text}")
    return items


def _parquet(folder: Path, image_size: int, channels: int) -> str:
    """A small Parquet file of the shape a config asks for (points when image_size is 0)."""
    path = folder / f"data_{image_size}_{channels}.parquet"
    if not path.exists():
        rng = np.random.default_rng(0)
        if image_size > 0:
            pixels = rng.uniform(-1, 1, (8, channels * image_size**2)).tolist()
            table = pa.table({"image": pixels, "label": list(range(8))})
        else:
            table = pa.table({"x": rng.normal(size=8), "y": rng.normal(size=8)})
        pq.write_table(table, path)
    return str(path)


def _image_folder(folder: Path, image_size: int, channels: int) -> str:
    """A folder of 8 PNG files in two class subfolders, of another size than asked for (the
    reader resizes them)."""
    path = folder / f"images_{image_size}_{channels}"
    if not path.exists():
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(8):
            (path / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (image_size + 3, image_size + 3, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path / f"class{i % 2}" / f"{i}.png")
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_data")


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    preset=st.sampled_from(PRESETS),
    variant=variant_items(),
    items=st.lists(train_item(), max_size=4),
    path_exists=st.booleans(),
)
def test_every_config_that_validates_trains(
    data_dir: Path, preset: str, variant: list[str], items: list[str], path_exists: bool
) -> None:
    overrides = TINY + variant + items
    note(f"load_config({preset!r}, {overrides!r})")
    try:
        cfg = load_config(preset, overrides)
    except ConfigError as err:
        event("refused")  # --hypothesis-show-statistics shows how many examples trained
        check_refusal(err, preset, overrides)
        return
    event(f"trained {cfg.data.name}")
    missing = str(data_dir / "missing" / "data.parquet")
    if cfg.data.name in ("parquet", "image_folder"):
        # image_size/channels passed validation; the data matches them, or is missing.
        make = _parquet if cfg.data.name == "parquet" else _image_folder
        path = make(data_dir, cfg.data.image_size, cfg.data.channels)
        cfg.data.path = path if path_exists else missing
    threads = torch.get_num_threads()
    try:
        run = GanRun(cfg)
        for _ in range(2):
            metrics = run.train_step()
        samples = run.generate(cfg.eval.samples)
    except DataError as err:
        # The one legitimate refusal left: data that is not there (preflight's job, see
        # services/preflight.py); it names the path.
        assert cfg.data.path == missing and missing in str(err), err
        return
    finally:
        torch.set_num_threads(threads)  # train.threads changes a process-wide setting
    assert run.model.step == 2
    assert {"d_loss", "g_loss"} <= set(metrics)
    assert samples.shape == (cfg.eval.samples, *run.dataset.shape)


# --- 3. the gaps found, refused by name ------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "overrides", "key", "value", "allowed"),
    [
        # Each loaded before, then crashed in GanRun or in a train step.
        ("grid25", ["train.batch_size=1"], "train.batch_size", 1, "generators.batch_norm"),
        (
            "ring8",
            ["generators.count=4", "train.batch_size=4"],
            "train.batch_size",
            4,
            ">= 2 * generators.count (8)",
        ),
        (
            "ring8",
            ["discriminator.batch_norm=true", "discriminator.pack=2", "train.batch_size=2"],
            "train.batch_size",
            2,
            ">= 2 * discriminator.pack (4)",
        ),
        (
            "ring8_ebgan",
            ["discriminator.batch_norm=true", "generators.batch_norm=false", "train.batch_size=1"],
            "train.batch_size",
            1,
            "discriminator.batch_norm",
        ),
        (
            "ring8",
            ["data.image_size=16", "generators.arch=dcgan"],
            "generators.arch",
            "dcgan",
            "mlp",
        ),
        (
            "ring8",
            [
                "data.name=parquet",
                "data.path=x.parquet",
                "data.image_size=4",
                "generators.arch=dcgan",
            ],
            "data.image_size",
            4,
            "one of 8, 16, 32",
        ),
        ("ring8", ["seed=100000000000000000000000"], "seed", 10**23, "a 64-bit integer"),
        ("ring8", ["train.threads=100000"], "train.threads", 100000, "<= 1024"),
        ("ring8", ["generators.count=6000"], "generators.count", 6000, "<= 5000"),
        ("ring8", ["g_optim.lr=inf"], "g_optim.lr", math.inf, "a finite number"),
        ("ring8", ["objective.gp_weight=1e400"], "objective.gp_weight", math.inf, "finite"),
        # Loaded, then failed in the worker when the storage path was built.
        ("ring8", ["name=.."], "name", "..", "other than '.' and '..'"),
        ("ring8", ["name='a\\b'"], "name", "a\\b", "without '/', '\\'"),
    ],
)
def test_found_gaps_are_refused_by_name(
    preset: str, overrides: list[str], key: str, value: Any, allowed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(preset, [*TINY, *overrides])
    err = info.value
    assert (err.key, err.value) == (key, value)
    assert allowed in err.allowed


def test_every_yaml_error_in_a_value_names_its_item() -> None:
    for (item,) in FOUND_BY_FUZZING[:6]:
        key, text = item.split("=", 1)
        with pytest.raises(ConfigError) as info:
            load_config("ring8", [item])
        assert (info.value.key, info.value.value) == (key, text)
        assert "a YAML value" in info.value.allowed


# --- 4. the job's entry point: a refused config never starts Ray -------------------------------


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(preset=st.sampled_from(PRESETS), overrides=OVERRIDES)
def test_main_refuses_invalid_configs_with_status_2_before_ray(
    preset: str, overrides: list[str]
) -> None:
    import ray

    from services import train

    try:
        load_config(preset, overrides)
    except ConfigError as err:
        expected = err
    else:
        # A valid config would start training; only refusals are main()'s business here.
        assume(False)
    stderr, stdout = io.StringIO(), io.StringIO()
    # A tripwire instead of a cluster, should a refused config ever get as far as Ray.
    tripwire = AssertionError("main() went on to start Ray for a refused config")
    with (
        contextlib.redirect_stderr(stderr),
        contextlib.redirect_stdout(stdout),
        mock.patch.object(train, "init_ray", side_effect=tripwire),
    ):
        status = train.main(["--config", preset, *overrides])
    note(f"stderr: {stderr.getvalue()!r}")
    assert status == 2
    lines = stderr.getvalue().splitlines()
    assert len(lines) >= 1 and lines[0].startswith("raygan: "), lines
    assert "Traceback" not in stderr.getvalue()
    assert f"{expected.key}=" in stderr.getvalue()
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["generators=[1]", "generators.count=2"], "generators.count"),
        (["generators.count=2", "generators=[1]"], "generators"),
    ],
)
def test_a_section_given_both_a_value_and_keys_is_refused_by_name(
    overrides: list[str], key: str
) -> None:
    # Found by the fuzz above once the schema grew: OmegaConf's ConfigTypeError escaped.
    with pytest.raises(ConfigError, match=f"{key}=.*both a value and keys"):
        load_config("ring8", overrides)
