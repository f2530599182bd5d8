"""The one way into Ray Train: every job and every Tune trial starts Ray and builds its trainer
here.

- ``init_ray`` joins a cluster (``--address`` or ``RAY_ADDRESS``) or starts a private one on
  127.0.0.1 with the dashboard on (Tune needs it, and Ray Train's placement-group cleaner finds
  its cluster through it).
- ``for_workers`` makes a config safe to ship: Ray Train V2 runs every worker in a working
  folder of its own under Ray's session folder, so a relative path (the default ``./runs``, a
  relative ``data.path``) would mean another place on a worker than where the user started the
  job. Local paths become absolute here, on the driver, and the default MLflow store with them.
- ``make_trainer`` builds the ``TorchTrainer``: scaling, failures, checkpoints kept by the
  config's metric, storage, and for file data a Ray Data dataset that each worker reads its
  own shard of (services/ray_data.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gan_core.config import FILE_DATA, GanConfig, checkpoint_metric, to_dict
from services import ray_procs
from services.storage import open_storage, ray_storage_args

log = logging.getLogger("raygan")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_ray(
    address: str | None = None, verbose: bool = False, num_cpus: int | None = None
) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start a private Ray on 127.0.0.1.

    The private cluster's address is "local": always a new cluster, never a stale ``ray start``
    one found on disk. Its dashboard address goes to every process: by default Ray Train's
    placement-group cleaner searches the machine for "the" Ray instance and gives up ("Found
    multiple active Ray instances") when another Ray runs on the same machine; a trial stopped
    by a Tune scheduler would then leak its CPUs and the next trial wait for ever.

    Before a private Ray starts, what an earlier raygan driver under the same Ray temporary
    folder left running when it was killed is stopped (``stop_leftovers``). The private Ray
    listens on 127.0.0.1 only (``_loopback_node``); a listener found elsewhere once it is up is
    named in a warning (``warn_unless_loopback``).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if verbose else logging.WARNING
    if address:
        runtime_env = None
        if re.fullmatch(r"[\w.-]+:\d+", address):
            # Ray Train's placement-group cleaner looks for "the" Ray of the machine unless told
            # (as for the private cluster below); with another Ray on the machine it fails with
            # a traceback each second. A job's own RAY_ADDRESS (ray job submit) is this form too.
            runtime_env = {"env_vars": {"RAY_ADDRESS": address}}
        ray.init(address=address, logging_level=level, log_to_driver=True, runtime_env=runtime_env)
        return
    stop_leftovers(ray_procs.temp_root())
    port = _free_port()
    with _loopback_node():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            _node_ip_address="127.0.0.1",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            logging_level=level,
            configure_logging=True,
            log_to_driver=True,
            runtime_env={
                "env_vars": {
                    "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                    # Ray Data logs two INFO lines per pass over a data set from its
                    # coordinator actor (a 50,000-row file gave 60 of them in one run): quiet
                    # unless verbose.
                    **({} if verbose else {"RAY_DATA_LOG_LEVEL": "WARNING"}),
                    **_loopback_worker_env(),
                }
            },
        )
    session = os.path.join(ray_procs.temp_root(), ray.get_runtime_context().get_session_name())
    try:
        # At once: a driver killed from here on leaves processes the next start can find.
        ray_procs.claim(session)
    except OSError as err:
        log.warning("the next private Ray cannot stop what this one leaves if killed: %s", err)
    warn_unless_loopback(session)


def _loopback_worker_env() -> dict[str, str]:
    """Worker variables that keep what Train's workers open on loopback. gloo (the CPU
    collectives) listens on the address of GLOO_SOCKET_IFNAME's interface, else on whatever
    the host name resolves to (the machine's network address on most hosts, measured with
    eth0): every rank of a private Ray is on this machine, so "lo" serves. A user's own
    setting stays."""
    if not sys.platform.startswith("linux") or "GLOO_SOCKET_IFNAME" in os.environ:
        return {}
    return {"GLOO_SOCKET_IFNAME": "lo"}


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While a private Ray starts, its node address stays 127.0.0.1.

    Ray decides its bind addresses from the node address: the GCS, raylet, worker and
    dashboard-agent gRPC servers listen on 127.0.0.1 only when it is exactly 127.0.0.1 (else on
    every interface), the agents' HTTP servers and metrics exporter on it. But
    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not kept: ``ray.init`` passes it through
    ``services.resolve_ip_for_localhost``, which swaps a loopback address for the machine's
    network address unless ``ray_constants.ENABLE_RAY_CLUSTER`` is false (its variable
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is read once, when ray is imported: usually before this).
    Ray 2.60 has no other bind-host setting for these servers. The flag is false for the
    ``ray.init`` call only; afterwards the node's own address (127.0.0.1) answers that question
    in this process, and Ray's processes get it on their command lines.
    """
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def stop_leftovers(temp_root: str) -> list[ray_procs.RayProc]:
    """Stop the processes of earlier raygan private Rays under ``temp_root`` whose driver is
    gone, and log one line saying which (and any that would not stop). Returns them.

    A driver killed with SIGKILL gets no ``ray.shutdown``: its dashboard agent and runtime-env
    agent stay up, orphaned, about two minutes (about 215 MB), the agent holding the fixed
    dashboard-agent port 52365 that the next private Ray's agent then fails to bind. Only
    processes of a session folder raygan claimed (``ray_procs.DRIVER_FILE``) for a driver no
    longer running are signalled, by pid with their start time checked: a Ray the user
    started, or one whose driver lives, is never touched.
    """
    dead = ray_procs.leftovers(temp_root)
    found = [p for procs in dead.values() for p in procs]
    if not found:
        return []
    left = ray_procs.stop(found)

    def names(procs: list[ray_procs.RayProc]) -> str:
        return ", ".join(f"{p.name} (pid {p.pid})" for p in procs)

    drivers = ", ".join(str(o.pid) for o in sorted(dead, key=lambda o: o.pid))
    stopped = [p for p in found if p not in left]
    line = f"stopped {len(stopped)} Ray process(es) left by killed raygan driver(s) {drivers}"
    line += f": {names(stopped)}" if stopped else ""
    if left:
        line += f"; still running, could not stop: {names(left)}"
    log.warning("%s", line)
    return found


