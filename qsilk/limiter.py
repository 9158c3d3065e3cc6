"""The corridor limiter shared by the QSilk micro-clamp and AQClip (spec §1).

Three shapes map a value `x` into a corridor `[l, h]`. Every shape is computed so that a value it
does not change comes back bit-for-bit (no `m + δ·u` round trip for kept values).
"""
from __future__ import annotations

import math

import torch

SHAPES = ("hard", "soft", "tanh")

#: Accepted α per shape (spec §1). `hard` has no α.
ALPHA_RANGE = {"soft": (0.1, 20.0), "tanh": (0.1, 4.0)}

#: Relative half-width below which a corridor counts as degenerate (spec §1).
DEGENERATE_RTOL = 1e-12


def check_shape_alpha(shape: str, alpha: float, *, shape_name: str = "shape",
                      alpha_name: str = "alpha") -> None:
    """Reject an unknown shape or an α outside its shape's range, naming the parameter.

    >>> check_shape_alpha("tanh", 5.0)
    Traceback (most recent call last):
    ...
    ValueError: alpha must be a finite number in 0.1..4 for shape 'tanh' (got 5.0)
    """
    if shape not in SHAPES:
        raise ValueError(f"{shape_name} must be one of {', '.join(SHAPES)} (got {shape!r})")
    if shape in ALPHA_RANGE:
        lo, hi = ALPHA_RANGE[shape]
        ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)
        if not ok or not lo <= alpha <= hi:
            raise ValueError(f"{alpha_name} must be a finite number in {lo:g}..{hi:g} "
                             f"for shape {shape!r} (got {alpha!r})")


def limit(x: torch.Tensor, l: torch.Tensor, h: torch.Tensor, shape: str = "hard",
          alpha: float = 2.0) -> torch.Tensor:
    """Limit `x` into the corridor ``[l, h]`` — spec §1; the paper's Eq. (1) is ``shape="tanh"``.

    Math (``m = (l+h)/2``, ``δ = (h−l)/2``, ``u = (x−m)/δ``, ``k = α/(1+α)``, ``1−k = 1/(1+α)``):
        hard: ``min(max(x, l), h)``
        soft: ``x`` where ``|u| ≤ k``, else
              ``min(max(m + δ·sign(u)·(k + (1−k)·tanh((|u|−k)/(1−k))), l), h)``
        tanh: ``m + δ·tanh(α·u)``
        degenerate corridor (``δ ≤ 1e-12·(1+|m|)``, incl. ``l = h``): ``min(max(x, l), h)``.

    Args:
        x: any shape, any float dtype.
        l, h: bounds broadcastable to `x` (float32 recommended), ``l ≤ h``.
        shape: ``"hard"`` | ``"soft"`` | ``"tanh"``.
        alpha: soft: knee hardness in [0.1, 20] (larger = closer to hard); tanh: centre slope
            in [0.1, 4] (>1 expands); ignored for hard.
    Returns:
        A new tensor with `x`'s dtype, device and (broadcast) shape; arithmetic in float32.
    Guarantees:
        hard/soft: output within ``[l, h]`` (after rounding to `x`'s dtype: within the rounded
        bounds); values the shape keeps (inside ``[l, h]`` for hard, inside the knee for soft)
        are returned bit-for-bit; monotone in `x`; elementwise, no host sync.
    Deviates:
        spec §7 "soft clamp": `soft` is the project's knee limiter; the paper's form is `tanh`
        (without its ε: a degenerate corridor clamps instead).

    >>> x = torch.tensor([[-3.0, -0.5], [0.25, 3.0]])
    >>> limit(x, torch.tensor(-1.0), torch.tensor(1.0), "hard")
    tensor([[-1.0000, -0.5000],
            [ 0.2500,  1.0000]])
    >>> limit(torch.tensor([-1.2, -0.5]), torch.tensor(-1.0), torch.tensor(1.0), "soft", 2.0)
    tensor([-0.9739, -0.5000])
    """
    check_shape_alpha(shape, alpha)
    x32 = x.float()
    l = torch.as_tensor(l, device=x.device).float()
    h = torch.as_tensor(h, device=x.device).float()
    if shape == "hard":
        out = torch.clamp(x32, l, h)
    elif shape == "soft":
        out = _soft(x32, l, h, float(alpha))
    else:
        out = _tanh(x32, l, h, float(alpha))
    return out.to(x.dtype)


def _half_width(l: torch.Tensor, h: torch.Tensor):
    """``m``, ``δ`` with degenerate corridors flagged and given ``δ = 1`` (never 0 or negative)."""
    # halves first: l + h and h − l overflow for bounds beyond ±1.7e38 (then δ = ∞ and tanh's
    # m + δ·0 is NaN); ×0.5 is exact above the subnormals, so otherwise the same values
    m = torch.add(l * 0.5, h, alpha=0.5)
    delta = torch.sub(h * 0.5, l, alpha=0.5)
    degenerate = delta <= DEGENERATE_RTOL * (1.0 + m.abs())
    return m, torch.where(degenerate, torch.ones_like(delta), delta), degenerate


