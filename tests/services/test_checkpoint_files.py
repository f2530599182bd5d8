"""Checkpoint folders that are corrupt, truncated, foreign or from another config.

Every case must raise CheckpointError naming the folder and the problem, and a refused restore
must leave the run exactly as it was: torch's strict ``load_state_dict`` copies the tensors that
fit before it complains about the one that does not, so without a check first a mismatching
discriminator would leave the generator already overwritten. (Truncated files, missing files,
pickles carrying code and configs of another width are in test_checkpoints.py.)
"""

from __future__ import annotations

import copy
import io
import json
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gan_core.config import GanConfig, load_config, to_yaml
from services import train
from services.checkpoints import (
    CONFIG_FILE,
    META_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_step,
    load_checkpoint,
    save_checkpoint,
)
from services.worker import WorkerSession

SMALL = [
    "name=ckpt",
    "train.steps=4",
    "eval.every=2",
    "generators.width=16",
    "discriminator.width=16",
    "train.ema=0.9",
    "tracking.enabled=false",
    "resources.backend=local",
]


def _cfg(storage: Path, *extra: str) -> GanConfig:
    return load_config("ring8", [*SMALL, f"storage.uri={storage}", *extra])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A checkpoint of a run trained 2 steps (so its weights differ from a fresh run's)."""
    root = tmp_path_factory.mktemp("saved")
    cfg = _cfg(root / "runs")
    session = WorkerSession(cfg, rank=0, world_size=1, device="cpu", quiet=True)
    for _ in range(2):
        session.run.train_step()
    folder = root / "step_2"
    save_checkpoint(folder, session.run.state_dict(), cfg, {"d_loss": 0.5})
    return {"cfg": cfg, "folder": folder, "storage": root / "runs"}


def _copy(saved: dict, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in (STATE_FILE, CONFIG_FILE, META_FILE):
        (dest / name).write_bytes((saved["folder"] / name).read_bytes())
    return dest


def _session(saved: dict) -> WorkerSession:
    return WorkerSession(saved["cfg"], rank=0, world_size=1, device="cpu", quiet=True)


def _everything(session: WorkerSession) -> dict:
    """A deep copy of all a restore could change: weights, optimizers, EMA, step, RNG."""
    return copy.deepcopy({"state": session.run.state_dict(), "start": session.start_step})


def _assert_same(a: object, b: object, key: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), key
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), key
        for name in a:
            _assert_same(a[name], b[name], f"{key}.{name}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{key}.{i}")
    else:
        assert a == b, key


def _refused(folder: Path, cfg: GanConfig, *problem: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, cfg)
    message = str(info.value)
    assert str(folder) in message
    for text in problem:
        assert text in message, (text, message)
    # torch's own advice for refused files is to disable the safe loader: never passed on.
    assert "weights_only" not in message
    return message


# --- state.pt that is not a run's state ---------------------------------------------------------


def _zip_of_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/readme.txt", "not a checkpoint")
    return buffer.getvalue()


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _random_bytes() -> bytes:
    data = bytearray(random.Random(7).randbytes(4096))
    data[0] = 0x13  # neither a zip ("PK") nor a pickle (0x80) header
    return bytes(data)


STATE_CASES: dict[str, tuple[Callable[[], bytes], tuple[str, ...]]] = {
    "empty": (lambda: b"", ("is empty (0 bytes)",)),
    "random bytes": (_random_bytes, ("is not a torch checkpoint", "starts with b'\\x13")),
    "pickle header then noise": (
        lambda: b"\x80\x02" + random.Random(3).randbytes(512),
        ("refused by the safe loader",),
    ),
    "zip, not torch": (
        _zip_of_text,
        ("zip archive but not a torch checkpoint", "notes/readme.txt"),
    ),
    "torch zip without its end": (
        lambda: _torch_bytes({"model": {}})[:-30],
        ("truncated or corrupt",),
    ),
    "plain tensor": (
        lambda: _torch_bytes(torch.zeros(3)),
        ("does not hold a run state", "a Tensor, not a dict"),
    ),
    "foreign dict": (
        lambda: _torch_bytes({"model": {"weights": torch.ones(2, 2)}}),
        ("does not hold a run state", "no 'torch_rng' tensor"),
    ),
    "list of tensors": (
        lambda: _torch_bytes([torch.ones(1)]),
        ("does not hold a run state", "a list, not a dict"),
    ),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case", list(STATE_CASES))
def test_state_file_that_is_not_a_checkpoint(saved: dict, tmp_path: Path, case: str) -> None:
    folder = _copy(saved, tmp_path / "ckpt")
    make, problem = STATE_CASES[case]
    (folder / STATE_FILE).write_bytes(make())
    _refused(folder, saved["cfg"], f"{STATE_FILE}", *problem)


def test_nan_weight_in_a_saved_state_is_refused(saved: dict, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path / "ckpt")
    state = torch.load(folder / STATE_FILE, weights_only=True)
    name = next(iter(state["model"]["generator"]))
    state["model"]["generator"][name].view(-1)[0] = float("nan")
    torch.save(state, folder / STATE_FILE)
    _refused(folder, saved["cfg"], f"model.generator.{name}", "non-finite")


# --- meta.json and config.yaml ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{{{ not json", "is not JSON"),
        (b"\xff\xfe\x00garbage", "is not JSON"),
        ("[2, 3]", "expected an object"),
        ('{"step": "two", "format": 1}', "non-negative int"),
        ('{"step": -1, "format": 1}', "non-negative int"),
        ('{"step": 2, "format": 99}', "says format 99"),
        ('{"step": 3, "format": 1}', "meta.json says step 3 but state.pt holds step 2"),
    ],
)
def test_meta_that_is_garbage_or_disagrees(
    saved: dict, tmp_path: Path, text: str | bytes, problem: str
) -> None:
    folder = _copy(saved, tmp_path / "ckpt")
    data = text if isinstance(text, bytes) else text.encode()
    (folder / META_FILE).write_bytes(data)
    _refused(folder, saved["cfg"], problem)
    if "step 3" not in problem:
        with pytest.raises(CheckpointError, match=META_FILE):
            checkpoint_step(folder)


