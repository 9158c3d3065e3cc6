"""AQClip: adaptive quantile clip per tile (spec §3) — the corridor (§3.4), the EMA state (§3.5)
and the entry point. Tiling lives in `tiles`, confidence maps in `confidence`, the limiter in
`limiter`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
import torch.nn.functional as F

from . import confidence as cf
from .limiter import check_shape_alpha
from .tiles import TileGrid, coverage_2d, overlap_add_changes, spread_tiles, tile_grid, tile_stats

VARIANTS = ("qsilk", "paper")
DEFAULT_SHAPE = {"qsilk": "soft", "paper": "tanh"}
#: |ndtri| clamp of the paper mapping (spec §3.4; the reference code's erfinv clamp gives 4.8916).
PAPER_Z_MAX = 4.89


@dataclass
class AQClipState:
    """EMA state carried across the evaluations of one pass (spec §3.5).

    `has_attn` is True once an Attn confidence map has been used in this pass; from then on a call
    without a map reuses the state without updating it. `key` is ``(variant, shape, grid,
    device)``; a call with another key resets the state (counted in `shape_resets`): an EMA is
    never reused across shapes. `value` is the EMA (qsilk: confidence ``(B,1,n_h,n_w)``; paper:
    the bounds ``(l, h)``, each ``(B,1,n_h,n_w)``), `seen` ``(B,)`` the samples it holds.
    """
    has_attn: bool = False
    key: tuple | None = None
    value: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
    seen: torch.Tensor | None = None
    last_confidence: torch.Tensor | None = None
    updates: int = 0
    shape_resets: int = 0

    def restart(self, key: tuple | None = None) -> None:
        """Forget the EMA (keeps the counters)."""
        self.key, self.value, self.seen, self.last_confidence = key, None, None, None
        self.has_attn = False


def corridor_qsilk(mu, sigma, c, sigma_s, rho: float, p_wide: float, p_narrow: float):
    """Symmetric corridor widening with confidence (spec §3.4, `qsilk`).

    Math: ``z = z_n + (z_w − z_n)·c``, ``z_n = −ndtri(p_narrow)``, ``z_w = −ndtri(p_wide)``,
    ``σ_eff = max(σ, ρ·σ_s)``, ``l = μ − z·σ_eff``, ``h = μ + z·σ_eff``.

    >>> corridor_qsilk(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0), 1.0, 0.0005, 0.01)
    (tensor(-6.5811), tensor(6.5811))
    """
    z_n, z_w = -NormalDist().inv_cdf(p_narrow), -NormalDist().inv_cdf(p_wide)
    s = torch.maximum(sigma, rho * sigma_s) if rho > 0 else sigma
    z = z_n + (z_w - z_n) * c
    return mu - z * s, mu + z * s


def corridor_paper(mu, sigma, c):
    """The paper's sliding corridor (spec §3.4, `paper`; Algorithm 1 lines 3, 5, sign fixed).

    Math: ``q_ℓ = ½c²``, ``q_h = 1 − ½(1−c)²``, ``l = μ + ndtri(q_ℓ)·σ``, ``h = μ + ndtri(q_h)·σ``,
    ndtri clamped to ±4.89.
    Deviates: spec §7 "lower bound sign" (the paper's ``μ − ndtri(q_ℓ)σ`` puts l above μ).

    >>> corridor_paper(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.5))
    (tensor(-1.1503), tensor(1.1503))
    """
    zl = torch.special.ndtri(0.5 * c * c).clamp(-PAPER_Z_MAX, PAPER_Z_MAX)
    zh = torch.special.ndtri(1.0 - 0.5 * (1.0 - c) ** 2).clamp(-PAPER_Z_MAX, PAPER_Z_MAX)
    return mu + zl * sigma, mu + zh * sigma


def _ema(state: AQClipState, now, beta: float, finite: torch.Tensor):
    """``v = β·v_prev + (1−β)·v_now`` per sample; a sample's first finite update sets ``v_now``;
    non-finite samples keep their previous value (spec §3.5)."""
    nows = now if isinstance(now, tuple) else (now,)
    prevs = state.value if isinstance(state.value, tuple) else (state.value,)
    seen = state.seen if state.seen is not None else torch.zeros_like(finite)
    ok, was = finite.view(-1, 1, 1, 1), seen.view(-1, 1, 1, 1)
    out = []
    for p, n in zip(prevs if state.value is not None else nows, nows):
        out.append(torch.where(ok, torch.where(was, torch.lerp(n, p, beta), n), p))
    state.value = tuple(out) if isinstance(now, tuple) else out[0]
    state.seen, state.updates = seen | finite, state.updates + 1
    return state.value


def _check_args(x, tile, stride, shape, alpha, variant, p_wide, p_narrow, strength, sigma_floor, ema_beta):
    def num(name, v, lo, hi, lo_open=False, hi_open=False):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise ValueError(f"{name} must be a finite number in {rng} (got {v!r})")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or x.numel() == 0:
        raise ValueError(f"x must be a non-empty floating (B, C, H, W) tensor (got {getattr(x, 'shape', x)!r})")
    for name, v in (("tile", tile), ("stride", stride)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer ≥ 1 (got {v!r})")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)} (got {variant!r})")
    check_shape_alpha(DEFAULT_SHAPE[variant] if shape is None else shape, alpha)
    num("p_wide", p_wide, 0.0, 0.5, lo_open=True, hi_open=True)
    num("p_narrow", p_narrow, 0.0, 0.5, lo_open=True, hi_open=True)
    num("strength", strength, 0.0, 1.0)
    num("sigma_floor", sigma_floor, 0.0, math.inf)
    num("ema_beta", ema_beta, 0.0, 1.0, hi_open=True)


def _confidence(x32, confidence, variant: str, grid: TileGrid) -> torch.Tensor:
    """``c`` on the tile grid ``(B,1,n_h,n_w)`` from a given map or Lite (spec §3.3)."""
    b, _, h, w = x32.shape
    pool = lambda m: cf.pool_to_tiles(m, grid.pad_h, grid.pad_w, grid.tile, grid.stride)  # noqa: E731
    if confidence is None:
        g = pool(cf.lite_map(x32, variant))
        return cf.normalise_paper(g) if variant == "paper" else cf.normalise_qsilk(g, cf.lite_tau(g))
    a = pool(cf.resize_map(confidence.to(x32.device), (h, w), b))
    return cf.normalise_paper(a) if variant == "paper" else cf.normalise_qsilk(a, cf.ATTN_TAU)


def aqclip(x: torch.Tensor, confidence: torch.Tensor | None = None, *, tile: int = 32, stride: int = 16,
           shape: str | None = None, alpha: float = 2.0, variant: str = "qsilk", p_wide: float = 0.0005,
           p_narrow: float = 0.01, strength: float = 1.0, state: AQClipState | None = None,
           sigma_floor: float = 1.0, ema_beta: float = 0.8, return_maps: bool = False):
    """Adaptive quantile clip per tile — spec §3 (the paper's Algorithm 1 is ``variant="paper"``).

    Math: per tile (§3.1 geometry, reflect padding) ``μ, σ`` (§3.2) and confidence ``c`` (§3.3;
    EMA §3.5) give ``[l, h]`` (§3.4); ``Δ = fold(w·(L_tile(x) − x))/fold(w)``,
    ``x_out = x + s·Δ`` (§3.6) with `w` triangular (qsilk) or 1 (paper).

    Args:
        x: ``(B, C, H, W)``, any float dtype, any size (also smaller than a tile).
        confidence: ``(B|1, 1, H', W')`` map in [0, 1], 1 = confident (resized); None = Lite.
            For `paper` it is used directly as Ĥ (normalised by its max).
        tile, stride: T and S (≥ 1). shape: hard | soft | tanh; None = soft (qsilk) / tanh (paper).
        alpha: the limiter's α. variant: ``"qsilk"`` | ``"paper"``.
        p_wide, p_narrow: tail shares at c = 1 / c = 0 (qsilk). strength: s in [0, 1].
        state: `AQClipState` carrying the EMA across the evaluations of a pass; None = no EMA.
        sigma_floor: ρ of ``σ_eff = max(σ, ρ·σ_sample)`` (qsilk; 0 = none). ema_beta: β in [0, 1).
        return_maps: also return ``{"confidence", "activity"}``, each ``(B,1,H,W)`` float32.
    Returns:
        A new tensor like `x` (dtype, device), or ``(tensor, maps)``; statistics in float32/64.
    Guarantees:
        Strength 0, a constant sample or tile, and any value no covering tile changes come back
        bit-for-bit; at strength 1 a pixel stays within [min l, max h] of its covering tiles
        (hard/soft); every pixel is covered; per sample; a sample with NaN/±Inf passes through
        unchanged (and leaves the EMA alone); memory O(C·H·W); no host sync.
    Deviates:
        spec §7 (qsilk variant): knee limiter, symmetric z-linear corridor, σ floor, per-channel
        stats, RMS Lite gradient, percentile normalisation, EMA on confidence, triangular window
        over changes, padded borders. The paper variant keeps only the sign fix, the padding,
        the overlap-add of changes (equal in exact arithmetic) and a degenerate-corridor clamp.

    >>> x = torch.zeros(1, 1, 4, 4); x[0, 0, 1, 2] = 50.0
    >>> aqclip(x, tile=4, stride=2, shape="hard")[0, 0, 1, 2] < 50.0
    tensor(True)
    """
    _check_args(x, tile, stride, shape, alpha, variant, p_wide, p_narrow, strength, sigma_floor, ema_beta)
    shape = DEFAULT_SHAPE[variant] if shape is None else shape
    b, c, h, w = x.shape
    grid = tile_grid(h, w, tile, stride)
    x32 = x.float()
    s1 = x32.sum((2, 3)).double()
    finite = s1.isfinite().all(1)  # NaN/±Inf (a float32 sum overflowing, |x| ~ 1e34, counts too)
    xp = F.pad(x32, (0, grid.pad_w, 0, grid.pad_h), mode="reflect") if grid.pad_h or grid.pad_w else x32
    xp = xp.contiguous()
    mu, sigma = tile_stats(xp, grid, pooled=variant == "paper")
    l, hb, conf = _bounds(x32, s1, mu, sigma, confidence, variant, grid, state, finite,
                          sigma_floor, p_wide, p_narrow, ema_beta)
    acc = overlap_add_changes(xp, l, hb, grid, shape, alpha, triangular=variant == "qsilk")
    factor = strength / coverage_2d(grid, variant == "qsilk", str(x.device))[:h, :w]
    out = x32 - acc[..., :h, :w] * factor
    ok = finite.view(-1, 1, 1, 1)
    out = torch.where(ok, out.to(x.dtype), x)
    if not return_maps:
        return out
    zero = torch.zeros((), device=x.device)
    maps = {"confidence": torch.where(ok, spread_tiles(conf, grid, variant == "qsilk", (h, w)), zero),
            "activity": torch.where(ok, (out.float() - x32).abs().sum(1, keepdim=True), zero)}
    return out, maps


def _start_evaluation(state: AQClipState | None, key: tuple, attn: bool) -> bool:
    """Apply spec §3.5's bookkeeping before an evaluation; True = reuse the state, no update."""
    if state is None:
        return False
    if state.key != key:  # never reuse an EMA across shapes
        state.shape_resets += state.key is not None
        state.restart(key)
    elif attn and not state.has_attn:
        state.restart(key)  # the first Attn map restarts the EMA: Lite and Attn maps differ in meaning
    return state.has_attn and not attn


def _bounds(x32, s1, mu, sigma, confidence, variant, grid, state, finite, rho, p_wide, p_narrow, beta):
    """``(l, h, c)`` on the tile grid (float32, float32, float64) with the EMA of spec §3.5."""
    ok = finite.view(-1, 1, 1, 1)
    reuse = _start_evaluation(state, (variant, tuple(x32.shape), grid, str(x32.device)), confidence is not None)
    if reuse:  # samples the state never saw finite get the widest (qsilk) / confident (paper) corridor
        seen = state.seen.view(-1, 1, 1, 1)
        c = torch.where(seen, state.last_confidence, torch.ones_like(state.last_confidence))
    else:
        c = torch.where(ok, _confidence(x32, confidence, variant, grid), 1.0)
    if variant == "paper":
        l, h = (v.float() for v in corridor_paper(mu, sigma, c))
        if reuse:
            l, h = (torch.where(seen, v, now) for v, now in zip(state.value, (l, h)))
        elif state is not None:
            l, h = _ema(state, (l, h), beta, finite)
    else:
        if state is not None and not reuse:
            c = _ema(state, c, beta, finite)
        n = x32.shape[2] * x32.shape[3]
        sigma_s = ((x32 * x32).sum((2, 3)).double() / n - (s1 / n) ** 2).clamp_min(0).sqrt()
        l, h = (v.float() for v in corridor_qsilk(mu, sigma, c, sigma_s[:, :, None, None], rho, p_wide, p_narrow))
    if state is not None and not reuse:
        state.has_attn |= confidence is not None
        last = state.last_confidence
        state.last_confidence = c if last is None else torch.where(ok, c, last)
    return l, h, c
