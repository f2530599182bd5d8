"""Full-state checkpoints in a folder, written so Ray's ``Checkpoint.from_directory`` uploads it.

A checkpoint folder holds three files: ``state.pt`` (everything ``GanRun.state_dict`` returns:
unwrapped weights, both optimizers, EMA, step, RNG streams, metric history), ``config.yaml`` (the
run's config, to refuse a resume into a different architecture) and ``meta.json`` (step and
metrics, readable without torch), plus whatever the caller adds (``tracking.json``).

``meta.json`` is written last and commits the folder: under ``files`` it lists every other file
with its size and sha256, each written and fsynced before it. A folder cut short (a full disk,
an interrupted upload, Ray's upload of the folder, whose file order is Ray's) is recognisably
incomplete: ``incomplete_reason`` is the one rule every reader applies before it picks or loads
a folder, and such a folder is skipped with a warning naming it, never loaded and blamed on the
architecture. Folders written before meta.json carried that list are accepted unless a file
shows the marks of a write cut short (see ``incomplete_reason``).

Loading uses ``torch.load(weights_only=True)`` only: a checkpoint is data from storage that
others may write to, and must never be able to run code.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from gan_core.config import ConfigError, GanConfig, flatten, from_dict, to_yaml
from services.storage import Storage, write_atomic, write_failure

if TYPE_CHECKING:
    from gan_core.loop import GanRun

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
CHECKPOINT_FILES = (STATE_FILE, CONFIG_FILE, META_FILE)
# services.train's local backend keeps its checkpoints here, inside the run folder (Ray Train's
# are the run folder's checkpoint_* folders).
LOCAL_CHECKPOINTS = "local_checkpoints"
RAY_CHECKPOINT_PREFIX = "checkpoint_"
FORMAT = 1
MANIFEST_KEY = "files"  # in meta.json: {file name: {"size": bytes, "sha256": hex}}
log = logging.getLogger("raygan")

# Keys that change the shapes or kinds of what a checkpoint holds. Everything else (train.steps,
# learning rates, eval.*, ...) may change between a run and its resume.
_ARCH_SECTIONS = ("data.", "generators.", "discriminator.", "encoder.")
# objective.mrgan_diffusion adds MRGAN's second discriminator and its optimizer to the state.
_ARCH_KEYS = ("objective.name", "objective.mrgan_diffusion", "g_optim.name", "d_optim.name")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded: missing, corrupt, unsafe or for another config."""


def _write_atomic(path: Path, data: bytes) -> None:
    """``services.storage.write_atomic`` into a checkpoint folder; a full disk is a
    StorageFullError naming the file."""
    # fsync: on disk before meta.json names it, since the commit must not outrun its files.
    where, hint = f"checkpoint folder {path.parent}", "free space there or set TMPDIR"
    write_atomic(path, data, where, path.name, hint, sync=os.fsync)


