"""Calibration of Q-Sched coefficients: sampling runs with common random numbers, and the paired fit.

(a) **Search** (Q-Sched style): `qsilk.quant.search`; `run` here gives it common random numbers —
every job's start noise and ancestral noise depend only on its seed.

(b) **Paired fit** (seed 001's serial-then-parallel idea, quant.md §5.4): run the 16-bit model and
record every evaluation's (σ_i, x_i, D16_i); evaluate the low-bit model on the same x_i (teacher
forcing) → Dq_i; per step solve

    min_{a,b} Σ ‖a·Dq_i + b·s(σ_i)·x_i − D16_i‖²      (2×2 normal equations, float64)

so that D' = a·Dq + b·s·x, i.e. c_F = a and c_x = a + b. Smooth across steps, clamp to the band,
and write knots at the schedule's σ. The 16-bit corridor at each step (quantiles of D16) is stored
as per-σ clamp targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .coeffs import CoefficientSet, metadata_value
from .precondition import BAND, skip_factor

GuidedDenoise = Callable[[torch.Tensor, float, list], torch.Tensor]


@dataclass
class Target:
    """One model under calibration: guided denoiser (CFG inside, k-diffusion frame) and sampler.

    `denoise(x, sigma, prompts) -> D` for a batch whose row j belongs to ``prompts[j]``;
    `sigmas` has n + 1 entries ending in 0; `decode(latents) -> images in [0, 1]` or None.
    """

    denoise: GuidedDenoise
    shape: tuple[int, int, int]
    sigmas: list[float]
    sampler: str = "euler"
    prediction: str = "eps"
    sigma_data: float = 1.0
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    stabilizer_settings: Any = None  # QSilk settings to run during calibration (None: Q-Sched only)


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int


def _noise(seeds: Sequence[int], shape, salt: int) -> torch.Tensor:
    """Per-row Gaussian noise that depends only on (seed, salt): common random numbers."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s) * 1_000_003 + salt))
            for s in seeds]
    return torch.stack(rows)


def sample_lcm(denoise, x, sigmas, *, noise, callback=None):
    """LCM-type update (k-diffusion's LCM sampler): ``x ← D(x, σ)``, then ``+ σ_next·z`` unless last."""
    for i in range(len(sigmas) - 1):
        x = denoise(x, sigmas[i], i)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(i)
        if callback is not None:
            callback(i)
    return x


def _sampler(name: str):
    if name == "lcm":
        return sample_lcm
    from ..demo import samplers as demo  # the command line's samplers (Euler, Euler a, DPM++ 2M)

    kind, fn = demo.SAMPLERS.get(demo.SAMPLER_ALIASES.get(name.lower(), name), (None, None))
    if kind != "x0":
        raise ValueError(f"QSilk: calibration sampler must be lcm, euler, euler_a or dpmpp_2m (got {name!r})")
    return fn


def run(target: Target, jobs: Sequence[Job], pre: Any = None, record: list | None = None) -> torch.Tensor:
    """Sample every job once (batched); returns the final latents ``(B, C, H, W)`` float32.

    `pre`: a Q-Sched pre-conditioner (or None). `record`: if a list, every evaluation appends
    ``(sigma, x, D)`` with D *before* pre-conditioning (the model's own estimate).
    """
    prompts = [j.prompt for j in jobs]
    seeds = [j.seed for j in jobs]
    n = len(target.sigmas) - 1
    stab = None
    if target.stabilizer_settings is not None:
        from ..stabilizer import Stabilizer

        stab = Stabilizer(target.stabilizer_settings, preconditioner=pre)
        stab.begin_pass(sigma_max=target.sigmas[0], sigma_min=target.sigmas[-2])

    def hooked(x, sigma, i):
        d = target.denoise(x, sigma, prompts)
        if record is not None:
            record.append((float(sigma), x.detach().clone(), d.detach().clone()))
        sig = torch.full((x.shape[0],), float(sigma))
        if stab is not None:
            return stab.post_cfg(d, i, n, sigma=sig, x_noisy=x)
        if pre is not None:
            return pre(d, x, sig, None, i / (n - 1) if n > 1 else 1.0)
        return d

    x = _noise(seeds, target.shape, 0) * target.sigmas[0]
    fn = _sampler(target.sampler)
    with torch.no_grad():
        return fn(hooked, x, list(target.sigmas), noise=lambda i: _noise(seeds, target.shape, i + 1))


# -- (b) paired least squares ---------------------------------------------------------------
def fit_step(dq: torch.Tensor, sx: torch.Tensor, d16: torch.Tensor, ridge: float = 0.0) -> tuple[float, float]:
    """Least-squares ``(a, b)`` with ``a·dq + b·sx ≈ d16`` over all values (float64).

    `ridge` > 0 pulls towards the identity (1, 0) by ``ridge·mean(diag)``: it keeps late steps,
    where D ≈ x and the system is near-singular, at the identity instead of an arbitrary split.
    """
    u, v, t = (z.double().reshape(-1) for z in (dq, sx, d16))
    g = torch.tensor([[u @ u, u @ v], [u @ v, v @ v]], dtype=torch.float64)
    r = torch.tensor([u @ t, v @ t], dtype=torch.float64)
    lam = ridge * float(g.diagonal().mean())
    g += lam * torch.eye(2, dtype=torch.float64)
    r += lam * torch.tensor([1.0, 0.0], dtype=torch.float64)
    a, b = torch.linalg.solve(g, r).tolist()
    return a, b


