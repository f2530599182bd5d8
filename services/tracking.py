"""MLflow tracking for one training run: params, metrics, images and artifacts, outage-tolerant.

The Ray worker uses a ``Tracker`` on rank 0 only (the local backend uses one too). It talks to
MLflow through its own ``mlflow.MlflowClient`` (no fluent ``mlflow.start_run`` state), so several
runs, e.g. Tune trials, can live in one process.

Failure policy: tracking must never stop training. When MLflow cannot be reached, metrics, tags
and artifacts are buffered (metrics in a bounded buffer), ONE warning per outage says what is
waiting, and delivery is retried on a later call (at most once every ``retry_interval_s``,
because a single attempt against a dead server can block for MLflow's whole HTTP retry budget, see
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``); ``flush()`` retries at
once. MLflow's own HTTP retry budget defaults to minutes per request (7 retries, doubling
backoff): the Tracker lowers the defaults to one retry, backoff factor 1 and a 10 s timeout
(environment variables the user sets win), so an attempt against a dead server costs the
training loop seconds, not minutes. This includes the start: a Tracker built while the
server is down does not raise; it creates (or resumes) the run on the first later call that
reaches the server, so ``run_id`` is ``None`` until then. Errors MLflow reports as the
caller's fault (an invalid metric name, a deleted run) are not retried: those points are
dropped with a warning.

Where runs go (``default_tracking_uri``): ``$MLFLOW_TRACKING_URI`` if set; else an SQLite file
``mlflow.db`` in the local storage folder; for ``s3://`` storage it is still a local file,
``./runs/mlflow.db``, because an SQLite database cannot live in S3: use a tracking server (e.g.
``deploy/local``) to keep tracking beside S3 storage. For an SQLite store the experiment's
artifacts go to ``mlartifacts/`` next to the database file, not to MLflow's own default
``./mlruns`` in the current directory, which in a Ray worker is a temporary working directory.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import numbers
import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from gan_core.config import GanConfig, flatten
from services.secrets import is_secret_key, redact

logger = logging.getLogger("raygan.tracking")

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow error codes that mean "this request is wrong", so retrying it can never succeed.
_PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "BAD_REQUEST",
        "INVALID_STATE",
        "MALFORMED_REQUEST",
    }
)
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params and tags
_MAX_PENDING_ARTIFACTS = 1000


def default_tracking_uri(storage_uri: str) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs folder>/mlflow.db`` (see module docstring).

    The folder is the local storage folder itself, or ``./runs`` when storage is remote
    (``s3://...``), since an SQLite file must be on a local disk.
    """
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    if storage_uri.startswith("file://"):
        folder = Path(storage_uri.removeprefix("file://"))
    elif "://" in storage_uri:
        folder = Path("runs")
    else:
        folder = Path(storage_uri)
    return f"sqlite:///{folder.resolve()}/mlflow.db"


def _git_commit() -> str:
    """HEAD of the checkout this code runs from; a Ray job's uploaded working dir has no .git."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _is_permanent(exc: Exception) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT_ERRORS


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


# See the module doc: bounded per-request cost while a tracking server is down.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def bound_http_retries() -> None:
    """Apply HTTP_DEFAULTS to this process unless the user set them: MLflow's own defaults
    retry one request against a dead server for minutes."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


