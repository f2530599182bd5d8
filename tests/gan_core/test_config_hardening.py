"""Configs as untrusted input: no interpolation, no file content in errors, sizes and names that
would only fail inside Ray refused by name.

Each refusal names the key, the value (shortened, or not shown when a file's unknown key may hold
anything) and what is allowed; a planted secret, in the environment or in a file, never appears
in the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from gan_core import footprint as fp
from gan_core.config import (
    MAX_CONFIG_BYTES,
    MAX_NAME_LENGTH,
    MAX_SHOWN,
    MAX_UNROLL_STEPS,
    PRESET_DIR,
    ConfigError,
    GanConfig,
    flatten,
    from_dict,
    load_config,
    preset_names,
)
from gan_core.nets import build_discriminator
from gan_core.unroll import lookahead_params
from tests.gan_core.test_footprint import HAND_NETS

SECRET = "planted-s3cret-Zq81"
ENV = "RAYGAN_PLANTED_SECRET"
RING8_OVERRIDES = f"{PRESET_DIR / 'ring8.yaml'} + overrides"


@pytest.fixture(autouse=True)
def planted_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)


def refused(call: Any, *args: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args)
    assert SECRET not in str(info.value)
    return info.value


def check(err: ConfigError, key: str, value: Any, allowed: str, source: str) -> None:
    assert (err.key, err.value, err.source) == (key, value, source)
    assert allowed in err.allowed
    assert str(err).startswith(f"{source}: {key}={value!r} is invalid; allowed: ")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --- 1. no interpolation, anywhere --------------------------------------------------------------

NO_INTERPOLATION = "not an interpolation"


@pytest.mark.parametrize(
    "item",
    [
        f"name=${{oc.env:{ENV}}}",
        f"storage.uri=${{oc.env:{ENV}}}",
        f"tracking.uri='${{oc.env:{ENV},x}}'",
        "name=${seed}",  # between keys too: nothing resolves
        f"generators.width=${{oc.decode:${{oc.env:{ENV}}}}}",
    ],
)
def test_an_override_with_an_interpolation_is_refused_as_given(item: str) -> None:
    key, text = item.split("=", 1)
    check(refused(load_config, "ring8", [item]), key, text, NO_INTERPOLATION, "<overrides>")


def test_an_interpolation_in_a_yaml_file_is_refused_at_its_key(tmp_path: Path) -> None:
    text = f"base: ring8\ngenerators: {{width: '${{oc.env:{ENV}}}'}}\n"
    path = write(tmp_path / "run.yaml", text)
    err = refused(load_config, path)
    check(err, "generators.width", f"${{oc.env:{ENV}}}", NO_INTERPOLATION, path)


def test_an_interpolation_in_a_list_or_in_base_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "list.yaml", f"name: [a, '${{oc.env:{ENV}}}']\n")
    check(refused(load_config, path), "name", ["a", f"${{oc.env:{ENV}}}"], NO_INTERPOLATION, path)
    # base is popped (which would resolve it) before the file is merged: read raw first.
    path = write(tmp_path / "base.yaml", f"base: ${{oc.env:{ENV}}}\n")
    check(refused(load_config, path), "base", f"${{oc.env:{ENV}}}", NO_INTERPOLATION, path)


def test_an_interpolation_in_a_base_file_names_that_file(tmp_path: Path) -> None:
    parent = write(
        tmp_path / "parent.yaml", f"base: ring8\nstorage: {{uri: '${{oc.env:{ENV}}}'}}\n"
    )
    child = write(tmp_path / "child.yaml", "base: parent.yaml\nname: child\n")
    err = refused(load_config, child)
    check(err, "storage.uri", f"${{oc.env:{ENV}}}", NO_INTERPOLATION, parent)


def test_stored_and_sampled_configs_refuse_interpolation() -> None:
    # from_dict reads checkpoints' config.yaml, best.yaml's trials, sweep spaces and Tune samples.
    value = f"${{oc.env:{ENV}}}"
    err = refused(from_dict, {"storage": {"uri": value}}, "ckpt/config.yaml")
    check(err, "storage.uri", value, NO_INTERPOLATION, "ckpt/config.yaml")
    err = refused(from_dict, {**flatten(GanConfig()), "name": value}, "space.yaml")
    check(err, "name", value, NO_INTERPOLATION, "space.yaml")


# --- 2. errors name files, never print them -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        # /etc/passwd: one long plain scalar, which OmegaConf turned into a key of the whole file.
        (
            f"root:x:0:0:root:/root:/bin/bash\nme:x:1000:1000:{SECRET}:/home/me:/bin/sh\n",
            "one text",
        ),
        # /etc/shadow: every line "a:b:...:" is a key; its first line was printed as the key.
        (f"root:$6${SECRET}$abcdefgh:19000:0:99999:7:::\nbin:*:19000:0:99999:7:::\n", "key 1 at"),
        (f"- {SECRET}\n", "this file holds a list"),
        (f"base: ring8\nname: x\nbad: [{SECRET}\n", "valid YAML"),  # yaml quotes the line
        (f"name: a\nname: {SECRET}\n", "valid YAML (found duplicate key name"),
        (f"AWS_SECRET_ACCESS_KEY={SECRET}\n", "one text"),
        (f"[default]\naws_secret_access_key = {SECRET}\n", "valid YAML"),
    ],
)
def test_a_file_that_is_not_a_config_is_named_never_printed(
    tmp_path: Path, text: str, allowed: str
) -> None:
    path = write(tmp_path / "notes.yaml", text)
    err = refused(load_config, path)
    check(err, "<file>", path, allowed, path)
    for line in text.splitlines():
        assert line not in str(err)


def test_binary_and_oversized_files_are_refused_unread(tmp_path: Path) -> None:
    binary = tmp_path / "blob.yaml"
    binary.write_bytes(b"\xff\xfe" + SECRET.encode() + bytes(range(256)))
    check(refused(load_config, str(binary)), "<file>", str(binary), "UTF-8 text", str(binary))
    big = write(tmp_path / "big.yaml", f"name: {SECRET}\n" + "#" * MAX_CONFIG_BYTES)
    check(refused(load_config, big), "<file>", big, f"under {MAX_CONFIG_BYTES} bytes", big)


def test_a_files_unknown_key_is_named_its_value_not_shown(tmp_path: Path) -> None:
    # A credentials or docker config.json read by mistake: valid YAML mappings of other keys.
    path = write(tmp_path / "creds.yaml", f"aws_secret_access_key: {SECRET}\n")
    err = refused(load_config, path)
    assert (err.key, repr(err.value)) == ("aws_secret_access_key", "<not shown>")
    assert "known keys: name, seed, data" in err.allowed
    path = write(tmp_path / "config.json", f'{{"auths": {{"r": {{"auth": "{SECRET}"}}}}}}')
    assert refused(load_config, path).key == "auths"


def test_keys_and_values_in_messages_are_shortened() -> None:
    long_key = "k" * 300
    err = refused(load_config, "ring8", [f"{long_key}=1"])
    assert err.key == long_key  # the attribute keeps it whole
    shown = str(err).removeprefix("overrides: ").split(" is invalid")[0]
    assert shown == "k" * (MAX_SHOWN - 3) + "...=1"
    err = refused(load_config, "ring8", ["data.name=" + "x" * 300])
    assert f"data.name='{'x' * (MAX_SHOWN - 4)}... is invalid" in str(err)


def test_every_preset_loads_as_omegaconfs_own_reader_reads_it() -> None:
    # The new reader (plain YAML first) changes nothing for a real config.
    def old_way(path: Path) -> Any:
        node = OmegaConf.load(path)
        base = node.pop("base", None)
        below = old_way(PRESET_DIR / f"{base}.yaml") if base else OmegaConf.structured(GanConfig)
        return OmegaConf.merge(below, node)

    for name in preset_names():
        expected = OmegaConf.to_object(old_way(PRESET_DIR / f"{name}.yaml"))
        assert load_config(name) == expected, name
    assert load_config("ring8_unrolled").unroll.steps == 5


# --- 3. the look-ahead in the footprint; its bound; seeds ---------------------------------------


@pytest.mark.parametrize(("second_order", "alive"), [(True, 4), (False, 1)])
def test_the_lookahead_part_by_hand(second_order: bool, alive: int) -> None:
    cfg = load_config(
        "ring8", [*HAND_NETS, "unroll.steps=4", f"unroll.second_order={second_order}"]
    )
    # D: Flatten (2), Linear(2 -> 3), LeakyReLU (3), Linear(3 -> 1): 9 elements per sample and
    # 2*3+3 + 3+1 = 13 parameters. Each step alive: 10 real + 10 fake samples' activations and
    # their gradients, plus 32 bytes per parameter; first order keeps one step at a time.
    assert sum(p.numel() for p in build_discriminator(cfg, (2,)).parameters()) == 13
    per_step = 2 * 4 * 10 * 2 * 9 + fp.LOOKAHEAD_PARAM_BYTES * 13
    assert fp.footprint(cfg).parts["unroll.steps"] == alive * per_step == alive * 1856


def _saved_bytes(cfg: GanConfig, steps: int) -> int:
    """Bytes autograd keeps for a real second-order look-ahead of ``cfg``'s D (saved tensors)."""
    torch.manual_seed(0)
    d = build_discriminator(cfg, (2,))
    batch = cfg.train.batch_size
    real, fake = torch.randn(batch, 2), torch.randn(batch, 2, requires_grad=True)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def d_loss(call: Any) -> torch.Tensor:
        return F.softplus(-call(real)).mean() + F.softplus(call(fake)).mean()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lookahead_params(d, d_loss, steps, cfg.d_optim.name, 1e-4, second_order=True)
    return sum(kept.values())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_lookahead_estimate_bounds_what_autograd_keeps(optimizer: str) -> None:
    cfg = load_config("ring8", [f"d_optim.name={optimizer}"])
    per_step = (_saved_bytes(cfg, 3) - _saved_bytes(cfg, 1)) / 2
    one = load_config("ring8", [f"d_optim.name={optimizer}", "unroll.steps=1"])
    estimate = fp.footprint(one).parts["unroll.steps"]
    # ring-8's D (405,201 parameters, batch 100) keeps ~13.6 MB per step with Adam, ~5.1 MB
    # with SGD; the estimate (17.8 MB) is above both and not far above Adam's.
    assert per_step <= estimate
    assert per_step >= (0.6 if optimizer == "adam" else 0.2) * estimate


