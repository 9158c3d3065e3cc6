"""Q-Sched pre-conditioning of the guided denoised estimate (seed 002; research/quant.md §1.3).

Q-Sched (Frumkin & Marculescu, 2025) learns two per-step scalars: c_F multiplies the network
output F (ε, v or velocity) and c_x multiplies the latent x, both inside the scheduler's step
before the usual update arithmetic. The network input is not changed.

Derivation (why one formula on the denoised estimate is enough). Every parametrisation QSilk
meets writes the denoised estimate as ``D = s(σ)·x + o(σ)·F`` in k-diffusion's frame:

- ε (VE frame, ``x = x0 + σ·ε``):            s = 1,                 o = −σ
- v (k-diffusion ``CompVisVDenoiser``):      s = σ_d²/(σ² + σ_d²),  o = −σ·σ_d/√(σ² + σ_d²)
- flow (``x = (1−σ)·x0 + σ·ε``, F = v):      s = 1,                 o = −σ

Scaling x by c_x and F by c_F gives ``D' = c_x·s·x + c_F·o·F``; eliminating ``o·F = D − s·x``:

    D' = c_F·D + (c_x − c_F)·s(σ)·x

so the hook needs only D, x, σ and s — never F or the parametrisation's c_out. Scaling the
latent commutes with the VP ↔ VE rescaling, so the scalars mean the same in every frame.

What is exact and what is not. Q-Sched also starts the update from ``c_x·x`` instead of x.

- LCM-type updates ``x_next = D + σ_next·z`` consume only D: replacing D by D' *is* Q-Sched.
- A final step landing on σ = 0 returns D (Euler, Euler a, flow Euler): exact again.
- An intermediate first-order Euler step ``x_next = x + (σ_next/σ − 1)·(x − D')`` keeps the
  F part identical but moves the x coefficient from 1 by ``(1 − c_x)·(1 − σ_next/σ)`` instead of
  Q-Sched's ``(1 − c_x)`` (σ_down in place of σ_next for Euler a). `exact_c_x` gives the c_x
  that closes the gap when σ_next is known; multistep solvers (DPM++ 2M …) have no exact map.

Coefficients are stored as knots over log σ (linear interpolation in log σ, flat outside the
knots), which survives hires passes, img2img, other step counts and multi-evaluation samplers.
The "ramp" mode reproduces the released Q-Sched search space: each coefficient goes linearly
from its start value at the first evaluation of a pass to 1 at the last.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger("qsilk")

#: Every coefficient is kept inside this band; files outside it are rejected (§5.1 "sane band").
BAND = (0.5, 1.5)
PREDICTIONS = ("eps", "v", "flow")


def skip_factor(sigma: torch.Tensor, prediction: str = "eps", sigma_data: float = 1.0) -> torch.Tensor:
    """The skip factor s(σ) of ``D = s·x + o·F`` in k-diffusion's frame (see module docstring).

    Args:
        sigma: noise levels, any shape, float.
        prediction: ``"eps"`` | ``"v"`` | ``"flow"``.
        sigma_data: σ_d of a v-prediction model (1 for SD 2.x / SDXL-v in k-diffusion).
    Returns: a float32 (float64 for float64 input) tensor shaped like `sigma`.

    >>> skip_factor(torch.tensor([0.0, 1.0, 3.0]), "v").tolist()
    [1.0, 0.5, 0.10000000149011612]
    """
    sigma = torch.as_tensor(sigma)
    sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
    if prediction in ("eps", "flow"):
        return torch.ones_like(sigma)
    if prediction == "v":
        return sigma_data ** 2 / (sigma * sigma + sigma_data ** 2)
    raise ValueError(f"QSilk: prediction must be one of {', '.join(PREDICTIONS)} (got {prediction!r})")


def precondition(denoised: torch.Tensor, x: torch.Tensor, c_f: Any, c_x: Any, s: Any) -> torch.Tensor:
    """Q-Sched on the denoised estimate: ``D' = c_F·D + (c_x − c_F)·s·x``.

    Args:
        denoised: ``(B, C, H, W)`` guided denoised estimate D, any float dtype.
        x: the evaluation's noisy input, same shape (k-diffusion frame).
        c_f, c_x, s: Python floats, scalars or per-row ``(B,)`` tensors.
    Returns: a new tensor with D's dtype and device, computed in float32 (float64 for float64
        input); `denoised` itself when
        the coefficients are the Python floats 1.0.
    Guarantees: rows with ``c_F = c_x = 1`` come back bit-for-bit (also −0.0, and NaN in x);
        no host synchronisation.

    >>> d, x = torch.tensor([[[[1.0, -0.0]]]]), torch.tensor([[[[2.0, 4.0]]]])
    >>> precondition(d, x, 0.5, 1.0, 1.0).tolist()
    [[[[1.5, 2.0]]]]
    >>> torch.equal(precondition(d, x, torch.ones(1), torch.ones(1), 1.0), d)
    True
    """
    work = torch.promote_types(denoised.dtype, torch.float32)  # float32, or float64 if given
    if all(isinstance(v, (int, float)) for v in (c_f, c_x)):
        if c_f == 1.0 and c_x == 1.0:
            return denoised
        s = _rows(s, denoised, work)
        return (c_f * denoised.to(work) + (c_x - c_f) * s * x.to(work)).to(denoised.dtype)
    c_f, c_x, s = (_rows(v, denoised, work) for v in (c_f, c_x, s))
    out = c_f * denoised.to(work) + (c_x - c_f) * s * x.to(work)
    identity = (c_f == 1) & (c_x == 1)
    return torch.where(identity, denoised, out.to(denoised.dtype))


def exact_c_x(c_x: float, sigma: float, sigma_next: float) -> float:
    """The c_x that makes a D-only first-order Euler step equal Q-Sched's step exactly.

    Math: ``c_x' = 1 − (1 − c_x)/(1 − σ_next/σ)`` (σ_down for Euler a); equals c_x on a final step
    (σ_next = 0); ill-conditioned as σ_next → σ, which is why the hook does not use it by default.

    >>> exact_c_x(0.9, 2.0, 0.0), round(exact_c_x(0.9, 2.0, 1.0), 12)
    (0.9, 0.8)
    """
    return 1.0 - (1.0 - c_x) / (1.0 - sigma_next / sigma)


def interp_log_sigma(sigma: torch.Tensor, knots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of `values` at `sigma` in log σ; flat outside the knots.

    Args:
        sigma: ``(B,)`` or scalar noise levels (σ ≤ 0 takes the smallest knot's value).
        knots: ``(K,)`` strictly increasing positive σ (`CoefficientSet` stores them so).
        values: ``(K,)`` or ``(K, C)``.
    Returns: float32 ``(B,)`` / ``(B, C)`` (a scalar σ gives ``()`` / ``(C,)``); no host sync.

    >>> k = torch.tensor([0.1, 1.0, 10.0]); v = torch.tensor([0.0, 1.0, 2.0])
    >>> interp_log_sigma(torch.tensor([100.0, 10.0, 3.1622777, 0.1, 0.0]), k, v).tolist()
    [2.0, 2.0, 1.5, 0.0, 0.0]
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=knots.device)
    lk = knots.float().log()
    vals = values.float()
    if lk.numel() == 1:
        return vals[0].expand(tuple(sigma.shape) + tuple(vals.shape[1:])).clone()
    ls = sigma.reshape(-1).clamp_min(torch.finfo(torch.float32).tiny).log()
    ls = torch.minimum(torch.maximum(ls, lk[0]), lk[-1])
    hi = torch.searchsorted(lk, ls.contiguous()).clamp(1, lk.numel() - 1)
    lo = hi - 1
    w = ((ls - lk[lo]) / (lk[hi] - lk[lo])).reshape(-1, *([1] * (vals.dim() - 1)))
    out = vals[lo] + w * (vals[hi] - vals[lo])
    return out.reshape(tuple(sigma.shape) + tuple(vals.shape[1:]))


def ramp_value(start: float, progress: Any) -> Any:
    """Q-Sched's released ramp: ``c = start + (1 − start)·p`` for progress p ∈ [0, 1] (end = 1)."""
    return start + (1.0 - start) * progress


