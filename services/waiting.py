"""What a Ray job says while its workers cannot be placed (a node lost, a busy cluster).

Ray Train restarts a failed worker group and then waits for a placement group of all its workers;
by default it gives up on the group after 60 s, logs a traceback and tries again, for ever. raygan
instead waits ``resources.wait_timeout`` seconds in one attempt (Ray's worker-group start timeout),
says once what it waits for, says when the resources are back (the run resumes from its last
checkpoint), and on timeout stops with one line and exit status 4 (``ResourcesUnavailable``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

# Ray Train reads its worker-group start timeout from the environment of the driver (it forwards
# the variable to its controller): the only way to set it.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
EXIT_NO_RESOURCES = 4


class ResourcesUnavailable(RuntimeError):
    """The workers could not be placed within ``resources.wait_timeout``."""


def set_start_timeout(wait_timeout: float) -> None:
    """Make Ray Train wait ``wait_timeout`` s for a worker group before it gives up on it."""
    os.environ[START_TIMEOUT_ENV] = str(float(wait_timeout))


def is_start_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` (what ``fit()`` raised) is Ray Train giving up on placing the workers."""
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        err = stack.pop()
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        if type(err).__name__ == "WorkerGroupStartupTimeoutError":
            return True
        # Ray Train wraps it: TrainingFailedError -> ControllerError.controller_failure.
        stack += [err.__cause__, err.__context__, getattr(err, "controller_failure", None)]
    return False


def _fmt(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or k.startswith("accel")}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items())) or "nothing"


class ResourceWatch:
    """A driver thread: while this job has a placement group pending for ``announce_after_s``,
    print one line saying what it waits for; print one more when it is placed again."""

    def __init__(
        self,
        wait_timeout: float,
        out: TextIO | None = None,
        poll_s: float = 2.0,
        announce_after_s: float = 10.0,
    ) -> None:
        self.wait_timeout = wait_timeout
        self.out = out or sys.stdout
        self.poll_s = poll_s
        self.announce_after_s = announce_after_s
        self.situation = ""  # what it waited for when last announced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ResourceWatch:
        self._thread = threading.Thread(target=self._loop, name="raygan-resources", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def _pending(self, job: str) -> list[dict[str, Any]]:
        import ray

        table = ray.util.placement_group_table()
        return [
            pg
            for pg_id, pg in table.items()
            # A placement group's ID ends with its job's ID: other jobs' groups are not ours.
            if pg_id.endswith(job) and pg.get("state") == "PENDING"
        ]

    def _describe(self, pending: list[dict[str, Any]], since: float) -> str:
        import ray

        bundles = [b for pg in pending for b in pg.get("bundles", {}).values()]
        need: dict[str, float] = {}
        for bundle in bundles:
            for key, value in bundle.items():
                need[key] = need.get(key, 0.0) + float(value)
        nodes = ray.nodes()
        alive = sum(bool(n.get("Alive")) for n in nodes)
        lost = len(nodes) - alive
        free = ray.available_resources()
        total = ray.cluster_resources()
        give_up = (
            time.strftime("%H:%M:%S", time.localtime(since + self.wait_timeout))
            if self.wait_timeout < 10**9
            else "never"
        )
        self.situation = (
            f"{len(bundles)} workers ({_fmt(need)} in all): the cluster has "
            f"{_fmt(free)} free of {_fmt(total)} on {alive} node(s)"
            + (f", {lost} node(s) lost" if lost else "")
        )
        return (
            f"[raygan] waiting since {time.strftime('%H:%M:%S', time.localtime(since))} for "
            f"{self.situation}; the run resumes from its last checkpoint when they come, or "
            f"stops at {give_up} (resources.wait_timeout={self.wait_timeout:g} s)"
        )

    def _loop(self) -> None:
        import ray

        try:
            job = ray.get_runtime_context().get_job_id()
        except Exception:
            return
        since: float | None = None
        announced = False
        while not self._stop.wait(self.poll_s):
            try:
                pending = self._pending(job)
                if pending:
                    since = since or time.time()
                    if not announced and time.time() - since >= self.announce_after_s:
                        self._say(self._describe(pending, since))
                        announced = True
                else:
                    if announced and since is not None:
                        self._say(
                            f"[raygan] the workers are placed again after "
                            f"{time.time() - since:.0f} s of waiting; resuming"
                        )
                    since, announced = None, False
            except Exception:  # a GCS hiccup must not end the job; the next poll tries again
                continue


def quiet_start_timeout_callback() -> Any:
    """A Ray Train controller callback that keeps Ray's traceback of a worker-group start
    timeout out of the driver's output: raygan says it in one line (``ResourcesUnavailable``).
    Ray Train runs the ``ControllerCallback``s of ``RunConfig.callbacks`` in its controller's
    process, the only place that logger lives (an internal Ray class: Ray 2.60's layout)."""
    import logging

    from ray.train.v2._internal.execution.callback import ControllerCallback

    class _DropStartTimeout(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            return type(exc).__name__ != "WorkerGroupStartupTimeoutError"

    class QuietStartTimeout(ControllerCallback):
        def after_controller_start(self, train_run_context: Any) -> None:
            name = "ray.train.v2._internal.execution.controller.controller"
            logging.getLogger(name).addFilter(_DropStartTimeout())

    return QuietStartTimeout()