@pytest.mark.parametrize("batch", [100, 2])
def test_a_lookahead_too_big_to_hold_names_unroll_steps(batch: int) -> None:
    err = refused(load_config, "ring8", ["unroll.steps=100000", f"train.batch_size={batch}"])
    check(err, "unroll.steps", 100000, "fits 256 GiB", RING8_OVERRIDES)
    assert "unroll.steps 1.2" in err.allowed or "unroll.steps 1.6" in err.allowed  # ~1,200+ GiB


def test_a_huge_batch_is_blamed_on_the_batch_even_when_unrolled() -> None:
    # The look-ahead part is the largest here, but unroll.steps=0 would not make the run fit.
    overrides = ["train.batch_size=1000000000"]
    parts = fp.footprint(load_config("ring8_unrolled", ["eval.samples=1"])).parts
    assert parts["unroll.steps"] > parts["train.batch_size"]
    err = refused(load_config, "ring8_unrolled", overrides)
    assert (err.key, err.value) == ("train.batch_size", 10**9)


def test_unroll_steps_has_an_upper_bound_even_when_it_fits() -> None:
    small = ["generators.width=8", "discriminator.width=8"]
    assert load_config("ring8", [*small, f"unroll.steps={MAX_UNROLL_STEPS}"])
    err = refused(load_config, "ring8", [*small, f"unroll.steps={MAX_UNROLL_STEPS + 1}"])
    check(err, "unroll.steps", MAX_UNROLL_STEPS + 1, "an integer in [0, 1000]", RING8_OVERRIDES)