def _tensors(node: Any, key: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts/lists, with its dotted key."""
    if isinstance(node, torch.Tensor):
        yield key, node
    elif isinstance(node, dict):
        for name, value in node.items():
            yield from _tensors(value, f"{key}.{name}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from _tensors(value, f"{key}.{i}")


def _check_finite(state: dict) -> None:
    # Optimizer moments are checked with the weights: a NaN moment poisons the next step as
    # surely as a NaN weight, and a resume from either only repeats the divergence.
    for key, tensor in _tensors(state["model"], "model"):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"refusing to checkpoint a non-finite tensor at {key}")


def save_checkpoint(
    folder: str | Path,
    state: dict,
    cfg: GanConfig,
    metrics: dict[str, float],
    extra: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``state``, ``cfg``, ``metrics`` and the ``extra`` files ({name: bytes}) into
    ``folder`` (created if needed); ``meta.json`` last, listing the others (the commit)."""
    folder = Path(folder)
    _check_finite(state)
    clash = set(extra or {}) & {STATE_FILE, CONFIG_FILE, META_FILE}
    if clash:
        raise ValueError(f"extra checkpoint files may not be named {sorted(clash)}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files = {STATE_FILE: buffer.getvalue(), CONFIG_FILE: to_yaml(cfg).encode(), **(extra or {})}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        full = write_failure(exc, f"checkpoint folder {folder}", "it", "free space there")
        if full is not None:
            raise full from exc
        raise
    for name, data in files.items():
        _write_atomic(folder / name, data)
    # JSON has no NaN/inf; a diverged metric is recorded as null rather than as invalid JSON.
    clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
    meta = {
        "step": int(state["model"]["step"]),
        "metrics": clean,
        "format": FORMAT,
        MANIFEST_KEY: {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        },
    }
    _write_atomic(folder / META_FILE, json.dumps(meta, indent=1).encode())
    return folder


def checkpoint_folders(paths: Iterable[str]) -> dict[str, set[str]]:
    """The checkpoint folders among a run's file paths (relative to the run), with the names
    of the files each holds: Ray Train's ``checkpoint_*`` and the local backend's
    ``local_checkpoints/*``. Whether one is complete is ``incomplete_reason``'s question."""
    folders: dict[str, set[str]] = {}
    for rel in paths:
        parent, _, file = rel.rpartition("/")
        top = parent.split("/")
        ray_folder = len(top) == 1 and top[0].startswith(RAY_CHECKPOINT_PREFIX)
        local_folder = len(top) == 2 and top[0] == LOCAL_CHECKPOINTS
        if ray_folder or local_folder:
            folders.setdefault(parent, set()).add(file)
    return folders


def download_complete(storage: Storage, folder: str, files: Collection[str], dest: Path) -> bool:
    """Copy the stored checkpoint folder ``folder`` (relative to ``storage``; ``files`` are its
    file names, from a listing) into the local folder ``dest`` and say whether it is complete:
    ``incomplete_reason`` (which warns) checks the local copy, so each file is read from storage
    once, for the check and the restore alike."""
    for file in files:
        (dest / file).write_bytes(storage.read_bytes(f"{folder}/{file}"))

    def read(name: str) -> bytes:
        return (dest / name).read_bytes()

    return incomplete_reason(storage.run_uri(folder), files, read) is None


def listed_complete(files: Collection[str]) -> bool:
    """The cheap half of the rule, from a listing alone: all three files are there. A folder
    that passes must still pass ``incomplete_reason`` before it is used."""
    return set(CHECKPOINT_FILES) <= set(files)


def incomplete_reason(
    where: str, files: Collection[str], read: Callable[[str], bytes]
) -> str | None:
    """Why the checkpoint folder ``where`` is not complete, or None when it is; a reason is
    logged as a warning naming the folder (it is skipped, never loaded). ``files`` are the
    names in the folder, ``read(name)`` a file's bytes.

    Complete: the three files are there, and every file ``meta.json`` lists (written last, see
    save_checkpoint) has the size and sha256 it lists. A folder without that list (written by
    raygan before it had one) is accepted unless it shows the marks of a write cut short: an
    empty ``config.yaml`` or ``state.pt``, or a ``state.pt`` zip archive without its central
    directory (torch.save writes it last); anything else wrong with it is load_checkpoint's to
    report."""
    reason = _incomplete(files, read)
    if reason is not None:
        log.warning("skipping incomplete checkpoint folder %s: %s", where, reason)
    return reason


def _incomplete(files: Collection[str], read: Callable[[str], bytes]) -> str | None:
    missing = [name for name in CHECKPOINT_FILES if name not in files]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        meta = json.loads(read(META_FILE))
        manifest = meta.get(MANIFEST_KEY) if isinstance(meta, dict) else None
        if manifest is None:
            return _cut_short_legacy(read)
        if not isinstance(manifest, dict) or not all(
            isinstance(e, dict) and type(e.get("size")) is int and isinstance(e.get("sha256"), str)
            for e in manifest.values()
        ):
            return f"{META_FILE}'s {MANIFEST_KEY!r} list is malformed"
        for name, entry in sorted(manifest.items()):
            if name not in files:
                return f"{name} is missing ({META_FILE} lists it)"
            data = read(name)
            if len(data) != entry["size"]:
                return (
                    f"{name} is {len(data)} bytes, {META_FILE} says {entry['size']} "
                    "(a write cut short)"
                )
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                return f"{name} is not the file {META_FILE} lists (sha256 differs)"
    except FileNotFoundError as exc:
        return f"{Path(str(exc.filename or exc)).name} vanished while it was read"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
        return f"{META_FILE} is not JSON ({exc})"
    return None


def _cut_short_legacy(read: Callable[[str], bytes]) -> str | None:
    if not read(CONFIG_FILE).strip():
        return f"{CONFIG_FILE} is empty"
    state = read(STATE_FILE)
    if not state:
        return f"{STATE_FILE} is empty (0 bytes)"
    if state[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(state)):
                pass
        except zipfile.BadZipFile:
            return f"{STATE_FILE} is a zip archive cut short ({len(state)} bytes, no directory)"
    return None


def meta_score(meta: dict[str, Any], metric: str) -> float | None:
    """A checkpoint's value of ``metric`` from its meta.json (``step`` is the step itself); None
    when it has none, or a value that cannot rank (not a number, NaN, inf)."""
    value = meta.get("step") if metric == "step" else (meta.get("metrics") or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder}: {name} is missing")
    return path


def _saved_config(folder: Path) -> GanConfig:
    path = _require(folder, CONFIG_FILE)
    if not path.read_bytes().strip():
        # An empty file would load as {} = the default config, and the resume would then be
        # refused as "a different architecture": it is a write cut short.
        raise CheckpointError(
            f"checkpoint {folder}: {CONFIG_FILE} is empty: the checkpoint is incomplete"
        )
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if not isinstance(data, dict):
            raise CheckpointError(
                f"checkpoint {folder}: {CONFIG_FILE} is not a valid config: a YAML "
                f"{type(data).__name__}, not a mapping of config keys"
            )
        return from_dict(data, source=str(path))
    except CheckpointError:
        raise
    except ConfigError as exc:
        raise CheckpointError(
            f"checkpoint {folder}: {CONFIG_FILE} is not a valid config: {exc}"
        ) from None
    except Exception as exc:  # YAML errors come in several exception types
        raise CheckpointError(f"checkpoint {folder}: {CONFIG_FILE} is unreadable: {exc}") from None


def _architecture(cfg: GanConfig) -> dict[str, Any]:
    flat = flatten(cfg)
    arch = {k: v for k, v in flat.items() if k.startswith(_ARCH_SECTIONS) or k in _ARCH_KEYS}
    # Only whether EMA is on changes the state's keys; its decay may be tuned on resume.
    arch["train.ema>0"] = cfg.train.ema > 0
    return arch


def config_differences(saved: GanConfig, cfg: GanConfig) -> list[str]:
    """``key: checkpoint=A, config=B`` for every architecture-defining key that differs."""
    a, b = _architecture(saved), _architecture(cfg)
    lines = []
    for key in sorted(a):
        if a[key] != b[key]:
            shown = (saved.train.ema, cfg.train.ema) if key == "train.ema>0" else (a[key], b[key])
            lines.append(f"{key}: checkpoint={shown[0]!r}, config={shown[1]!r}")
    return lines


def _refusal_reason(exc: Exception) -> str:
    """The line of torch's refusal that says what was refused. The rest of its message suggests
    retrying with weights_only=False, which is exactly what must not be done with such a file."""
    for line in str(exc).splitlines():
        if line.strip().startswith(("Trying to load", "Unsupported")):
            return line.strip()
    return "unsupported pickle content"


def _saved_meta(folder: Path) -> dict:
    """``meta.json`` as written by save_checkpoint: a JSON object with the step and format."""
    path = _require(folder, META_FILE)
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} is not JSON ({exc})") from None
    if not isinstance(meta, dict) or type(meta.get("step")) is not int or meta["step"] < 0:
        raise CheckpointError(
            f"checkpoint {folder}: {META_FILE} holds {str(meta)[:80]!r}; expected an object "
            'with a non-negative int "step"'
        )
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {folder}: {META_FILE} says format {meta.get('format')!r}; this raygan "
            f"reads format {FORMAT}"
        )
    return meta


