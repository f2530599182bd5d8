"""A file data set larger than a worker's memory, trained under Ray: streamed vs in memory.

    python -m bench.streaming [--size-gb 2.0] [--steps 200] [--data PATH] [--keep-data]
                              [--modes streamed,in_memory,streamed_default_cpus,...]

Protocol:
  1. Data: a folder of ``--files`` (16) Parquet files (Hugging Face image layout: PNG bytes in
     ``image``, int ``label``) of at least ``--size-gb`` x 1e9 bytes, built with
     gan_core.datasets from the 8x8 digits upsampled to ``--image-size`` (32), jittered by +-4
     px, with Gaussian pixel noise (std ``--noise`` = 32, so the PNGs barely compress: decoded
     uint8 is about the file size); ``--build-procs`` processes write the files. ``--data PATH``
     reuses an existing file or folder (never deleted).
  2. Jobs: ``python -m services.train`` as a subprocess with a private Ray (RAY_ADDRESS unset,
     RAY_TMPDIR a short /tmp folder), 2 Ray Train workers, ``--steps`` steps of a small DCGAN
     (z 32, width 16, batch 64 per worker, 1 torch thread), eval and checkpoint every
     min(100, steps/2), tracking off, resources.cpus_per_worker=``--cpus-per-worker`` (0.5).
     Modes, all on the same files:
       streamed              data.cache_mb=0: Ray Data tasks read and decode while training
       in_memory             data.cache_mb above the decoded size: decoded once and
                             materialized in Ray's object store before fit() starts (a subset
                             of the files if the store, Ray's default 30 % of the memory
                             available, cannot hold it; said so)
       streamed_default_cpus streamed with the service's default resources.cpus_per_worker
       streamed_small_store  streamed with an object store of --small-store-fraction of the
                             available memory (RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION)
     A job is killed after --timeout s, or --hang-grace s after Ray Data logs that it cannot
     get the resources for any task if no step follows ("HUNG"). The label classifier the
     evaluation uses is trained once beforehand (RAYGAN_CACHE), so no mode pays for it.
  3. Memory: every 0.5 s, every process of the job's tree (the driver and all its
     descendants: Ray's raylet, GCS, workers...) is sampled: RSS and RssShmem from
     /proc/PID/status, USS (private pages, what psutil calls USS) from /proc/PID/smaps_rollup.
     A process's role comes from its command line / title at that sample (ray::RayTrainWorker,
     ray::SplitCoordinator, ray::ReadFiles... / MapBatches tasks, ray::IDLE pool workers,
     raylet (it hosts the plasma object store), ...). RSS counts the object-store pages a
     process has touched (RssShmem); USS counts its private pages only. Machine: MemTotal -
     MemAvailable (includes the object store's /dev/shm pages, and whatever else runs on this
     shared machine) and Shmem from /proc/meminfo, plus the bytes Ray spilled under RAY_TMPDIR.
  4. Speed: steps/s of the last evaluation window from the job's --summary-json (steady state),
     fit() seconds from the summary, the subprocess's wall time, and the time to the first
     progress line. The in-memory mode decodes the data set before fit() starts: that time is
     in its wall time, not in fit().
Writes bench/out/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from bench.common import machine, table, write_json

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
SAMPLE_S = 0.5

# Roles, first match wins; checked against the process's command line (Ray sets a worker's
# title to ray::<actor or task>, and back to ray::IDLE when a pooled worker is free).
ROLES: list[tuple[str, Callable[[str], bool]]] = [
    ("train_worker", lambda c: "RayTrainWorker" in c),
    ("split_coordinator", lambda c: "SplitCoordinator" in c),
    ("train_controller", lambda c: "TrainController" in c),
    (
        "data_task",
        lambda c: (
            c.startswith("ray::")
            and any(k in c for k in ("Read", "MapBatches", "Map(", "ListFiles", "_map_task"))
        ),
    ),
    ("idle_worker", lambda c: c.startswith("ray::IDLE")),
    ("raylet+plasma", lambda c: "/raylet" in c.split(" ", 1)[0] or c.startswith("raylet")),
    ("gcs", lambda c: "gcs_server" in c),
    ("dashboard", lambda c: "dashboard" in c),
    ("other_ray_worker", lambda c: c.startswith("ray::")),
]


def role_of(cmdline: str, pid: int, driver_pid: int) -> str:
    """The role of a process of the job from its command line (title) at one sample."""
    if pid == driver_pid:
        return "driver"
    for role, match in ROLES:
        if match(cmdline):
            return role
    return "other"


# --- memory sampling ----------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def processes() -> dict[int, tuple[int, str]]:
    """Every process of the machine: pid -> (parent pid, command line as one string)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if not stat:
            continue
        # The command name (field 2) is in parentheses and may hold spaces: split after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        cmdline = _read(f"/proc/{entry}/cmdline").replace("\0", " ").strip()
        out[int(entry)] = (int(fields[1]), cmdline)
    return out


