"""AQClip confidence maps (spec §3.3): the Lite gradient proxy, resizing and pooling a map onto the
tile grid, and the per-variant normalisation to ``c ∈ [0, 1]`` (1 = confident).

All functions are pure, per sample, float32 (float64 where stated) and free of host syncs.
"""
from __future__ import annotations

import math
import struct
from functools import lru_cache

import torch
import torch.nn.functional as F

from .consts import scalar, scratch

#: Floor of the percentile spread for a given (Attn) confidence map (spec §3.3).
ATTN_TAU = 0.05

#: Percentile levels of the `qsilk` normalisation (spec §3.3).
PERCENTILES = (0.02, 0.5, 0.98)


def lite_source(x: torch.Tensor, variant: str = "qsilk", out: torch.Tensor | None = None, *,
                scaled: bool = False) -> tuple[torch.Tensor, float]:
    """``(g', scale)`` with ``lite_map(x) = scale·g'``: the Lite gradient in six batched ops.

    Math: Sobel-x = B₂∘D_x and Sobel-y = B₂∘D_y with B₂ the 2×2 box sum, ``D_x = e + f``,
    ``D_y = e − f``, ``e = p[y+1,x+1] − p[y,x]``, ``f = p[y,x+1] − p[y+1,x]`` on the replicate-padded
    sample p; B₂ is linear, so ``gx² + gy² = 2·((B₂e)² + (B₂f)²)``, and ``B₂e``, ``B₂f`` are
    differences of the 2×2 box sums Q of p (two slice additions): ``E = Q[i+1,j+1] − Q[i,j]``,
    ``F = Q[i,j+1] − Q[i+1,j]``. So ``g = √(2/C)·√(Σ_c E² + F²)``. Every op works per output
    pixel of one sample (no convolution whose algorithm could depend on the batch).
    Args: x: ``(B, C, H, W)`` float32 or float64; out: where to write g (optional); scaled:
        return `lite_map` itself (scale 1).
    Returns: ``(B, 1, H, W)`` in x's dtype and the Python scale.
    """
    if variant == "paper":
        x = x.mean(1, keepdim=True)
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    # temporaries in reused CPU buffers (`consts.scratch`; e reuses h's, which q has consumed)
    b, c, hh, ww = x.shape
    hbuf = scratch((b * c * (hh + 2) * (ww + 1),), x.dtype, x.device, "lite.h")
    h = torch.add(p[..., 1:], p[..., :-1], out=hbuf.view(b, c, hh + 2, ww + 1))
    q = torch.add(h[..., 1:, :], h[..., :-1, :], out=scratch((b, c, hh + 1, ww + 1), x.dtype, x.device, "lite.q"))
    # 2×2 box sums q, (B, C, H+1, W+1)
    e = torch.sub(q[..., 1:, 1:], q[..., :-1, :-1], out=hbuf[:b * c * hh * ww].view(b, c, hh, ww))
    f = torch.sub(q[..., :-1, 1:], q[..., 1:, :-1], out=scratch((b, c, hh, ww), x.dtype, x.device, "lite.f"))
    # Σ_c (e² + f²) by a plain channel sum (a norm reduction over channels is ~80× slower on CPU)
    total = e.mul_(e).addcmul_(f, f).sum(1, keepdim=True)
    if scaled:  # lite_map's own scale, inside the root (exact for exact inputs)
        return torch.sqrt(total.mul_(2.0 / x.shape[1]), out=out), 1.0
    g = torch.sqrt(total, out=out)
    return g, math.sqrt(2.0 / x.shape[1])


def lite_map(x: torch.Tensor, variant: str = "qsilk") -> torch.Tensor:
    """Lite (proxy) confidence source: local gradient magnitude — spec §3.3.

    Math: `qsilk`: ``g = sqrt(mean_c(gx_c² + gy_c²))`` (RMS over channels of each channel's Sobel
    magnitude); `paper`: ``g = |∇ mean_c x|`` (Algorithm 1, line 2). Replicate padding.

    Args:
        x: ``(B, C, H, W)``, any float dtype (computed in float32).
        variant: ``"qsilk"`` | ``"paper"``.
    Returns:
        ``(B, 1, H, W)`` float32, ≥ 0; zero for a constant sample.
    Deviates:
        spec §7 "Lite gradient" (qsilk: RMS of per-channel gradients, replicate padding). The
        paper variant also uses replicate padding (the paper names none; the reference code's
        zero padding inflates borders).

    >>> lite_map(torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]))
    tensor([[[[4., 4.],
              [4., 4.]]]])
    """
    return lite_source(x.float(), variant, scaled=True)[0]