def _check_state_file(folder: Path, path: Path) -> None:
    """Name the problem with files torch.load would only call corrupt, or misreport: torch.save
    writes a zip archive holding ``<name>/data.pkl``; anything else is not a checkpoint."""
    with path.open("rb") as src:
        head = src.read(4)
    if not head:
        raise CheckpointError(f"checkpoint {folder}: {STATE_FILE} is empty (0 bytes)")
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(
                f"checkpoint {folder}: {STATE_FILE} is truncated or corrupt ({exc})"
            ) from None
        if not any(name.endswith("/data.pkl") for name in names):
            shown = ", ".join(names[:5]) or "nothing"
            raise CheckpointError(
                f"checkpoint {folder}: {STATE_FILE} is a zip archive but not a torch checkpoint "
                f"(it holds {shown}; torch.save writes <name>/data.pkl)"
            )
    elif head[:1] != b"\x80":
        # Not a zip and not a pickle (whose first opcode is PROTO, 0x80): torch would try it
        # as a pickle and report a bad opcode as an unsafe one.
        raise CheckpointError(
            f"checkpoint {folder}: {STATE_FILE} is not a torch checkpoint (starts with "
            f"{head!r}; torch.save writes a zip archive)"
        )


def load_checkpoint(folder: str | Path, cfg: GanConfig) -> dict:
    """The state saved in ``folder``, after checking it was made for ``cfg``'s architecture.

    Refuses, as CheckpointError naming the folder: missing files, a ``meta.json`` that is not
    save_checkpoint's, a config of another architecture, a ``state.pt`` that is empty, corrupt,
    not torch's or unsafe, a state that is not a run's, and non-finite weights. Whether the
    tensors fit a particular run is ``restore_run``'s check."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder}: no such folder")
    state_path = _require(folder, STATE_FILE)
    meta = _saved_meta(folder)
    # The state file's own problems first: a truncated folder must be called truncated, not
    # blamed on the architecture its (possibly also cut short) config.yaml seems to describe.
    _check_state_file(folder, state_path)
    differences = config_differences(_saved_config(folder), cfg)
    if differences:
        raise CheckpointError(
            f"checkpoint {folder} was made for a different architecture; differing keys: "
            + "; ".join(differences)
        )
    try:
        state = torch.load(state_path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(
                f"checkpoint {folder}: {STATE_FILE} is truncated or corrupt ({exc})"
            ) from None
        # weights_only refused a global outside its allow-list or an unknown opcode: a pickle
        # that would build arbitrary objects or call functions. None of it has run.
        raise CheckpointError(
            f"checkpoint {folder}: {STATE_FILE} was refused by the safe loader because it holds "
            f"more than tensors and plain containers, possibly code ({_refusal_reason(exc)}); "
            "it was not written by save_checkpoint"
        ) from None
    except Exception as exc:  # torch reports truncation and corruption with several types
        raise CheckpointError(
            f"checkpoint {folder}: {STATE_FILE} is truncated or corrupt ({type(exc).__name__}: "
            f"{exc})"
        ) from None
    _check_run_state(folder, state, meta["step"])
    return state


def _check_run_state(folder: Path, state: Any, step: int) -> None:
    """The shape of what GanRun.state_dict returns, the step meta.json names, finite weights."""
    problem = ""
    if not isinstance(state, dict):
        problem = f"a {type(state).__name__}, not a dict"
    elif not isinstance(state.get("model"), dict):
        problem = "no 'model' dict"
    elif not isinstance(state.get("torch_rng"), torch.Tensor):
        problem = "no 'torch_rng' tensor"
    elif not isinstance(state.get("history"), list):
        problem = "no 'history' list"
    elif type(state["model"].get("step")) is not int:
        problem = "no int 'model.step'"
    if problem:
        raise CheckpointError(
            f"checkpoint {folder}: {STATE_FILE} does not hold a run state ({problem})"
        )
    if state["model"]["step"] != step:
        # Files of two different checkpoints side by side (a half-copied folder, say).
        raise CheckpointError(
            f"checkpoint {folder}: {META_FILE} says step {step} but {STATE_FILE} holds step "
            f"{state['model']['step']}"
        )
    try:
        _check_finite(state)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {folder}: {STATE_FILE}: {exc}") from None


def _shape(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _mismatch(state: dict, reference: dict, prefix: str) -> str | None:
    """The first difference in tensor names, shapes or dtypes of one network's state dict."""
    for key, ref in reference.items():
        if key not in state:
            return f"{prefix}.{key} is missing"
        saved = state[key]
        if not isinstance(saved, torch.Tensor):
            return f"{prefix}.{key} is a {type(saved).__name__}, not a tensor"
        if saved.shape != ref.shape or saved.dtype != ref.dtype:
            return f"{prefix}.{key} is {_shape(saved)} in the checkpoint, {_shape(ref)} in this run"
    extra = [key for key in state if key not in reference]
    if extra:
        return f"{prefix}.{extra[0]} is not in this run"
    return None


