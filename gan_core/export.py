"""A trained generator as a self-contained TorchScript sampler: noise in, samples out.

``export_sampler`` turns a checkpoint's state dict into a ``torch.jit.ScriptModule`` whose
``forward(noise)`` maps ``(n, z_dim)`` float32 noise to ``(n, *data_shape)`` float32 samples in the
data's own coordinates (points raw, images in [-1, 1]). The module carries its weights and code,
so ``torch.jit.load`` reads it in a process that has never heard of raygan (an MLflow model, a
serving container). It holds the generator the run evaluates with: the EMA copy when the run keeps
one, with the BatchNorm statistics recomputed exactly as ``GanModel.sample`` does, else (or with
``raw=True``) the trained generator with its own running statistics.

A MAD-GAN bank is mixed row by row: row ``i`` of the noise goes to generator ``i % count``, for any
``n``. In eval mode BatchNorm uses fixed statistics, so each row's sample depends only on its own
noise and its generator; padding the noise to a multiple of ``count`` changes nothing.

    sampler, cfg, meta = sampler_from_checkpoint(Path("runs/ring8/checkpoint_000010"))
    points = sampler(torch.randn(1000, sampler.z_dim))

Torch only (no Ray, MLflow or boto3): this module is what a consumer of a run needs.
"""

import copy
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from gan_core.config import FILE_DATA, GanConfig, from_dict
from gan_core.data import DigitsDataset, MixtureDataset, StackedDigitsDataset
from gan_core.loop import _EVAL, _stream
from gan_core.nets import GeneratorBank, build_generator
from gan_core.steps import recalibrate_batch_norm

STATE_FILE, CONFIG_FILE, META_FILE = "state.pt", "config.yaml", "meta.json"
# Batch sizes the traced fallback is checked on: a trace may bake one batch size in.
_TRACE_CHECK_SIZES = (1, 3, 7)


class ExportError(ValueError):
    """A checkpoint (or state dict) that cannot be turned into a sampler; names the file/key."""


class BankSampler(nn.Module):
    """``(n, z_dim)`` noise -> ``(n, *data_shape)`` samples; row i goes to generator i % count.

    Holds the bank's own submodules and repeats ``GeneratorBank.forward`` (independent
    generators, or one shared body and a head per generator) in a form TorchScript compiles:
    the bank's shape check formats ``tuple(z.shape)``, which scripting refuses.
    """

    # Class-level annotations: TorchScript keeps these attributes, and a caller reads them back
    # after torch.jit.load (sampler.z_dim, sampler.data_shape, ...).
    z_dim: int
    count: int
    data_shape: list[int]
    ema: bool
    shared: bool

    def __init__(
        self, bank: GeneratorBank, z_dim: int, data_shape: tuple[int, ...], ema: bool
    ) -> None:
        super().__init__()
        self.z_dim, self.count = int(z_dim), int(bank.count)
        self.data_shape = [int(s) for s in data_shape]
        self.ema, self.shared = bool(ema), bool(bank.shared)
        # Both branches must exist for the compiler; the unused one is empty.
        empty = nn.ModuleList()
        self.body: nn.Module = bank.body if self.shared else nn.Identity()
        self.heads = bank.heads if self.shared else empty
        self.generators = empty if self.shared else bank.generators

    def forward(self, noise: Tensor) -> Tensor:
        if noise.dim() != 2 or noise.shape[1] != self.z_dim:
            raise ValueError("noise must have shape (n, z_dim) with z_dim=" + str(self.z_dim))
        n = noise.shape[0]
        count = self.count
        m = (n + count - 1) // count
        pad = m * count - n
        if pad > 0:
            noise = torch.cat([noise, noise.new_zeros(pad, self.z_dim)])
        # Row k * count + j of the noise becomes z[j, k]: generator j's k-th input.
        z = noise.reshape(m, count, self.z_dim).transpose(0, 1)
        outs: list[Tensor] = []
        if self.shared:
            features = self.body(z.flatten(0, 1)).unflatten(0, [count, m])
            for i, head in enumerate(self.heads):
                outs.append(head(features[i]))
        else:
            for i, g in enumerate(self.generators):
                outs.append(g(z[i]))
        out = torch.stack(outs)  # (count, m, *data_shape)
        return out.transpose(0, 1).flatten(0, 1)[:n]