def _title(cmdline: str) -> str:
    """A short title for a command line: the program's base name and its arguments, so that a
    long interpreter path (a virtual environment deep in a CI checkout) does not crowd out
    what the process runs."""
    program, _, args = cmdline.partition(" ")
    return f"{os.path.basename(program)} {args}".strip()[:80]


def descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    """``root`` and every process below it in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root] if root in table else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def memory_of(pid: int) -> tuple[int, int, int]:
    """(RSS, USS, RssShmem) of a process in bytes: VmRSS and RssShmem from /proc/PID/status,
    USS = Private_Clean + Private_Dirty + Private_Hugetlb from /proc/PID/smaps_rollup (what
    psutil's memory_full_info reads); zeros for what cannot be read."""
    rss = shm = uss = 0
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("RssShmem:"):
            shm = int(line.split()[1]) * 1024
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")):
            uss += int(line.split()[1]) * 1024
    return rss, uss, shm


def meminfo() -> dict[str, int]:
    """MemTotal, MemAvailable and Shmem of the machine, in bytes."""
    out = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable", "Shmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def folder_bytes(root: Path, name_part: str) -> int:
    """Bytes of the files under folders of ``root`` whose name contains ``name_part``."""
    total = 0
    for folder, _, files in os.walk(root):
        if name_part in folder:
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
    return total


class Sampler(threading.Thread):
    """Samples the memory of a process tree every ``interval`` s until ``stop()``.

    ``samples`` is a list of ``(t, procs, machine)``: ``procs`` a list of
    ``(pid, role, rss, uss, rss_shmem)``, ``machine`` ``{"used", "shmem", "spilled"}``."""

    def __init__(
        self, root_pid: int, interval: float = SAMPLE_S, spill_root: Path | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.interval, self.spill_root = root_pid, interval, spill_root
        self.samples: list[tuple[float, list[tuple[int, str, int, int, int]], dict]] = []
        self.started = time.perf_counter()
        self._stop_event = threading.Event()
        self._spilled = 0
        # Which titles each role had (a few per role): what "other" really was.
        self.titles: dict[str, set[str]] = {}

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        tick = 0
        while not self._stop_event.is_set():
            self.sample(spill=tick % 4 == 0)
            tick += 1
            self._stop_event.wait(self.interval)

    def sample(self, spill: bool = True) -> None:
        table = processes()
        rows = []
        for pid in descendants(self.root_pid, table):
            rss, uss, shm = memory_of(pid)
            if rss:  # gone meanwhile (or a zombie)
                role = role_of(table[pid][1], pid, self.root_pid)
                rows.append((pid, role, rss, uss, shm))
                seen = self.titles.setdefault(role, set())
                if len(seen) < 12:
                    seen.add(_title(table[pid][1]))
        info = meminfo()
        if spill and self.spill_root is not None:
            self._spilled = folder_bytes(self.spill_root, "spill")
        self.samples.append(
            (
                time.perf_counter() - self.started,
                rows,
                {
                    "used": info["MemTotal"] - info["MemAvailable"],
                    "shmem": info["Shmem"],
                    "spilled": self._spilled,
                },
            )
        )


def aggregate(samples: list[tuple[float, list[tuple[int, str, int, int, int]], dict]]) -> dict:
    """Peaks of a run's samples (bytes): per train worker (by pid), per role (the largest
    single process and the largest sum over the role's processes at one sample), machine."""
    workers: dict[int, dict[str, int]] = {}
    roles: dict[str, dict[str, int]] = {}
    machine_peak = {"used": 0, "shmem": 0, "spilled": 0}
    for _, rows, mach in samples:
        sums: dict[str, list[int]] = {}
        for pid, role, rss, uss, shm in rows:
            if role == "train_worker":
                w = workers.setdefault(pid, {"rss": 0, "uss": 0, "rss_shmem": 0})
                w["rss"], w["uss"] = max(w["rss"], rss), max(w["uss"], uss)
                w["rss_shmem"] = max(w["rss_shmem"], shm)
            r = roles.setdefault(
                role, {"max_rss": 0, "max_uss": 0, "max_sum_rss": 0, "max_sum_uss": 0, "procs": 0}
            )
            r["max_rss"], r["max_uss"] = max(r["max_rss"], rss), max(r["max_uss"], uss)
            s = sums.setdefault(role, [0, 0, 0])
            s[0], s[1], s[2] = s[0] + rss, s[1] + uss, s[2] + 1
        for role, (rss, uss, count) in sums.items():
            r = roles[role]
            r["max_sum_rss"], r["max_sum_uss"] = (
                max(r["max_sum_rss"], rss),
                max(r["max_sum_uss"], uss),
            )
            r["procs"] = max(r["procs"], count)
        for key in machine_peak:
            machine_peak[key] = max(machine_peak[key], int(mach.get(key, 0)))
    return {
        "train_workers": [workers[pid] | {"pid": pid} for pid in sorted(workers)],
        "roles": roles,
        "machine": machine_peak,
    }


def worker_rss_at(samples: list, t: float | None) -> int | None:
    """The larger train worker's RSS at the last sample at or before ``t`` (s since start)."""
    if t is None:
        return None
    best = None
    for when, rows, _ in samples:
        if when > t:
            break
        rss = [r[2] for r in rows if r[1] == "train_worker"]
        if rss:
            best = max(rss)
    return best


def worker_timeline(samples: list, every_s: float = 5.0) -> list[dict]:
    """Train workers' RSS/USS and the machine's used memory about every ``every_s`` seconds."""
    out, next_t = [], 0.0
    for t, rows, mach in samples:
        if t < next_t:
            continue
        next_t = t + every_s
        out.append(
            {
                "t": round(t, 1),
                "worker_rss_mib": [round(r[2] / MiB) for r in rows if r[1] == "train_worker"],
                "worker_uss_mib": [round(r[3] / MiB) for r in rows if r[1] == "train_worker"],
                "machine_used_mib": round(mach["used"] / MiB),
                "shmem_mib": round(mach["shmem"] / MiB),
            }
        )
    return out


# --- the data -----------------------------------------------------------------------------------


def _write_part(out: str, seed: int, rows: int, size: int, noise: float) -> dict:
    from gan_core.datasets import DIGIT_CLASSES, _take, digit_images, write_image_parquet

    copies = math.ceil(rows / 1797) + 1
    chunks = _take(digit_images("all", size, copies, 4, noise, seed), rows)
    return write_image_parquet(chunks, out, class_names=DIGIT_CLASSES)


def png_bytes_per_row(size: int, noise: float, n: int = 500) -> float:
    """Mean PNG size of ``n`` jittered, noisy digits (pass 1 of the generator)."""
    from gan_core.datasets import _png, digit_images

    for copy, (images, _) in enumerate(digit_images("all", size, 2, 4, noise, 0)):
        if copy * len(images) >= 1797:  # the first chunk of pass 1 (pass 0 is clean)
            break
    sample = images[:n]
    return sum(len(_png(img)) for img in sample) / len(sample)


def build_data(
    folder: Path, target_bytes: int, size: int, noise: float, procs: int, files: int
) -> dict:
    """``files`` part files under ``folder``, written by ``procs`` processes, adding up to at
    least ``target_bytes`` (a small extra part tops them up if the estimate fell short)."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    per_row = png_bytes_per_row(size, noise)
    rows = math.ceil(target_bytes / per_row * 1.02)
    shares = [rows // files + (i < rows % files) for i in range(files)]
    jobs = [
        (str(folder / f"part-{i:05d}.parquet"), i, n, size, noise) for i, n in enumerate(shares)
    ]
    if procs <= 1:
        parts = [_write_part(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(_write_part, *zip(*jobs, strict=True)))
    total = sum(p["bytes"] for p in parts)
    while total < target_bytes:  # pass 0 of each part is clean (smaller PNGs): top up
        i = len(parts)
        extra = math.ceil((target_bytes - total) / per_row * 1.05) + 1000
        parts.append(_write_part(str(folder / f"part-{i:05d}.parquet"), i, extra, size, noise))
        total += parts[-1]["bytes"]
    return {
        "rows": sum(p["rows"] for p in parts),
        "bytes": total,
        "files": len(parts),
        "build_seconds": round(time.perf_counter() - started, 1),
        "png_bytes_per_row_estimate": round(per_row, 1),
        "build_procs": procs,
        "rows_per_s": round(sum(p["rows"] for p in parts) / (time.perf_counter() - started)),
    }


def describe(path: Path, image_size: int) -> dict:
    """Rows, bytes on disk, decoded bytes and part files of a Parquet file or folder."""
    from gan_core.config import DataConfig
    from gan_core.files import open_file_data

    data = open_file_data(
        DataConfig(name="parquet", path=str(path), image_size=image_size), check=False
    )
    files = data.files
    return {
        "rows": data.num_rows,
        "bytes": sum(os.path.getsize(f) for f in files),
        "decoded_bytes": data.decoded_bytes,
        "files": files,
    }


def subset_folder(files: list[str], keep_bytes: int, image_size: int, out: Path) -> list[str]:
    """Hard links to the first part files whose decoded size stays under ``keep_bytes``."""
    out.mkdir(parents=True, exist_ok=True)
    chosen: list[str] = []
    for file in files:
        link = out / Path(file).name
        os.link(file, link)
        if describe(out, image_size)["decoded_bytes"] > keep_bytes and chosen:
            link.unlink()
            break
        chosen.append(file)
    return chosen


def warm_label_classifier(path: Path, image_size: int) -> float:
    """Train (or load) the evaluation's label classifier once, into RAYGAN_CACHE."""
    from gan_core.config import DataConfig
    from gan_core.file_eval import can_classify, label_classifier
    from gan_core.files import open_file_data

    started = time.perf_counter()
    data = open_file_data(
        DataConfig(name="parquet", path=str(path), image_size=image_size), check=False
    )
    if can_classify(data):
        label_classifier(data)
    return time.perf_counter() - started


def object_store_bytes() -> int:
    """What Ray's default object store would be if a private Ray started now."""
    try:
        from ray._private.utils import estimate_available_memory, resolve_object_store_memory

        return int(resolve_object_store_memory(estimate_available_memory()))
    except (ImportError, AttributeError, TypeError):
        return int(meminfo()["MemAvailable"] * 0.3)


# --- the jobs -----------------------------------------------------------------------------------


# What each mode changes; "cpus": resources.cpus_per_worker (None: --cpus-per-worker, "service":
# the service's default, not passed), "store": RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION.
MODES: dict[str, dict[str, Any]] = {
    "streamed": {"cache": False, "cpus": None, "store": None},
    "in_memory": {"cache": True, "cpus": None, "store": None},
    "streamed_default_cpus": {"cache": False, "cpus": "service", "store": None},
    "streamed_small_store": {"cache": False, "cpus": None, "store": "small"},
}
# Ray Data's log line when its first operator cannot get the CPUs for one task (it then waits
# for a cluster that never grows).
STARVED = "Cluster resources are not enough to run any task"


def job_command(
    mode: str,
    data: Path,
    image_size: int,
    steps: int,
    cache_mb: int,
    work: Path,
    cpus_per_worker: float | None,
) -> list[str]:
    every = max(min(100, steps // 2), 1)
    return [
        sys.executable,
        "-m",
        "services.train",
        "--config",
        "ring8",
        "--summary-json",
        str(work / f"{mode}.json"),
        f"name=stream-{mode}",
        "data.name=parquet",
        f"data.path={data}",
        f"data.image_size={image_size}",
        f"data.cache_mb={cache_mb}",
        "generators.arch=dcgan",
        "discriminator.arch=dcgan",
        "generators.z_dim=32",
        "generators.width=16",
        "discriminator.width=16",
        "train.batch_size=64",
        "train.threads=1",
        f"train.steps={steps}",
        f"eval.every={every}",
        f"checkpoint.every={every}",
        "eval.samples=1000",
        "resources.num_workers=2",
        *([] if cpus_per_worker is None else [f"resources.cpus_per_worker={cpus_per_worker:g}"]),
        f"storage.uri={work / 'runs'}",
        "tracking.enabled=false",
    ]


def run_job(
    cmd: list[str], env: dict[str, str], ray_tmp: Path, timeout: float, hang_grace: float
) -> dict:
    """Run one training job while sampling its processes' memory. It is killed after
    ``timeout`` s, or ``hang_grace`` s after Ray Data logs that it is starved of CPUs if no
    progress line came since."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a hung job is killed as a whole
    )
    sampler = Sampler(proc.pid, spill_root=ray_tmp)
    sampler.start()
    lines: list[tuple[float, str]] = []
    starved: list[float] = []
    progress: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - started
            lines.append((now, line.rstrip("\n")))
            if STARVED in line:
                starved.append(now)
            if re.search(r"\[raygan\] step \d+", line):
                progress.append(now)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    hung = None
    while proc.poll() is None:
        now = time.perf_counter() - started
        if now > timeout:
            hung = f"no exit after the {timeout:.0f} s timeout"
        elif (
            starved and now > starved[0] + hang_grace and not any(t > starved[0] for t in progress)
        ):
            hung = (
                f"Ray Data logged '{STARVED} ...' at {starved[0]:.0f} s and no step followed "
                f"in {hang_grace:.0f} s"
            )
        if hung:
            sampler.sample()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            break
        time.sleep(1.0)
    wall = time.perf_counter() - started
    sampler.stop()
    reader.join(timeout=10)
    leftovers = _leftover_ray(ray_tmp)
    shown = [(t, line) for t, line in lines if re.search(r"\[raygan\] step \d+", line)]
    return {
        "returncode": proc.returncode,
        "hung": hung,
        "starved_log_s": round(starved[0], 1) if starved else None,
        "wall_seconds": round(wall, 1),
        "first_progress_s": round(shown[0][0], 1) if shown else None,
        "progress": [{"t": round(t, 1), "line": line.strip()} for t, line in shown],
        "log_tail": [line[:400] for _, line in lines[-40:]],
        "samples": sampler.samples,
        "titles": {role: sorted(t) for role, t in sampler.titles.items()},
        "leftover_pids": leftovers,
    }


def _leftover_ray(ray_tmp: Path) -> list[int]:
    """Processes still running from this job's private Ray (found by its temp folder), killed."""
    left = [pid for pid, (_, cmd) in processes().items() if str(ray_tmp) in cmd]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def mode_report(name: str, job: dict, summary: dict | None, data_info: dict) -> dict:
    peaks = aggregate(job["samples"])
    return {
        "mode": name,
        "data": {k: v for k, v in data_info.items() if k != "files"}
        | {"files": len(data_info["files"])},
        "returncode": job["returncode"],
        "hung": job["hung"],
        "starved_log_s": job["starved_log_s"],
        "wall_seconds": job["wall_seconds"],
        "fit_seconds": summary.get("wall_seconds") if summary else None,
        "steps": summary.get("steps") if summary else None,
        "steps_per_s": summary.get("steps_per_s") if summary else None,
        "first_progress_s": job["first_progress_s"],
        "progress": job["progress"],
        "peaks": peaks,
        # Flatness: the larger worker's RSS at the first and the last progress line.
        "worker_rss_first_eval": worker_rss_at(
            job["samples"], job["progress"][0]["t"] if job["progress"] else None
        ),
        "worker_rss_last_eval": worker_rss_at(
            job["samples"], job["progress"][-1]["t"] if job["progress"] else None
        ),
        "timeline": worker_timeline(job["samples"]),
        "titles": job["titles"],
        "leftover_pids": job["leftover_pids"],
        **({} if job["returncode"] == 0 and not job["hung"] else {"log_tail": job["log_tail"]}),
    }


def table_rows(modes: list[dict], file_bytes: int) -> list[list[Any]]:
    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v / MiB:,.0f}"

    rows = []
    for m in modes:
        p = m["peaks"]
        workers = p["train_workers"]
        roles = p["roles"]
        data_task = roles.get("data_task", {})
        status = (
            "HUNG" if m["hung"] else ("ok" if m["returncode"] == 0 else f"rc {m['returncode']}")
        )
        rows.append(
            [
                m["mode"],
                status,
                f"{m['data']['rows']:,} / {m['data']['bytes'] / 1e9:.2f} GB",
                " + ".join(mib(w["rss"]) for w in workers) or "-",
                " + ".join(mib(w["uss"]) for w in workers) or "-",
                f"{max((w['rss'] for w in workers), default=0) / file_bytes:.3f}",
                f"{mib(m.get('worker_rss_first_eval'))} -> {mib(m.get('worker_rss_last_eval'))}",
                mib(roles.get("driver", {}).get("max_rss")),
                mib(roles.get("raylet+plasma", {}).get("max_rss")),
                mib(roles.get("split_coordinator", {}).get("max_rss")),
                f"{mib(data_task.get('max_rss'))} ({data_task.get('procs', 0)})",
                mib(p["machine"]["used"]),
                mib(p["machine"]["shmem"]),
                mib(p["machine"]["spilled"]),
                m["wall_seconds"],
                "-" if m["first_progress_s"] is None else m["first_progress_s"],
                "-" if m["fit_seconds"] is None else m["fit_seconds"],
                "-" if m["steps_per_s"] is None else m["steps_per_s"],
            ]
        )
    return rows


HEADERS = [
    "mode",
    "status",
    "rows / file",
    "worker RSS",
    "worker USS",
    "max worker RSS / file",
    "worker RSS 1st -> last eval",
    "driver",
    "raylet",
    "split coord",
    "data task (procs)",
    "machine used",
    "shmem",
    "spilled",
    "wall s",
    "1st progress s",
    "fit s",
    "steps/s",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="data set size, 1e9 bytes")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", help="reuse this Parquet file or folder (built here if absent)")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--noise", type=float, default=32.0)
    parser.add_argument("--files", type=int, default=16, help="part files of the data set")
    parser.add_argument("--build-procs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=0.5,
        help="resources.cpus_per_worker (the service's default 1 hangs streamed data on 2 CPUs)",
    )
    parser.add_argument("--small-store-fraction", type=float, default=0.04)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    parser.add_argument("--hang-grace", type=float, default=120)
    parser.add_argument("--modes", default="streamed,in_memory", help=", ".join(MODES))
    parser.add_argument("--out-dir", type=Path, default=None, help="default: bench/out")
    args = parser.parse_args(argv)
    modes_asked = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes_asked if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; allowed: {', '.join(MODES)}")
    target = int(args.size_gb * 1e9)
    print("# streaming: a file data set larger than a worker's memory, trained under Ray")
    print(__doc__.split("Protocol:", 1)[1].split("Writes", 1)[0].rstrip())
    print(
        f"this run: >= {target / 1e9:.2f} GB of {args.image_size}x{args.image_size} PNGs (noise "
        f"{args.noise:g}) in {args.files} files, {args.steps} steps, resources.cpus_per_worker="
        f"{args.cpus_per_worker:g}, modes {', '.join(modes_asked)}\n",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="rgstr", dir="/tmp"))
    result: dict[str, Any] = {"protocol": vars(args), "machine": machine()}
    result["machine"]["commit"] = _full_commit() or result["machine"]["commit"]
    result["machine"]["mem_total_bytes"] = meminfo()["MemTotal"]
    # The machine is shared: its load says how much of the 2 cores the jobs really had.
    result["machine"]["loadavg_at_start"] = os.getloadavg()
    owned_data = args.data is None
    data_path = Path(args.data).resolve() if args.data else work / "data"
    modes: list[dict] = []
    try:
        if data_path.exists():
            build: dict[str, Any] = {"reused": str(data_path)}
            print(f"data: reusing {data_path}")
        else:
            print(f"data: building {data_path} ...", flush=True)
            build = build_data(
                data_path, target, args.image_size, args.noise, args.build_procs, args.files
            )
            print(
                f"data: {build['rows']:,} rows, {build['bytes']:,} bytes in {build['files']} "
                f"files, built in {build['build_seconds']:.0f} s ({args.build_procs} processes, "
                f"{build['rows_per_s']:,} rows/s)",
                flush=True,
            )
        full = describe(data_path, args.image_size)
        if full["bytes"] < target:
            print(f"WARNING: the data holds {full['bytes']:,} bytes, under the {target:,} asked")
        ratio = full["decoded_bytes"] / full["bytes"]
        print(
            f"data: {full['rows']:,} rows, {full['bytes']:,} bytes on disk, decoded (uint8 "
            f"pixels + int64 label) {full['decoded_bytes']:,} bytes = {ratio:.2f} x the file"
        )
        result["data"] = (
            {"path": str(data_path), "build": build}
            | {k: v for k, v in full.items() if k != "files"}
            | {"files": len(full["files"]), "decoded_over_file": round(ratio, 3)}
        )

        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
        env |= {
            "AWS_EC2_METADATA_DISABLED": "true",
            "RAYGAN_CACHE": str(work / "cache"),
            "PYTHONUNBUFFERED": "1",
        }
        os.environ["RAYGAN_CACHE"] = env["RAYGAN_CACHE"]
        warm = warm_label_classifier(data_path, args.image_size)
        print(f"label classifier for the evaluation trained beforehand in {warm:.0f} s", flush=True)
        result["classifier_seconds"] = round(warm, 1)

        for mode in modes_asked:
            spec = MODES[mode]
            info, path, extra_env = full, data_path, {}
            if spec["cache"]:
                store = object_store_bytes()
                result["object_store_bytes_estimate"] = store
                # Ray Data's own budget is a fraction of the store; leave room for its blocks.
                if full["decoded_bytes"] > 0.8 * store:
                    path = work / "subset"
                    subset_folder(full["files"], int(0.6 * store), args.image_size, path)
                    info = describe(path, args.image_size)
                    print(
                        f"{mode}: the object store (~{store / 1e9:.1f} GB) cannot hold "
                        f"{full['decoded_bytes'] / 1e9:.1f} GB decoded: using a subset of "
                        f"{len(info['files'])} files, {info['rows']:,} rows"
                    )
                cache_mb = math.ceil(info["decoded_bytes"] / MiB) + 16
            else:
                cache_mb = 0
            if spec["store"] == "small":
                extra_env["RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"] = str(
                    args.small_store_fraction
                )
            cpus = None if spec["cpus"] == "service" else args.cpus_per_worker
            ray_tmp = Path(tempfile.mkdtemp(prefix="rgr", dir="/tmp"))
            cmd = job_command(mode, path, args.image_size, args.steps, cache_mb, work, cpus)
            print(
                f"{mode}: data.cache_mb={cache_mb} resources.cpus_per_worker="
                f"{'(service default)' if cpus is None else f'{cpus:g}'}"
                + "".join(f" {k}={v}" for k, v in extra_env.items()),
                flush=True,
            )
            load_before = os.getloadavg()
            job = run_job(
                cmd,
                env | extra_env | {"RAY_TMPDIR": str(ray_tmp)},
                ray_tmp,
                args.timeout,
                args.hang_grace,
            )
            summary_path = work / f"{mode}.json"
            summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
            report = mode_report(mode, job, summary, info)
            report |= {
                "cache_mb": cache_mb,
                "cpus_per_worker": cpus,
                "env": extra_env,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            }
            modes.append(report)
            status = "ok" if job["returncode"] == 0 else f"FAILED rc={job['returncode']}"
            if job["hung"]:
                status = f"HUNG, killed: {job['hung']}"
            print(
                f"{mode}: {status}; wall {job['wall_seconds']:.0f} s, first progress line at "
                f"{job['first_progress_s']} s, steps/s {report['steps_per_s']}",
                flush=True,
            )
            if job["returncode"] != 0 or job["hung"]:
                print("\n".join(f"    {line}" for line in job["log_tail"][-12:]))
            if job["leftover_pids"]:
                print(f"{mode}: killed leftover Ray processes {job['leftover_pids']}")
            shutil.rmtree(ray_tmp, ignore_errors=True)
        result["modes"] = modes
        by = {m["mode"]: m for m in modes}
        if all(by.get(k, {}).get("steps_per_s") for k in ("streamed", "in_memory")):
            result["streamed_over_in_memory_steps_per_s"] = round(
                by["streamed"]["steps_per_s"] / by["in_memory"]["steps_per_s"], 3
            )
        print()
        print(table(HEADERS, table_rows(modes, full["bytes"])))
        print(
            "\nMiB; worker RSS/USS: peak of each of the 2 train workers; 1st -> last eval: the "
            "larger worker's RSS when the first and the last progress lines came; driver .. "
            "data task: "
            "peak RSS of the largest single process of the role (data task: most such processes "
            "at once); machine used = MemTotal - MemAvailable (peak, whole shared machine); "
            "shmem = /dev/shm in use (peak; Ray's object store); spilled = bytes Ray spilled "
            "to disk (peak)"
        )
        if "streamed_over_in_memory_steps_per_s" in result:
            ratio_s = result["streamed_over_in_memory_steps_per_s"]
            print(f"steps/s streamed / in memory: {ratio_s:.3f}")
        out = write_json("streaming", result, args.out_dir)
        print(f"wrote {out}")
    finally:
        for sub in ("runs", "cache", "subset"):
            shutil.rmtree(work / sub, ignore_errors=True)
        if owned_data and args.keep_data:
            print(f"data kept: {data_path}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if modes and all(m["returncode"] == 0 and not m["hung"] for m in modes) else 1


def _full_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, cwd=REPO
        ).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
