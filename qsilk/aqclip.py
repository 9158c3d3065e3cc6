"""AQClip: adaptive per-tile quantile corridor (spec §3).

CONTRACT STUB — to be implemented (issue #2). Signatures are fixed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AQClipState:
    """EMA state carried across the evaluations of one pass (spec §3.5).

    `has_attn` is True once an Attn confidence map has been used in this pass.
    """
    has_attn: bool = False


def aqclip(x: torch.Tensor, confidence: torch.Tensor | None = None, *, tile: int = 32, stride: int = 16,
           shape: str | None = None, alpha: float = 2.0, variant: str = "qsilk", p_wide: float = 0.0005,
           p_narrow: float = 0.01, strength: float = 1.0, state: AQClipState | None = None,
           sigma_floor: float = 1.0, ema_beta: float = 0.8, return_maps: bool = False):
    """Adaptive quantile clip per tile (spec §3). Returns a tensor like `x`, or
    ``(tensor, {"confidence": (B,1,H,W), "activity": (B,1,H,W)})`` with `return_maps`."""
    raise NotImplementedError
