"""QSilk micro-clamp (spec §2) and fast exact tail quantiles; the limiter itself is in `limiter`.

The quantiles reproduce `torch.quantile`'s linear interpolation exactly (its float32 rank
arithmetic included) from the two order statistics each quantile needs, selected with `topk`
instead of a full sort; there is no 16M-element limit.
"""
from __future__ import annotations

import math
import struct

import torch

from .consts import scalar
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


def _order_stats(x: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The `lo`-th and `hi`-th smallest values (0-based, ``lo ≤ hi``) of each row, via one topk
    from whichever end needs fewer values; also that topk's first column (the row's min when
    taken from below, its max from above — NaN counts as the largest value) and which end."""
    n = x.shape[1]
    if hi + 1 <= n - lo:
        v = torch.topk(x, hi + 1, dim=1, largest=False, sorted=True).values
        return v[:, lo], v[:, hi], v[:, 0], False
    v = torch.topk(x, n - lo, dim=1, largest=True, sorted=True).values
    return v[:, n - 1 - lo], v[:, n - 1 - hi], v[:, 0], True


def _tails(x: torch.Tensor, q_lo: float, q_hi: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(l, h, finite)`` of float32 rows: `tail_quantiles` and, per row, whether it holds only
    finite values — from the two topk's extremes (``max − min < ∞``; NaN sorts above +∞), so no
    extra pass over the row when the tails come from opposite ends (the usual q_lo < ½ < q_hi);
    ``max + 0·min < ∞``, so a finite row spanning float32's whole range counts as finite."""
    n = x.shape[1]
    out, ends = [], {}
    for q in (q_lo, q_hi):
        below, above, w = _rank(q, n)
        v_below, v_above, first, from_top = _order_stats(x, below, above)
        out.append(torch.lerp(v_below, v_above, w))
        ends[from_top] = first
    if len(ends) == 2:
        lo_end, hi_end = ends[False], ends[True]
    else:
        lo_end, hi_end = torch.aminmax(x, dim=1)  # same end for both tails (tiny rows, odd levels)
    # hi + 0·lo < ∞: NaN or ±∞ at either end gives NaN or +∞ (0·±∞ = NaN); a finite row gives its
    # max, so no overflow for finite rows spanning float32's range (hi − lo would be ∞)
    dev = str(x.device)
    finite = torch.lt(torch.addcmul(hi_end, lo_end, scalar(0.0, x.dtype, dev)), scalar(math.inf, x.dtype, dev))
    return out[0], out[1], finite


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
        v_below, v_above, _, _ = _order_stats(x, below, above)
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
    out, finite = clamp_unmasked(x, q_lo, q_hi, shape, alpha, per_channel, out_dtype=x.dtype)
    return torch.where(finite.view(-1, *([1] * (x.dim() - 1))), out, x)


def clamp_unmasked(x: torch.Tensor, q_lo: float, q_hi: float, shape: str, alpha: float,
                   per_channel: bool, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`micro_clamp` without its pass-through of non-finite samples: ``(out, finite)``, `finite`
    ``(B,)`` True where sample b holds only finite values; `out` is unspecified where it is False
    (the caller passes those samples through — `Stabilizer` once, after every component).
    `out` is float32, or `out_dtype` (the hard clamp writes it directly: no separate cast).
    Arguments as `micro_clamp` (not checked here). Hard: 2 topk, 2 lerp, 2 small ops and one clamp."""
    b = x.shape[0]
    rows = x.reshape(b * x.shape[1], -1) if per_channel else x.reshape(b, -1)
    rows = rows.float()
    l, h, finite = _tails(rows, q_lo, q_hi)
    if per_channel:
        finite = finite.view(b, -1).all(1)
    l, h = l.unsqueeze(1), h.unsqueeze(1)
    # NaN bounds of a non-finite sample give NaN here: the caller restores the sample.
    if shape == "hard":
        out = torch.clamp(rows, l, h, out=torch.empty(rows.shape, dtype=out_dtype or torch.float32,
                                                       device=rows.device))
    else:
        out = limit(rows, l, h, shape, alpha)
        out = out if out_dtype is None else out.to(out_dtype)
    return out.reshape(x.shape), finite
