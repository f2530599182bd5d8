"""services.checkpoints: bit-identical save/restore of a real GanRun, and safe, checked loading."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from gan_core.config import GanConfig, load_config
from gan_core.loop import GanRun
from services.checkpoints import (
    CONFIG_FILE,
    META_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_step,
    load_checkpoint,
    save_checkpoint,
)

SMALL = [
    "train.steps=4",
    "eval.every=2",
    "generators.width=16",
    "discriminator.width=16",
    "train.ema=0.9",
]


def _cfg(*extra: str) -> GanConfig:
    return load_config("ring8", [*SMALL, *extra])


def _assert_identical(a: object, b: object, key: str = "state") -> None:
    """Nested dicts/lists of tensors and plain values are equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, key
        assert torch.equal(a, b), key
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), key
        for name in a:
            _assert_identical(a[name], b[name], f"{key}.{name}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), key  # type: ignore[arg-type]
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{key}.{i}")
    else:
        assert a == b, key


class _Marker:
    """A pickle that runs a (harmless) shell command when unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run trained 2 steps and checkpointed, then continued one step (the reference)."""
    cfg = _cfg()
    run = GanRun(cfg)
    for _ in range(2):
        run.train_step()
    folder = tmp_path_factory.mktemp("ckpt") / "step_2"
    saved_state = run.state_dict()
    save_checkpoint(folder, saved_state, cfg, {"d_loss": 0.5, "modes": float("nan")})
    # Nothing between save and this step touches any RNG, so this is "continuing the original".
    next_metrics = run.train_step()
    return {
        "cfg": cfg,
        "folder": folder,
        "next_metrics": next_metrics,
        "next_state": run.state_dict(),
    }


def test_resume_is_bit_identical(trained: dict) -> None:
    cfg = trained["cfg"]
    fresh = GanRun(cfg)
    assert fresh.model.step == 0
    fresh.load_state_dict(load_checkpoint(trained["folder"], cfg))
    assert fresh.model.step == 2
    metrics = fresh.train_step()
    assert metrics == trained["next_metrics"]  # exact float equality, not approx
    # G, D, EMA, both optimizers' moments, RNG streams, step and history all match.
    after = fresh.state_dict()
    assert after["model"]["step"] == 3
    assert "ema" in after["model"] and after["model"]["g_opt"]["state"]
    _assert_identical(after, trained["next_state"])


def test_files_and_meta(trained: dict) -> None:
    folder = trained["folder"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([STATE_FILE, CONFIG_FILE, META_FILE])
    meta = json.loads((folder / META_FILE).read_text())
    # NaN is not JSON: it is stored as null so strict readers can parse the file.
    files = meta.pop("files")
    assert meta == {"step": 2, "metrics": {"d_loss": 0.5, "modes": None}, "format": 1}
    # The commit: meta.json, written last, lists every other file as it is on disk.
    assert sorted(files) == [CONFIG_FILE, STATE_FILE]
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert checkpoint_step(folder) == 2
    assert "width: 16" in (folder / CONFIG_FILE).read_text()


class _Wrapper(nn.Module):
    """Stands in for DDP: holds the network as ``.module``, so its own keys get "module."."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.module(*args, **kwargs)


def test_wrapped_run_saves_plain_keys_that_load_unwrapped(tmp_path: Path) -> None:
    cfg = _cfg()
    run = GanRun(cfg)
    run.model.wrap(_Wrapper)
    run.train_step()  # moves the weights away from the init a fresh run starts from
    assert all(k.startswith("module.") for k in run.model.generator.state_dict())
    save_checkpoint(tmp_path, run.state_dict(), cfg, {})
    state = load_checkpoint(tmp_path, cfg)
    for net in ("generator", "discriminator", "ema"):
        keys = list(state["model"][net])
        assert keys and not any(k.startswith("module.") for k in keys), net
    fresh = GanRun(cfg)  # unwrapped, as a single-process resume would be
    fresh.load_state_dict(state)
    _assert_identical(fresh.model.generator.state_dict(), run.model.generator.module.state_dict())


def test_longer_budget_and_new_lrs_may_resume(trained: dict) -> None:
    cfg = _cfg("train.steps=40", "g_optim.lr=0.001", "eval.every=10", "train.ema=0.5")
    state = load_checkpoint(trained["folder"], cfg)
    assert state["model"]["step"] == 2


def test_different_architecture_lists_every_differing_key(trained: dict) -> None:
    cfg = _cfg("generators.width=32", "d_optim.name=sgd", "train.ema=0")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(trained["folder"], cfg)
    message = str(err.value)
    assert str(trained["folder"]) in message
    assert "generators.width: checkpoint=16, config=32" in message
    assert "d_optim.name: checkpoint='adam', config='sgd'" in message
    assert "train.ema>0: checkpoint=0.9, config=0.0" in message
    assert "g_optim.name" not in message and "discriminator.width" not in message


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in (STATE_FILE, CONFIG_FILE, META_FILE):
        (dest / name).write_bytes((folder / name).read_bytes())
    return dest


def test_truncated_state_is_refused(trained: dict, tmp_path: Path) -> None:
    folder = _copy(trained["folder"], tmp_path / "ckpt")
    data = (folder / STATE_FILE).read_bytes()
    (folder / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_checkpoint(folder, trained["cfg"])
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("missing", [STATE_FILE, CONFIG_FILE, META_FILE])
def test_missing_file_is_named(trained: dict, tmp_path: Path, missing: str) -> None:
    folder = _copy(trained["folder"], tmp_path / "ckpt")
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{missing} is missing") as err:
        load_checkpoint(folder, trained["cfg"])
    assert str(folder) in str(err.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such folder"):
        load_checkpoint(tmp_path / "nope", _cfg())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle-protocol-2", "pickle-default"])
def test_pickle_carrying_code_is_refused_and_never_runs(
    trained: dict, tmp_path: Path, writer: str
) -> None:
    folder = _copy(trained["folder"], tmp_path / "ckpt")
    marker = tmp_path / "code-ran"
    payload = {"model": {"step": 2, "x": _Marker(marker)}}
    if writer == "torch.save":
        torch.save(payload, folder / STATE_FILE)
    else:
        protocol = 2 if writer == "pickle-protocol-2" else pickle.DEFAULT_PROTOCOL
        (folder / STATE_FILE).write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(CheckpointError, match="refused by the safe loader") as err:
        load_checkpoint(folder, trained["cfg"])
    message = str(err.value)
    assert str(folder) in message
    # torch's own text suggests weights_only=False; the message must not pass that advice on.
    assert "weights_only" not in message
    assert not marker.exists()


def test_nan_weight_is_never_checkpointed(tmp_path: Path) -> None:
    cfg = _cfg()
    run = GanRun(cfg)
    state = run.state_dict()
    name = next(iter(state["model"]["discriminator"]))
    state["model"]["discriminator"][name].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"model.discriminator.{name}"):
        save_checkpoint(tmp_path / "ckpt", state, cfg, {})
    assert not (tmp_path / "ckpt").exists()


def test_inf_in_ema_is_never_checkpointed(tmp_path: Path) -> None:
    cfg = _cfg()
    run = GanRun(cfg)
    state = run.state_dict()
    name = next(iter(state["model"]["ema"]))
    state["model"]["ema"][name].view(-1)[-1] = float("inf")
    with pytest.raises(ValueError, match=f"model.ema.{name}"):
        save_checkpoint(tmp_path / "ckpt", state, cfg, {})


def test_overwrite_is_atomic(trained: dict, tmp_path: Path) -> None:
    """Saving twice into one folder leaves only the three files (no temporaries)."""
    cfg = trained["cfg"]
    state = load_checkpoint(trained["folder"], cfg)
    save_checkpoint(tmp_path, state, cfg, {"d_loss": 1.0})
    save_checkpoint(tmp_path, state, cfg, {"d_loss": 2.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [STATE_FILE, CONFIG_FILE, META_FILE]
    )
    assert json.loads((tmp_path / META_FILE).read_text())["metrics"] == {"d_loss": 2.0}


def test_a_refused_checkpoint_is_named_by_its_stored_uri_not_a_download_folder() -> None:
    import pyarrow.fs
    from ray.train import Checkpoint

    from services.worker import checkpoint_uri

    # Constructing an S3 filesystem contacts nothing; the endpoint is a closed loopback port.
    s3 = pyarrow.fs.S3FileSystem(
        endpoint_override="http://127.0.0.1:9", region="us-east-1", anonymous=True
    )
    stored = Checkpoint("bucket/runs/demo/checkpoint_2026", filesystem=s3)
    assert checkpoint_uri(stored) == "s3://bucket/runs/demo/checkpoint_2026"
    local = Checkpoint("/data/runs/demo/checkpoint_2026", filesystem=pyarrow.fs.LocalFileSystem())
    assert checkpoint_uri(local) == "/data/runs/demo/checkpoint_2026"
