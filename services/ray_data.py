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
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from torch import Tensor

from gan_core.files import IMAGE_FILES, FileData, to_training

log = logging.getLogger("raygan")
DATASET = "train"
# CPUs of a small cluster kept for Ray Data when training would take them all (launch.py), and
# what each read/decode task asks for. Ray Data 2.60 gets its share through an autoscaling
# coordinator: with half a CPU left it never started a read task (the job hung, "Cluster
# resources are not enough to run any task"); with one whole CPU left it runs.
DATA_CPUS = 1.0
TASK_CPUS = 0.25
# Rows decoded per map_batches call, and the largest block Ray Data may merge them into (its
# default, 128 MiB, made each worker fetch 130 MB at a time from a 2 GB data set of 32x32 images).
DECODE_ROWS = 256
BLOCK_BYTES = 8 * 2**20
# Rows a worker shuffles locally: streamed blocks come in file order, so a buffer of many batches
# is what mixes rows of different row groups into one batch.
SHUFFLE_ROWS = 2048
# A data set is materialized only if it takes at most this share of the object store.
CACHE_STORE_SHARE = 0.5


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
    """The Ray Data dataset of ``data``'s decoded rows: lazy and streamed, or decoded once and
    materialized when ``data.cached`` and the object store has room for it."""
    import ray
    import ray.data

    # A dataset snapshots the current context when it is created.
    context = ray.data.DataContext.get_current()
    context.target_max_block_size = BLOCK_BYTES
    if not verbose:
        # Without this every pass over the data logs its plan and a progress bar.
        context.print_on_execution_start = False
        context.enable_progress_bars = False
    store = float(ray.cluster_resources().get("object_store_memory", 0.0))
    cache = data.cached and data.decoded_bytes <= CACHE_STORE_SHARE * store
    if data.cached and not cache:
        log.warning(
            "%s decodes to %.0f MiB, more than %d%% of Ray's object store (%.0f MiB): streamed, "
            "decoded on every pass",
            data.uri,
            data.decoded_bytes / 2**20,
            100 * CACHE_STORE_SHARE,
            store / 2**20,
        )
    # Streamed: the files in a new order every pass. An all-to-all step such as
    # randomize_block_order() would wait for the whole pass to be decoded into the object store
    # before the first batch (measured: a 2 GB data set went whole into the store every pass).
    shuffle = None if cache else "files"
    if data.layout == IMAGE_FILES:
        raw = ray.data.read_binary_files(
            data.files,
            filesystem=data.filesystem,
            include_paths=True,
            shuffle=shuffle,
            num_cpus=TASK_CPUS,
        )
    else:
        raw = ray.data.read_parquet(
            data.files,
            filesystem=data.filesystem,
            include_paths=True,
            shuffle=shuffle,
            num_cpus=TASK_CPUS,
        ).select_columns([*data.columns, "path"])
    dataset = raw.map_batches(
        _Decode(data), batch_format="pyarrow", batch_size=DECODE_ROWS, num_cpus=TASK_CPUS
    )
    if not cache:
        return dataset
    started = time.perf_counter()
    dataset = dataset.materialize()
    print(
        f"[raygan] decoded {data.uri} once into Ray's object store: {data.num_rows} rows, "
        f"{data.decoded_bytes / 2**20:.0f} MiB in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    # In memory, a new block order every pass costs nothing.
    return dataset.randomize_block_order()


def shard_batches(batch_size: int, shuffle_rows: int | None = None) -> Iterator[Tensor]:
    """This worker's shard as an endless stream of ``(batch_size, ...)`` float32 batches.

    Every pass drops its last partial batch; with ``equal`` shares every worker gets the same
    number of batches per pass, so the workers' DDP steps stay paired."""
    import ray.train

    shard = ray.train.get_dataset_shard(DATASET)
    buffer = shuffle_rows if shuffle_rows is not None else max(SHUFFLE_ROWS, 4 * batch_size)
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