def resize_map(conf: torch.Tensor, hw: tuple[int, int], batch: int) -> torch.Tensor:
    """A given confidence map resized to the latent grid — spec §3.3 (Attn).

    Args:
        conf: ``(B|1, 1, H', W')`` or ``(B|1, H', W')``, values in [0, 1] (1 = confident).
        hw: the latent's ``(H, W)``; batch: the latent's B.
    Returns:
        ``(B, 1, H, W)`` float32 in [0, 1]: bilinear (antialiased when shrinking); non-finite
        values count as confident (1.0, the widest `qsilk` corridor).
    Raises:
        ValueError naming `confidence` when the shape cannot be matched to the latent.
    """
    if conf.dim() == 3:
        conf = conf.unsqueeze(1)
    if conf.dim() != 4 or conf.shape[1] != 1 or conf.shape[0] not in (1, batch) or conf.numel() == 0:
        raise ValueError(f"confidence must be a (B, 1, H', W') map with B = 1 or {batch} "
                         f"(got {tuple(conf.shape)})")
    conf = torch.nan_to_num(conf.float(), nan=1.0, posinf=1.0, neginf=0.0)
    if tuple(conf.shape[-2:]) != tuple(hw):
        shrink = conf.shape[-2] > hw[0] or conf.shape[-1] > hw[1]
        conf = F.interpolate(conf, size=hw, mode="bilinear", align_corners=False, antialias=shrink)
    return conf.clamp(0.0, 1.0).expand(batch, 1, *hw)