def smooth_steps(v: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """``passes`` rounds of the [1, 2, 1]/4 kernel along steps, edges replicated.

    >>> smooth_steps(torch.tensor([0.0, 4.0, 0.0]), 1).tolist()
    [1.0, 2.0, 1.0]
    """
    v = v.double()
    for _ in range(max(0, passes)):
        if v.numel() < 3:
            break
        p = torch.cat([v[:1], v, v[-1:]])
        v = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    return v


@dataclass
class PairedFit:
    sigmas: list[float]
    a: list[float]
    b: list[float]
    c_f: torch.Tensor
    c_x: torch.Tensor
    clamp_lo: torch.Tensor | None
    clamp_hi: torch.Tensor | None
    error_before: list[float]  # per step, teacher-forced RMS(Dq − D16)
    error_after: list[float]  # per step, RMS(D' − D16) with the smoothed, clamped coefficients
    clipped_to_band: bool = False


def fit_paired(ref: Target, low: Target, jobs: Sequence[Job], *, ridge: float = 1e-6, smooth: int = 1,
               q_lo: float = 0.001, q_hi: float = 0.999, per_channel: bool = False,
               progress: Any = None) -> PairedFit:
    """Serial 16-bit pass, teacher-forced low-bit evaluations, per-step fit (module docstring)."""
    record: list = []
    run(ref, jobs, record=record)
    prompts = [j.prompt for j in jobs]
    sig, a_raw, b_raw, rows = [], [], [], []
    for sigma, x, d16 in record:
        with torch.no_grad():
            dq = low.denoise(x, sigma, prompts)
        s = skip_factor(torch.tensor(sigma), low.prediction, low.sigma_data)
        a, b = fit_step(dq, s * x, d16, ridge)
        sig.append(sigma)
        a_raw.append(a)
        b_raw.append(b)
        rows.append((x, dq, d16, float(s)))
        if progress is not None:
            progress.advance()
    a_s, b_s = smooth_steps(torch.tensor(a_raw), smooth), smooth_steps(torch.tensor(b_raw), smooth)
    c_f, c_x = a_s, a_s + b_s
    clipped = bool(((c_f < BAND[0]) | (c_f > BAND[1]) | (c_x < BAND[0]) | (c_x > BAND[1])).any())
    c_f, c_x = c_f.clamp(*BAND).float(), c_x.clamp(*BAND).float()
    before, after, lo, hi = [], [], [], []
    for i, (x, dq, d16, s) in enumerate(rows):
        fixed = c_f[i].double() * dq.double() + (c_x[i] - c_f[i]).double() * s * x.double()
        before.append(_rms(dq - d16))
        after.append(_rms(fixed - d16))
        flat = d16.float().flatten(2) if per_channel else d16.float().flatten(1)
        lo.append(torch.quantile(flat, q_lo, dim=-1).mean(0))
        hi.append(torch.quantile(flat, q_hi, dim=-1).mean(0))
    return PairedFit(sig, a_raw, b_raw, c_f, c_x, torch.stack(lo).float(), torch.stack(hi).float(),
                     before, after, clipped)


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def trajectory_error(ref: Target, low: Target, jobs: Sequence[Job], pre: Any = None) -> float:
    """RMS distance of the low-bit final latents (with `pre`) to the 16-bit ones, same seeds."""
    return _rms(run(low, jobs, pre=pre) - run(ref, jobs))


def paired_coefficients(fit: PairedFit, metadata: dict, thresholds: bool = True) -> CoefficientSet:
    """The fit as a coefficient set (increasing σ) with its metadata."""
    order = torch.tensor(fit.sigmas).argsort()
    pick = lambda t: None if t is None else t[order].contiguous()  # noqa: E731
    meta = {**metadata, "method": "paired",
            "fit_error_before": metadata_value(_mean(fit.error_before)),
            "fit_error_after": metadata_value(_mean(fit.error_after))}
    if thresholds:
        meta["thresholds_from"] = "16-bit denoised quantiles"
    return CoefficientSet(torch.tensor(fit.sigmas, dtype=torch.float32)[order], pick(fit.c_x), pick(fit.c_f),
                          {k: metadata_value(v) for k, v in meta.items()},
                          clamp_lo=pick(fit.clamp_lo) if thresholds else None,
                          clamp_hi=pick(fit.clamp_hi) if thresholds else None)


def _mean(v: Sequence[float]) -> float:
    return sum(v) / max(1, len(v))