def warn_unless_loopback(session_dir: str) -> list[ray_procs.Listener]:
    """Log one warning line naming each process of the private Ray in ``session_dir`` (this
    driver included) that listens anywhere but on loopback; returns those listeners. None is
    expected since ``_loopback_node``: this says so if a Ray version binds otherwise."""
    pids = ray_procs.session_pids(session_dir)
    exposed = [s for s in ray_procs.listeners(pids) if not s.loopback]
    if exposed:
        log.warning(
            "the private Ray listens beyond 127.0.0.1, reachable from the network: %s",
            "; ".join(str(s) for s in exposed),
        )
    return exposed


def _absolute(path: str) -> str:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def for_workers(cfg: GanConfig) -> GanConfig:
    """``cfg`` with local storage and data paths absolute, and the default MLflow store (an
    SQLite file beside local storage) spelled out, so every process resolves them alike."""
    from services.tracking import default_tracking_uri

    storage = dataclasses.replace(cfg.storage, uri=_absolute(cfg.storage.uri.strip()))
    data = cfg.data
    if data.name in FILE_DATA:
        data = dataclasses.replace(data, path=_absolute(data.path))
    tracking = cfg.tracking
    if tracking.enabled and not tracking.uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        # From the environment the URI may carry a password; it then stays out of the config
        # (which MLflow logs as params) and reaches the workers as the environment variable.
        tracking = dataclasses.replace(tracking, uri=default_tracking_uri(storage.uri))
    return dataclasses.replace(cfg, storage=storage, data=data, tracking=tracking)


def worker_threads(cfg: GanConfig) -> int:
    """Torch threads for a process that trains ``cfg`` outside a Ray Train worker (the local
    backend, an in-process Tune trial): what Ray gives a worker (OMP_NUM_THREADS = its whole
    CPUs, at least 1) unless ``train.threads`` says otherwise. Another thread count sums in
    another order, and the backends would drift apart."""
    return cfg.train.threads or max(1, int(cfg.resources.cpus_per_worker))


