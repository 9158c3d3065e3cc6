"""QSilk micro-clamp (spec §2) and fast exact tail quantiles; the limiter itself is in `limiter`.

The quantiles reproduce `torch.quantile`'s linear interpolation exactly (its float32 rank
arithmetic included) from the two order statistics each quantile needs, selected with `topk`
instead of a full sort; there is no 16M-element limit.
"""
from __future__ import annotations

import math
import struct

import torch

from .limiter import check_shape_alpha, limit

__all__ = ["limit", "micro_clamp", "tail_quantiles"]


def _f32(v: float) -> float:
    """Round a Python float to the nearest float32 value."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _check_q(name: str, q: float) -> None:
    if not (isinstance(q, (int, float)) and not isinstance(q, bool) and math.isfinite(q) and 0.0 <= q <= 1.0):
        raise ValueError(f"{name} must be a finite number in 0..1 (got {q!r})")


def _rank(q: float, n: int) -> tuple[int, int, float]:
    """Order-statistic indices and weight of quantile `q` of `n` values, as torch.quantile computes
    them: ``r = fl32(fl32(q)·fl32(n−1))``, below ``⌊r⌋``, above ``⌈r⌉``, weight ``r − ⌊r⌋``."""
    r = _f32(_f32(q) * _f32(float(n - 1)))
    below = int(math.floor(r))
    above = min(int(math.ceil(r)), n - 1)
    return below, above, r - below


def _order_stats(x: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `lo`-th and `hi`-th smallest values (0-based, ``lo ≤ hi``) of each row, via one topk
    from whichever end needs fewer values."""
    n = x.shape[1]
    if hi + 1 <= n - lo:
        v = torch.topk(x, hi + 1, dim=1, largest=False, sorted=True).values
        return v[:, lo], v[:, hi]
    v = torch.topk(x, n - lo, dim=1, largest=True, sorted=True).values
    return v[:, n - 1 - lo], v[:, n - 1 - hi]


def tail_quantiles(x: torch.Tensor, q_lo: float, q_hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantiles at `q_lo` and `q_hi`, equal to ``torch.quantile`` (linear) — spec §2.

    Math: for ``r = q·(N−1)`` (in float32, as torch.quantile), ``Q = lerp(v₍⌊r⌋₎, v₍⌈r⌉₎, r−⌊r⌋)``
    where ``v₍j₎`` is the j-th smallest value of the row (four order statistics per row in all).

    Args:
        x: ``(R, N)``, any float dtype, any N ≥ 1 (also above torch.quantile's 16M limit).
        q_lo, q_hi: quantile levels in [0, 1].
    Returns:
        ``(l, h)``: two float32 tensors of shape ``(R,)`` on `x`'s device.
    Guarantees:
        Equal to ``torch.quantile(x.float(), q, dim=1)`` for rows without NaN (the same float32
        rank, the same order statistics, the same lerp); rows are independent; no sort of the
        whole row, no host sync. A row containing NaN gives an unspecified value (callers mask
        such rows; torch.quantile would return NaN).

    >>> tail_quantiles(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 0.25, 0.5)
    (tensor([1.7500]), tensor([2.5000]))
    """
    _check_q("q_lo", q_lo)
    _check_q("q_hi", q_hi)
    if x.dim() != 2 or x.shape[1] < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (R, N) tensor with N ≥ 1 (got {tuple(x.shape)}, {x.dtype})")
    # topk on float32 is several times faster than on fp16/bf16 on CPU; order statistics are
    # exactly representable in float32 either way.
    x = x.float()
    n = x.shape[1]
    out = []
    for q in (q_lo, q_hi):
        below, above, w = _rank(q, n)
        v_below, v_above = _order_stats(x, below, above)
        out.append(torch.lerp(v_below, v_above, w))
    return out[0], out[1]


def micro_clamp(x: torch.Tensor, q_lo: float = 0.001, q_hi: float = 0.999, shape: str = "hard",
                alpha: float = 2.0, per_channel: bool = False) -> torch.Tensor:
    """QSilk micrograin stabilizer: per-sample quantile corridor, then the limiter — spec §2.

    Math: ``l = quantile(x_b, q_lo)``, ``h = quantile(x_b, q_hi)`` over all values of sample b
    (or of each channel with `per_channel`), then ``limit(x_b, l, h, shape, alpha)`` (spec §1).

    Args:
        x: ``(B, …)``, any float dtype; ``(B, C, …)`` with `per_channel`.
        q_lo, q_hi: quantile levels, ``0 ≤ q_lo < q_hi ≤ 1``.
        shape, alpha: the limiter (hard | soft | tanh) and its α (soft 0.1..20, tanh 0.1..4).
        per_channel: one corridor per (sample, channel) instead of per sample.
    Returns:
        A new tensor with `x`'s shape, dtype and device; statistics in float32.
    Guarantees:
        Per sample (sample b's output depends only on sample b); a sample with any NaN/±Inf is
        returned bit-for-bit unchanged while the finite samples are processed; hard/soft keep
        in-corridor (in-knee) values bit-for-bit and never leave ``[l, h]``; a constant sample is
        unchanged; `x` is not modified; no host sync (``.item()``) and no branching on values.
    Deviates:
        spec §7 "soft clamp": the default shape is hard (the paper's fast variant, what the
        reference code runs); the paper's tanh α≈2 is ``shape="tanh"``.

    >>> x = torch.tensor([[[[0.0, 1.0], [2.0, 100.0]]]])
    >>> micro_clamp(x, 0.0, 2 / 3)
    tensor([[[[0., 1.],
              [2., 2.]]]])
    """
    _check_q("q_lo", q_lo)
    _check_q("q_hi", q_hi)
    if not q_lo < q_hi:
        raise ValueError(f"q_lo must be below q_hi (got q_lo={q_lo!r}, q_hi={q_hi!r})")
    check_shape_alpha(shape, alpha)
    if not x.is_floating_point() or x.dim() < (3 if per_channel else 2) or x.numel() == 0:
        raise ValueError(f"x must be a non-empty floating (B, C, …) tensor (got {tuple(x.shape)}, {x.dtype})")
    b = x.shape[0]
    rows = x.reshape(b * x.shape[1], -1) if per_channel else x.reshape(b, -1)
    # A float64 sum of float32/16 values cannot overflow: it is non-finite iff a value is NaN/±Inf.
    finite = x.reshape(b, -1).sum(1, dtype=torch.float64).isfinite()
    if per_channel:
        finite = finite.repeat_interleave(x.shape[1])
    l, h = tail_quantiles(rows, q_lo, q_hi)
    l, h = l.unsqueeze(1), h.unsqueeze(1)
    if shape == "hard":
        # An infinite corridor is the identity for clamp (NaN and -0.0 included): no extra pass.
        inf = torch.full_like(l, math.inf)
        out = limit(rows, torch.where(finite[:, None], l, -inf), torch.where(finite[:, None], h, inf))
    else:
        out = torch.where(finite[:, None], limit(rows, l, h, shape, alpha), rows)
    return out.reshape(x.shape)
