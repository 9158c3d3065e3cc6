"""AQClip: adaptive quantile clip per tile (spec §3) — the corridor (§3.4), the EMA state (§3.5)
and the entry point. Tiling lives in `tiles`, confidence maps in `confidence`, the limiter in
`limiter`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import torch
import torch.nn.functional as F

from . import confidence as cf
from .consts import scalar, scratch, zeroed_scratch
from .limiter import check_shape_alpha
from .tiles import (TileGrid, batched, blend_factor, layout, phase_view, phase_weight, spread_tiles, tile_grid,
                    tile_params_view, window)

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
    the bounds ``(l, h)``, each ``(B,1,n_h,n_w)``), `seen` ``(B,)`` the samples it holds (`paper`;
    `qsilk` keeps the per-sample EMA weight ``(B,1,1,1)`` instead: β for a sample seen, 0 if not).
    """
    has_attn: bool = False
    key: tuple | None = None
    value: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
    seen: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    last_confidence: torch.Tensor | None = None
    updates: int = 0
    shape_resets: int = 0

    def restart(self, key: tuple | None = None) -> None:
        """Forget the EMA (keeps the counters)."""
        self.key, self.value, self.seen, self.last_confidence = key, None, None, None
        self.weight = None
        self.has_attn = False

    def seen_samples(self) -> torch.Tensor:
        """``(B,)`` bool: the samples this EMA holds a finite update of (`qsilk` keeps this as the
        EMA weight, β or 0; `paper` as `seen`)."""
        return self.seen if self.seen is not None else ~torch.signbit(self.weight.flatten())