def _soft(x: torch.Tensor, l: torch.Tensor, h: torch.Tensor, alpha: float) -> torch.Tensor:
    # Per-corridor constants are computed on the (usually small) bound tensors; per-value work is
    # one addcmul, abs, compare, tanh, addcmul, copysign, add, where and clamp.
    k, k1 = alpha / (1.0 + alpha), 1.0 / (1.0 + alpha)
    m, delta, degenerate = _half_width(l, h)
    inv = 1.0 / delta
    u = torch.addcmul(-m * inv, x, inv)
    au = u.abs()
    # Degenerate corridors keep everything here; the final clamp then gives min(max(x, l), h).
    keep = au <= torch.where(degenerate, torch.full_like(delta, math.inf), torch.full_like(delta, k))
    t = au.sub_(k).mul_(1.0 + alpha).tanh_()
    y = torch.addcmul(delta * k, t, delta * k1)
    y = torch.copysign(y, u, out=y).add_(m)
    # Kept values lie inside [l, h], so clamping them returns them unchanged (bit-exact).
    return torch.clamp(torch.where(keep, x, y), l, h)


def _tanh(x: torch.Tensor, l: torch.Tensor, h: torch.Tensor, alpha: float) -> torch.Tensor:
    m, delta, degenerate = _half_width(l, h)
    y = torch.addcmul(-m * (alpha / delta), x, alpha / delta).tanh_()
    y = torch.addcmul(m, y, delta)
    return torch.where(degenerate, torch.clamp(x, l, h), y)


def change_params(l: torch.Tensor, h: torch.Tensor, shape: str, alpha: float) -> tuple[torch.Tensor, ...]:
    """Per-corridor constants of `limit_change`, computed once for many values (float32).

    hard: ``(l, h)``; tanh: ``(m, α/δ, −δ)``; soft: ``(m, kδ, 1/((1−k)δ), −(1−k)δ)``; a degenerate
    corridor gets ``(m, 0, 0[, 0])``, which turns the formulas into ``x − m``.
    """
    check_shape_alpha(shape, alpha)
    l, h = l.float(), h.float()
    if shape == "hard":
        return l, h
    m, delta, degenerate = _half_width(l, h)
    zero = torch.zeros_like(delta)
    if shape == "tanh":
        return m, torch.where(degenerate, zero, alpha / delta), torch.where(degenerate, zero, -delta)
    k, k1 = alpha / (1.0 + alpha), 1.0 / (1.0 + alpha)
    return (m, torch.where(degenerate, zero, k * delta), torch.where(degenerate, zero, 1.0 / (k1 * delta)),
            torch.where(degenerate, zero, -k1 * delta))


def change_from_params(x: torch.Tensor, params: tuple[torch.Tensor, ...], shape: str) -> torch.Tensor:
    """`limit_change` of float32 `x` given `change_params` broadcastable to `x`."""
    if shape == "hard":
        return x - torch.clamp(x, params[0], params[1])
    v = x - params[0]
    if shape == "tanh":
        return torch.addcmul(v, torch.mul(v, params[1]).tanh_(), params[2])
    s = v.abs().sub_(params[1]).clamp_min_(0.0)
    t = torch.mul(s, params[2]).tanh_()
    return torch.copysign(torch.addcmul(s, t, params[3]), v)


def limit_change(x: torch.Tensor, l: torch.Tensor, h: torch.Tensor, shape: str = "hard",
                 alpha: float = 2.0) -> torch.Tensor:
    """The limiter's change ``x − limit(x, l, h)`` in float32, computed directly (spec §1, §3.6).

    Math (``v = x − m``): hard: ``x − min(max(x, l), h)``; soft: ``sign(v)·(s − (1−k)δ·tanh(s/((1−k)δ)))``
    with ``s = max(|v| − kδ, 0)``; tanh: ``v − δ·tanh(α·v/δ)``; degenerate corridor: ``x − m``
    (``= x − min(max(x, l), h)`` for ``l = h``; within δ ≤ 1e-12·(1+|m|) otherwise).

    Args: as `limit`; `x` float32 (views welcome), bounds broadcastable.
    Returns: a new float32 tensor, equal to ``x − limit(x, l, h)`` up to float32 rounding.
    Guarantees: exactly ±0 wherever the shape keeps `x` (inside the corridor for hard, inside the
        knee for soft) — so an overlap-add of changes leaves such values bit-exact; 8 full-size
        operations for soft, 4 for tanh, 2 for hard.

    >>> limit_change(torch.tensor([-3.0, 0.5, 1.5]), torch.tensor(-1.0), torch.tensor(1.0), "soft")
    tensor([-2.0000,  0.0000,  0.5045])
    """
    l = torch.as_tensor(l, device=x.device)
    h = torch.as_tensor(h, device=x.device)
    return change_from_params(x.float(), change_params(l, h, shape, alpha), shape)
