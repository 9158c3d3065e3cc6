"""Noise schedules and samplers, written from the papers' update equations.

Two families, as in the WebUIs:

- **x0 samplers** in the variance-exploding parametrisation ``x = x0 + σ·ε`` (Karras et al. 2022,
  "Elucidating the design space…"): `sample_euler`, `sample_euler_ancestral`, `sample_dpmpp_2m`.
  They take ``denoise(x, sigma, i) -> x0`` — CFG and the stabilizer live inside that callable, so
  the stabilizer sees every evaluation's post-CFG x0 exactly as on a WebUI.
- **ε sampler** in the variance-preserving parametrisation ``x_t = √ᾱ·x0 + √(1−ᾱ)·ε``:
  `sample_ddim` (Song et al. 2021, η = 0). It takes ``eps(x_t, t, a, i) -> ε``.

Each sampler makes exactly one model evaluation per step, so evaluation i of n has progress
``i/(n−1)``. Nothing here knows about QSilk.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Denoise = Callable[[torch.Tensor, float, int], torch.Tensor]
EpsFn = Callable[[torch.Tensor, int, float, int], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]
StepCallback = Callable[[int], None]


# -- schedules ------------------------------------------------------------------------------
def scaled_linear_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ_t of Stable Diffusion's training schedule: ``β_t = (linspace(√β₀, √β₁, T))²``, float64."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VE noise level of each VP timestep: ``σ_t = √((1 − ᾱ_t)/ᾱ_t)``."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al. (2022) Eq. 5: ``σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ``, then 0.

    Returns n + 1 Python floats (the last is 0), so the loop needs no host sync.
    """
    if n < 1:
        raise ValueError(f"steps must be at least 1 (got {n})")
    if n == 1:
        return [float(sigma_max), 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)] + [0.0]


def ddim_timesteps(n: int, train_steps: int = 1000) -> list[int]:
    """n timesteps evenly spaced from T−1 down to 0 (each evaluated once)."""
    if n < 1:
        raise ValueError(f"steps must be at least 1 (got {n})")
    if n == 1:
        return [train_steps - 1]
    return [round((train_steps - 1) * (1 - i / (n - 1))) for i in range(n)]


# -- x0 samplers (VE) -----------------------------------------------------------------------
def sample_euler(denoise: Denoise, x: torch.Tensor, sigmas: list[float], *,
                 callback: StepCallback | None = None, noise: NoiseFn | None = None) -> torch.Tensor:
    """Euler on the probability-flow ODE ``dx/dσ = (x − D(x, σ))/σ`` (Karras et al. 2022, Alg. 2, no churn)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, sigma, i)) / sigma
        x = x + d * (sigma_next - sigma)
        if callback is not None:
            callback(i)
    return x


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(σ_down, σ_up)`` of an ancestral step: ``σ_up = min(σ', η·√(σ'²(σ²−σ'²)/σ²))``, ``σ_down = √(σ'² − σ_up²)``.

    Stepping deterministically to σ_down and adding fresh noise of std σ_up lands at σ' = σ_next
    (Ho et al. 2020's posterior q(x_{t−1} | x_t, x0) in VE form).
    """
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def sample_euler_ancestral(denoise: Denoise, x: torch.Tensor, sigmas: list[float], *,
                           noise: NoiseFn, callback: StepCallback | None = None,
                           eta: float = 1.0) -> torch.Tensor:
    """Euler a: an Euler step to σ_down, then fresh noise of std σ_up (`ancestral_split`)."""
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        down, up = ancestral_split(sigma, sigmas[i + 1], eta)
        d = (x - denoise(x, sigma, i)) / sigma
        x = x + d * (down - sigma)
        if up > 0:
            x = x + noise(i) * up
        if callback is not None:
            callback(i)
    return x


def sample_dpmpp_2m(denoise: Denoise, x: torch.Tensor, sigmas: list[float], *,
                    callback: StepCallback | None = None, noise: NoiseFn | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in VE form, with λ = −log σ.

    Math: ``h = λ_{i+1} − λ_i``; first step and last step (σ' = 0) first order
    (``D̂ = D_i``), otherwise ``r = h_{i−1}/h``, ``D̂ = (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1}``; then
    ``x ← (σ'/σ)·x + (1 − σ'/σ)·D̂``  (exp(−h) = σ'/σ).
    """
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma, i)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if old_denoised is None:
                d_hat = denoised
            else:
                r = h_last / h
                d_hat = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            ratio = sigma_next / sigma
            x = ratio * x + (1 - ratio) * d_hat
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i)
    return x


# -- ε sampler (VP) -------------------------------------------------------------------------
def sample_ddim(eps_fn: EpsFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: list[int], *,
                callback: StepCallback | None = None) -> torch.Tensor:
    """DDIM, η = 0 (Song et al. 2021, Eq. 12): ``x0̂ = (x_t − √(1−a)·ε)/√a``,
    ``x_prev = √a'·x0̂ + √(1−a')·ε``; after the last timestep a' = 1 (the clean x0̂).

    `x` is the VP latent at ``timesteps[0]``. ᾱ values are read once into Python floats.
    """
    abar = [float(alphas_cumprod[t]) for t in timesteps] + [1.0]
    for i, t in enumerate(timesteps):
        a, a_prev = abar[i], abar[i + 1]
        eps = eps_fn(x, t, a, i)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        if callback is not None:
            callback(i)
    return x


#: name -> (kind, function); kind "x0" (VE, Karras sigmas) or "eps" (VP timesteps).
SAMPLERS: dict[str, tuple[str, Callable]] = {
    "euler": ("x0", sample_euler),
    "euler_a": ("x0", sample_euler_ancestral),
    "dpmpp_2m": ("x0", sample_dpmpp_2m),
    "ddim": ("eps", sample_ddim),
}
#: Display names accepted on the command line as well.
SAMPLER_ALIASES = {"euler": "euler", "euler a": "euler_a", "euler_a": "euler_a", "dpm++ 2m": "dpmpp_2m",
                   "dpmpp_2m": "dpmpp_2m", "dpm++2m": "dpmpp_2m", "ddim": "ddim"}
