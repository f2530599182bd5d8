"""Shared plumbing for benchmarks: machine facts, JSON rows, markdown tables, parallel runs."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).parent / "out"


@contextlib.contextmanager
def private_ray(name: str, num_cpus: int = 2) -> Iterator[Path]:
    """A private Ray (as tuning.sweep starts it) for a benchmark that runs sweeps; yields a
    fresh working folder. RAY_TMPDIR is a short fresh folder (Ray's socket paths must stay
    under 108 bytes), set before ray.init so every Ray process inherits it; Ray is shut down
    and both folders are removed afterwards."""
    import ray

    from services.launch import init_ray

    ray_tmp = tempfile.mkdtemp(prefix="rgb", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    root = Path(tempfile.mkdtemp(prefix=f"raygan-{name}-"))
    init_ray(num_cpus=num_cpus)
    try:
        yield root
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cpu_model() -> str:
    """The CPU's model name and its widest vector unit: MKL picks its kernels by CPU, so the same
    seed trains to other numbers, at another speed, on another CPU (docs/RESULTS.md)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), ""
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    vector = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "")
    return f"{model}, {vector}" if model and vector else model


def machine() -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run_parallel(
    fn: Callable[..., Any],
    jobs: list[tuple],
    workers: int,
    on_result: Callable[[Any], None] | None = None,
) -> list[Any]:
    """Run ``fn(*job)`` for every job in ``workers`` spawned processes (one torch thread each);
    ``on_result`` sees each result as soon as it is done (so long runs can be resumed)."""
    results = []
    if workers <= 1:
        for job in jobs:
            results.append(fn(*job))
            if on_result is not None:
                on_result(results[-1])
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for future in as_completed(futures):
            results.append(future.result())
            if on_result is not None:
                on_result(results[-1])
    return results
