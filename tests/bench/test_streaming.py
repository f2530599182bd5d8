"""bench.streaming on tiny inputs: roles, the /proc sampler, peaks, the table, a tiny data set."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench import streaming
from bench.streaming import MiB, aggregate, descendants, memory_of, role_of, table_rows


def test_roles_come_from_ray_process_titles():
    driver = 100
    assert role_of("python -m services.train --config ring8", driver, driver) == "driver"
    assert role_of("ray::RayTrainWorker.run_train_fn", 1, driver) == "train_worker"
    assert role_of("ray::SplitCoordinator.get", 1, driver) == "split_coordinator"
    assert role_of("ray::TrainController.run", 1, driver) == "train_controller"
    assert role_of("ray::ReadFilesParquetV2", 1, driver) == "data_task"
    assert role_of("ray::MapBatches(_Decode)", 1, driver) == "data_task"
    assert role_of("ray::IDLE", 1, driver) == "idle_worker"
    raylet = "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node_ip=127"
    assert role_of(raylet, 1, driver) == "raylet+plasma"
    assert role_of("/venv/ray/core/src/ray/gcs/gcs_server --port", 1, driver) == "gcs"
    assert role_of("ray::DatasetManager", 1, driver) == "other_ray_worker"
    assert role_of("/usr/bin/python log_monitor.py", 1, driver) == "other"


def test_descendants_walk_the_whole_tree_and_nothing_else():
    table = {1: (0, "init"), 10: (1, "driver"), 11: (10, "raylet"), 12: (11, "w"), 20: (1, "x")}
    assert sorted(descendants(10, table)) == [10, 11, 12]
    assert descendants(99, table) == []


def test_a_title_keeps_what_a_process_runs_behind_a_long_interpreter_path():
    deep = "/" + "/".join(["checkout"] * 12) + "/.venv/bin/python"
    assert streaming._title(f"{deep} -c import time; time.sleep(60)") == (
        "python -c import time; time.sleep(60)"
    )
    assert streaming._title("ray::RayTrainWorker.train") == "ray::RayTrainWorker.train"
    assert len(streaming._title("x " + "y" * 500)) == 80


def test_memory_of_this_process_and_the_sampler_sees_a_child():
    rss, uss, shm = memory_of(os.getpid())
    assert rss > 10 * MiB and 0 < uss <= rss and shm >= 0
    assert memory_of(2**22 + 12345) == (0, 0, 0)  # no such process: zeros, no error
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sampler = streaming.Sampler(os.getpid(), interval=0.05)
        sampler.sample()  # one sample by hand, then the thread's (timing-free on a busy machine)
        sampler.start()
        deadline = time.monotonic() + 20
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        sampler.stop()
    finally:
        child.kill()
        child.wait()
    assert len(sampler.samples) >= 3
    _, rows, machine = sampler.samples[0]
    assert {os.getpid(), child.pid} <= {row[0] for row in rows}
    assert machine["used"] > 0 and machine["shmem"] >= 0
    assert [row[1] for row in rows if row[0] == os.getpid()] == ["driver"]
    assert any("time.sleep(60)" in title for title in sampler.titles["other"])


def _sample(t, rows, used=1000 * MiB, shmem=0):
    return (t, rows, {"used": used, "shmem": shmem, "spilled": 0})


def test_aggregate_keeps_each_workers_peak_and_per_role_peaks():
    samples = [
        _sample(0.0, [(1, "driver", 300, 200, 0), (2, "train_worker", 500, 400, 10)]),
        _sample(
            0.5,
            [
                (2, "train_worker", 700, 450, 200),
                (3, "train_worker", 600, 500, 100),
                (4, "data_task", 100, 90, 0),
                (5, "data_task", 150, 80, 0),
            ],
            used=2000 * MiB,
            shmem=50,
        ),
        _sample(1.0, [(2, "train_worker", 650, 440, 150), (4, "idle_worker", 120, 100, 0)]),
    ]
    peaks = aggregate(samples)
    assert peaks["train_workers"] == [
        {"rss": 700, "uss": 450, "rss_shmem": 200, "pid": 2},
        {"rss": 600, "uss": 500, "rss_shmem": 100, "pid": 3},
    ]
    data = peaks["roles"]["data_task"]
    assert (data["max_rss"], data["max_sum_rss"], data["max_uss"], data["procs"]) == (
        150,
        250,
        90,
        2,
    )
    assert peaks["roles"]["train_worker"]["max_sum_rss"] == 1300
    assert peaks["machine"] == {"used": 2000 * MiB, "shmem": 50, "spilled": 0}
    assert aggregate([]) == {
        "train_workers": [],
        "roles": {},
        "machine": {"used": 0, "shmem": 0, "spilled": 0},
    }


def test_table_rows_on_a_finished_and_a_hung_mode():
    peaks = aggregate(
        [_sample(0, [(2, "train_worker", 512 * MiB, 256 * MiB, 0), (1, "driver", MiB, MiB, 0)])]
    )
    base = {
        "data": {"rows": 1000, "bytes": 2 * 10**9, "files": 2},
        "peaks": peaks,
        "wall_seconds": 10.0,
        "first_progress_s": 5.0,
        "fit_seconds": 8.0,
        "steps_per_s": 3.0,
    }
    ok = base | {"mode": "streamed", "hung": None, "returncode": 0}
    hung = base | {
        "mode": "streamed_default_cpus",
        "hung": "starved",
        "returncode": -15,
        "first_progress_s": None,
        "fit_seconds": None,
        "steps_per_s": None,
    }
    rows = table_rows([ok, hung], file_bytes=2 * 10**9)
    assert len(rows) == 2 and all(len(r) == len(streaming.HEADERS) for r in rows)
    assert rows[0][:5] == ["streamed", "ok", "1,000 / 2.00 GB", "512", "256"]
    assert rows[1][1] == "HUNG" and rows[1][-1] == "-"
    assert rows[0][5] == f"{512 * MiB / 2e9:.3f}"


def test_build_data_reaches_the_size_asked_and_describe_agrees(tmp_path):
    built = streaming.build_data(tmp_path / "d", 40_000, size=8, noise=32.0, procs=1, files=2)
    assert built["bytes"] >= 40_000 and built["files"] >= 2
    seen = streaming.describe(tmp_path / "d", image_size=8)
    assert seen["rows"] == built["rows"] and seen["bytes"] == built["bytes"]
    assert seen["decoded_bytes"] == built["rows"] * (8 * 8 + 8)


def test_worker_rss_at_takes_the_larger_worker_at_the_last_sample_before_t():
    samples = [
        _sample(0.0, [(1, "driver", 5, 5, 0)]),
        _sample(1.0, [(2, "train_worker", 100, 1, 0), (3, "train_worker", 120, 1, 0)]),
        _sample(2.0, [(2, "train_worker", 130, 1, 0), (3, "train_worker", 110, 1, 0)]),
    ]
    assert streaming.worker_rss_at(samples, 0.5) is None
    assert streaming.worker_rss_at(samples, 1.5) == 120
    assert streaming.worker_rss_at(samples, 9.0) == 130
    assert streaming.worker_rss_at(samples, None) is None
