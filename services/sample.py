"""Draw samples from a trained run's generator and write them as .npy, .png or .parquet.

    python -m services.sample --run runs/ring8 --n 2000 --out samples.npy
    python -m services.sample --run s3://bucket/runs/ring8 --checkpoint latest --n 64 --out grid.png

``--run`` is a run's folder (local, or ``s3://bucket/prefix/NAME``; the S3 endpoint comes from
``--endpoint`` or AWS_ENDPOINT_URL as for the service). ``--checkpoint`` picks one of its
checkpoint folders (Ray Train's ``checkpoint_*``, the local backend's ``local_checkpoints/*``):
``best`` (default) by the run's checkpoint metric and mode
(``gan_core.config.checkpoint_metric``, values from each ``meta.json``), ``latest`` (highest step),
or a checkpoint folder's path (or its name inside the run). The generator is exported with
``gan_core.export`` (EMA unless ``--raw``) and fed noise from ``torch.Generator`` seeded by
``--seed``, or with ``--eval-noise`` the noise of the run's own evaluation, so the metrics of the
written .npy equal the ones the run logged at that step. Output suffixes:

- ``.npy``: the float32 array ``(n, *data_shape)`` that ``python -m gan_core.evaluate`` scores;
- ``.png``: an image grid (images), or the points over the mode centers / over themselves;
- ``.parquet``: the layout the data came in, so raygan can train on the file: points as numeric
  columns (``x``, ``y`` for ring8/grid25; the training file's own column names when it can be read
  locally, else ``x0``, ``x1``, ...); images as ``image`` struct<bytes: PNG, path: string>.

Problems print one line on stderr naming the bad thing and exit with status 2.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gan_core.config import GanConfig, StorageConfig, checkpoint_metric
from gan_core.export import ExportError, eval_noise, export_sampler, read_checkpoint
from services.checkpoints import (
    CHECKPOINT_FILES,
    LOCAL_CHECKPOINTS,
    META_FILE,
    checkpoint_folders,
    incomplete_reason,
    listed_complete,
    meta_score,
)

USAGE_ERROR = 2
SUFFIXES = (".npy", ".png", ".parquet")
CHECKPOINT_PREFIX = "checkpoint_"
# Samples drawn per sampler call: bounds memory for large --n (a 64x64 RGB image is 48 KiB).
CHUNK = 4096


class SampleError(ValueError):
    """Bad input to the sampler command: one line naming the thing and what is allowed."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.sample", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--run", required=True, help="run folder: local path or s3://bucket/.../NAME"
    )
    parser.add_argument(
        "--checkpoint", default="best", help="best (default) | latest | a checkpoint folder"
    )
    parser.add_argument("--n", required=True, help="number of samples (a positive integer)")
    parser.add_argument("--out", required=True, help="output file: .npy, .png or .parquet")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--raw", action="store_true", help="the trained generator, not its EMA")
    parser.add_argument(
        "--eval-noise",
        action="store_true",
        help="the noise of the run's own evaluation (reproduces its logged metrics)",
    )
    parser.add_argument("--endpoint", default="", help="S3 endpoint URL (default AWS_ENDPOINT_URL)")
    return parser.parse_args(argv)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1 or str(n) != text.strip():
        raise SampleError(f"--n {text!r} is invalid; allowed: a positive integer")
    return n


def _meta(text: str, where: str) -> dict:
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise SampleError(f"checkpoint {where}: {META_FILE} is not JSON ({exc})") from None
    if not isinstance(meta, dict) or type(meta.get("step")) is not int:
        raise SampleError(f"checkpoint {where}: {META_FILE} has no int 'step'")
    return meta


def choose(metas: dict[str, dict], how: str, cfg: GanConfig | None) -> str:
    """The name of the chosen checkpoint among ``{name: meta}``: ``latest`` is the highest step;
    ``best`` the best value of the run's checkpoint metric (``cfg``'s metric and mode), checkpoints
    without a value for it last, ties to the later step."""
    if how == "latest" or cfg is None:
        return max(metas, key=lambda name: (metas[name]["step"], name))
    metric, mode = checkpoint_metric(cfg)
    sign = 1.0 if mode == "max" else -1.0

    def rank(name: str) -> tuple[bool, float, int]:
        value = meta_score(metas[name], metric)
        return (value is not None, sign * value if value is not None else 0.0, metas[name]["step"])

    return max(metas, key=rank)


def _config_of(text: str, where: str) -> GanConfig:
    """The run's config (the newest checkpoint's config.yaml): what ranks its checkpoints."""
    from omegaconf import OmegaConf

    from gan_core.config import from_dict

    try:
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
        return from_dict(data if isinstance(data, dict) else {}, source=where)
    except Exception as exc:  # noqa: BLE001 - YAML and config errors come in several types
        raise SampleError(
            f"checkpoint {where}: config.yaml is not a valid config ({exc})"
        ) from None