def worker_cpus(cfg: GanConfig, streams_files: bool) -> float:
    """CPUs each Train worker asks for. Ray Train reserves its workers' CPUs before Ray Data
    sees the cluster; workers that take every CPU leave Ray Data's read and decode tasks none,
    and the job hangs waiting for them. Where that would happen, the workers share what is left
    after ``ray_data.DATA_CPUS`` (a CPU is a scheduling unit, not a core: they still run)."""
    import ray

    from services.ray_data import DATA_CPUS

    r = cfg.resources
    if not streams_files:
        return r.cpus_per_worker
    total = float(ray.cluster_resources().get("CPU", 0.0))
    if r.num_workers * r.cpus_per_worker + DATA_CPUS <= total or total <= DATA_CPUS:
        return r.cpus_per_worker
    cpus = round((total - DATA_CPUS) / r.num_workers, 3)
    log.warning(
        "%d workers x resources.cpus_per_worker=%g would leave Ray Data no CPU of the "
        "cluster's %g to read and decode with; each worker asks for %g",
        r.num_workers,
        r.cpus_per_worker,
        total,
        cpus,
    )
    return cpus


def make_trainer(
    cfg: GanConfig,
    loop_config: dict[str, Any],
    *,
    run_name: str | None = None,
    callbacks: list[Any] | None = None,
    verbose: bool = False,
    trainer_cls: type | None = None,
) -> Any:
    """The ``TorchTrainer`` that runs ``services.worker.train_loop_per_worker`` for ``cfg``.

    ``loop_config`` holds the worker's switches; ``"gan"`` (the config, made safe by
    ``for_workers``) is added here. The Train run is named ``run_name`` (default ``cfg.name``);
    rerunning a name on the same storage resumes it.
    """
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from services.ddp_store import LoopbackTorchConfig, all_nodes_on_loopback
    from services.waiting import quiet_start_timeout_callback, set_start_timeout
    from services.worker import train_loop_per_worker

    cfg = for_workers(cfg)
    r, c = cfg.resources, cfg.checkpoint
    metric, order = checkpoint_metric(cfg)
    datasets, loop_config = None, {**loop_config, "gan": to_dict(cfg)}
    if cfg.data.name in FILE_DATA:
        from services.preflight import open_data
        from services.ray_data import DATASET, train_dataset

        # Checked already (preflight, or the sweep's plan): only described here, once, and the
        # description shipped to the workers (they read no listing or footer themselves).
        data = open_data(cfg, check=False)
        datasets = {DATASET: train_dataset(data, verbose)}
        loop_config["file_data"] = data
    cpus = worker_cpus(cfg, datasets is not None)
    set_start_timeout(r.wait_timeout)
    backend = "nccl" if r.use_gpu else "gloo"
    # A cluster all on this machine (the private Ray) meets at a store on 127.0.0.1; torch's
    # default store listens on every interface (services/ddp_store.py).
    torch_config = (
        LoopbackTorchConfig(backend=backend)
        if all_nodes_on_loopback()
        else TorchConfig(backend=backend)
    )
    return (trainer_cls or TorchTrainer)(
        train_loop_per_worker,
        train_loop_config=loop_config,
        # NCCL between GPUs, gloo on CPU (gloo is also what DDP's CPU tests compare against).
        torch_config=torch_config,
        scaling_config=ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.use_gpu,
            resources_per_worker={"CPU": cpus} | ({"GPU": 1} if r.use_gpu else {}),
        ),
        datasets=datasets,
        run_config=RunConfig(
            name=run_name or cfg.name,
            callbacks=[*(callbacks or []), quiet_start_timeout_callback()],
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            # A worker group that cannot be placed is not retried every 60 s for ever: Ray waits
            # resources.wait_timeout in one attempt, then fit() raises (services/waiting.py).
            failure_config=FailureConfig(max_failures=r.max_failures, controller_failure_limit=0),
            # raygan's own switches (e.g. fault injection in tests) reach the workers; credentials
            # are deliberately not forwarded here (the job API would show them to its readers).
            worker_runtime_env={
                "env_vars": {k: v for k, v in os.environ.items() if k.startswith("RAYGAN_")}
            },
            checkpoint_config=CheckpointConfig(
                num_to_keep=c.keep,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=order,
            ),
            **ray_storage_args(open_storage(cfg.storage)),
        ),
    )