@dataclass
class QSched:
    """A per-job Q-Sched pre-conditioner; call signature is the Stabilizer's seam.

    ``mode="ramp"``: `c_x`/`c_f` are the start values (floats) of ramps to 1 over the pass.
    ``mode="file"``: `knots` ``(K,)`` σ and `c_x`/`c_f` ``(K,)`` tensors, interpolated in log σ.
    `prediction`/`sigma_data` give s(σ) when the host passes no ``c_skip``.
    """

    mode: str
    c_x: Any
    c_f: Any
    knots: torch.Tensor | None = None
    prediction: str = "eps"
    sigma_data: float = 1.0
    note: Callable[[str], None] | None = None
    label: str = ""
    thresholds: Any = None  # a `qsilk.quant.thresholds.SigmaCorridor`, or None
    identity: bool = False  # coefficients all 1 (a file carrying only clamp targets)

    def __post_init__(self) -> None:
        self._device_cache: dict[Any, tuple[torch.Tensor, ...]] = {}

    def coefficients(self, sigma: Any, progress: float | None, like: torch.Tensor):
        """(c_x, c_F) for this evaluation: floats (ramp) or per-row tensors (file)."""
        if self.mode == "ramp":
            if progress is None:
                return None
            return ramp_value(self.c_x, progress), ramp_value(self.c_f, progress)
        if sigma is None:
            return None
        knots, cx, cf = self._on(like.device)
        sig = _sigma_rows(sigma, like)
        return interp_log_sigma(sig, knots, cx), interp_log_sigma(sig, knots, cf)

    def __call__(self, denoised: torch.Tensor, x_noisy: torch.Tensor | None, sigma: Any = None,
                 c_skip: Any = None, progress: float | None = None) -> torch.Tensor:
        if self.identity:
            return denoised
        if x_noisy is None or x_noisy.shape != denoised.shape:
            self._say("Q-Sched needs the evaluation's noisy input from the host; not applied")
            return denoised
        coeffs = self.coefficients(sigma, progress, denoised)
        if coeffs is None:
            self._say("Q-Sched could not place this evaluation (no σ / step position); not applied")
            return denoised
        c_x, c_f = coeffs
        if c_skip is None:
            if self.prediction == "v":
                if sigma is None:
                    self._say("Q-Sched needs σ for a v-prediction model; not applied")
                    return denoised
                c_skip = skip_factor(_sigma_rows(sigma, denoised), "v", self.sigma_data)
            else:
                c_skip = 1.0
        return precondition(denoised, x_noisy, c_f, c_x, c_skip)

    def _on(self, device: Any) -> tuple[torch.Tensor, ...]:
        cached = self._device_cache.get(device)
        if cached is None:
            cached = tuple(t.to(device=device, dtype=torch.float32) for t in (self.knots, self.c_x, self.c_f))
            self._device_cache[device] = cached
        return cached

    def _say(self, message: str) -> None:
        (self.note or log.warning)(message)


def _sigma_rows(sigma: Any, like: torch.Tensor) -> torch.Tensor:
    """σ as a float32 ``(B,)`` tensor on `like`'s device (a scalar is broadcast to every row)."""
    s = torch.as_tensor(sigma, dtype=torch.float32).to(like.device).reshape(-1)
    if s.numel() == 1:
        return s.expand(like.shape[0])
    if s.numel() != like.shape[0]:
        s = s[-like.shape[0]:]  # A1111 layout: the last B rows are the plain batch
    return s


def _rows(v: Any, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = torch.as_tensor(v).to(device=like.device, dtype=dtype)
    if t.dim() == 0:
        return t
    t = t.reshape(-1)
    if t.numel() == 1:
        return t.reshape(())
    return t.reshape(-1, *([1] * (like.dim() - 1)))