def corridor_qsilk(mu, sigma, c, sigma_s, rho: float, p_wide: float, p_narrow: float):
    """Symmetric corridor widening with confidence (spec §3.4, `qsilk`) — the formula; `aqclip`
    computes the same bounds fused into the limiter's constants (`_params`).

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
    out, finite, maps = aqclip_unmasked(
        x, confidence, tile=tile, stride=stride, shape=shape, alpha=alpha, variant=variant, p_wide=p_wide,
        p_narrow=p_narrow, strength=strength, state=state, sigma_floor=sigma_floor, ema_beta=ema_beta,
        return_maps=return_maps, out_dtype=x.dtype)
    out = torch.where(finite.view(-1, 1, 1, 1), out, x)
    return (out, maps) if return_maps else out


#: Relative bias subtracted from a tile's variance, ``κ·n·μ_d²`` (n = T² values, μ_d its mean
#: relative to the channel mean): above the float64 summation error of n equal values, so a
#: constant tile gets σ = 0 exactly (its corridor is degenerate); negligible otherwise.
KAPPA = 4 * 2.0 ** -52
#: Smallest corridor half-width used as a divisor (a degenerate corridor then clamps, spec §1).
TINY = 1e-30


def aqclip_unmasked(x: torch.Tensor, confidence: torch.Tensor | None = None, *, tile: int = 32,
                    stride: int = 16, shape: str | None = None, alpha: float = 2.0, variant: str = "qsilk",
                    p_wide: float = 0.0005, p_narrow: float = 0.01, strength: float = 1.0,
                    state: AQClipState | None = None, sigma_floor: float = 1.0, ema_beta: float = 0.8,
                    finite: torch.Tensor | None = None, return_maps: bool = False,
                    out_dtype: torch.dtype | None = None):
    """`aqclip` without its pass-through of non-finite samples and without argument checks:
    ``(out, finite, maps | None)``; `out` is unspecified for samples where `finite` is False (the
    caller restores them; `Stabilizer` does so once, after every component). `finite` ``(B,)`` may
    be given (from `clamp.clamp_unmasked` on the same values), else it is computed. `out` is
    float32, or `out_dtype` (written by the last op directly: no separate cast).

    The lean path of issue #14, a fixed number of batched ops whatever the latent size:

    - statistics: one float64 copy, per-channel means, ``d = x − mean_c`` and ``d²`` written into one
      buffer with the confidence source, pooled together (``g×g`` blocks, then tiles; all channels
      at once) into each tile's ``μ_d``, ``E[d²]`` and pooled source; ``σ² = E[d²] − (1+κ)·μ_d²``
      (two-pass around the channel mean; κ makes a constant tile's σ exactly 0);
    - confidence: `confidence.lite_source` (six ops) or the given map, `normalise_tiles` (exact
      percentiles by one ``topk``), the EMA as one ``lerp`` and one ``where``;
    - corridor: the limiter's per-tile constants as one tensor, in a few small ops;
    - limiter and overlap-add: all ⌈T/S⌉² tile phases as one strided view of the padded latent
      (`tiles.phase_view`), the limiter's change in 2–7 element-wise ops on all of them at once,
      then one weighted add per phase into the sum (when ``⌈T/S⌉² ≤ 4``: temporaries ≤ 4× the
      padded latent); larger ratios loop over the phases (memory O(C·H·W)).
    """
    shape = DEFAULT_SHAPE[variant] if shape is None else shape
    b, c, h, w = x.shape
    grid = tile_grid(h, w, tile, stride)
    dev = str(x.device)
    x32 = x.float()
    x64 = scratch(x.shape, torch.float64, x.device, "x64").copy_(x32)
    mean = F.adaptive_avg_pool2d(x64, 1)  # (B, C, 1, 1); NaN/±Inf iff the channel holds one
    if finite is None:
        total = mean.sum((1, 2, 3))
        finite = torch.sub(total, total) == 0
    reuse = _start_evaluation(state, (variant, tuple(x.shape), grid, dev), confidence is not None)
    # [d, d², source] written straight into one buffer (no concatenation), pooled together below
    moments = scratch((b, 2 * c + (0 if reuse else 1), h, w), torch.float64, x.device, "moments")
    d = torch.sub(x64, mean, out=moments[:, :c])
    # qsilk: + 1e-60, so every variance below is > 0, σ_eff > 0 (ρ > 0) and the soft limiter's
    # (1−k)δ is a safe divisor without a clamp; far below float64 resolution of any real variance.
    # Not for `paper`: its corridor is asymmetric around μ, so a σ of 1e-30 would move an all-zero
    # sample by ~1e-31 (a constant sample must come back unchanged); its rows clamp their divisors.
    bias = TINY * TINY if variant == "qsilk" else 0.0
    d2 = torch.addcmul(scalar(bias, torch.float64, dev), d, d, out=moments[:, c:2 * c])
    var_s = F.adaptive_avg_pool2d(d2, 1)  # two-pass sample variance
    lite_eps = None
    if not reuse:
        if confidence is None:  # computed in float64 (no conversion), into the buffer
            _, scale = cf.lite_source(x64, variant, out=moments[:, 2 * c:])
            lite_eps = 1e-12 / scale  # τ's 1e-12 on lite_map's scale (the normalisation is scale-free)
        else:
            moments[:, 2 * c:].copy_(cf.resize_map(confidence.to(x.device), (h, w), b))
    if grid.pad_h or grid.pad_w:
        moments = F.pad(moments, (0, grid.pad_w, 0, grid.pad_h), mode="reflect")
    g = math.gcd(grid.tile, grid.stride)
    if g > 1:  # g×g block means first (each value read once), then tiles of (T/g)² blocks
        moments = F.avg_pool2d(moments, g, g)
    pooled = F.avg_pool2d(moments, grid.tile // g, grid.stride // g)  # (B, 2C[+1], n_h, n_w) float64
    tm, te = pooled[:, :c], pooled[:, c:2 * c]
    var = torch.addcmul(te, tm, tm, value=-(1.0 + KAPPA * grid.tile * grid.tile))
    ok = finite.view(-1, 1, 1, 1)

    # -- confidence on the tile grid (B, 1, n_h, n_w), with the EMA of spec §3.5 ------------------
    if reuse:  # samples the state never saw finite get the widest (qsilk) / confident (paper) corridor
        seen = state.seen_samples().view(-1, 1, 1, 1)
        conf = torch.where(seen, state.last_confidence, 1.0)
    else:
        a = pooled[:, 2 * c:]
        if variant == "paper":
            conf = cf.normalise_paper(a)
        else:
            conf = cf.normalise_tiles(a, lite_eps)
    if variant == "paper":
        mu_c = mean + tm
        mu = mu_c.mean(1, keepdim=True)
        dev_c = mu_c - mu
        sigma = torch.addcmul(var.clamp_min(0.0), dev_c, dev_c).mean(1, keepdim=True).sqrt_()
        if not reuse:
            conf = torch.where(ok, conf, 1.0)
        lo, hi = corridor_paper(mu, sigma, conf)
        if reuse:
            lo, hi = (torch.where(seen, v, now) for v, now in zip(state.value, (lo, hi)))
        elif state is not None:
            lo, hi = _ema(state, (lo, hi), ema_beta, finite)
        m, half = (lo + hi) * 0.5, (hi - lo) * 0.5
        params = _params_buffer(shape, m.shape, grid, (h, w), x.device)
        _params(m, half, None, shape, alpha, params[..., :grid.n_h, :grid.n_w])
    else:
        if state is not None and not reuse:
            conf = _ema_confidence(state, conf, ema_beta, finite, ok)
        rho = float(sigma_floor)
        floor = var_s if rho == 1.0 else (var_s * (rho * rho) if rho > 0 else 0.0)
        sigma_eff = torch.clamp(var, min=floor).sqrt_() if rho > 0 else var.clamp_min_(0.0).sqrt_()
        params = _params_buffer(shape, tm.shape, grid, (h, w), x.device)
        _params(mean + tm, sigma_eff, conf, shape, alpha, params[..., :grid.n_h, :grid.n_w],
                p_wide=p_wide, p_narrow=p_narrow, positive=rho > 0)
    if state is not None and not reuse:
        state.has_attn |= confidence is not None
        if variant == "paper":
            last = state.last_confidence
            state.last_confidence = conf if last is None else torch.where(ok, conf, last)
        else:
            state.last_confidence = conf

    acc = _overlap_add(x32, params, grid, shape, variant == "qsilk")
    factor = blend_factor(grid, variant == "qsilk", float(strength), (h, w), dev)
    out = torch.addcmul(x32, acc[..., :h, :w], factor,
                        out=torch.empty(x.shape, dtype=out_dtype or torch.float32, device=x.device))
    if not return_maps:
        return out, finite, None
    zero = torch.zeros((), device=x.device)
    maps = {"confidence": torch.where(ok, spread_tiles(conf, grid, variant == "qsilk", (h, w)), zero),
            "activity": torch.where(ok, (out.float() - x32).abs().sum(1, keepdim=True), zero)}
    return out, finite, maps


@lru_cache(maxsize=64)
def _corridor_coefs(shape: str, alpha: float, p_wide: float, p_narrow: float, dtype: torch.dtype, device: str):
    """Cached per-row constants of `_params` for the `qsilk` corridor (rows of the limiter's
    per-tile constants): ``(A, B, M)`` with ``rows = M·μ + (A + B·c)·σ_eff`` (M = 1 for the
    bounds, 0 for soft's third row)."""
    z_n, z_w = -NormalDist().inv_cdf(p_narrow), -NormalDist().inv_cdf(p_wide)
    if shape == "hard":      # l, h
        coef = (-1.0, 1.0)
    else:                    # soft: m − kδ, m + kδ, (1−k)δ/2
        k, k1 = alpha / (1.0 + alpha), 1.0 / (1.0 + alpha)
        coef = (-k, k, 0.5 * k1)
    col = lambda v: torch.tensor(v, dtype=dtype).view(-1, 1, 1, 1, 1).to(device)  # noqa: E731
    return col([v * z_n for v in coef]), col([v * (z_w - z_n) for v in coef]), col([1.0, 1.0, 0.0][:len(coef)])


def _params(m: torch.Tensor, scale: torch.Tensor, conf: torch.Tensor | None, shape: str, alpha: float,
            out: torch.Tensor, *, p_wide: float = 0.0005, p_narrow: float = 0.01, positive: bool = False
            ) -> torch.Tensor:
    """The limiter's per-tile constants, written (as float32) into `out` ``(rows, B, C|1, n_h, n_w)``.

    With `conf` (`qsilk`): the corridor is ``μ ± z·σ_eff``, ``z = z_n + (z_w − z_n)·c`` (spec §3.4):
    `m` = μ, `scale` = σ_eff. Without: `m`, `scale` are the corridor's centre and half-width δ.
    Rows — hard: ``(l, h)``; soft: ``(m − kδ, m + kδ, (1−k)δ/2)`` (the last ≥ 1e-30); tanh:
    ``(m, 2α/δ, δ/2)`` (the halves: `_change` takes tanh from an exponential). A degenerate corridor
    (δ → 0) then clamps, as spec §1 asks, to within δ.
    `positive`: `scale` is known to be > 0 (no floor needed for the soft divisor).
    """
    if conf is not None and shape in ("hard", "soft"):
        a_, b_, keep = _corridor_coefs(shape, float(alpha), float(p_wide), float(p_narrow), m.dtype,
                                       str(m.device))
        zc = torch.addcmul(a_, b_, conf.unsqueeze(0))  # (rows, B, 1, n_h, n_w): the rows' multiples of σ_eff
        if shape == "hard":
            torch.addcmul(m, zc, scale, out=out)
        elif positive:  # σ_eff > 0 already (see `aqclip_unmasked`): all three rows in one op
            torch.addcmul(m * keep, zc, scale, out=out)
        else:
            torch.addcmul(m, zc[:2], scale, out=out[:2])
            torch.clamp(torch.mul(zc[2], scale), min=scalar(TINY, m.dtype, str(m.device)), out=out[2])
        return out
    if conf is not None:
        z_n, z_w = -NormalDist().inv_cdf(p_narrow), -NormalDist().inv_cdf(p_wide)
        scale = (z_n + (z_w - z_n) * conf) * scale
    if shape == "hard":
        rows = (m - scale, m + scale)
    elif shape == "soft":
        k, k1 = alpha / (1.0 + alpha), 1.0 / (1.0 + alpha)
        rows = (m - k * scale, m + k * scale, (0.5 * k1 * scale).clamp_min(TINY))
    else:
        rows = (m.expand_as(scale), (2.0 * alpha) / scale.clamp_min(TINY), 0.5 * scale)
    for dst, row in zip(out, rows):
        dst.copy_(row)
    return out


def _params_buffer(shape: str, grid_shape: tuple[int, ...], grid: TileGrid, hw: tuple[int, int],
                   device: torch.device) -> torch.Tensor:
    """Where `_params` writes (its ``[..., :n_h, :n_w]`` corner): ``(rows, B, C|1, ·, ·)`` float32 —
    for the batched path a buffer filled once over the ``r·ni × r·nj`` grid (phantom tiles keep
    bounds 0 and a third row of 1; their weight is 0)."""
    rows = 2 if shape == "hard" else 3
    b, c = grid_shape[0], grid_shape[1]
    if batched(grid):
        lay = layout(grid, hw)
        # phantom tiles: 0 bounds, and a third row of 1 (the exponential in `_change` then sees
        # finite values there — ±∞ and NaN take a slow path on CPU — and the change is finite)
        fill = (0.0, 0.0, 1.0) if rows == 3 else ()
        buf = zeroed_scratch((rows, b, c, lay.r * lay.ni, lay.r * lay.nj), torch.float32, str(device),
                             (grid.n_h, grid.n_w), fill)
        return buf
    return torch.empty((rows, b, c, grid.n_h, grid.n_w), dtype=torch.float32, device=device)


def _change(v: torch.Tensor, p: tuple[torch.Tensor, ...], shape: str) -> torch.Tensor:
    """The limiter's change ``x − L(x)`` of float32 values `v` given `_params` rows `p`
    (broadcastable): exactly ±0 wherever the shape keeps the value (hard: inside ``[l, h]``;
    soft: inside the knee ``[m − kδ, m + kδ]``). A `consts.scratch` tensor (valid until the next
    call)."""
    # the first op writes a contiguous tensor (a view of overlapping tiles gives its output an
    # odd layout otherwise, which slows every later op)
    first = scratch(v.shape, v.dtype, v.device, "change.s")
    if shape == "hard":
        t = torch.clamp(v, p[0], p[1], out=first)
        return torch.sub(v, t, out=t)
    # tanh(y) = 1 − 2/(1 + e^{2y}), so with h = δ'/2 (the third row): u − δ'·tanh(u/δ') =
    # (u − 2h) + 4h/(1 + e^{u/h}). torch's CPU exp is 2–3× faster than its tanh (both vectorised
    # with the same result whatever an element's position, so per sample); u = 0 gives
    # −2h + 4h/2 = +0 exactly (power-of-2 multiples of h); e^{u/h} = ∞ gives u − 2h, 0 gives u + 2h.
    if shape == "soft":
        # s = v − clamp(v, m − kδ, m + kδ) is the signed excess over the knee (0 inside it); the
        # change is s − (1−k)δ·tanh(s/((1−k)δ)) (tanh is odd: the sign comes with s)
        s = torch.clamp(v, p[0], p[1], out=first)
        s = torch.sub(v, s, out=s)
        t = torch.div(s, p[2], out=scratch(v.shape, v.dtype, v.device, "change.t")).exp_().add_(1.0)
    else:
        s = torch.sub(v, p[0], out=first)         # tanh: u − δ·tanh(α·u/δ), rows (m, 2α/δ, δ/2)
        t = torch.mul(s, p[1], out=scratch(v.shape, v.dtype, v.device, "change.t")).exp_().add_(1.0)
    return torch.addcdiv(s.add_(p[2], alpha=-2.0), p[2], t, value=4.0, out=t)


def _overlap_add(x32: torch.Tensor, params: torch.Tensor, grid: TileGrid, shape: str, triangular: bool
                 ) -> torch.Tensor:
    """``Σ_tiles w·(x − L_tile(x))`` (spec §3.6) on the padded latent: ``(B, C, ≥H_pad, ≥W_pad)``.
    An unchanged value contributes exactly ±0 (the sum starts at +0)."""
    b, c, h, w = x32.shape
    if batched(grid):
        lay = layout(grid, (h, w))
        ext_h, ext_w = lay.he - h, lay.we - w
        if ext_h or ext_w:  # reflect (spec §3.1) as far as the real grid; phantom tiles weigh 0
            if ext_h < h and ext_w < w:
                xe = F.pad(x32, (0, ext_w, 0, ext_h), mode="reflect")
            else:
                xe = F.pad(x32, (0, grid.pad_w, 0, grid.pad_h), mode="reflect") if grid.pad_h or grid.pad_w else x32
                xe = F.pad(xe, (0, lay.we - xe.shape[3], 0, lay.he - xe.shape[2]))
        else:
            xe = x32
        params32 = params  # the whole buffer: phantom tiles' constants are 0
        pv = tile_params_view(params32, lay).unbind(0)
        change = _change(phase_view(xe, grid, lay), pv, shape)  # (B, C, r, ni, T, r, nj, T)
        # overlap-add: one weighted add per phase into its (non-overlapping) tiles' places; where
        # phase (0, 0) covers the whole latent its product initialises the sum (no zero fill)
        weight = phase_weight(grid, triangular, str(x32.device), (h, w))
        acc = scratch(xe.shape, xe.dtype, xe.device, "acc") if lay.first_covers else torch.zeros_like(xe)
        for pi in range(lay.r):
            for pj in range(lay.r):
                place = phase_view(acc, grid, lay)[:, :, pi, :, :, pj]
                if pi == pj == 0 and lay.first_covers:
                    torch.mul(change[:, :, 0, :, :, 0], weight[:, :, 0, :, :, 0], out=place)
                else:
                    place.addcmul_(change[:, :, pi, :, :, pj], weight[:, :, pi, :, :, pj])
        return acc
    # ⌈T/S⌉ > 2: one tile phase at a time (tiles of one phase do not overlap)
    params32 = params
    xp = F.pad(x32, (0, grid.pad_w, 0, grid.pad_h), mode="reflect") if grid.pad_h or grid.pad_w else x32
    t, s = grid.tile, grid.stride
    r = -(-t // s)
    acc = torch.zeros_like(xp)
    wt = window(t, triangular, str(x32.device))
    w2 = wt[:, None, None] * wt[None, None, :]
    sb, sc, sh, sw = xp.stride()
    for pi in range(min(r, grid.n_h)):
        for pj in range(min(r, grid.n_w)):
            n_i, n_j = -(-(grid.n_h - pi) // r), -(-(grid.n_w - pj) // r)
            size, strides = (b, c, n_i, t, n_j, t), (sb, sc, r * s * sh, sh, r * s * sw, sw)
            off = pi * s * sh + pj * s * sw
            view = xp.as_strided(size, strides, xp.storage_offset() + off)
            phase = tuple(p[:, :, pi::r, pj::r][:, :, :, None, :, None] for p in params32.unbind(0))
            acc.as_strided(size, strides, off).addcmul_(_change(view, phase, shape), w2)
    return acc


def _ema_confidence(state: AQClipState, now: torch.Tensor, beta: float, finite: torch.Tensor,
                    ok: torch.Tensor) -> torch.Tensor:
    """The `qsilk` EMA on the confidence map (spec §3.5) in three ops: ``c = lerp(c_now, c_prev, w)``
    with ``w = β`` for samples seen before, −0.0 for a sample's first finite update (kept as the
    state's ``(B,1,1,1)`` weight; the sign bit tells unseen samples apart also at β = 0);
    non-finite samples keep their previous value (the first update gives them c = 1)."""
    dt, dev = now.dtype, str(now.device)
    if state.value is None:
        c = torch.where(ok, now, 1.0)
        state.weight = torch.where(ok, scalar(beta, dt, dev), scalar(-0.0, dt, dev))
    else:
        c = torch.where(ok, torch.lerp(now, state.value, state.weight), state.value)
        state.weight = torch.where(ok, scalar(beta, dt, dev), state.weight)
    state.value, state.updates = c, state.updates + 1
    return c


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
