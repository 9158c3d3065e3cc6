"""Per-σ micro-clamp targets ("multi-timestep statistics", seed 001; quant.md §5.5).

Latent statistics drift along the trajectory, so one global corridor fits no step well. A
coefficient file may carry, per knot σ_k,

- absolute bounds ``clamp_lo``/``clamp_hi`` (``(K,)`` or per channel ``(K, C)``) — e.g. the 16-bit
  model's own corridor at that σ, fitted by the paired calibrator — or
- quantile levels ``q_lo``/``q_hi`` ``(K,)`` replacing the global `q_lo`/`q_hi`.

Both are interpolated linearly in log σ (flat outside the knots). Absolute bounds take precedence
when a file has both. The result replaces the micro-clamp's corridor; the limiter (shape, α) and
strength stay the user's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .precondition import _sigma_rows, interp_log_sigma


def rowwise_quantile(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantile of each row of `v` ``(R, N)`` at its own level ``q`` ``(R,)`` (linear interpolation,
    like `torch.quantile`). One sort per row; no host sync.

    >>> rowwise_quantile(torch.tensor([[0., 1., 2., 3.], [4., 0., 8., 2.]]), torch.tensor([0.5, 1.0])).tolist()
    [1.5, 8.0]
    """
    n = v.shape[1]
    srt = v.float().sort(dim=1).values
    pos = q.float().clamp(0, 1) * (n - 1)
    below = pos.floor().long().clamp(0, n - 1)
    above = (below + 1).clamp(max=n - 1)
    lo = srt.gather(1, below[:, None])[:, 0]
    hi = srt.gather(1, above[:, None])[:, 0]
    return lo + (hi - lo) * (pos - below.float())


@dataclass
class SigmaCorridor:
    """Per-σ corridor for the micro-clamp; knots increasing (as `CoefficientSet` stores them)."""

    knots: torch.Tensor
    q_lo: torch.Tensor | None = None
    q_hi: torch.Tensor | None = None
    clamp_lo: torch.Tensor | None = None
    clamp_hi: torch.Tensor | None = None

    @classmethod
    def from_coefficients(cls, coeffs: Any) -> "SigmaCorridor | None":
        if not coeffs.has_thresholds:
            return None
        return cls(coeffs.sigmas, coeffs.q_lo, coeffs.q_hi, coeffs.clamp_lo, coeffs.clamp_hi)

    def bounds(self, x: torch.Tensor, sigma: Any, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Corridor ``(l, h)`` broadcastable to `x` ``(B, C, H, W)`` at this evaluation's σ."""
        knots = self.knots.to(x.device)
        sig = _sigma_rows(sigma, x)
        b, c = x.shape[0], x.shape[1]
        if self.clamp_lo is not None:
            lo = interp_log_sigma(sig, knots, self.clamp_lo.to(x.device))
            hi = interp_log_sigma(sig, knots, self.clamp_hi.to(x.device))
            if lo.dim() == 2 and lo.shape[1] != c:
                raise ValueError(f"QSilk: per-channel clamp targets have {lo.shape[1]} channels, the latent {c}")
            shape = (b, lo.shape[1] if lo.dim() == 2 else 1, 1, 1)
            return lo.reshape(shape), hi.reshape(shape)
        ql = interp_log_sigma(sig, knots, self.q_lo.to(x.device))
        qh = interp_log_sigma(sig, knots, self.q_hi.to(x.device))
        rows = x.reshape(b * c, -1) if per_channel else x.reshape(b, -1)
        if per_channel:
            ql, qh = ql.repeat_interleave(c), qh.repeat_interleave(c)
        shape = (b, c if per_channel else 1, 1, 1)
        return rowwise_quantile(rows, ql).reshape(shape), rowwise_quantile(rows, qh).reshape(shape)

    def __call__(self, x: torch.Tensor, sigma: Any, *, shape: str = "hard", alpha: float = 2.0,
                 per_channel: bool = False) -> torch.Tensor:
        """The micro-clamp with this corridor; samples with NaN/Inf pass through unchanged."""
        from ..clamp import limit

        l, h = self.bounds(x, sigma, per_channel)
        out = limit(x, l.to(x.dtype), h.to(x.dtype), shape=shape, alpha=alpha)
        finite = torch.isfinite(x).flatten(1).all(1).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.where(finite, out, x)
