"""The normal equations of a layer's least-squares refit, and the walk that picks its ridge.

:class:`Normal` holds ``X^T X``, ``X^T Y`` and ``||Y||^2`` summed over calibration tokens; sums add, so
folds merge and ranks of a ``torch.distributed`` group reduce them (:mod:`amgfx.graph.ranks`).
:func:`downhill` walks the ridge grid to its held-out minimum (:mod:`amgfx.weights.reconstruct`).
"""
from __future__ import annotations

import torch

from ..graph.ranks import active, all_sum

__all__ = ["Normal", "downhill"]


def downhill(grid, f, start: int | None = None):
    """The grid point a walk from ``grid[start]`` (the middle by default) reaches by stepping to the
    better neighbour while ``f`` falls: the grid's minimum when ``f`` is unimodal on it, as a held-out
    ridge error is (too little damping overfits, too much underfits), in about half the evaluations.

    >>> downhill((0.01, 0.1, 1.0, 10.0), lambda d: (d - 0.1) ** 2)
    0.1
    """
    seen = {}

    def at(i):
        if i not in seen:
            seen[i] = f(grid[i])
        return seen[i]
    i = len(grid) // 2 if start is None else start
    while True:
        best = min((j for j in (i - 1, i, i + 1) if 0 <= j < len(grid)), key=at)
        if best == i:
            return grid[i]
        i = best


class Normal:
    """The least-squares normal equations of one layer on some tokens: ``G = X^T X``, ``B = X^T Y``,
    ``yy = ||Y||^2`` per output row (``X`` the pruned inputs, a ones column for the bias; ``Y`` the
    target rows). Every output row is its own ridge problem on the one ``G``, so ``rows=`` restricts
    a solve or an error to some of them."""

    def __init__(self):
        self.G = self.B = self.yy = None
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.G is None:
            self.G, self.B, self.yy = x.T @ x, x.T @ y, (y * y).sum(0)
        else:       # in place: a wide layer's G is hundreds of MB, and a sum would hold three of them
            self.G.addmm_(x.T, x)
            self.B.addmm_(x.T, y)
            self.yy += (y * y).sum(0)
        self.n += x.shape[0]

    def merge(self, o) -> "Normal":
        """``self`` plus ``o``, in place (``o`` is spent)."""
        self.G += o.G
        self.B += o.B
        self.yy += o.yy
        self.n += o.n
        o.G = o.B = o.yy = None
        return self

    def reduce(self, k: int, r: int) -> None:
        """Summed over the ranks of a ``torch.distributed`` group (:mod:`amgfx.graph.ranks`), ``k`` inputs and
        ``r`` outputs wide: a rank with no chunk in this fold gives zeros."""
        if not active():
            return
        if self.G is None:
            self.G, self.B = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, r, dtype=torch.float64)
            self.yy = torch.zeros(r, dtype=torch.float64)
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        all_sum(self.G, self.B, self.yy, n)
        self.n = int(n.item())

    def err(self, w: torch.Tensor, rows=None) -> float:
        """``||X w^T - Y||^2 / ||Y||^2`` for ``w`` [r, k (+1)] (the output ``rows`` of ``Y`` only, if given)."""
        B, yy = (self.B, self.yy) if rows is None else (self.B[:, rows], self.yy[rows])
        sq = ((w @ self.G) * w).sum() - 2 * (w * B.T).sum() + yy.sum()
        return float(sq / max(float(yy.sum()), 1e-30))

    def solve(self, w0: torch.Tensor, damp: float, free_last: bool, rows=None) -> torch.Tensor:
        """Ridge toward ``w0``: ``(G + lam I) w^T = B + lam w0^T``, ``lam = damp * mean(diag G)``
        (``w0`` holds the output ``rows`` solved for, if given)."""
        k = self.G.shape[0] - (1 if free_last else 0)
        lam = torch.full((self.G.shape[0],), damp * float(self.G.diagonal()[:k].mean()) + 1e-12, dtype=torch.float64)
        if free_last:
            lam[-1] = 1e-12                  # the bias is free: it takes the mean shift (FLAP's compensation)
        rhs = (self.B if rows is None else self.B[:, rows]) + lam[:, None] * w0.T
        damped = lambda: torch.diagonal_scatter(self.G, self.G.diagonal() + lam)
        # factored in place: a wide layer's G is hundreds of MB, and the cross-validation holds two folds of it
        L = damped()
        _, info = torch.linalg.cholesky_ex(L, out=(L, torch.empty((), dtype=torch.int32)))
        return (torch.cholesky_solve(rhs, L) if int(info) == 0 else torch.linalg.lstsq(damped(), rhs).solution).T
