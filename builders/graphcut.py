"""Greedy GraphCut bins (Dataset Quantization): similarity kernels and the fast incremental greedy.

The GraphCut gain of a candidate ``x`` for the bin ``B`` being filled from the pool ``P`` (every image not
in an earlier bin, ``B`` included) is ``lam * sum_{i in P} S(i, x) - 2 * sum_{s in B} S(s, x)``.
The first sum is fixed while one bin fills; the second grows by one similarity column per pick. Both are
kept as running vectors: a pick costs one column of ``S`` (read from a dense matrix when ``n x n`` fits
the memory budget, computed from the features otherwise), so a class of ``n`` images bins in
``O(n^2)`` work after the similarities, instead of the reference's ``O(n * k^2)`` Python loop.
"""

from __future__ import annotations

import torch

DEFAULT_MEMORY_BYTES = 1 << 30  # dense n x n similarity up to 1 GiB (n ~ 16,000 in float32)


class CosineSimilarity:
    """``S(i, j) = 0.5 + 0.5 * cos(g_i, g_j)``, where ``cos`` is the product of the cosines of the factors.

    One factor: plain features. Two factors ``(b, [1, e])``: the last-layer gradient embedding
    ``g = [b, vec(b e^T)]`` (``b = dl/dz``, ``e`` the penultimate feature), whose inner product is
    ``(b . b')(1 + e . e')``, without forming the ``K x D`` vectors. Rows with zero norm have cosine 0.
    """

    def __init__(self, *factors: torch.Tensor) -> None:
        if not factors or any(f.dim() != 2 or f.shape[0] != factors[0].shape[0] for f in factors):
            raise ValueError("factors must be 2-D tensors with the same number of rows")
        self.factors = [_unit_rows(f.float()) for f in factors]

    @classmethod
    def gradient_embedding(cls, loss_grad: torch.Tensor, features: torch.Tensor) -> "CosineSimilarity":
        """The kernel of ``[dl/dz, vec(dl/dz e^T)]`` from ``dl/dz`` [n, K] and ``e`` [n, D]."""
        ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
        return cls(loss_grad, torch.cat([ones, features], dim=1))

    @property
    def n(self) -> int:
        return int(self.factors[0].shape[0])

    @property
    def device(self) -> torch.device:
        return self.factors[0].device

    def block(self, rows: torch.Tensor | slice, cols: torch.Tensor | slice) -> torch.Tensor:
        """``S[rows][:, cols]`` as float32."""
        cos = None
        for f in self.factors:
            part = f[rows] @ f[cols].T
            cos = part if cos is None else cos * part
        return 0.5 + 0.5 * cos

    def column(self, j: int) -> torch.Tensor:
        """``S[:, j]`` (every row against row ``j``)."""
        return self.block(slice(None), slice(j, j + 1)).squeeze(1)

    def column_sums(self, chunk: int = 2048) -> torch.Tensor:
        """``S.sum(0)`` in float64, computed ``chunk`` rows at a time."""
        total = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        for start in range(0, self.n, chunk):
            total += self.block(slice(start, start + chunk), slice(None)).sum(0, dtype=torch.float64)
        return total


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def bin_sizes(n: int, bins: int) -> list[int]:
    """``bins`` sizes of ``n // bins`` each, the last one taking the remainder."""
    if bins < 1 or n < bins:
        raise ValueError(f"cannot split {n} images into {bins} non-empty bins")
    size = n // bins
    return [size] * (bins - 1) + [n - size * (bins - 1)]


def graphcut_bins(
    sim: CosineSimilarity,
    bins: int,
    *,
    lam: float = 1.0,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> list[torch.Tensor]:
    """Split rows ``0..n-1`` into ``bins`` disjoint bins, one after another, by greedy GraphCut.

    Each bin but the last takes ``n // bins`` rows, picked one at a time by the largest gain (the first
    row on ties); the last bin is the remainder. Returns the bins' row indices (int64, CPU), each in
    pick order (the last in ascending order).
    """
    n = sim.n
    sizes = bin_sizes(n, bins)
    dense = sim.block(slice(None), slice(None)) if n * n * 4 <= memory_bytes else None
    pool_sum = dense.sum(0, dtype=torch.float64) if dense is not None else sim.column_sums()
    available = torch.ones(n, dtype=torch.bool, device=sim.device)
    minus_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=sim.device)
    out: list[torch.Tensor] = []
    for size in sizes[:-1]:
        base = lam * pool_sum
        bin_sum = torch.zeros(n, dtype=torch.float64, device=sim.device)
        picks = torch.empty(size, dtype=torch.int64, device=sim.device)
        for step in range(size):
            gain = torch.where(available, base - 2.0 * bin_sum, minus_inf)
            j = int(torch.argmax(gain))
            picks[step] = j
            available[j] = False
            bin_sum += (dense[:, j] if dense is not None else sim.column(j)).double()
        pool_sum = pool_sum - bin_sum  # the bin leaves the pool: its rows' similarities are bin_sum
        out.append(picks.cpu())
    out.append(torch.nonzero(available).flatten().cpu())
    return out