def pool_to_tiles(m: torch.Tensor, pad_h: int, pad_w: int, tile: int, stride: int) -> torch.Tensor:
    """Mean of a ``(B, K, H, W)`` map over each tile of the grid — spec §3.1/§3.3.

    Math: reflect-pad bottom/right by ``(pad_h, pad_w)`` exactly like the latent, then average
    over ``tile×tile`` windows at `stride`, as ``g×g`` block means (``g = gcd(tile, stride)``)
    averaged over ``(tile/g)²`` blocks: equal-size blocks, so this is the tile mean.
    Returns:
        ``(B, K, n_h, n_w)`` float64 (a tile mean of up to T² values; the paper mapping's ndtri
        near 1 magnifies float32 rounding).

    >>> pool_to_tiles(torch.arange(16.0).view(1, 1, 4, 4), 0, 0, 2, 2)
    tensor([[[[ 2.5000,  4.5000],
              [10.5000, 12.5000]]]], dtype=torch.float64)
    """
    if pad_h or pad_w:
        m = F.pad(m, (0, pad_w, 0, pad_h), mode="reflect")
    g = math.gcd(tile, stride)
    if g > 1:  # block means: a float32 sum of g² values, then float64
        b, k, hp, wp = m.shape
        m = m.reshape(b, k, hp // g, g, wp // g, g).sum((3, 5)).double() / (g * g)
    return F.avg_pool2d(m.double(), tile // g, stride // g)


@lru_cache(maxsize=64)
def _quantile_plan(levels: tuple[float, ...], n: int, dtype: torch.dtype, device: str
                   ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(k, index, weight)`` to read exact ``torch.quantile`` (linear) values of `levels` from the
    k smallest values of rows of n: ranks ``r = q·(n−1)`` in `dtype` (as torch.quantile computes
    them), order statistics ``⌊r⌋`` and ``⌈r⌉`` (``index``: all belows, then all aboves) and
    weights ``r − ⌊r⌋``. Built once per (levels, n, dtype, device): no per-call host→device copy."""
    if dtype == torch.float64:
        ranks = [q * (n - 1) for q in levels]
    else:  # float32 rank arithmetic, as torch.quantile on float32 (it takes no other dtype)
        f32 = lambda v: struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731
        ranks = [f32(f32(q) * f32(float(n - 1))) for q in levels]
    below = [int(math.floor(r)) for r in ranks]
    above = [min(int(math.ceil(r)), n - 1) for r in ranks]
    index = torch.tensor(below + above, dtype=torch.long).to(device)
    weight = torch.tensor([r - b for r, b in zip(ranks, below)], dtype=dtype).to(device)
    return max(above) + 1, index, weight


def row_quantiles(a: torch.Tensor, levels: tuple[float, ...]) -> torch.Tensor:
    """``(R, L)``: quantiles at `levels` of each row of ``(R, N)`` `a`, equal to ``torch.quantile``
    (linear interpolation, ranks in `a`'s dtype) for rows without NaN — in three ops (one sorted
    ``topk`` of the k smallest values, one ``index_select``, one ``lerp``), with no host sync (a
    tensor `q` makes torch.quantile check it on the host) and no 16M limit."""
    k, index, weight = _quantile_plan(tuple(levels), a.shape[1], a.dtype, str(a.device))
    v = torch.topk(a, k, dim=1, largest=False, sorted=True).values.index_select(1, index)
    return torch.lerp(v[:, :len(levels)], v[:, len(levels):], weight)


def _percentiles(a: torch.Tensor) -> torch.Tensor:
    """``(3, B, 1, 1, 1)``: p2, p50, p98 of each sample's values of a ``(B, 1, n_h, n_w)`` map."""
    return row_quantiles(a.flatten(1), PERCENTILES).t().reshape(3, -1, 1, 1, 1)


@lru_cache(maxsize=16)
def _spread_terms(lite_eps: float, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bias, M)`` with ``bias + [p2, p50, p98]·M = [p98 − p2, lite_eps + ½·p50]`` (cached)."""
    mat = torch.tensor([[-1.0, 0.0], [0.0, 0.5], [1.0, 0.0]], dtype=dtype).to(device)
    return torch.tensor([0.0, lite_eps], dtype=dtype).to(device), mat


def normalise_tiles(a: torch.Tensor, lite_eps: float | None) -> torch.Tensor:
    """`normalise_qsilk` of a ``(B, 1, n_h, n_w)`` tile-grid source in a handful of ops: with
    `lite_eps` (Lite: ``τ = 0.5·p50 + lite_eps``; ``1e-12`` on `lite_map`'s scale), else the Attn
    floor ``τ = 0.05``. ``c = clip(1 + (a − p98)/r, 0, 1)`` — bit-equal to ``1 − (p98 − a)/r``."""
    flat = a.flatten(1)
    levels = PERCENTILES if lite_eps is not None else (PERCENTILES[0], PERCENTILES[2])
    q = row_quantiles(flat, levels)
    p98 = q[:, -1:]
    if lite_eps is not None:
        # [p98 − p2, lite_eps + ½·p50] as one matrix product: each column is one rounding of
        # two terms (the others are exact zeros), bit-equal to the subtraction and the add
        bias, mat = _spread_terms(float(lite_eps), a.dtype, str(a.device))
        both = torch.addmm(bias, q, mat)
        r = torch.maximum(both[:, :1], both[:, 1:])
    else:
        r = (p98 - q[:, :1]).clamp_min(ATTN_TAU)
    c = torch.addcdiv(scalar(1.0, a.dtype, str(a.device)), flat - p98, r)
    return c.clamp_(0.0, 1.0).view(a.shape)


def normalise_qsilk(a: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Anchored percentile normalisation of a confidence source on the tile grid — spec §3.3.

    Math: per sample, ``p2, p98`` percentiles of `a`, ``r = max(p98 − p2, τ)``,
    ``c = clip(1 − (p98 − a)/r, 0, 1)``. For a source where high = uncertain (entropy E), pass
    ``a = 1 − E``: this equals the spec's ``clip(1 − (E − p2(E))/r, 0, 1)``.

    Args:
        a: ``(B, 1, n_h, n_w)``, high = confident (gradient magnitude or confidence).
        tau: floor of the spread, a float or a ``(B, 1, 1, 1)`` tensor.
    Returns:
        ``(B, 1, n_h, n_w)`` in [0, 1], `a`'s dtype.
    Guarantees:
        A constant map gives exactly 1; a map whose spread is below τ stays near 1 (no
        stretching of noise); per sample.
    Deviates:
        spec §7 "normalisation" (the paper divides by the max).

    >>> normalise_qsilk(torch.tensor([[[[0.0, 1.0, 2.0, 2.0]]]]), 0.5)[0, 0, 0]
    tensor([0.0000, 0.4845, 1.0000, 1.0000])
    """
    p2, _, p98 = _percentiles(a)
    r = torch.clamp_min(p98 - p2, tau)
    return (1.0 - (p98 - a) / r).clamp_(0.0, 1.0)


def lite_tau(g: torch.Tensor) -> torch.Tensor:
    """The Lite spread floor ``τ = 0.5·p50(g) + 1e-12`` per sample, ``(B, 1, 1, 1)``."""
    return 0.5 * _percentiles(g)[1] + 1e-12


def normalise_paper(a: torch.Tensor) -> torch.Tensor:
    """The paper's ``Ĥ = a / max(a)`` per sample (Algorithm 1, line 2), floored at 1e-12.

    >>> normalise_paper(torch.tensor([[[[1.0, 4.0]]]]))
    tensor([[[[0.2500, 1.0000]]]])
    """
    return a / a.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)


def entropy_to_confidence(entropy: torch.Tensor, variant: str = "qsilk") -> torch.Tensor:
    """The confidence map AQClip takes, from a normalised attention-entropy map — spec §3.3.

    Math: `qsilk`: ``1 − E`` (entropy is uncertainty); `paper`: ``E`` (the paper and the
    reference code use normalised entropy directly as Ĥ).
    Deviates: spec §7 "Attn confidence" (qsilk inverts).
    """
    return entropy if variant == "paper" else 1.0 - entropy
