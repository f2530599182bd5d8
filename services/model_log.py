"""The trained generator as an MLflow model: ``runs:/<run id>/generator``.

When a run ends, its best checkpoint (ranked by ``gan_core.config.checkpoint_metric``, like the
checkpoints Ray keeps) becomes a TorchScript sampler (``gan_core.export``: noise ``(n, z_dim)``
float32 in, samples ``(n, *data_shape)`` float32 out) and is logged into the run's MLflow run
as an ``mlflow.pytorch`` model named ``generator``, with a signature and an input example.
TorchScript carries the code with the weights, so loading needs torch and mlflow only:

    mlflow.pytorch.load_model(f"runs:/{run_id}/generator")(torch.randn(1000, z_dim))

``tracking.register_as=NAME`` also registers it: one version of NAME per run, tagged with the
run's final metrics, its name and the checkpoint it came from, so ``models:/NAME/latest`` loads.

MLflow 3 keeps a model as a "logged model" with artifacts of its own (``.../models/<model
id>/artifacts``) linked to the run as an output, not as files under the run's artifacts;
``runs:/<run id>/generator`` resolves to it by name. ``mlflow.pytorch.log_model`` creates the
logged model in the fluent API's experiment and sends it to the fluent tracking URI: here it is
created in the run's experiment first and passed by id, and the tracking URI is set only for
the call (``_tracking_uri``) so that a process logging several runs (Tune trials) or a user's
own MLflow settings are left as they were.

Failure policy, as for the rest of tracking: the run's checkpoints and samples are stored
already, so a model that cannot be logged (tracking server down) is a warning, never a failed
run (``log_run_generator`` returns None and says why).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from gan_core.config import GanConfig, checkpoint_metric
from services.checkpoints import (
    checkpoint_folders,
    download_complete,
    incomplete_reason,
    listed_complete,
    meta_score,
)
from services.storage import Storage, open_storage, redact
from services.tracking import bound_http_retries, default_tracking_uri

logger = logging.getLogger("raygan.model_log")

GENERATOR = "generator"  # the model's name in the run: runs:/<run id>/generator
MODEL_TYPE = "raygan-generator"
MODEL_FILE = "model.json"  # beside a run's checkpoints: where its model went (tuning.report)
_EXAMPLE_ROWS = 4


@dataclass(frozen=True)
class LoggedGenerator:
    """Where a run's generator went."""

    model_uri: str  # runs:/<run id>/generator
    model_id: str  # MLflow's logged-model id (models:/<model id> loads it too)
    run_id: str
    checkpoint: str  # the checkpoint the weights came from
    step: int
    registered_name: str | None = None
    registered_version: str | None = None

    def describe(self) -> str:
        text = self.model_uri
        if self.registered_version:
            text += f" (registered: models:/{self.registered_name}/{self.registered_version})"
        return text

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent tracking URI set to ``uri`` for the block, then put back exactly, with
    ``MLFLOW_TRACKING_URI`` (which ``set_tracking_uri`` also writes): raygan's own default
    store (services.tracking.default_tracking_uri) reads that variable."""
    from mlflow.tracking._tracking_service import utils

    saved, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextmanager
def _quiet_mlflow_pytorch() -> Iterator[None]:
    """Silence two misleading messages of ``log_model`` for a ScriptModule: a warning that
    "pickle" format can run code (a ScriptModule is saved with ``torch.jit.save``, a TorchScript
    archive) and torch's note that ``torch.load`` read a TorchScript archive."""
    flavor_log = logging.getLogger("mlflow.pytorch")
    level = flavor_log.level
    flavor_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive.*")
            yield
    finally:
        flavor_log.setLevel(level)


