"""Tiles of AQClip (spec §3.1, §3.6): geometry with reflect padding, windows and coverage, and the
layout that limits every tile phase in one strided view (tile statistics are ``avg_pool2d`` in
`qsilk.aqclip`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F


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


# -- the batched path (issue #14): every tile phase in one strided view, one fold ---------------
#: At most this many tile phases (⌈T/S⌉²) are limited in one batched op: the temporaries then hold
#: at most 4× the (padded) latent, whatever the tile/stride. Larger ratios loop over phases.
PHASES_AT_ONCE = 4


class Layout(NamedTuple):
    """Where the tiles of a grid lie when all ⌈T/S⌉² phases are processed at once.

    Phase ``(pi, pj)`` holds tiles ``(pi + r·ti, pj + r·tj)``; every phase gets ``ni × nj`` tiles,
    those past the real grid ("phantom" tiles, index ≥ n_h or n_w) weigh 0. The latent is padded
    to ``he × we`` so every phase's tiles are one strided view of it, and the tile grid to
    ``r·ni × r·nj``, which is also the grid `F.fold` expects for output ``he × we``."""
    r: int
    ni: int
    nj: int
    he: int
    we: int
    first_covers: bool  # phase (0, 0)'s tiles cover the whole latent (they abut: S divides T)


def layout(grid: TileGrid, hw: tuple[int, int] | None = None) -> Layout:
    """`Layout` of a grid (see there). When S divides T the tiles of one phase abut, and with
    `hw` (the latent's size) every phase gets enough (phantom) tiles for phase (0, 0) to cover it.

    >>> layout(tile_grid(128, 128, 32, 16), (128, 128))
    Layout(r=2, ni=4, nj=4, he=144, we=144, first_covers=True)
    """
    t, s = grid.tile, grid.stride
    r = -(-t // s)
    ni, nj = -(-grid.n_h // r), -(-grid.n_w // r)
    covers = False
    if hw is not None and t == r * s:
        ni, nj, covers = max(ni, -(-hw[0] // t)), max(nj, -(-hw[1] // t)), True
    return Layout(r, ni, nj, (r * ni - 1) * s + t, (r * nj - 1) * s + t, covers)


def batched(grid: TileGrid) -> bool:
    """Whether the grid's phases fit one batched op (``⌈T/S⌉² ≤ PHASES_AT_ONCE``)."""
    r = -(-grid.tile // grid.stride)
    return r * r <= PHASES_AT_ONCE


def phase_view(xe: torch.Tensor, grid: TileGrid, lay: Layout) -> torch.Tensor:
    """``(B, C, r, ni, T, r, nj, T)`` strided view of a ``(B, C, he, we)`` tensor: value ``u, v``
    of tile ``(pi + r·ti, pj + r·tj)``. No copy; tiles of different phases overlap in memory."""
    t, s = grid.tile, grid.stride
    sb, sc, sh, sw = xe.stride()
    size = (xe.shape[0], xe.shape[1], lay.r, lay.ni, t, lay.r, lay.nj, t)
    strides = (sb, sc, s * sh, lay.r * s * sh, sh, s * sw, lay.r * s * sw, sw)
    return xe.as_strided(size, strides, xe.storage_offset())


def tile_params_view(p: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Per-tile values ``(..., r·ni, r·nj)`` laid out to broadcast against `phase_view`:
    ``(..., r, ni, 1, r, nj, 1)``."""
    lead = p.shape[:-2]
    v = p.reshape(*lead, lay.ni, lay.r, lay.nj, lay.r)
    n = len(lead)
    v = v.permute(*range(n), n + 1, n, n + 3, n + 2)
    return v.unsqueeze(n + 2).unsqueeze(n + 5)


@lru_cache(maxsize=32)
def phase_weight(grid: TileGrid, triangular: bool, device: str = "cpu", hw: tuple[int, int] | None = None
                 ) -> torch.Tensor:
    """``(1, 1, r, ni, T, r, nj, T)`` float32: the window ``w(u)·w(v)`` of each tile, 0 for
    phantom tiles (`layout` of `grid` and `hw`). Cached per grid and device (read-only)."""
    lay = layout(grid, hw)
    t = grid.tile
    w = window(t, triangular)
    real_i = (torch.arange(lay.r)[:, None] + lay.r * torch.arange(lay.ni)[None, :] < grid.n_h).float()
    real_j = (torch.arange(lay.r)[:, None] + lay.r * torch.arange(lay.nj)[None, :] < grid.n_w).float()
    wi = real_i[:, :, None] * w[None, None, :]          # (r, ni, T)
    wj = real_j[:, :, None] * w[None, None, :]
    return (wi[:, :, :, None, None, None] * wj[None, None, None]).unsqueeze(0).unsqueeze(0).to(device)


@lru_cache(maxsize=32)
def blend_factor(grid: TileGrid, triangular: bool, strength: float, hw: tuple[int, int],
                 device: str = "cpu") -> torch.Tensor:
    """``−strength / fold(w)`` cropped to the latent, float32 ``(H, W)``: ``x_out = x + acc·factor``.
    Cached per grid, strength and device (read-only)."""
    cov = coverage(grid.n_h, grid.tile, grid.stride, triangular)[: hw[0], None] * \
        coverage(grid.n_w, grid.tile, grid.stride, triangular)[None, : hw[1]]
    return (-strength / cov.float()).contiguous().to(device)