def _optimizer_mismatch(saved: Any, optimizer: torch.optim.Optimizer, prefix: str) -> str | None:
    """Optimizer state that would load silently and fail at the next step: parameter groups of
    other sizes, or moments shaped unlike their parameters."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        return f"{prefix} is not an optimizer state"
    if not isinstance(saved.get("state"), dict):
        return f"{prefix}.state is missing"
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        return (
            f"{prefix} has {len(groups)} parameter groups, this run {len(optimizer.param_groups)}"
        )
    params: dict[Any, torch.Tensor] = {}
    for i, (group, live) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(live["params"]):
            count = len(ids) if isinstance(ids, list) else "no"
            return (
                f"{prefix}.param_groups.{i} has {count} parameters, this run {len(live['params'])}"
            )
        params.update(zip(ids, live["params"], strict=True))
    for pid, entry in saved["state"].items():
        if pid not in params:
            return f"{prefix}.state.{pid} belongs to no parameter of this run"
        for name, value in entry.items() if isinstance(entry, dict) else ():
            # Adam's "step" is a scalar counter; every other tensor is shaped like its parameter.
            if name != "step" and isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape != params[pid].shape:
                    return (
                        f"{prefix}.state.{pid}.{name} is {tuple(value.shape)} in the checkpoint, "
                        f"{tuple(params[pid].shape)} in this run"
                    )
    return None


def check_state(folder: str | Path, state: dict, run: GanRun) -> None:
    """Refuse ``state`` unless every tensor fits ``run``: same networks, same tensor names,
    shapes and dtypes, optimizer moments shaped like their parameters, torch's RNG state.

    torch's strict ``load_state_dict`` copies every tensor that fits before it complains about
    one that does not, so this runs before anything is loaded. The message names the first
    mismatching key."""
    reference = run.state_dict()
    problem = None
    ref_model, model = reference["model"], state["model"]
    for key, ref in ref_model.items():
        if _is_network(ref):
            saved = model.get(key)
            if not isinstance(saved, dict):
                problem = f"model.{key} is missing"
            else:
                problem = _mismatch(saved, ref, f"model.{key}")
        elif isinstance(getattr(run.model, key, None), torch.optim.Optimizer):
            problem = _optimizer_mismatch(model.get(key), getattr(run.model, key), f"model.{key}")
        if problem:
            break
    if problem is None:
        extra = [k for k, v in model.items() if k not in ref_model and _is_network(v)]
        if extra:
            problem = f"model.{extra[0]} is not in this run"
    rng = state["torch_rng"]
    if problem is None and (rng.dtype != torch.uint8 or rng.shape != reference["torch_rng"].shape):
        problem = (
            f"torch_rng is {_shape(rng)}, torch's RNG state is {_shape(reference['torch_rng'])}"
        )
    if problem:
        raise CheckpointError(f"checkpoint {folder} does not fit this run: {problem}")


def _is_network(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def restore_run(folder: str | Path, state: dict, run: GanRun) -> None:
    """Load ``state`` (from load_checkpoint) into ``run``: all of it, or nothing.

    ``check_state`` refuses what does not fit before anything is copied; should loading still
    fail (a value no check foresaw), the run's own state is put back before the error is raised,
    so a refused checkpoint never leaves a run half loaded."""
    check_state(folder, state, run)
    before = copy.deepcopy(run.state_dict())
    try:
        run.load_state_dict(state)
    except Exception as exc:
        run.load_state_dict(before)
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"checkpoint {folder} does not load into this run ({type(exc).__name__}: {reason})"
        ) from None


def checkpoint_step(folder: str | Path) -> int:
    """The training step a checkpoint was taken at, from its ``meta.json``."""
    return int(_saved_meta(Path(folder))["step"])
