"""Full-state checkpoints in a folder, written so Ray's ``Checkpoint.from_directory`` uploads it.

A checkpoint folder holds three files: ``state.pt`` (everything ``GanRun.state_dict`` returns:
unwrapped weights, both optimizers, EMA, step, RNG streams, metric history), ``config.yaml`` (the
run's config, to refuse a resume into a different architecture) and ``meta.json`` (step and
metrics, readable without torch). Loading uses ``torch.load(weights_only=True)`` only: a
checkpoint is data from storage that others may write to, and must never be able to run code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from gan_core.config import ConfigError, GanConfig, flatten, from_dict, to_yaml

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
FORMAT = 1

# Keys that change the shapes or kinds of what a checkpoint holds. Everything else (train.steps,
# learning rates, eval.*, ...) may change between a run and its resume.
_ARCH_SECTIONS = ("data.", "generators.", "discriminator.", "encoder.")
_ARCH_KEYS = ("objective.name", "g_optim.name", "d_optim.name")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded: missing, corrupt, unsafe or for another config."""


def _write_atomic(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temporary file, then rename it over ``path``: a reader
    (or a resume after a crash) sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    folder: str | Path, state: dict, cfg: GanConfig, metrics: dict[str, float]
) -> Path:
    """Write ``state``, ``cfg`` and ``metrics`` into ``folder`` (created if needed)."""
    folder = Path(folder)
    _check_finite(state)
    folder.mkdir(parents=True, exist_ok=True)
    # JSON has no NaN/inf; a diverged metric is recorded as null rather than as invalid JSON.
    clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
    meta = {"step": int(state["model"]["step"]), "metrics": clean, "format": FORMAT}
    _write_atomic(folder / STATE_FILE, lambda out: torch.save(state, out))
    _write_atomic(folder / CONFIG_FILE, lambda out: out.write(to_yaml(cfg).encode()))
    # meta.json last: its presence marks a complete checkpoint.
    _write_atomic(folder / META_FILE, lambda out: out.write(json.dumps(meta, indent=1).encode()))
    return folder


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder}: {name} is missing")
    return path


def _saved_config(folder: Path) -> GanConfig:
    path = _require(folder, CONFIG_FILE)
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        return from_dict(data, source=str(path))  # type: ignore[arg-type]
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


def load_checkpoint(folder: str | Path, cfg: GanConfig) -> dict:
    """The state saved in ``folder``, after checking it was made for ``cfg``'s architecture."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder}: no such folder")
    state_path = _require(folder, STATE_FILE)
    _require(folder, META_FILE)
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
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"checkpoint {folder}: {STATE_FILE} does not hold a run state")
    return state


def checkpoint_step(folder: str | Path) -> int:
    """The training step a checkpoint was taken at, from its ``meta.json``."""
    folder = Path(folder)
    path = _require(folder, META_FILE)
    try:
        return int(json.loads(path.read_text())["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} is unreadable: {exc!r}") from None
