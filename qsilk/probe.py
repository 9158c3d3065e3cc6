"""Attention-entropy probe (spec §5).

CONTRACT STUB — to be implemented (issue #2). Signatures are fixed.
"""
from __future__ import annotations

import torch


def entropy_map(q: torch.Tensor, k: torch.Tensor, grid_hw: tuple[int, int], *, num_heads: int, heads: int = 2,
                max_queries: int = 1024) -> torch.Tensor:
    """Normalised attention entropy ``(B, 1, h, w)`` in [0, 1] from `to_q`/`to_k` outputs
    ``(B, N, num_heads·d)`` of one self-attention layer whose tokens form the grid `grid_hw`."""
    raise NotImplementedError
