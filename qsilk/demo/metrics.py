"""Image and latent metrics that need no learned model, and a registry for learned ones.

Every built-in metric is a pure function of one sample and returns one float per sample
(a ``(B,)`` float64 tensor). Images are ``(B, 3, H, W)`` in [0, 1]; latents ``(B, C, H, W)``.
Luminance is Rec. 601 ``Y = 0.299 R + 0.587 G + 0.114 B``.

Learned metrics (CLIP score, LPIPS, …) are not dependencies: `register_metric` adds one, and the
built-in adapters in `LEARNED` load their package only when asked for by name and say what to
install when it is missing.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..settings import SettingsError

_LUMA = (0.299, 0.587, 0.114)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` float64 Rec. 601 luma of ``(B, 3, H, W)`` RGB."""
    w = torch.tensor(_LUMA, dtype=torch.float64, device=images.device)
    return torch.einsum("c,bchw->bhw", w, images.to(torch.float64))


# -- latent tail statistics -----------------------------------------------------------------
def standardized(latent: torch.Tensor) -> torch.Tensor:
    """``z = (x − mean)/std`` per sample over all C·H·W values (population std), float64 ``(B, N)``."""
    x = latent.to(torch.float64).flatten(1)
    mean = x.mean(1, keepdim=True)
    std = x.std(1, keepdim=True, unbiased=False)
    return (x - mean) / torch.where(std > 0, std, torch.ones_like(std))


def robust_z(latent: torch.Tensor) -> torch.Tensor:
    """``z = (x − median)/(IQR/1.349)`` per sample, float64 ``(B, N)``.

    The scale comes from the bulk of the values (for a Gaussian IQR/1.349 = σ), so clipping the
    tails does not move it: a tail measure on this z compares runs on the same footing.
    A sample with IQR 0 uses scale 1.
    """
    x = latent.to(torch.float64).flatten(1)
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=x.device), dim=1)
    scale = ((q[2] - q[0]) / 1.349)[:, None]
    return (x - q[1][:, None]) / torch.where(scale > 0, scale, torch.ones_like(scale))


def tail_share(latent: torch.Tensor, k: float = 3.0) -> torch.Tensor:
    """Share of values with robust ``|z| > k`` (`robust_z`; a Gaussian has 0.27 % beyond 3, 0.0063 % beyond 4)."""
    return (robust_z(latent).abs() > k).to(torch.float64).mean(1)


def kurtosis(latent: torch.Tensor) -> torch.Tensor:
    """Pearson kurtosis ``E[z⁴]`` per sample (3 for a Gaussian; heavier tails → larger)."""
    return (standardized(latent) ** 4).mean(1)


def max_abs_z(latent: torch.Tensor) -> torch.Tensor:
    """Largest robust ``|z|`` per sample (`robust_z`)."""
    return robust_z(latent).abs().amax(1)


# -- image metrics --------------------------------------------------------------------------
def _power_spectrum(y: torch.Tensor) -> torch.Tensor:
    """``|FFT(Y − mean Y)|²`` per sample, ``(B, H, W)``, DC at index [0, 0]."""
    y = y - y.mean(dim=(1, 2), keepdim=True)
    return torch.fft.fft2(y).abs() ** 2