def checkpoint_names(files: list[str]) -> list[str]:
    """Checkpoint folders (relative to the run) among the run's files: Ray Train's
    ``checkpoint_*`` and the local backend's ``local_checkpoints/*`` that hold all three files.
    ``pick`` still checks the one it chooses with ``incomplete_reason``."""
    return sorted(name for name, held in checkpoint_folders(files).items() if listed_complete(held))


def _local_files(root: Path) -> list[str]:
    found = [*root.glob(f"{CHECKPOINT_PREFIX}*/*"), *root.glob(f"{LOCAL_CHECKPOINTS}/*/*")]
    return sorted(p.relative_to(root).as_posix() for p in found if p.is_file())


def pick(run: str, how: str, files: list[str], read: Callable[[str], bytes]) -> str:
    """The chosen checkpoint's folder, relative to the run (``how`` is best or latest).

    Incomplete folders (``incomplete_reason``: a write or upload cut short) are skipped with a
    warning naming them; the choice falls to the next complete one. The ``best`` ranking uses
    the newest complete folder's config."""
    held = checkpoint_folders(files)
    names = checkpoint_names(files)
    if not names:
        raise SampleError(
            f"--run {run!r} holds no checkpoint ({CHECKPOINT_PREFIX}*/{META_FILE} or "
            f"{LOCAL_CHECKPOINTS}/*/{META_FILE})"
        )
    reasons: dict[str, str | None] = {}

    def complete(name: str) -> bool:
        if name not in reasons:
            reasons[name] = incomplete_reason(
                f"{run}/{name}", held[name], lambda file: read(f"{name}/{file}")
            )
        return reasons[name] is None

    metas = {}
    for name in names:
        text = read(f"{name}/{META_FILE}")
        try:
            json.loads(text)
        except ValueError:
            complete(name)  # a meta.json cut short: skipped, with the warning
            continue
        metas[name] = _meta(text.decode(), f"{run}/{name}")
    newest = sorted(metas, key=lambda name: (metas[name]["step"], name), reverse=True)
    cfg = None
    if how == "best":
        base = next((name for name in newest if complete(name)), None)
        if base is not None:
            cfg = _config_of(read(f"{base}/config.yaml").decode(), f"{run}/{base}")
    while metas:
        chosen = choose(metas, how, cfg)
        if complete(chosen):
            return chosen
        del metas[chosen]
    skipped = "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()) if why)
    raise SampleError(f"--run {run!r} holds no complete checkpoint ({skipped})")


def _bad_checkpoint(how: str, allowed: str) -> SampleError:
    return SampleError(
        f"--checkpoint {how!r} is not an existing checkpoint folder; allowed: best, latest or "
        f"{allowed}"
    )


def _local_checkpoint(run: str, how: str) -> tuple[Path, str]:
    """(folder, what was chosen) of a local run."""
    root = Path(run)
    if how not in ("best", "latest"):
        path = Path(how)
        if not path.is_dir() and (root / how).is_dir():
            path = root / how
        if not path.is_dir():
            raise _bad_checkpoint(how, "a checkpoint folder's path")
        return path, str(path)
    if not root.is_dir():
        raise SampleError(f"--run {run!r}: no such run folder")
    try:
        name = pick(run, how, _local_files(root), lambda rel: (root / rel).read_bytes())
    except FileNotFoundError as exc:
        raise SampleError(f"--run {run!r}: {exc.filename} is missing") from None
    return root / name, f"{how}: {root / name}"


def _s3_checkpoint(run: str, how: str, endpoint: str, into: Path) -> tuple[Path, str]:
    """Download the chosen checkpoint folder of an S3 run into ``into``."""
    from services.storage import StorageError, open_storage

    try:
        storage = open_storage(StorageConfig(uri=run, endpoint=endpoint))
        files = storage.list("")
        if how in ("best", "latest"):
            if not files:
                raise SampleError(f"--run {run!r}: no such run folder (nothing stored under it)")
            name = pick(run, how, files, storage.read_bytes)
            chosen = f"{how}: {run.rstrip('/')}/{name}"
        else:
            name = how.rstrip("/").removeprefix(run.rstrip("/") + "/")
            if name not in checkpoint_names(files):
                shown = ", ".join(checkpoint_names(files)) or "no checkpoint folders"
                raise _bad_checkpoint(how, f"a checkpoint folder of the run ({shown})")
            chosen = f"{run.rstrip('/')}/{name}"
        folder = into / "checkpoint"
        folder.mkdir(parents=True)
        for file in CHECKPOINT_FILES:
            if f"{name}/{file}" in files:
                (folder / file).write_bytes(storage.read_bytes(f"{name}/{file}"))
    except (StorageError, FileNotFoundError) as exc:
        raise SampleError(f"--run {run!r}: {exc}") from None
    return folder, chosen


