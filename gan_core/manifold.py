"""Label-free fidelity and diversity: precision, recall, density and coverage from k-NN balls.

- Precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models"): the real manifold is the union of balls around every real
  sample reaching its k-th nearest real neighbour (k = 3); precision is the share of generated
  samples inside it. Recall swaps the roles: the share of real samples inside the generated
  manifold.
- Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
  Generative Models"), with balls around real samples only (k = 5): density counts how many real
  balls hold each generated sample, divided by k (about 1 when the two sets come from one
  distribution; above 1 when samples crowd dense regions); coverage is the share of real balls
  that hold at least one generated sample. A generator that drops modes leaves their balls
  empty: coverage is the label-free measure of mode collapse.

Distances are Euclidean in whatever space the caller gives (raw coordinates for points, a
feature extractor's output for images). Every pairwise distance is computed in row blocks with
``torch.cdist``, so 10,000 x 10,000 samples never hold more than one block of the distance matrix.
The real side (its balls) is computed once by ``RealManifold`` and reused at every evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

PR_K = 3  # Kynkaanniemi et al.'s k for precision and recall
DC_K = 5  # Naeem et al.'s k for density and coverage
BLOCK_ROWS = 1024  # rows of one distance block: 1,024 x 10,000 float32 = 40 MB


def _as_float(x: Tensor | np.ndarray, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.ndim == 0 or t.shape[0] == 0:
        raise ValueError(f"{what}: no samples")
    t = t.detach().to("cpu", torch.float32).reshape(len(t), -1)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: NaN or Inf in the samples")
    return t


def kth_neighbour_distances(x: Tensor, ks: tuple[int, ...], block: int = BLOCK_ROWS) -> Tensor:
    """Distance from every row of ``x`` to its k-th nearest other row, for each k in ``ks``:
    shape (len(ks), n). A row is not its own neighbour; an exact duplicate is (distance 0)."""
    n = x.shape[0]
    top = max(ks)
    if n <= top:
        raise ValueError(f"{n} samples: a k-th neighbour with k = {top} needs at least {top + 1}")
    out = torch.empty(len(ks), n)
    for start in range(0, n, block):
        rows = x[start : start + block]
        d = torch.cdist(rows, x)
        # Its own row is at distance 0: push it out of the way instead of assuming it sorts first
        # (a duplicate is also at 0, and must still count as a neighbour).
        idx = torch.arange(rows.shape[0])
        d[idx, idx + start] = float("inf")
        nearest = d.topk(top, dim=1, largest=False).values
        for i, k in enumerate(ks):
            out[i, start : start + rows.shape[0]] = nearest[:, k - 1]
    return out


def _ball_hits(
    queries: Tensor, centres: Tensor, radii: Tensor, block: int = BLOCK_ROWS
) -> tuple[Tensor, Tensor]:
    """For balls of ``radii`` (one set of balls per row) around ``centres``: per set, how many
    balls hold each query; and each centre's distance to its nearest query (a ball holds a query
    when that distance is within its radius). One distance block serves every set of radii."""
    sets = radii.shape[0]
    holding = torch.zeros(sets, queries.shape[0], dtype=torch.int32)
    nearest_query = torch.full((centres.shape[0],), float("inf"))
    for start in range(0, queries.shape[0], block):
        d = torch.cdist(queries[start : start + block], centres)
        for i in range(sets):
            holding[i, start : start + d.shape[0]] = (d <= radii[i][None, :]).sum(
                1, dtype=torch.int32
            )
        # A row reduction of the block is far cheaper than a column "any" per set of radii.
        torch.minimum(nearest_query, d.amin(dim=0), out=nearest_query)
    return holding, nearest_query


class RealManifold:
    """The real samples' k-NN balls, computed once, scored against any generated set."""

    def __init__(
        self,
        real: Tensor | np.ndarray,
        pr_k: int = PR_K,
        dc_k: int = DC_K,
        block: int = BLOCK_ROWS,
    ) -> None:
        if pr_k < 1 or dc_k < 1:
            raise ValueError(f"k must be >= 1, got pr_k={pr_k}, dc_k={dc_k}")
        self.real = _as_float(real, "real samples")
        self.pr_k, self.dc_k, self.block = pr_k, dc_k, block
        self.pr_radii, self.dc_radii = kth_neighbour_distances(self.real, (pr_k, dc_k), block)

    def score(self, fake: Tensor | np.ndarray) -> dict[str, float]:
        """precision, recall, density, coverage of ``fake`` (same feature width as the real)."""
        fake = _as_float(fake, "generated samples")
        if fake.shape[1] != self.real.shape[1]:
            raise ValueError(
                f"generated samples have {fake.shape[1]} features, the real {self.real.shape[1]}"
            )
        # Both sets of real balls in one pass over the fake-to-real distances.
        radii = torch.stack([self.pr_radii, self.dc_radii])
        holding, nearest_fake = _ball_hits(fake, self.real, radii, self.block)
        (fake_radii,) = kth_neighbour_distances(fake, (self.pr_k,), self.block)
        covered, _ = _ball_hits(self.real, fake, fake_radii[None, :], self.block)
        return {
            "precision": (holding[0] > 0).float().mean().item(),
            "recall": (covered[0] > 0).float().mean().item(),
            "density": holding[1].sum().item() / (self.dc_k * fake.shape[0]),
            "coverage": (nearest_fake <= self.dc_radii).float().mean().item(),
        }


def prdc(
    real: Tensor | np.ndarray,
    fake: Tensor | np.ndarray,
    pr_k: int = PR_K,
    dc_k: int = DC_K,
    block: int = BLOCK_ROWS,
) -> dict[str, float]:
    """Precision, recall (k = ``pr_k``), density and coverage (k = ``dc_k``) of ``fake`` against
    ``real``: one-off form of ``RealManifold(real).score(fake)``."""
    return RealManifold(real, pr_k, dc_k, block).score(fake)