def test_negative_seeds_are_refused() -> None:
    # torch.manual_seed(-1) works (as 2**64 - 1), numpy's generators raise inside the worker.
    assert torch.manual_seed(-1).initial_seed() == 2**64 - 1
    err = refused(load_config, "ring8", ["seed=-1"])
    check(err, "seed", -1, "an integer >= 0", RING8_OVERRIDES)
    assert load_config("ring8", ["seed=0"]).seed == 0
    assert load_config("ring8", [f"seed={2**63 - 1}"]).seed == 2**63 - 1


# --- 4. names Ray and storage accept ------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a" * (MAX_NAME_LENGTH + 1), "a" * 300, "run-é", "模型", "run\u00a0x"]
)
def test_names_too_long_or_not_ascii_are_refused(name: str) -> None:
    err = refused(load_config, "ring8", [f"name={name}"])
    assert (err.key, err.value) == ("name", name)
    assert f"at most {MAX_NAME_LENGTH} printable ASCII characters" in err.allowed
    assert len(str(err).split(" is invalid")[0]) < len(RING8_OVERRIDES) + 8 + MAX_SHOWN
    err = refused(from_dict, {"name": name}, "trial")
    assert err.key == "name"


def test_a_name_at_the_limit_loads() -> None:
    name = "r" * MAX_NAME_LENGTH
    assert load_config("ring8", [f"name={name}"]).name == name