@pytest.mark.parametrize(
    ("other", "differing"),
    [
        (["generators.count=2"], "generators.count: checkpoint=2, config=1"),
        (
            ["generators.count=2", "objective.name=madgan"],
            "objective.name: checkpoint='madgan', config='nonsaturating'",
        ),
        (["discriminator.pack=2"], "discriminator.pack: checkpoint=2, config=1"),
        (["discriminator.minibatch.kernels=4"], "discriminator.minibatch.kernels"),
    ],
)
def test_config_of_another_variant_is_refused(
    saved: dict, tmp_path: Path, other: list[str], differing: str
) -> None:
    folder = _copy(saved, tmp_path / "ckpt")
    variant = _cfg(saved["storage"], *other)
    (folder / CONFIG_FILE).write_text(to_yaml(variant))
    _refused(folder, saved["cfg"], "different architecture", differing)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("generators: {count: [\n", "is unreadable"),
        ("generators: {count: -3}\n", "is not a valid config"),
        ("- just\n- a list\n", "is not a valid config"),
    ],
)
def test_config_yaml_that_is_garbage(saved: dict, tmp_path: Path, text: str, problem: str) -> None:
    folder = _copy(saved, tmp_path / "ckpt")
    (folder / CONFIG_FILE).write_text(text)
    _refused(folder, saved["cfg"], CONFIG_FILE, problem)


# --- tensors that do not fit: refused by restore, nothing loaded ----------------------------------


def _tamper(saved: dict, tmp_path: Path, change: Callable[[dict], None]) -> Path:
    """A copy of the checkpoint with the same config.yaml and meta.json, tensors changed."""
    folder = _copy(saved, tmp_path / "ckpt")
    state = torch.load(folder / STATE_FILE, weights_only=True)
    change(state)
    torch.save(state, folder / STATE_FILE)
    return folder


def _last(net: dict) -> str:
    return list(net)[-1]


def _shrink_d_head(state: dict) -> None:
    # The discriminator's LAST tensor: the generator and most of D would already be copied by
    # the time torch's strict load complained.
    net = state["model"]["discriminator"]
    key = _last(net)
    net[key] = torch.zeros(*[n + 1 for n in net[key].shape])


def _rename_ema_key(state: dict) -> None:
    net = state["model"]["ema"]
    key = _last(net)
    net[f"{key}_renamed"] = net.pop(key)


def _double_d_dtype(state: dict) -> None:
    net = state["model"]["discriminator"]
    key = _last(net)
    net[key] = net[key].double()


def _adam_moment(state: dict) -> None:
    moments = state["model"]["g_opt"]["state"][0]
    moments["exp_avg"] = torch.zeros(7)


def _drop_param_group_member(state: dict) -> None:
    state["model"]["d_opt"]["param_groups"][0]["params"].pop()