def signature_for(z_dim: int, data_shape: tuple[int, ...] | list[int]) -> Any:
    """Noise ``(-1, z_dim)`` float32 in, samples ``(-1, *data_shape)`` float32 out.

    Unnamed tensors: with a named input MLflow's serving layer hands the model a dict, which
    the pytorch flavor refuses."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, int(z_dim)))]),
        outputs=Schema([TensorSpec(f32, (-1, *(int(s) for s in data_shape)))]),
    )


def example_noise(z_dim: int, rows: int = _EXAMPLE_ROWS) -> np.ndarray:
    """The input example: fixed standard-normal noise (seed 0), float32."""
    rng = torch.Generator().manual_seed(0)
    return torch.randn(rows, int(z_dim), generator=rng).numpy()


def log_sampler(
    sampler: torch.jit.ScriptModule,
    run_id: str,
    tracking_uri: str,
    *,
    step: int,
    checkpoint: str,
    run_name: str,
    register_as: str = "",
) -> LoggedGenerator:
    """Log ``sampler`` (a TorchScript module with ``z_dim`` and ``data_shape`` attributes) into
    MLflow run ``run_id`` as ``generator``; register it as ``register_as`` when given.

    ``step`` links the run's metrics at that step (the checkpoint's) to the logged model.
    Raises what MLflow raises; ``log_run_generator`` is the forgiving entry point."""
    bound_http_retries()
    # One progress bar per upload would clutter a job's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    z_dim, shape = int(sampler.z_dim), [int(s) for s in sampler.data_shape]
    model = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=GENERATOR,
        source_run_id=run_id,
        model_type=MODEL_TYPE,
        tags={"raygan.run_name": run_name, "raygan.checkpoint": redact(checkpoint)},
    )
    metadata = {
        "z_dim": z_dim,
        "data_shape": shape,
        "input": "noise (n, z_dim) float32, standard normal",
        "output": "samples (n, *data_shape) float32",
        "checkpoint_step": int(step),
    }
    with _tracking_uri(tracking_uri), _quiet_mlflow_pytorch():
        info = mlflow.pytorch.log_model(
            sampler,
            name=GENERATOR,
            model_id=model.model_id,
            run_id=run_id,
            step=int(step),
            signature=signature_for(z_dim, shape),
            input_example=example_noise(z_dim),
            # A ScriptModule cannot use MLflow 3's default "pt2" (torch.export) format.
            serialization_format="pickle",
            # Given, not inferred: inference loads the model in a subprocess (seconds) and
            # would list this environment. A local build tag (+cpu) is not on PyPI.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata=metadata,
        )
    model_uri = f"runs:/{run_id}/{GENERATOR}"
    client.set_tag(run_id, "raygan.model_uri", model_uri)
    logged = LoggedGenerator(
        model_uri=model_uri,
        model_id=info.model_id or model.model_id,
        run_id=run_id,
        checkpoint=redact(checkpoint),
        step=int(step),
    )
    if register_as:
        version = register(tracking_uri, register_as, logged, run_name)
        logged = LoggedGenerator(
            **{**asdict(logged), "registered_name": register_as, "registered_version": version}
        )
    return logged


def register(tracking_uri: str, name: str, logged: LoggedGenerator, run_name: str) -> str:
    """A new version of registered model ``name`` from ``logged``; returns the version number.

    Tags: the run's final metrics (its last value of each), ``raygan.run_name``,
    ``raygan.checkpoint`` and ``raygan.checkpoint_step``."""
    client = mlflow.MlflowClient(tracking_uri)
    try:
        client.create_registered_model(name, description="raygan generators (services.model_log)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    metrics = client.get_run(logged.run_id).data.metrics
    tags = {key: repr(float(value)) for key, value in sorted(metrics.items())}
    tags.update(
        {
            "raygan.run_name": run_name,
            "raygan.checkpoint": logged.checkpoint,
            "raygan.checkpoint_step": str(logged.step),
        }
    )
    # The registry resolves the models:/ source through the fluent tracking URI.
    with _tracking_uri(tracking_uri):
        version = client.create_model_version(
            name,
            source=f"models:/{logged.model_id}",
            run_id=logged.run_id,
            tags=tags,
            model_id=logged.model_id,
        )
    return str(version.version)


def best_checkpoint(
    storage: Storage, name: str, metric: str, mode: str, dest: Path | None = None
) -> str | None:
    """The folder (relative to ``storage``) of run ``name``'s best complete checkpoint by
    ``metric`` (``mode`` max or min), the later step winning a tie; None if it has none.
    With ``dest`` (an empty local folder) the chosen folder's files are left there: each file
    is read from storage once, for the check and the use alike.

    Looks where both backends write: Ray Train's ``<name>/checkpoint_*`` folders and the local
    backend's ``<name>/local_checkpoints/*``. A folder without the metric is skipped, and so
    is an incomplete one (an upload cut short: ``incomplete_reason``, with a warning): the
    next best complete folder wins."""
    folders = checkpoint_folders(storage.list(name))
    sign = 1.0 if mode == "max" else -1.0
    ranked = []
    for folder, files in folders.items():
        if not listed_complete(files):
            continue
        try:
            meta = json.loads(storage.read_bytes(f"{name}/{folder}/meta.json"))
        except ValueError:
            continue
        score = meta_score(meta, metric) if isinstance(meta, dict) else None
        if score is not None:
            ranked.append((sign * score, int(meta.get("step", 0)), folder))
    for _, _, folder in sorted(ranked, reverse=True):
        prefix = f"{name}/{folder}"
        if dest is not None:
            for stale in dest.iterdir():  # a skipped folder's copy
                stale.unlink()
            if download_complete(storage, prefix, folders[folder], dest):
                return prefix
        elif not incomplete_reason(
            f"{storage.uri}/{prefix}", folders[folder], _reader(storage, prefix)
        ):
            return prefix
    return None


def _reader(storage: Storage, folder: str) -> Callable[[str], bytes]:
    return lambda file: storage.read_bytes(f"{folder}/{file}")


def log_checkpoint(
    folder: Path,
    run_id: str,
    tracking_uri: str,
    *,
    checkpoint: str,
    register_as: str = "",
) -> LoggedGenerator:
    """Export the local checkpoint ``folder`` (named ``checkpoint`` in what is logged) and log
    it into ``run_id``; raises on failure."""
    from gan_core.export import sampler_from_checkpoint

    sampler, cfg, meta = sampler_from_checkpoint(folder)
    return log_sampler(
        sampler,
        run_id,
        tracking_uri,
        step=int(meta.get("step", 0)),
        checkpoint=checkpoint,
        run_name=cfg.name,
        register_as=register_as,
    )


def _stored_run_id(folder: Path) -> str | None:
    """The MLflow run a checkpoint folder names in its ``tracking.json`` (services.worker)."""
    try:
        return json.loads((folder / "tracking.json").read_text()).get("run_id")
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def log_run_generator(
    cfg: GanConfig, run_id: str | None, tracking_uri: str | None = None
) -> LoggedGenerator | None:
    """Log the best checkpoint of the finished run ``cfg.name`` (in ``cfg.storage``) into its
    MLflow run (``run_id``; None: the one its checkpoint names), registered as
    ``cfg.tracking.register_as`` if set. Never raises: None (with a warning naming the reason)
    when there is nothing to log or MLflow failed."""
    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri or cfg.tracking.uri or default_tracking_uri(cfg.storage.uri)
    try:
        storage = open_storage(cfg.storage)
        metric, mode = checkpoint_metric(cfg)
        with tempfile.TemporaryDirectory(prefix="raygan-model-") as tmp:
            local = Path(tmp)
            folder = best_checkpoint(storage, cfg.name, metric, mode, dest=local)
            if folder is None:
                logger.warning(
                    "run %s has no complete checkpoint with %r in %s: no MLflow model logged",
                    cfg.name,
                    metric,
                    storage.uri,
                )
                return None
            run_id = run_id or _stored_run_id(local)
            if not run_id:
                logger.warning("%s/%s names no MLflow run: no model logged", storage.uri, folder)
                return None
            logged = log_checkpoint(
                local,
                run_id,
                uri,
                checkpoint=f"{storage.uri}/{folder}",
                register_as=cfg.tracking.register_as,
            )
        storage.write_bytes(f"{cfg.name}/{MODEL_FILE}", logged.to_json().encode())
        return logged
    except Exception as exc:  # the run's outputs are stored: the model must not fail the run
        _warn(cfg.name, uri, exc)
        return None


def _warn(name: str, uri: str, exc: Exception) -> None:
    reason = str(exc).splitlines()[0][:300] if str(exc) else repr(exc)
    logger.warning(
        "could not log the generator of run %s as an MLflow model at %s (%s: %s); its "
        "checkpoints and samples are stored: log it later with `python -m services.model_log "
        "--config ... [key=value ...]` (the run's own arguments)",
        name,
        redact(uri),
        type(exc).__name__,
        redact(reason),
    )


def log_result_generator(cfg: GanConfig, result: Any, run_id: str) -> LoggedGenerator | None:
    """A Tune trial's end (tuning.trial): log the best checkpoint Ray Train kept for the trial's
    Train run (``result``, what ``TorchTrainer.fit`` returned) into the trial's MLflow run, and
    note where it went in ``<storage>/<trial>/model.json`` for tuning.report. Registering is the
    sweep's business (its best trial), not each trial's. Never raises, like log_run_generator."""
    uri = cfg.tracking.uri or default_tracking_uri(cfg.storage.uri)
    try:
        metric, mode = checkpoint_metric(cfg)
        best = result.get_best_checkpoint(metric, mode) or result.checkpoint
        if best is None:
            logger.warning("trial %s kept no checkpoint: no MLflow model logged", cfg.name)
            return None
        scheme = getattr(best.filesystem, "type_name", "local")
        where = best.path if scheme == "local" else f"{scheme}://{best.path}"
        with best.as_directory() as folder:
            logged = log_checkpoint(Path(folder), run_id, uri, checkpoint=where)
        open_storage(cfg.storage).write_bytes(f"{cfg.name}/{MODEL_FILE}", logged.to_json().encode())
        return logged
    except Exception as exc:  # a trial's results stand without its model
        _warn(cfg.name, uri, exc)
        return None


def read_logged(storage: Storage, name: str) -> dict[str, Any] | None:
    """What ``<name>/model.json`` in ``storage`` says (LoggedGenerator's fields), or None."""
    try:
        if not storage.exists(f"{name}/{MODEL_FILE}"):
            return None
        data = json.loads(storage.read_bytes(f"{name}/{MODEL_FILE}"))
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def summary_fields(cfg: GanConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """``model_uri`` and ``registered_model`` (``models:/NAME/VERSION``) for a finished run's
    summary (services.train), after logging its generator; None where nothing was logged."""
    logged = log_run_generator(cfg, summary.get("mlflow_run_id"))
    registered = None
    if logged is not None and logged.registered_version:
        registered = f"models:/{logged.registered_name}/{logged.registered_version}"
    return {"model_uri": logged.model_uri if logged else None, "registered_model": registered}


def main(argv: list[str] | None = None) -> int:
    """``python -m services.model_log --config PRESET_OR_YAML [key=value ...]``: log (again) the
    generator of the run those arguments name, e.g. after the tracking server was down when it
    ended. The MLflow run is the one its best checkpoint names, unless ``--run-id``."""
    import argparse
    import sys

    from gan_core.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m services.model_log", description=main.__doc__)
    parser.add_argument("--config", default="ring8", help="the run's preset or YAML path")
    parser.add_argument("--run-id", default=None, help="MLflow run (default: the checkpoint's)")
    parser.add_argument("overrides", nargs="*", help="the run's key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="raygan: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"raygan: {redact(str(exc))}", file=sys.stderr)
        return 2
    logged = log_run_generator(cfg, args.run_id)
    if logged is None:
        return 1
    print(f"[raygan] model: {logged.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
