"""Calibration data split over ``torch.distributed`` ranks: sums made whole on every rank.

Every data-dependent quantity amgfx reads (calibration statistics, the refit's normal equations, the q/k
logit scales) is a sum over samples, so each rank sums its own shard and one all-reduce gives every rank
the sums of the union: every rank then scores, plans and refits exactly as one process would on all of it.
Without an initialised process group, everything here does nothing.

Example:
    >>> import torch
    >>> active(), rank_world()
    (False, (0, 1))
    >>> t = torch.ones(3, dtype=torch.float64)
    >>> all_sum(t)          # no process group: t as it was
    >>> t.tolist()
    [1.0, 1.0, 1.0]
"""
from __future__ import annotations

import torch

__all__ = ["active", "rank_world", "all_sum", "barrier"]


def active() -> bool:
    """Whether a default process group is initialised."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default group; ``(0, 1)`` without one."""
    if not active():
        return 0, 1
    import torch.distributed as dist
    return dist.get_rank(), dist.get_world_size()


def all_sum(*tensors: torch.Tensor) -> None:
    """Each tensor summed over the ranks, in place, in the order given (every rank must give the same list)."""
    if not active():
        return
    import torch.distributed as dist
    for t in tensors:
        dist.all_reduce(t)


def barrier() -> None:
    """Wait for every rank (nothing without a group)."""
    if active():
        import torch.distributed as dist
        dist.barrier()
