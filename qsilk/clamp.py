"""QSilk micro-clamp (spec §2), the limiter (spec §1) and fast exact tail quantiles.

CONTRACT STUB — to be implemented (issue #2). Signatures are fixed.
"""
from __future__ import annotations

import torch


def tail_quantiles(x: torch.Tensor, q_lo: float, q_hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantiles of a ``(R, N)`` tensor at `q_lo` and `q_hi`, equal to `torch.quantile`
    (linear interpolation) to float32 rounding, without a full sort and without torch.quantile's
    16M-element limit. Returns two float32 tensors of shape ``(R,)``."""
    raise NotImplementedError


def limit(x: torch.Tensor, l: torch.Tensor, h: torch.Tensor, shape: str = "hard", alpha: float = 2.0) -> torch.Tensor:
    """The limiter of spec §1 (`hard` | `soft` | `tanh`), `l`/`h` broadcastable to `x`."""
    raise NotImplementedError


def micro_clamp(x: torch.Tensor, q_lo: float = 0.001, q_hi: float = 0.999, shape: str = "hard",
                alpha: float = 2.0, per_channel: bool = False) -> torch.Tensor:
    """QSilk micrograin stabilizer: per-sample quantile corridor + limiter (spec §2)."""
    raise NotImplementedError
