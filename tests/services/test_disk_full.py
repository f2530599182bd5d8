"""A full disk: checkpoint folders cut short are skipped as incomplete by every reader, and a
write refused for space ends the run with one line and exit status 2.

The cut-short folder is the one a 3 MiB tmpfs left (issue 19): ``meta.json`` present,
``state.pt`` truncated, ``config.yaml`` empty. Before the commit marker every later resume
loaded it and blamed it on "a different architecture". A full disk is simulated: the writes
raise ``OSError(errno.ENOSPC, ...)`` (no root, no tmpfs mounts here).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from gan_core.config import GanConfig, load_config
from services import checkpoints, sample, storage, train
from services.checkpoints import (
    CONFIG_FILE,
    LOCAL_CHECKPOINTS,
    META_FILE,
    STATE_FILE,
    CheckpointError,
    incomplete_reason,
    load_checkpoint,
    save_checkpoint,
)
from services.model_log import best_checkpoint
from services.storage import StorageFullError, find_write_failure, open_storage, write_failure
from services.worker import TRACKING_FILE, WorkerSession, restore_latest_stored

NAME = "full"
ARGS = [
    f"name={NAME}",
    "train.steps=4",
    "eval.every=2",
    "checkpoint.every=2",
    "generators.width=16",
    "discriminator.width=16",
    "tracking.enabled=false",
    "resources.backend=local",
]
NOTE = (
    "free space or point storage.uri elsewhere; the run resumes from its last complete checkpoint"
)


def _cfg(root: Path) -> GanConfig:
    return load_config("ring8", [*ARGS, f"storage.uri={root}"])


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Checkpoints of one run at steps 2 and 4, as WorkerSession writes them."""
    root = tmp_path_factory.mktemp("steps")
    cfg = _cfg(root / "runs")
    session = WorkerSession(cfg, rank=0, world_size=1, device="cpu", quiet=True)
    folders = {}
    for step in (2, 4):
        while session.run.model.step < step:
            session.run.train_step()
        folders[step] = root / f"step_{step}"
        session.write_checkpoint(folders[step], {"modes": float(step)})
    return {"cfg": cfg, "folders": folders}


def _cut_short(folder: Path, legacy: bool = False) -> None:
    """What the full disk left: meta.json whole, state.pt truncated, config.yaml empty."""
    state = folder / STATE_FILE
    state.write_bytes(state.read_bytes()[:1000])
    (folder / CONFIG_FILE).write_bytes(b"")
    if legacy:  # written before meta.json listed the files
        meta = json.loads((folder / META_FILE).read_text())
        del meta["files"]
        (folder / META_FILE).write_text(json.dumps(meta))


def _place(steps: dict, root: Path, layout: dict[str, int], cut: str = "", legacy: bool = False):
    """Copy the step checkpoints into run ``NAME`` under ``root``: {relative folder: step}."""
    for rel, step in layout.items():
        target = root / NAME / rel
        shutil.copytree(steps["folders"][step], target)
        if rel == cut:
            _cut_short(target, legacy)
        elif legacy:
            meta = json.loads((target / META_FILE).read_text())
            del meta["files"]
            (target / META_FILE).write_text(json.dumps(meta))


def _files(folder: Path) -> tuple[set[str], Any]:
    return {p.name for p in folder.iterdir()}, lambda name: (folder / name).read_bytes()


# --- the rule ------------------------------------------------------------------------------------