def data_shape_of(cfg: GanConfig, generator_state: dict[str, Tensor]) -> tuple[int, ...]:
    """The shape of one sample: from the config where it says (images, generated data), else
    (Parquet points, whose width only the data files know) from the generator's last layer."""
    name = cfg.data.name
    if name in ("ring8", "grid25"):
        return MixtureDataset.shape
    if name == "digits":
        return DigitsDataset.shape
    if name == "stacked_digits":
        return StackedDigitsDataset.shape
    if name in FILE_DATA and cfg.data.image_size > 0:
        return (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    # Points from files: an MLP generator's head is Sequential(Linear(width, D), Unflatten).
    key = "heads.0.0.weight" if "heads.0.0.weight" in generator_state else "generators.0.1.0.weight"
    weight = generator_state.get(key)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ExportError(
            f"cannot tell the point dimension of data.name={name!r}: generator state has no "
            f"2-D tensor {key!r} (expected an MLP generator for point data)"
        )
    return (int(weight.shape[0]),)


def _generator(cfg: GanConfig, model_state: dict, raw: bool) -> tuple[GeneratorBank, bool, tuple]:
    """The evaluation generator in eval mode, whether it is the EMA copy, and the data shape."""
    use_ema = not raw and cfg.train.ema > 0 and "ema" in model_state
    key = "ema" if use_ema else "generator"
    weights = model_state.get(key)
    if not isinstance(weights, dict):
        raise ExportError(f"state['model'][{key!r}] is missing or not a state dict")
    shape = data_shape_of(cfg, weights)
    # A fresh, eager, NCHW generator: channels_last and torch.compile change the layout and the
    # code, never the parameter names or values, so the weights load as they are.
    torch.manual_seed(0)  # the initial weights are overwritten; seeded only to be repeatable
    bank = build_generator(cfg, shape)
    try:
        bank.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(
            f"state['model'][{key!r}] does not fit the generator config.yaml describes ({first})"
        ) from None
    if use_ema:
        # Exactly GanModel.sample: BN statistics recomputed from noise seeded by the step, so
        # the sampler gives what the run's own evaluation at this step gave.
        step = int(model_state.get("step", 0))
        recalibrate_batch_norm(bank, cfg.generators.count, cfg.generators.z_dim, step, "cpu")
    return bank.eval().requires_grad_(False), use_ema, shape


def export_sampler(cfg: GanConfig, state: dict, raw: bool = False) -> torch.jit.ScriptModule:
    """A TorchScript sampler of the generator in ``state`` (``GanRun.state_dict()``, or just its
    ``model`` part): the EMA generator when the run has one, unless ``raw``. Attributes readable
    after ``torch.jit.load``: ``z_dim``, ``data_shape`` (list), ``count``, ``ema`` (bool)."""
    model_state = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(model_state, dict):
        raise ExportError(f"state is a {type(state).__name__}; expected GanRun.state_dict()")
    bank, use_ema, shape = _generator(cfg, copy.copy(model_state), raw)
    module = BankSampler(bank, cfg.generators.z_dim, shape, use_ema).eval()
    # torch marks TorchScript deprecated; it is still a format torch.jit.load runs without the
    # code that defined it, at any batch size, so the warning is silenced for this call only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            scripted = torch.jit.script(module)
        except Exception:  # noqa: BLE001 - any scripting failure falls back to a checked trace
            scripted = _traced(module)
    return scripted.eval()


def _traced(module: BankSampler) -> torch.jit.ScriptModule:
    """Fallback for nets that do not script: a trace, refused unless it matches eager mode at
    several batch sizes (a trace can silently freeze the batch size it saw)."""
    example = torch.randn(2 * module.count + 1, module.z_dim, generator=torch.Generator())
    traced = torch.jit.trace(module, example, check_trace=False)
    rng = torch.Generator().manual_seed(0)
    for n in _TRACE_CHECK_SIZES:
        noise = torch.randn(n, module.z_dim, generator=rng)
        with torch.no_grad():
            want, got = module(noise), traced(noise)
        if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5):
            raise ExportError(f"the traced sampler gives wrong samples for batch size {n}")
    return traced