def _radius(h: int, w: int, device: Any = None) -> torch.Tensor:
    """Radial frequency in cycles/pixel (0 … 0.707) of each FFT bin."""
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64)
    fx = torch.fft.fftfreq(w, device=device, dtype=torch.float64)
    return (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()


def hf_energy(images: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Share of the luma's AC spectral energy above `cutoff` cycles/pixel (0 for a flat image).

    Math: ``Σ_{|f|>cutoff} |Ŷ(f)|² / Σ_{f≠0} |Ŷ(f)|²`` (Parseval: the denominator is H·W·Var(Y)).
    """
    p = _power_spectrum(luminance(images))
    r = _radius(*p.shape[1:], device=p.device)
    total = p.sum(dim=(1, 2))
    high = (p * (r > cutoff)).sum(dim=(1, 2))
    return torch.where(total > 0, high / total.clamp_min(1e-300), torch.zeros_like(total))


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """Variance of the 4-neighbour Laplacian of the luma over interior pixels (a sharpness proxy).

    Math: ``L = Y[i−1,j] + Y[i+1,j] + Y[i,j−1] + Y[i,j+1] − 4·Y[i,j]``; result ``Var(L)``.
    """
    y = luminance(images)
    lap = y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4 * y[:, 1:-1, 1:-1]
    return lap.flatten(1).var(1, unbiased=False)


def saturation_share(images: torch.Tensor, eps: float = 1.0 / 255) -> torch.Tensor:
    """Share of pixels with at least one RGB channel clipped (≤ eps or ≥ 1 − eps)."""
    x = images.to(torch.float64)
    clipped = ((x <= eps) | (x >= 1 - eps)).any(dim=1)
    return clipped.flatten(1).to(torch.float64).mean(1)


def periodic_index(images: torch.Tensor, ratio: float = 20.0, min_radius: float = 0.02) -> torch.Tensor:
    """Share of the luma's AC energy in isolated spectral peaks — a grid / moiré artifact index.

    A bin counts as a peak when its power exceeds `ratio` × the median power of its ring (bins of
    the same radius, rounded to whole FFT bins) and its radius is above `min_radius` (very low
    frequencies are image layout, not artifacts). A pure sinusoid or a repeating grid scores
    near 1; noise, smooth images and natural textures score near 0; a flat image scores 0.
    """
    y = luminance(images)
    y = (y - y.mean(dim=(1, 2), keepdim=True)) * _hann(*y.shape[1:], device=y.device)  # window after de-meaning
    p = _power_spectrum(y)
    b, h, w = p.shape
    fy = torch.fft.fftfreq(h, d=1.0 / h, device=p.device, dtype=torch.float64)
    fx = torch.fft.fftfreq(w, d=1.0 / w, device=p.device, dtype=torch.float64)
    ring = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt().round().long().flatten()
    flat = p.flatten(1)
    med = _ring_medians(flat, ring)
    background = med[:, ring]
    radius = _radius(h, w, device=p.device).flatten()
    peak = (flat > ratio * background) & (radius > min_radius)[None, :]
    total = flat.sum(1)
    return torch.where(total > 0, (flat * peak).sum(1) / total.clamp_min(1e-300), torch.zeros_like(total))


def _ring_medians(values: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """Median of each ring's values per row: ``(B, N)`` values, ``(N,)`` ring ids → ``(B, rings)``.

    Sort by value, then stably by ring: each ring becomes a sorted contiguous run, whose middle
    one or two entries give the median (no Python loop over rings).
    """
    by_value = values.argsort(dim=1)
    by_ring = ring[by_value].argsort(dim=1, stable=True)
    ordered = values.gather(1, by_value.gather(1, by_ring))
    counts = torch.bincount(ring)
    starts = counts.cumsum(0) - counts
    lo = (starts + (counts - 1).clamp_min(0) // 2).clamp_max(values.shape[1] - 1)
    hi = (starts + counts // 2).clamp_max(values.shape[1] - 1)
    med = 0.5 * (ordered[:, lo] + ordered[:, hi])
    return torch.where(counts[None] > 0, med, torch.zeros_like(med))


def _hann(h: int, w: int, device: Any = None) -> torch.Tensor:
    wy = torch.hann_window(h, periodic=False, dtype=torch.float64, device=device) if h > 1 else torch.ones(1, dtype=torch.float64)
    wx = torch.hann_window(w, periodic=False, dtype=torch.float64, device=device) if w > 1 else torch.ones(1, dtype=torch.float64)
    return wy[:, None] * wx[None, :]


# -- tables of metrics ----------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One metric: `fn(images, latents, context) -> (B,)`; `better` is "lower", "higher" or "" (no direction)."""
    name: str
    fn: Callable[..., torch.Tensor]
    help: str
    better: str = ""


def builtin_metrics(tail_k: float = 3.0) -> list[Metric]:
    """The weight-free metrics, in table order."""
    return [
        Metric(f"latent_tail_share_{tail_k:g}", lambda i, l, c: tail_share(l, tail_k),
               f"share of final-latent values with robust |z| > {tail_k:g} (z from median and IQR/1.349)", "lower"),
        Metric("latent_kurtosis", lambda i, l, c: kurtosis(l), "E[z⁴] of the final latent (Gaussian: 3)", "lower"),
        Metric("latent_max_abs_z", lambda i, l, c: max_abs_z(l), "largest robust |z| in the final latent", "lower"),
        Metric("hf_energy", lambda i, l, c: hf_energy(i), "share of luma spectral energy above 0.25 cycles/px", ""),
        Metric("laplacian_variance", lambda i, l, c: laplacian_variance(i), "variance of the luma Laplacian (sharpness)", ""),
        Metric("saturation_share", lambda i, l, c: saturation_share(i), "share of pixels with a clipped RGB channel", "lower"),
        Metric("periodic_index", lambda i, l, c: periodic_index(i), "share of luma energy in isolated spectral peaks (grid/moiré)", "lower"),
    ]


#: Learned metrics that can be asked for by name: name -> "module:function" building a `Metric`.
#: They import their package lazily; see `load_learned_metric`.
LEARNED: dict[str, str] = {
    "lpips": "qsilk.demo.learned:lpips_metric",
    "clip_score": "qsilk.demo.learned:clip_score_metric",
}


def register_metric(name: str, factory: str | Callable[..., Metric]) -> None:
    """Make a learned metric available to ``qsilk compare --metric NAME``.

    `factory` is ``"module:function"`` (imported only when used) or a callable; it is called with
    the command's options (keyword ``options=``) and returns a `Metric`.
    """
    LEARNED[name] = factory  # type: ignore[assignment]


def load_learned_metric(name: str, **options: Any) -> Metric:
    """Build learned metric `name`; a missing package or weight raises `CommandError` naming what to install."""
    if name not in LEARNED:
        raise SettingsError(f"--metric: unknown metric {name!r}; available: {', '.join(sorted(LEARNED))}")
    factory = LEARNED[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(options=options)


def evaluate(metrics: list[Metric], images: torch.Tensor, latents: torch.Tensor,
             context: dict | None = None) -> dict[str, list[float]]:
    """Per-sample values of each metric, as Python floats (read once, at the end of a run)."""
    ctx = context or {}
    return {m.name: [float(v) for v in m.fn(images, latents, ctx).to(torch.float64).cpu()] for m in metrics}