def test_meta_lists_every_other_file_and_a_cut_short_one_is_named(
    steps: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = shutil.copytree(steps["folders"][4], tmp_path / "ckpt")
    meta = json.loads((folder / META_FILE).read_text())
    assert sorted(meta["files"]) == [CONFIG_FILE, STATE_FILE, TRACKING_FILE]
    assert incomplete_reason("here", *_files(folder)) is None
    size = meta["files"][STATE_FILE]["size"]
    _cut_short(folder)
    with caplog.at_level(logging.WARNING, logger="raygan"):
        reason = incomplete_reason("s3://b/full/checkpoint_000001", *_files(folder))
    # Files are checked in name order: config.yaml (0 bytes) before state.pt.
    size_cfg = meta["files"][CONFIG_FILE]["size"]
    assert reason == f"config.yaml is 0 bytes, meta.json says {size_cfg} (a write cut short)"
    assert caplog.messages == [
        f"skipping incomplete checkpoint folder s3://b/full/checkpoint_000001: {reason}"
    ]
    (folder / CONFIG_FILE).write_bytes((steps["folders"][4] / CONFIG_FILE).read_bytes())
    assert incomplete_reason("x", *_files(folder)) == (
        f"state.pt is 1000 bytes, meta.json says {size} (a write cut short)"
    )
    # Same size, other bytes: not the file that was committed.
    data = bytearray((steps["folders"][4] / STATE_FILE).read_bytes())
    data[-30] ^= 0xFF
    (folder / STATE_FILE).write_bytes(bytes(data))
    assert incomplete_reason("x", *_files(folder)) == (
        "state.pt is not the file meta.json lists (sha256 differs)"
    )
    (folder / TRACKING_FILE).unlink()
    (folder / STATE_FILE).write_bytes((steps["folders"][4] / STATE_FILE).read_bytes())
    assert (
        incomplete_reason("x", *_files(folder)) == "tracking.json is missing (meta.json lists it)"
    )
    (folder / META_FILE).write_text('{"step": 4, "fi')
    assert incomplete_reason("x", *_files(folder)).startswith("meta.json is not JSON")
    (folder / META_FILE).unlink()
    assert incomplete_reason("x", *_files(folder)) == "meta.json missing"


def test_old_folders_without_the_list_are_judged_by_their_files(
    steps: dict, tmp_path: Path
) -> None:
    _place(steps, tmp_path, {"checkpoint_000000": 4}, legacy=True)
    folder = tmp_path / NAME / "checkpoint_000000"
    assert "files" not in json.loads((folder / META_FILE).read_text())
    assert incomplete_reason("x", *_files(folder)) is None
    assert load_checkpoint(folder, steps["cfg"])["model"]["step"] == 4  # still loads
    _cut_short(folder)
    assert incomplete_reason("x", *_files(folder)) == "config.yaml is empty"
    (folder / CONFIG_FILE).write_bytes((steps["folders"][4] / CONFIG_FILE).read_bytes())
    assert incomplete_reason("x", *_files(folder)) == (
        "state.pt is a zip archive cut short (1000 bytes, no directory)"
    )


def test_load_calls_a_cut_short_folder_incomplete_not_another_architecture(
    steps: dict, tmp_path: Path
) -> None:
    folder = shutil.copytree(steps["folders"][4], tmp_path / "ckpt")
    _cut_short(folder)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, steps["cfg"])
    assert "state.pt is truncated or corrupt" in str(info.value)
    (folder / STATE_FILE).write_bytes((steps["folders"][4] / STATE_FILE).read_bytes())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, steps["cfg"])
    assert (
        str(info.value)
        == f"checkpoint {folder}: config.yaml is empty: the checkpoint is incomplete"
    )


# --- every reader skips it and takes the next older complete folder -------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["listed", "old-style"])
def test_restore_latest_stored_skips_the_cut_short_folder(
    steps: dict, tmp_path: Path, legacy: bool, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "runs"
    _place(
        steps, root, {"checkpoint_000000": 2, "checkpoint_000001": 4}, "checkpoint_000001", legacy
    )
    session = WorkerSession(_cfg(root), rank=0, world_size=1, device="cpu", quiet=True)
    with caplog.at_level(logging.WARNING, logger="raygan"):
        assert restore_latest_stored(session) is True
    assert session.start_step == 2
    (warning,) = caplog.messages
    assert warning.startswith(
        f"skipping incomplete checkpoint folder {root}/{NAME}/checkpoint_000001"
    )
    assert "architecture" not in caplog.text


@pytest.mark.parametrize("legacy", [False, True], ids=["listed", "old-style"])
def test_best_checkpoint_and_the_sample_picker_skip_it(
    steps: dict, tmp_path: Path, legacy: bool
) -> None:
    root = tmp_path / "runs"
    layout = {"checkpoint_000000": 2, f"{LOCAL_CHECKPOINTS}/step_0000004": 4}
    _place(steps, root, layout, f"{LOCAL_CHECKPOINTS}/step_0000004", legacy)
    store = open_storage(_cfg(root).storage)
    # By modes (2.0 and 4.0) and by step the cut-short folder would win.
    assert best_checkpoint(store, NAME, "modes", "max") == f"{NAME}/checkpoint_000000"
    assert best_checkpoint(store, NAME, "step", "max") == f"{NAME}/checkpoint_000000"
    # Copying while checking (the model log): the skipped folder's files do not stay behind.
    dest = tmp_path / "copy"
    dest.mkdir()
    assert best_checkpoint(store, NAME, "step", "max", dest=dest) == f"{NAME}/checkpoint_000000"
    good = root / NAME / "checkpoint_000000"
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in good.iterdir())
    assert all((dest / p.name).read_bytes() == p.read_bytes() for p in good.iterdir())
    run = root / NAME
    for how in ("latest", "best"):
        folder, chosen = sample._local_checkpoint(str(run), how)
        assert folder == run / "checkpoint_000000" and chosen == f"{how}: {folder}"
    shutil.rmtree(run / "checkpoint_000000")
    assert best_checkpoint(store, NAME, "step", "max") is None
    with pytest.raises(sample.SampleError, match="holds no complete checkpoint"):
        sample._local_checkpoint(str(run), "latest")


