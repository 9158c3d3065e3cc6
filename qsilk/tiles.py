"""Tiles of AQClip (spec §3.1, §3.2, §3.6): geometry with reflect padding, tile statistics from
pooled block moments, and the overlap-add of a per-tile limiter's changes, one tile phase at a time.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .limiter import change_from_params, change_params

#: Values limited at once in `overlap_add_changes` (1 MiB of float32: stays in cache).
CHUNK = 1 << 18


class TileGrid(NamedTuple):
    """Tile geometry of spec §3.1 for one latent size."""
    tile: int    # T_eff = min(T, H, W)
    stride: int  # S_eff = max(1, min(S, ⌈T_eff/2⌉))
    pad_h: int   # reflect padding at the bottom so that (H_pad − T_eff) % S_eff = 0
    pad_w: int
    n_h: int     # tiles per column / row
    n_w: int


def tile_grid(h: int, w: int, tile: int, stride: int) -> TileGrid:
    """Tile geometry (spec §3.1): every pixel covered, by ≥ 2 tiles per axis where the side allows.

    >>> tile_grid(104, 152, 32, 16)
    TileGrid(tile=32, stride=16, pad_h=8, pad_w=8, n_h=6, n_w=9)
    """
    t = min(tile, h, w)
    s = max(1, min(stride, -(-t // 2)))
    pad_h, pad_w = -(h - t) % s, -(w - t) % s
    return TileGrid(t, s, pad_h, pad_w, (h + pad_h - t) // s + 1, (w + pad_w - t) // s + 1)


def tile_stats(xp: torch.Tensor, grid: TileGrid, pooled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile mean and population std (spec §3.2), per channel or pooled over channels.

    Math: blocks of ``g×g`` (``g = gcd(T, S)``) give float32 moments around a block pixel (no
    cancellation); tiles average ``(T/g)²`` blocks in float64: ``μ = E[x]``,
    ``σ² = E[(x − r)²] − (E[x] − r)²`` per block, combined as ``E[σ_b² + μ_b²] − μ²``. A tile whose
    values are all equal gets exactly ``σ = 0`` and ``μ =`` that value.
    Args: xp: padded ``(B, C, H_pad, W_pad)`` float32, contiguous.
    Returns: ``(μ, σ)``, float64, ``(B, C|1, n_h, n_w)``.

    >>> x = torch.full((1, 1, 4, 4), 0.1); x[0, 0, 3, 3] = 2.0
    >>> mu, sigma = tile_stats(x, tile_grid(4, 4, 2, 2), pooled=False)
    >>> bool(mu[0, 0, 0, 0] == x[0, 0, 0, 0].double()), sigma[0, 0].round(decimals=4).tolist()
    (True, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.8227]])
    """
    b, c, hp, wp = xp.shape
    g = math.gcd(grid.tile, grid.stride)
    if g > 1:
        r = xp[:, :, ::g, ::g]
        d = xp.view(b, c, hp // g, g, wp // g, g) - r[:, :, :, None, :, None]
        # float32 block sums (a float64 `dtype=` would first copy the whole latent to float64)
        s1 = d.sum((3, 5)).double() / (g * g)
        s2 = d.mul_(d).sum((3, 5)).double() / (g * g)
        m = r.double() + s1
        ex2 = (s2 - s1 * s1).clamp_min_(0) + m * m
    else:
        m = xp.double()
        s2, ex2 = None, m * m
    k, q = grid.tile // g, grid.stride // g
    mu, ex2 = F.avg_pool2d(m, k, q), F.avg_pool2d(ex2, k, q)
    mmax, mmin = F.max_pool2d(m, k, q), -F.max_pool2d(-m, k, q)
    const = mmax == mmin
    if s2 is not None:
        const &= F.max_pool2d(s2, k, q) == 0
    if pooled:
        mu, ex2 = mu.mean(1, keepdim=True), ex2.mean(1, keepdim=True)
        const = const.all(1, keepdim=True) & (mmax.amax(1, keepdim=True) == mmin.amin(1, keepdim=True))
    var = (ex2 - mu * mu).clamp_min_(0)
    return mu, torch.where(const, torch.zeros_like(var), var).sqrt_()


@lru_cache(maxsize=64)
def window(t: int, triangular: bool, device: str = "cpu") -> torch.Tensor:
    """Tile window (spec §3.6): ``w(i) = 1 − |i − (T−1)/2|/(T/2)`` (> 0 everywhere), or 1.

    Cached per device (read-only): a host→device copy per call would synchronise a GPU stream.
    """
    i = torch.arange(t, dtype=torch.float64)
    w = (1.0 - (i - (t - 1) / 2).abs() / (t / 2)).float() if triangular else torch.ones(t)
    return w.to(device)


@lru_cache(maxsize=64)
def coverage(n: int, t: int, s: int, triangular: bool) -> torch.Tensor:
    """``Σ_tiles w(i − origin)`` along one padded axis (the 1-D factor of ``fold(w)``), float64."""
    idx = (torch.arange(n)[:, None] * s + torch.arange(t)[None, :]).flatten()
    return torch.zeros((n - 1) * s + t, dtype=torch.float64).index_add_(
        0, idx, window(t, triangular).double().repeat(n))


def overlap_add_changes(xp, l, h, grid: TileGrid, shape: str, alpha: float, triangular: bool):
    """``Σ_tiles w·(x − L_tile(x))`` on the padded latent, one tile phase at a time (spec §3.6).

    The ⌈T/S⌉² phases each hold tiles that do not overlap, so each phase is one strided view of
    `xp` limited at once: memory O(C·H·W). An unchanged value contributes exactly +0.
    """
    t, s = grid.tile, grid.stride
    r = -(-t // s)
    acc = torch.zeros_like(xp)
    w = window(t, triangular, str(xp.device))
    w2 = (w[:, None, None] * w[None, None, :]) if triangular else None
    params = change_params(l, h, shape, alpha)  # per-tile constants, once for all phases
    sb, sc, sh, sw = xp.stride()
    for pi in range(min(r, grid.n_h)):
        for pj in range(min(r, grid.n_w)):
            n_i, nj = -(-(grid.n_h - pi) // r), -(-(grid.n_w - pj) // r)
            # a few tile rows at a time, so the ~9 passes of the limiter run on cache-sized data
            rows = max(1, CHUNK // (xp.shape[0] * xp.shape[1] * nj * t * t))
            for i0 in range(0, n_i, rows):
                ni = min(rows, n_i - i0)
                size, strides = (*xp.shape[:2], ni, t, nj, t), (sb, sc, r * s * sh, sh, r * s * sw, sw)
                off = (pi + i0 * r) * s * sh + pj * s * sw
                xt = xp.as_strided(size, strides, xp.storage_offset() + off)
                phase = tuple(p[:, :, pi + i0 * r:pi + (i0 + ni) * r:r, pj::r][:, :, :, None, :, None] for p in params)
                change = change_from_params(xt, phase, shape)
                view = acc.as_strided(size, strides, off)
                view.add_(change) if w2 is None else view.addcmul_(change, w2)
    return acc


def spread_tiles(v: torch.Tensor, grid: TileGrid, triangular: bool, hw: tuple[int, int]) -> torch.Tensor:
    """A per-tile ``(B,1,n_h,n_w)`` value as each pixel sees it: ``fold(w·v)/fold(w)``, cropped."""
    w = window(grid.tile, triangular, str(v.device))
    folded = F.conv_transpose2d(v.float(), (w[:, None] * w[None, :])[None, None], stride=grid.stride)
    den = coverage_2d(grid, triangular, str(v.device))
    return (folded / den)[..., : hw[0], : hw[1]]


@lru_cache(maxsize=32)
def coverage_2d(grid: TileGrid, triangular: bool, device: str = "cpu") -> torch.Tensor:
    """``fold(w)`` on the padded latent, ``(H_pad, W_pad)`` float32: > 0 at every pixel.

    Cached per grid and device (read-only), like `window`.

    >>> coverage_2d(tile_grid(4, 4, 2, 1), False, "cpu")[0]
    tensor([1., 2., 2., 1.])
    """
    ch = coverage(grid.n_h, grid.tile, grid.stride, triangular)
    cw = coverage(grid.n_w, grid.tile, grid.stride, triangular)
    return (ch[:, None] * cw[None, :]).float().to(device)