def _foreign_model(state: dict) -> None:
    state["model"] = {"weights": torch.ones(2, 2), "step": 2}


def _extra_network(state: dict) -> None:
    state["model"]["encoder"] = {"net.0.weight": torch.ones(2, 2)}


def _rng(state: dict) -> None:
    state["torch_rng"] = torch.zeros(10, dtype=torch.uint8)


TAMPERED: dict[str, tuple[Callable[[dict], None], str]] = {
    "D head shape": (_shrink_d_head, "model.discriminator."),
    "EMA key renamed": (_rename_ema_key, "model.ema."),
    "D dtype": (_double_d_dtype, "float64 in the checkpoint, "),
    "Adam moment shape": (_adam_moment, "model.g_opt.state.0.exp_avg is (7,) in the checkpoint"),
    "param group size": (_drop_param_group_member, "model.d_opt.param_groups.0 has"),
    "foreign model dict": (_foreign_model, "model.generator is missing"),
    "extra network": (_extra_network, "model.encoder is not in this run"),
    "torch rng": (_rng, "torch_rng is (10,) uint8"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_tensors_are_refused_and_nothing_is_loaded(
    saved: dict, tmp_path: Path, case: str
) -> None:
    change, problem = TAMPERED[case]
    folder = _tamper(saved, tmp_path, change)
    session = _session(saved)
    before = _everything(session)
    # The fresh run differs from the checkpoint: a partial load would be visible.
    assert not torch.equal(
        next(iter(before["state"]["model"]["generator"].values())),
        next(iter(torch.load(saved["folder"] / STATE_FILE)["model"]["generator"].values())),
    )
    with pytest.raises(CheckpointError) as info:
        session.restore(folder)
    message = str(info.value)
    assert str(folder) in message and problem in message, message
    _assert_same(_everything(session), before)


def test_shape_mismatch_names_the_first_mismatching_key(saved: dict, tmp_path: Path) -> None:
    keys = list(torch.load(saved["folder"] / STATE_FILE)["model"]["discriminator"])
    folder = _tamper(saved, tmp_path, _shrink_d_head)
    with pytest.raises(CheckpointError) as info:
        _session(saved).restore(folder)
    assert f"model.discriminator.{keys[-1]} is (" in str(info.value)


def test_a_failure_no_check_foresaw_is_rolled_back(saved: dict, tmp_path: Path) -> None:
    # Tensors all fit, so every network is loaded before GanRun trips over the bad scale:
    # the run must be put back as it was, not left with the checkpoint's weights.
    def bad_scale(state: dict) -> None:
        state["lr_scale"] = "not a number"

    folder = _tamper(saved, tmp_path, bad_scale)
    session = _session(saved)
    before = _everything(session)
    with pytest.raises(CheckpointError, match="does not load into this run") as info:
        session.restore(folder)
    assert str(folder) in str(info.value)
    _assert_same(_everything(session), before)


def test_intact_checkpoint_still_restores(saved: dict, tmp_path: Path) -> None:
    # The counterpart of the refusals: the same checks let a real checkpoint through.
    session = _session(saved)
    session.restore(_copy(saved, tmp_path / "ckpt"))
    assert session.start_step == 2
    _assert_same(
        session.run.state_dict()["model"]["generator"],
        torch.load(saved["folder"] / STATE_FILE)["model"]["generator"],
    )


# --- through the job: a bad checkpoint on storage stops the resume with status 2 ----------------


def test_local_resume_from_a_tampered_checkpoint_exits_2(
    saved: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = tmp_path / "runs"
    ckpt = _tamper(saved, tmp_path / "src", _shrink_d_head)
    # Committed as written (meta.json lists the tampered file): complete, so it is loaded and
    # refused; with the original list it would be skipped as incomplete (test_disk_full.py).
    save_checkpoint(ckpt, torch.load(ckpt / STATE_FILE), saved["cfg"], {"d_loss": 0.5})
    target = storage / "ckpt" / train.LOCAL_CHECKPOINTS / "step_0000002"
    target.mkdir(parents=True)
    for path in ckpt.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in storage.rglob("*") if p.is_file()}
    status = train.main(["--config", "ring8", *SMALL, f"storage.uri={storage}"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("raygan: cannot resume: checkpoint ") and "model.discriminator." in err
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in storage.rglob("*") if p.is_file()}
    assert after == before  # no sample, checkpoint or MLflow file written, nothing replaced
    assert json.loads((target / META_FILE).read_text())["step"] == 2
