"""File data sets into Ray Train workers through Ray Data; plumbing only, the data code is in
gan_core.files.

On the driver, ``train_dataset`` builds a lazy Ray Data dataset over the files a ``FileData``
describes (``read_parquet`` or ``read_binary_files``) whose ``map_batches`` step is
``FileData.decode`` / ``decode_files``, the same code the pyarrow reader runs. Ray Train splits
it between its workers (``streaming_split``, equal shares); in a worker ``shard_batches`` reads
its own shard with ``ray.train.get_dataset_shard`` as an endless stream of training batches,
pass after pass. Nothing reads the whole data set into a worker: blocks flow through Ray's object
store with backpressure, so a data set larger than a worker's memory trains.

A data set small enough to cache (``data.cache_mb``) is decoded once and materialized in the
object store, where every worker reads it from shared memory on every later pass.

Order: each pass visits the blocks in a new random order and shuffles rows in a local buffer;
it is not a function of the seed, so a resumed run does not replay the batches the interrupted
one drew after its last checkpoint (the generated noise and the weights do resume exactly).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from torch import Tensor

from gan_core.files import IMAGE_FILES, FileData, to_training

DATASET = "train"
# CPUs of a small cluster kept for Ray Data when training would take them all (launch.py), and
# what each read/decode task asks for. Ray Data 2.60 gets its share through an autoscaling
# coordinator: with half a CPU left it never started a read task (the job hung, "Cluster
# resources are not enough to run any task"); with one whole CPU left it runs.
DATA_CPUS = 1.0
TASK_CPUS = 0.25
# Rows decoded per map_batches call: small enough that a block of 64x64 RGB pixels is ~3 MiB.
DECODE_ROWS = 256


class _Decode:
    """``map_batches`` step: raw rows (Parquet columns, or image files' bytes and paths) to
    ``{"x": training array, "label": int64}``; a picklable callable carrying the FileData."""

    def __init__(self, data: FileData) -> None:
        self.data = data

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        data = self.data
        if data.layout == IMAGE_FILES:
            paths = batch.column("path").to_pylist()
            x, labels = data.decode_files(paths, batch.column("bytes").to_pylist())
        else:
            paths = batch.column("path").to_pylist() if "path" in batch.column_names else []
            where = data.display(paths[0]) if paths else data.uri
            x, labels = data.decode(batch.select(data.columns), where)
        out = {"x": x}
        if labels is not None:
            out["label"] = labels
        return out


def train_dataset(data: FileData, verbose: bool = False) -> Any:
    """The Ray Data dataset of ``data``'s decoded rows (lazy unless cached)."""
    import ray.data

    if not verbose:
        # A dataset snapshots the current context: without this every pass over the data logs
        # its plan and a progress bar into the job's output.
        context = ray.data.DataContext.get_current()
        context.print_on_execution_start = False
        context.enable_progress_bars = False
    if data.layout == IMAGE_FILES:
        raw = ray.data.read_binary_files(
            data.files, filesystem=data.filesystem, include_paths=True, num_cpus=TASK_CPUS
        )
    else:
        raw = ray.data.read_parquet(
            data.files, filesystem=data.filesystem, include_paths=True, num_cpus=TASK_CPUS
        ).select_columns([*data.columns, "path"])
    dataset = raw.map_batches(
        _Decode(data), batch_format="pyarrow", batch_size=DECODE_ROWS, num_cpus=TASK_CPUS
    )
    if data.cached:
        dataset = dataset.materialize()
    # A new block order every pass (no seed: each pass differs).
    return dataset.randomize_block_order()


def shard_batches(batch_size: int, shuffle_rows: int | None = None) -> Iterator[Tensor]:
    """This worker's shard as an endless stream of ``(batch_size, ...)`` float32 batches.

    Every pass drops its last partial batch; with ``equal`` shares every worker gets the same
    number of batches per pass, so the workers' DDP steps stay paired."""
    import ray.train

    shard = ray.train.get_dataset_shard(DATASET)
    buffer = shuffle_rows if shuffle_rows is not None else 4 * batch_size
    trace = _shard_trace()
    while True:
        batches = 0
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=buffer or None,
            prefetch_batches=2,
        ):
            batches += 1
            if trace is not None:
                trace(batch["x"])
            yield to_training(batch["x"])
        trace = None  # the first pass only
        if batches == 0:
            raise RuntimeError(
                f"this worker's shard of the data set holds fewer than train.batch_size="
                f"{batch_size} rows: use fewer workers or a smaller batch"
            )


def _shard_trace() -> Callable[[np.ndarray], None] | None:
    """Test hook: with RAYGAN_SHARD_DIR set, each worker appends a digest of every row of its
    first pass to ``<dir>/rank<R>.txt``, so a test can see which rows each worker trained on."""
    folder = os.environ.get("RAYGAN_SHARD_DIR")
    if not folder:
        return None
    import ray.train

    path = Path(folder) / f"rank{ray.train.get_context().get_world_rank()}.txt"

    def trace(rows: np.ndarray) -> None:
        digests = [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in rows]
        with path.open("a") as out:
            out.write("".join(f"{d}\n" for d in digests))

    return trace
