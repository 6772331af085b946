"""How a model's output is read: what the default calibration loss and ``auto``'s held-out error compare.

Where a batch carries an ``attention_mask`` ``[batch, tokens]`` that matches the first output, token states
``[batch, tokens, hidden]`` are read mean-pooled over the real tokens (as sentence-transformers pools MiniLM
into its embedding), other outputs at the real tokens only (what a padded position computes is read by
nobody); any other output is read as it is.

Example:
    >>> import torch
    >>> out, mask = torch.arange(12.).reshape(2, 3, 2), torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> as_read(out, {"attention_mask": mask}).tolist()
    [[1.0, 2.0], [6.0, 7.0]]
"""
from __future__ import annotations

import torch

__all__ = ["as_read", "mean_pool"]


def mean_pool(out: torch.Tensor, mask=None) -> torch.Tensor:
    """Token states ``[batch, tokens, hidden]`` as one vector per sample: the mean over the tokens ``mask``
    (``[batch, tokens]``, 1 = real; None: all) marks, as sentence-transformers pools MiniLM."""
    w = (mask if mask is not None else torch.ones(out.shape[:2])).unsqueeze(-1).to(out.dtype)
    return out.mul(w).sum(1) / w.sum(1).clamp_min(1)


def as_read(out: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``out`` as it is read (see the module docstring); ``kwargs`` are the batch's keyword inputs.

    Why pooled: on MiniLM at half its FLOPs the error per token ranked obs+taylor first (0.618 against taylor's
    0.633 on held-out text) while the pooled embeddings' cosine to dense ranked taylor first (0.836 against
    0.825); the pooled error ranks them as the cosine does (0.563 against 0.583)."""
    mask = kwargs.get("attention_mask") if isinstance(kwargs, dict) else None
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and out.dim() >= 2 and out.shape[:2] == mask.shape):
        return out
    return mean_pool(out, mask) if out.dim() == 3 else out[mask.bool()]
