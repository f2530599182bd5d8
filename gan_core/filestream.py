"""The pyarrow reader of file data: shuffled batches for one rank, resumable at any position.

Used by ``gan_core.loop`` and the service's local backend; under Ray Train, Ray Data reads the
same files with the same decoder (services/ray_data.py).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from gan_core.files import WINDOW_UNITS, FileData, to_training


class FileStream:
    """Shuffled batches of a ``FileData`` for one rank, a pure function of (seed, rank,
    world_size, position): a resumed run that restores ``position`` draws exactly the batches an
    uninterrupted one would have.

    Every pass (epoch) permutes the units with a seed of (seed, epoch); consecutive groups of
    WINDOW_UNITS units are read together and their rows permuted jointly; rank r takes every
    world_size-th row of each window. Only a window is in memory at a time, unless the data set
    is small enough to cache (``FileData.cached``), then each unit is decoded once.
    """

    def __init__(
        self, data: FileData, seed: int, rank: int = 0, world_size: int = 1, position: int = 0
    ) -> None:
        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self.position = 0  # rows of this rank's stream handed out so far
        self._rows: list[np.ndarray] = []  # decoded rows not handed out yet, in order
        self._window: tuple[int, int] | None = None  # (epoch, window) that comes next
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        # Rows are dealt from rank 0 on, so the last rank gets the fewest: checking it refuses
        # the data set on every rank alike, not just on the ranks left without rows.
        if self._rank_rows_per_epoch(world_size - 1) == 0:
            data.fail(f"{data.num_rows} rows cannot feed {world_size} ranks (every rank needs one)")
        self._seek(position)

    def next_batch(self, n: int) -> Tensor:
        """The next ``n`` rows of this rank's stream, as training tensors."""
        have = sum(len(r) for r in self._rows)
        while have < n:
            rows = self._read_window()
            self._rows.append(rows)
            have += len(rows)
        joined = np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]
        batch, rest = joined[:n], joined[n:]
        self._rows = [rest] if len(rest) else []
        self.position += n
        return to_training(batch)

    # -- the order ------------------------------------------------------------------------------
    def _windows(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data.units))
        return [order[i : i + WINDOW_UNITS].tolist() for i in range(0, len(order), WINDOW_UNITS)]

    def _rank_rows(self, window: list[int], rank: int | None = None) -> int:
        total = sum(self.data.units[i].rows for i in window)
        return len(range(self.rank if rank is None else rank, total, self.world_size))

    def _rank_rows_per_epoch(self, rank: int | None = None) -> int:
        return sum(self._rank_rows(w, rank) for w in self._windows(0))

    def _seek(self, position: int) -> None:
        """Skip ``position`` rows by counting (no reading): whole epochs, then whole windows."""
        if self.world_size == 1:
            epoch, left = divmod(position, self.data.num_rows)
        else:
            # A rank's rows per epoch depend on how that epoch's order groups the units into
            # windows (every window's rows are dealt out from rank 0): count epoch by epoch.
            epoch, left = 0, position
            while left >= (per_epoch := sum(self._rank_rows(w) for w in self._windows(epoch))):
                left -= per_epoch
                epoch += 1
        windows = self._windows(epoch)
        index = 0
        while left >= self._rank_rows(windows[index]):
            left -= self._rank_rows(windows[index])
            index += 1
        self._window = (epoch, index)
        self.position = position - left
        if left:
            self._rows = [self._read_window()[left:]]
            self.position = position

    def _read_window(self) -> np.ndarray:
        epoch, index = self._window
        windows = self._windows(epoch)
        window = windows[index]
        self._window = (epoch, index + 1) if index + 1 < len(windows) else (epoch + 1, 0)
        rows = np.concatenate([self._unit(i)[0] for i in window])
        permuted = rows[np.random.default_rng([self.seed, epoch, index]).permutation(len(rows))]
        return permuted[self.rank :: self.world_size]

    def _unit(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if index in self._cache:
            return self._cache[index]
        decoded = self.data.read_unit(self.data.units[index])
        if self.data.cached:
            self._cache[index] = decoded
        return decoded