def eval_noise(cfg: GanConfig, n: int) -> Tensor:
    """The noise of the run's own evaluation (``GanRun.generate``), as ``(n, z_dim)`` rows a
    sampler maps to the same samples: its metrics at a step are reproduced exactly. For a bank
    the rows are ordered for ``i % count`` (the samples' order then differs, not the set)."""
    count, z_dim = cfg.generators.count, cfg.generators.z_dim
    rng = _stream(cfg.seed, _EVAL)
    per_call = 5000 - 5000 % count
    chunks, left = [], n
    while left > 0:
        take = min(per_call, left + (-left) % count)
        z = torch.randn(count, take // count, z_dim, generator=rng)  # as steps.sample_noise
        chunks.append(z.transpose(0, 1).reshape(-1, z_dim))
        left -= take
    return torch.cat(chunks)[:n] if chunks else torch.zeros(0, z_dim)


def read_checkpoint(folder: Path) -> tuple[GanConfig, dict, dict]:
    """(config, state, meta) of a checkpoint folder; the state loaded with weights_only=True."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"checkpoint {folder}: no such folder")
    for name in (STATE_FILE, CONFIG_FILE, META_FILE):
        if not (folder / name).is_file():
            raise ExportError(f"checkpoint {folder}: {name} is missing")
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except ValueError as exc:
        raise ExportError(f"checkpoint {folder}: {META_FILE} is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ExportError(f"checkpoint {folder}: {META_FILE} is not a JSON object")
    try:
        data = OmegaConf.to_container(OmegaConf.load(folder / CONFIG_FILE), resolve=False)
        if not isinstance(data, dict):
            raise ValueError("not a mapping of config keys")
        cfg = from_dict(data, source=str(folder / CONFIG_FILE))
    except Exception as exc:  # noqa: BLE001 - YAML and config errors come in several types
        raise ExportError(
            f"checkpoint {folder}: {CONFIG_FILE} is not a valid config ({exc})"
        ) from None
    state = _load_state(folder)
    return cfg, state, meta


def _load_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    with path.open("rb") as src:
        head = src.read(4)
    # torch.save writes a zip archive (a pickle in older formats); anything else would reach
    # the safe loader and be reported as refused rather than as what it is.
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        problem = "is empty (0 bytes)" if not head else f"is not a torch checkpoint ({head!r}...)"
        raise ExportError(f"checkpoint {folder}: {STATE_FILE} {problem}")
    try:
        # weights_only: a checkpoint is data from shared storage and must never run code.
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        what = "was refused by the safe loader" if "Weights only" in str(exc) else "is corrupt"
        raise ExportError(f"checkpoint {folder}: {STATE_FILE} {what}") from None
    except Exception as exc:  # noqa: BLE001 - torch reports corruption with several types
        raise ExportError(
            f"checkpoint {folder}: {STATE_FILE} is truncated or corrupt ({type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ExportError(f"checkpoint {folder}: {STATE_FILE} does not hold a run state")
    return state


def sampler_from_checkpoint(
    folder: Path, raw: bool = False
) -> tuple[torch.jit.ScriptModule, GanConfig, dict]:
    """The sampler of a checkpoint folder (config.yaml + state.pt + meta.json), its config and
    its meta (step, metrics)."""
    cfg, state, meta = read_checkpoint(Path(folder))
    return export_sampler(cfg, state, raw=raw), cfg, meta