def draw(sampler: torch.jit.ScriptModule, noise: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        parts = [sampler(noise[i : i + CHUNK]) for i in range(0, noise.shape[0], CHUNK)]
    return torch.cat(parts).numpy().astype(np.float32, copy=False)


def point_columns(cfg: GanConfig, dims: int) -> list[str]:
    """Column names for points: x, y for the 2D mixtures; the training file's numeric columns
    when its schema can be read locally and has ``dims`` of them; else x0, x1, ..."""
    if cfg.data.name in ("ring8", "grid25"):
        return ["x", "y"]
    names = _training_columns(cfg.data.path)
    if names is not None and len(names) == dims:
        return names
    return [f"x{i}" for i in range(dims)]


def _training_columns(path: str) -> list[str] | None:
    import pyarrow.parquet as pq

    if not path or "://" in path:
        return None  # remote data: not worth a network round trip (and its credentials) here
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet")) if root.is_dir() else []
    if not files:
        return None
    try:
        schema = pq.read_schema(files[0])
    except Exception:  # noqa: BLE001 - unreadable now: fall back to generic names
        return None
    return [f.name for f in schema if f.name != "label" and _numeric(f.type)]


def _numeric(kind: object) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def to_pixels(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 (the inverse of gan_core.files.to_training, rounded)."""
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_parquet(samples: np.ndarray, cfg: GanConfig, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    if samples.ndim == 2:
        names = point_columns(cfg, samples.shape[1])
        table = pa.table({name: samples[:, i] for i, name in enumerate(names)})
    else:
        blobs, paths = [], []
        for i, image in enumerate(to_pixels(samples)):
            picture = (
                Image.fromarray(image[0], "L")
                if image.shape[0] == 1
                else Image.fromarray(image.transpose(1, 2, 0), "RGB")
            )
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            blobs.append(buffer.getvalue())
            paths.append(f"sample_{i:06d}.png")
        kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        column = pa.array(
            [{"bytes": b, "path": p} for b, p in zip(blobs, paths, strict=True)], kind
        )
        table = pa.table({"image": column})
    pq.write_table(table, path)


def write_png(samples: np.ndarray, cfg: GanConfig, path: Path, title: str) -> None:
    from gan_core.images import save_grid, save_points, save_scatter

    if samples.ndim == 4:
        save_grid(samples, path)
    elif cfg.data.name in ("ring8", "grid25"):
        from gan_core.data import grid25, ring8

        mixture = ring8() if cfg.data.name == "ring8" else grid25()
        # The run's own high-quality radius (3 std, as the metrics and the run's pictures use):
        # the "off" bar then equals 100 - hq_pct.
        save_scatter(samples, mixture.centers, path, title, radius=3 * mixture.std)
    else:
        # No real data at hand (it may be remote): the samples are their own reference.
        save_points(samples, samples, path, title=title)


def sample(args: argparse.Namespace) -> str:
    """Do the work; returns the line to print. Raises SampleError / ExportError."""
    n = _count(args.n)
    out = Path(args.out)
    if out.suffix.lower() not in SUFFIXES:
        raise SampleError(
            f"--out {args.out!r} has suffix {out.suffix or '(none)'!r}; allowed: "
            + ", ".join(SUFFIXES)
        )
    with tempfile.TemporaryDirectory(prefix="raygan-sample-") as tmp:
        if args.run.startswith("s3://"):
            folder, chosen = _s3_checkpoint(args.run, args.checkpoint, args.endpoint, Path(tmp))
        else:
            folder, chosen = _local_checkpoint(args.run, args.checkpoint)
        cfg, state, meta = read_checkpoint(folder)
        sampler = export_sampler(cfg, state, raw=args.raw)
    if args.eval_noise:
        noise = eval_noise(cfg, n)
    else:
        noise = torch.randn(n, sampler.z_dim, generator=torch.Generator().manual_seed(args.seed))
    samples = draw(sampler, noise)
    which = "EMA" if sampler.ema else "raw"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".npy":
            np.save(out, samples)
        elif out.suffix.lower() == ".png":
            write_png(samples, cfg, out, f"{cfg.name} step {meta['step']} ({which})")
        else:
            write_parquet(samples, cfg, out)
    except OSError as exc:
        raise SampleError(f"--out {args.out!r} cannot be written ({exc.strerror or exc})") from None
    noise_from = "eval noise" if args.eval_noise else f"seed {args.seed}"
    return (
        f"wrote {out} ({n} samples, shape {list(samples.shape[1:])}) from checkpoint {chosen} "
        f"(step {meta['step']}, {which} generator, {noise_from})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(sample(args), flush=True)
    except (SampleError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