def test_local_resume_skips_it(
    steps: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    layout = {f"{LOCAL_CHECKPOINTS}/step_0000002": 2, f"{LOCAL_CHECKPOINTS}/step_0000004": 4}
    _place(steps, root, layout, f"{LOCAL_CHECKPOINTS}/step_0000004")
    status = train.main(["--config", "ring8", *ARGS, f"storage.uri={root}"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert f"[raygan] resumed {NAME} at step 2" in out
    # The rerun wrote step 4 again, whole: the cut-short folder is replaced by a complete one.
    step4 = root / NAME / LOCAL_CHECKPOINTS / "step_0000004"
    assert incomplete_reason("x", *_files(step4)) is None


# --- a write refused for space -------------------------------------------------------------------


class _FullDisk:
    """Stands in for ``os`` in one module: ``replace`` onto a path containing ``match`` raises
    ENOSPC (as the write of a file on a full disk does); everything else is os's."""

    def __init__(self, match: str, call: str = "replace") -> None:
        self.match, self.call, self.hits = match, call, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: str, dst: str | Path) -> None:
        if self.call == "replace" and self.match in str(dst):
            self.hits += 1
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        os.replace(src, dst)

    def fsync(self, fd: int) -> None:
        if self.call == "fsync":
            self.hits += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)


@pytest.mark.parametrize(
    ("match", "file"),
    [
        ("samples/step_0000002", "samples/step_0000002.png"),
        ("step_0000004/state.pt", f"{LOCAL_CHECKPOINTS}/step_0000004/state.pt"),
    ],
    ids=["sample-picture", "checkpoint"],
)
def test_full_storage_in_the_local_backend_is_one_line_and_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    match: str,
    file: str,
) -> None:
    root = tmp_path / "runs"
    disk = _FullDisk(match)
    monkeypatch.setattr(storage, "os", disk)
    status = train.main(["--config", "ring8", *ARGS, f"storage.uri={root}"])
    err = capsys.readouterr().err
    assert status == 2
    assert disk.hits == 1  # not retried
    assert err == f"raygan: storage {root}: no space left writing {NAME}/{file}: {NOTE}\n"
    run = root / NAME
    assert not list(run.rglob("*.tmp"))  # no half-written temporary file left behind
    if "state.pt" in file:
        # meta.json goes last: the folder cut short holds config.yaml only, and the rerun
        # (space freed) resumes from the complete step-2 folder.
        cut = run / LOCAL_CHECKPOINTS / "step_0000004"
        assert sorted(p.name for p in cut.iterdir()) == [CONFIG_FILE]
        monkeypatch.setattr(storage, "os", os)
        assert train.main(["--config", "ring8", *ARGS, f"storage.uri={root}"]) == 0
        assert f"[raygan] resumed {NAME} at step 2" in capsys.readouterr().out


def test_full_temporary_folder_while_saving_a_checkpoint(
    steps: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "os", _FullDisk("", call="fsync"))
    state = torch.load(steps["folders"][2] / STATE_FILE, weights_only=True)
    folder = tmp_path / "tmpckpt"
    with pytest.raises(StorageFullError) as info:
        save_checkpoint(folder, state, steps["cfg"], {})
    assert str(info.value) == (
        f"checkpoint folder {folder}: no space left writing state.pt: free space there or set "
        "TMPDIR; the run resumes from its last complete checkpoint"
    )
    assert list(folder.iterdir()) == []  # no meta.json, no temporary file


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ENOSPC, "no space left"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, None),
    ],
)
def test_write_failure_maps_only_what_cannot_succeed_when_repeated(
    code: int, reason: str | None
) -> None:
    full = write_failure(OSError(code, "x"), "storage /r", "a/b.png")
    if reason is None:
        assert full is None
    else:
        assert str(full) == f"storage /r: {reason} writing a/b.png: {NOTE}"


class _RayTaskError(StorageFullError):
    """Shaped like Ray's wrapper of a worker's exception: an instance of the cause's class
    whose text is the whole remote traceback, the original in ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"Traceback ...\nOSError: [Errno 28] No space left on device\n{cause}")
        self.cause = cause


class _TrainingFailed(RuntimeError):
    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_the_driver_finds_the_full_disk_inside_rays_errors() -> None:
    ours = write_failure(OSError(errno.ENOSPC, "x"), "storage /r", "full/samples/step_1.png")
    assert ours is not None
    found = find_write_failure(_TrainingFailed({1: _RayTaskError(ours)}), "storage /r")
    assert found is ours
    # Ray's own checkpoint upload (pyarrow) reports the errno as text only.
    upload = OSError("error closing file 'checkpoint_000001/state.pt'. Detail: [errno 28] No space")
    found = find_write_failure(_TrainingFailed({0: RuntimeError("wrap")}), "storage /r")
    assert found is None
    wrapped = RuntimeError("controller")
    wrapped.__cause__ = upload
    found = find_write_failure(wrapped, "storage /r")
    assert str(found) == f"storage /r: no space left writing a file: {NOTE}"
    assert find_write_failure(RuntimeError("[errno 2] No such file"), "storage /r") is None