class Tracker:
    """One MLflow run for one GAN run; new, or resumed when ``run_id`` is given.

    Single-threaded by design: it is called from rank 0's training loop only.
    """

    def __init__(
        self,
        cfg: GanConfig,
        storage_uri: str,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        *,
        max_buffered_points: int = 10_000,
        retry_interval_s: float = 30.0,
        skip_logged_steps: bool = True,
    ) -> None:
        # A progress bar per upload would flood the worker logs Ray collects.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        bound_http_retries()
        self.cfg = cfg
        self.tracking_uri = tracking_uri or cfg.tracking.uri or default_tracking_uri(storage_uri)
        self.retry_interval_s = retry_interval_s
        self._artifact_location: str | None = None
        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            self._artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
        self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)

        self._resume_id = run_id
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._run_ready = False  # run exists, is RUNNING and has its params
        self._params = {
            key: redact(str(value)) for key, value in flatten(cfg).items() if not is_secret_key(key)
        }
        self._tags: dict[str, str] = {}
        self._metrics: deque[Metric] = deque(maxlen=max_buffered_points)
        self._artifacts: deque[tuple[Path, str | None, bool]] = deque()  # path, dir, spooled
        self._spool: Path | None = None
        self._dropped_points = 0
        self._dropped_artifacts = 0
        self._down_since: float | None = None  # monotonic time of the failure opening an outage
        self._logged_upto: dict[str, int] = {}  # resumed run: last step MLflow holds per key
        self._skip_logged_steps = skip_logged_steps
        self._last_attempt = -math.inf
        self._finished = False
        self.set_tags(
            {
                "mlflow.source.git.commit": _git_commit(),
                "raygan.version.ray": _version("ray"),
                "raygan.version.torch": _version("torch"),
                "raygan.version.mlflow": _version("mlflow"),
                "raygan.storage_uri": storage_uri,
                "raygan.run_name": cfg.name,
            }
        )  # also the first attempt to open the run; failing it only buffers, see module doc

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (store it to resume); None while a new run could not be created."""
        return self._run_id or self._resume_id

    @property
    def pending(self) -> dict[str, int]:
        """What is buffered and not yet in MLflow."""
        return {
            "metric_points": len(self._metrics),
            "artifacts": len(self._artifacts),
            "tags": len(self._tags),
        }

    @property
    def ui_hint(self) -> str:
        """How a person finds this run: its page on the server, or the ``mlflow ui`` command."""
        uri = redact(self.tracking_uri)
        if uri.startswith(("http://", "https://")):
            if self._experiment_id and self._run_id:
                return f"{uri.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self._run_id}"
            return uri
        return f"mlflow ui --backend-store-uri {uri}"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log the finite numeric values of ``metrics`` at ``step``; others are skipped."""
        if self._refuse_after_finish("log_metrics"):
            return
        now = int(time.time() * 1000)
        skipped = []
        for key, value in metrics.items():
            if isinstance(value, numbers.Real) and math.isfinite(float(value)):
                self._buffer_point(Metric(key, float(value), now, int(step)))
            else:
                skipped.append(key)
        if skipped:
            logger.debug("step %d: not logging non-numeric or non-finite %s", step, skipped)
        self._deliver()

    def log_image(self, path: str | Path, artifact_dir: str = "samples") -> None:
        """Upload one image file under ``artifact_dir``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"log_image: no image file at {path}")
        self.log_artifact(path, artifact_dir)

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        """Upload a file, or a directory's contents, under ``artifact_dir`` (None = run root)."""
        if self._refuse_after_finish("log_artifact"):
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: nothing at {path}")
        if len(self._artifacts) >= _MAX_PENDING_ARTIFACTS:
            self._artifacts.popleft()
            self._dropped_artifacts += 1
        self._artifacts.append((path, artifact_dir, False))
        self._deliver()
        self._spool_pending()

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) run tags; values are redacted like params."""
        if self._refuse_after_finish("set_tags"):
            return
        self._tags.update({str(k): redact(str(v)) for k, v in tags.items()})
        self._deliver()

    def flush(self) -> bool:
        """Try to deliver everything buffered now; True when nothing is left waiting."""
        if self._finished:
            return True
        return self._deliver(force=True)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush, then end the run with ``status``; calling it again does nothing."""
        if status not in RUN_STATUSES:
            raise ValueError(f"finish(status={status!r}): allowed: {', '.join(RUN_STATUSES)}")
        if self._finished:
            return
        if self._deliver(force=True):
            try:
                self._client.set_terminated(self._run_id, status=status)
            except Exception as exc:  # MLflow's failure must not become the training's
                logger.warning(
                    "could not mark MLflow run %s %s: %s",
                    self._run_id,
                    status,
                    redact(str(exc)),
                )
        else:
            logger.warning(
                "MLflow at %s still unreachable at finish; NOT logged: %s%s",
                redact(self.tracking_uri),
                self._describe_pending(),
                "" if self._run_ready else " (and the run itself was never opened)",
            )
        self._finished = True
        self._metrics.clear()
        self._artifacts.clear()
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)

    # Delivery -------------------------------------------------------------------------------

    def _refuse_after_finish(self, what: str) -> bool:
        if self._finished:
            logger.warning("%s called after finish(); ignored (run %s)", what, self._run_id)
        return self._finished

    def _buffer_point(self, point: Metric) -> None:
        if len(self._metrics) == self._metrics.maxlen:
            if self._dropped_points == 0:
                logger.warning(
                    "MLflow metric buffer full (%d points): dropping the oldest points until "
                    "MLflow at %s is reachable again",
                    self._metrics.maxlen,
                    redact(self.tracking_uri),
                )
            self._dropped_points += 1
        self._metrics.append(point)  # a full deque drops its oldest item

    def _deliver(self, force: bool = False) -> bool:
        """Open the run if needed and send everything buffered; False if MLflow failed."""
        outage = self._down_since is not None
        if outage and not force and time.monotonic() - self._last_attempt < self.retry_interval_s:
            return False
        self._last_attempt = time.monotonic()
        try:
            self._ensure_run()
            self._send_tags()
            self._send_metrics()
            self._send_artifacts()
        except Exception as exc:  # network, HTTP 5xx, a locked database: all worth a retry
            if not outage:
                self._down_since = time.monotonic()
                logger.warning(
                    "MLflow at %s unreachable (%s); buffering %s; retrying on later calls "
                    "(at most every %.0f s) and in flush()/finish()",
                    redact(self.tracking_uri),
                    redact(str(exc).splitlines()[0][:300] if str(exc) else repr(exc)),
                    self._describe_pending(),
                    self.retry_interval_s,
                )
            return False
        if outage:
            logger.info(
                "MLflow at %s reachable again after %.0f s; buffered data delivered%s",
                redact(self.tracking_uri),
                time.monotonic() - self._down_since,
                f" except the {self._dropped_points} oldest metric points"
                if self._dropped_points
                else "",
            )
            self._down_since = None
            self._dropped_points = self._dropped_artifacts = 0
        return True

    def _describe_pending(self) -> str:
        keys = sorted({m.key for m in self._metrics})
        text = f"{len(self._metrics)} metric points"
        if keys:
            text += f" ({', '.join(keys[:10])}{', ...' if len(keys) > 10 else ''})"
        text += f", {len(self._artifacts)} artifacts, {len(self._tags)} tags"
        if self._dropped_points or self._dropped_artifacts:
            text += (
                f"; dropped already: {self._dropped_points} metric points, "
                f"{self._dropped_artifacts} artifacts"
            )
        return text

    def _ensure_run(self) -> None:
        """Create or resume the run, set it RUNNING and log its params; done once per Tracker."""
        if self._run_ready:
            return
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        if self._run_id is None:
            self._run_id = self._resumable_run_id()
        if self._run_id is None:
            self._run_id = self._client.create_run(
                self._experiment_id, run_name=self.cfg.name
            ).info.run_id
        # Read back rather than assume: an earlier attempt may have died halfway through.
        run = self._client.get_run(self._run_id)
        self._experiment_id = run.info.experiment_id
        if self._resume_id is not None and self._skip_logged_steps:
            # A resumed run replays the steps after its checkpoint, and the crash may have come
            # after an evaluation was logged but before its checkpoint was registered: points
            # at or below what MLflow holds already are not sent twice (deterministic replay
            # gives the same values; MLflow would otherwise show the step twice).
            self._logged_upto = {
                key: max(m.step for m in self._client.get_metric_history(self._run_id, key))
                for key in run.data.metrics
            }
        if run.info.status != "RUNNING":
            self._client.update_run(self._run_id, status="RUNNING")
        self._log_params(run.data.params)
        self._run_ready = True

    def _get_or_create_experiment(self) -> str:
        name = self.cfg.tracking.experiment
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self._client.create_experiment(name, artifact_location=self._artifact_location)
        except MlflowException as exc:
            # Another process (a parallel Tune trial) created it between our two calls.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._client.get_experiment_by_name(name).experiment_id

    def _resumable_run_id(self) -> str | None:
        """The run to resume, or None (start a new one) when this store does not have it."""
        if self._resume_id is None:
            return None
        try:
            run = self._client.get_run(self._resume_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            logger.warning(
                "MLflow run %s (to resume) not found at %s; starting a new run",
                self._resume_id,
                redact(self.tracking_uri),
            )
            self._resume_id = None
            return None
        return run.info.run_id

    def _log_params(self, existing: dict[str, str]) -> None:
        # MLflow params are immutable: a resumed run keeps the values it started with.
        changed = sorted(k for k, v in self._params.items() if k in existing and existing[k] != v)
        if changed:
            logger.warning(
                "resumed MLflow run %s keeps its original params; changed since: %s",
                self._run_id,
                ", ".join(f"{k}: {existing[k]!r} -> {self._params[k]!r}" for k in changed),
            )
        new = [Param(k, v) for k, v in self._params.items() if k not in existing]
        for start in range(0, len(new), _PARAMS_PER_BATCH):
            self._client.log_batch(
                self._run_id, params=new[start : start + _PARAMS_PER_BATCH], synchronous=True
            )

    def _send_tags(self) -> None:
        while self._tags:
            chunk = dict(islice(self._tags.items(), _PARAMS_PER_BATCH))
            tags = [RunTag(k, v) for k, v in chunk.items()]
            self._send_or_drop(
                partial(self._client.log_batch, self._run_id, tags=tags, synchronous=True),
                f"tags {sorted(chunk)}",
            )
            for key in chunk:
                del self._tags[key]

    def _send_metrics(self) -> None:
        while self._metrics:
            window = list(islice(self._metrics, _METRICS_PER_BATCH))
            batch = [p for p in window if p.step > self._logged_upto.get(p.key, -1)]
            try:
                if batch:
                    self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
            except Exception as exc:
                if not _is_permanent(exc):
                    raise
                # One bad key (say, an invalid name) must not cost the other keys their points.
                by_key: dict[str, list[Metric]] = {}
                for point in batch:
                    by_key.setdefault(point.key, []).append(point)
                for key, points in by_key.items():
                    self._send_or_drop(
                        partial(
                            self._client.log_batch, self._run_id, metrics=points, synchronous=True
                        ),
                        f"metric {key!r} ({len(points)} points)",
                    )
            for _ in window:
                self._metrics.popleft()

    def _send_artifacts(self) -> None:
        while self._artifacts:
            path, artifact_dir, spooled = self._artifacts[0]
            upload = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
            self._send_or_drop(
                partial(upload, self._run_id, str(path), artifact_dir), f"artifact {path.name}"
            )
            self._artifacts.popleft()
            if spooled:
                shutil.rmtree(path.parent, ignore_errors=True)

    def _send_or_drop(self, send: Callable[[], Any], what: str) -> None:
        """Run ``send``; a permanent MLflow error drops ``what`` (logged), others propagate."""
        try:
            send()
        except Exception as exc:
            if not _is_permanent(exc):
                raise
            logger.warning(
                "MLflow rejected %s; dropped: %s", what, redact(str(exc).splitlines()[0])
            )

    def _spool_pending(self) -> None:
        """Copy files still waiting for upload, so the caller may delete or overwrite its own."""
        for i, (path, artifact_dir, spooled) in enumerate(self._artifacts):
            if spooled:
                continue
            if self._spool is None:
                self._spool = Path(tempfile.mkdtemp(prefix="raygan-mlflow-spool-"))
            target = Path(tempfile.mkdtemp(dir=self._spool)) / path.name
            if path.is_dir():
                shutil.copytree(path, target)
            else:
                shutil.copy2(path, target)
            self._artifacts[i] = (target, artifact_dir, True)
