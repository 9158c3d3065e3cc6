"""One sampling job with CFG and the stabilizer at the WebUIs' hook points (spec §4).

Per job: one `Stabilizer` (`begin_pass` per sampler invocation, i.e. per chunk of seeds); per
evaluation: the model is called once on ``[uncond; cond]``, CFG combines the halves, and the
post-CFG prediction goes through `Stabilizer.post_cfg` (x0 samplers) or `Stabilizer.post_cfg_eps`
(DDIM); before decoding, `Stabilizer.pre_decode`. With the probe, the evaluation's entropy map is
taken right after the model call and handed to the same evaluation's `post_cfg`.

A model here is any object with ``latent_channels``, ``latent_scale``, ``encode_prompts(prompts,
negative) -> (cond, uncond)``, ``denoise(x, sigma, cond, t=None) -> x0`` in the variance-exploding
frame (rows of ``cond`` as built by `stack_conditioning`), ``decode(latent) -> RGB in [0, 1]``,
``alphas_cumprod`` (VP training schedule), ``sigma_min``/``sigma_max``, and optionally
``probe_layer() -> (name, module, factor) | None``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..probe import EntropyProbe, default_max_queries
from ..settings import Settings
from ..stabilizer import Stabilizer
from .samplers import SAMPLERS, ddim_timesteps, karras_sigmas


@dataclass
class JobSpec:
    """What to sample: the same for every variant of a comparison."""
    sampler: str = "euler"
    steps: int = 12
    cfg: float = 7.0
    seeds: tuple[int, ...] = (1, 2)
    prompts: tuple[str, ...] = ("discs", "stripes")
    negative: str = ""
    latent_hw: tuple[int, int] = (32, 32)
    batch_size: int = 4
    device: str = "cpu"
    tail_k: float = 3.0


@dataclass
class JobResult:
    latents: torch.Tensor  # (B, C, H, W) float32 on CPU, after pre_decode
    images: torch.Tensor  # (B, 3, H·f, W·f) float32 in [0, 1] on CPU
    activity: torch.Tensor  # (B, 1, H, W): mean |x0' − x0| over evaluations (0 when nothing changed)
    confidence: torch.Tensor | None  # (B, 1, H, W) AQClip confidence of the last evaluation, if any
    report: dict[str, Any]
    seconds: float
    cfg_x0_tail_share: list[float] = field(default_factory=list)  # per sample, before the stabilizer


def stack_conditioning(uncond: Any, cond: Any) -> Any:
    """``[uncond; cond]`` along the batch: tensors are concatenated, dicts/tuples element-wise."""
    if isinstance(uncond, torch.Tensor):
        return torch.cat([uncond, cond])
    if isinstance(uncond, dict):
        return {k: stack_conditioning(uncond[k], cond[k]) for k in uncond}
    if isinstance(uncond, (tuple, list)):
        return type(uncond)(stack_conditioning(u, c) for u, c in zip(uncond, cond))
    raise TypeError(f"cannot batch conditioning of type {type(uncond).__name__}")


def slice_conditioning(c: Any, start: int, stop: int) -> Any:
    if isinstance(c, torch.Tensor):
        return c[start:stop]
    if isinstance(c, dict):
        return {k: slice_conditioning(v, start, stop) for k, v in c.items()}
    if isinstance(c, (tuple, list)):
        return type(c)(slice_conditioning(v, start, stop) for v in c)
    raise TypeError(f"cannot slice conditioning of type {type(c).__name__}")


class GuidedDenoiser:
    """CFG on one ``[uncond; cond]`` model call per evaluation, plus the stabilizer and the probe.

    The probe's row selector knows this loop's batch order: rows B..2B−1 of the call are the
    cond rows of images 0..B−1.
    """

    def __init__(self, model: Any, cond: Any, uncond: Any, cfg: float, total: int,
                 stabilizer: Stabilizer | None, probe: EntropyProbe | None = None, tail_k: float = 3.0):
        self.model, self.cfg, self.total = model, float(cfg), int(total)
        self.both = stack_conditioning(uncond, cond)
        self.stabilizer = stabilizer if stabilizer is not None and stabilizer.enabled else None
        self.probe = probe
        self.tail_k = tail_k
        self.activity: torch.Tensor | None = None
        self.tail_sum: torch.Tensor | None = None
        self.evaluations = 0

    def _guided(self, x: torch.Tensor, sigma: float, t: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = x.shape[0]
        emap = None
        if self.probe is not None:
            self.probe.begin_evaluation(tuple(x.shape[2:]), b, row_selector=lambda rows: (
                [(b + i, i) for i in range(b)] if rows == 2 * b else None))
        d = self.model.denoise(torch.cat([x, x]), sigma, self.both, t=t)
        if self.probe is not None:
            emap = self.probe.take_map()
        d_uncond, d_cond = d.chunk(2)
        return d_uncond + self.cfg * (d_cond - d_uncond), emap

    def _record(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Device-side accumulators (no host sync): where the stabilizer changed x0, and raw tails."""
        delta = (after.float() - before.float()).abs().mean(1, keepdim=True)
        self.activity = delta if self.activity is None else self.activity + delta
        z = before.float().flatten(1)
        z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True, unbiased=False).clamp_min(1e-12)
        share = (z.abs() > self.tail_k).float().mean(1)
        self.tail_sum = share if self.tail_sum is None else self.tail_sum + share
        self.evaluations += 1

    def x0(self, x: torch.Tensor, sigma: float, i: int) -> torch.Tensor:
        """Post-CFG x0 at VE noise level σ, stabilised (x0 samplers)."""
        d, emap = self._guided(x, sigma, None)
        out = d if self.stabilizer is None else self.stabilizer.post_cfg(d, i, self.total, emap, sigma=sigma,
                                                                          x_noisy=x)
        self._record(d, out)
        return out

    def eps(self, x_t: torch.Tensor, t: int, a: float, i: int) -> torch.Tensor:
        """Post-CFG ε at VP timestep t (ᾱ = a), stabilised through `post_cfg_eps` (DDIM)."""
        sigma = math.sqrt((1 - a) / a)
        x_ve = x_t / math.sqrt(a)
        d, emap = self._guided(x_ve, sigma, t)
        eps = (x_ve - d) / sigma
        if self.stabilizer is None:
            out = eps
        else:
            out = self.stabilizer.post_cfg_eps(x_t, eps, torch.tensor(a), i, self.total, emap, sigma=t)
        # x0' − x0 = (ε − ε')·√(1−a)/√a
        x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        self._record(x0, x0 + (eps - out) * math.sqrt((1 - a) / a))
        return out


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Standard normal latents, one CPU generator per seed (independent of batch composition)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class _SeededNoise:
    """Per-seed noise for ancestral steps: the same draws for a seed in every variant and batch."""

    def __init__(self, seeds: list[int], shape: tuple[int, int, int], device: Any, dtype: torch.dtype):
        self.gens = [torch.Generator().manual_seed(int(s) * 1_000_003 + 17) for s in seeds]
        self.shape, self.device, self.dtype = shape, device, dtype

    def __call__(self, step: int) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens]).to(self.device, self.dtype)


def run_job(model: Any, settings: Settings | None, spec: JobSpec, *,
            on_step: Callable[[], None] | None = None, use_probe: bool = True) -> JobResult:
    """Sample every seed of `spec` with `settings` (None = no stabilizer at all) and decode."""
    kind, sampler = SAMPLERS[spec.sampler]
    # show_maps only adds the AQClip maps to the stabilizer's `last_maps` (a debug output)
    stab = None
    if settings is not None:  # Q-Sched (qsilk.quant): ramp, or a file from $QSILK_COEFF_DIR (default models/QSilk)
        from .. import quant
        info = quant.ModelInfo(prediction=getattr(model, "prediction", "eps"), sampler=spec.sampler, steps=spec.steps,
                               coeff_dir=os.environ.get("QSILK_COEFF_DIR", "models/QSilk"))
        stab = Stabilizer(settings.replace(show_maps=True), preconditioner=quant.make_preconditioner(settings, info))
    if stab is not None and not stab.enabled:
        stab = None  # off means off: no hook point is called
    probe, probe_note = _make_probe(model, settings, spec, stab) if use_probe else (None, None)
    c, h, w = model.latent_channels, *spec.latent_hw
    latents, images, activity, tails, confidence = [], [], [], [], []
    t0 = time.perf_counter()
    try:
        for start in range(0, len(spec.seeds), spec.batch_size):
            seeds = list(spec.seeds[start:start + spec.batch_size])
            prompts = [spec.prompts[(start + j) % len(spec.prompts)] for j in range(len(seeds))]
            cond, uncond = model.encode_prompts(prompts, spec.negative)
            noise = initial_noise(seeds, (c, h, w)).to(spec.device, torch.float32)
            callback = (lambda i: on_step()) if on_step is not None else None
            if kind == "x0":
                sigmas = karras_sigmas(spec.steps, model.sigma_min, model.sigma_max)
                guided = GuidedDenoiser(model, cond, uncond, spec.cfg, spec.steps, stab, probe, spec.tail_k)
                if stab is not None:
                    stab.begin_pass(evaluations_per_step=1, sigma_max=sigmas[0], sigma_min=sigmas[-2])
                x = sampler(guided.x0, noise * sigmas[0], sigmas, callback=callback,
                            noise=_SeededNoise(seeds, (c, h, w), spec.device, torch.float32))
            else:
                steps = ddim_timesteps(spec.steps, len(model.alphas_cumprod))
                a_first = float(model.alphas_cumprod[steps[0]])
                guided = GuidedDenoiser(model, cond, uncond, spec.cfg, spec.steps, stab, probe, spec.tail_k)
                if stab is not None:
                    stab.begin_pass(evaluations_per_step=1)
                # VP start: x_T = √ᾱ·(σ·n) = √(1−ᾱ)·n, the same draw as the VE samplers use
                x = sampler(guided.eps, noise * math.sqrt(1 - a_first), model.alphas_cumprod, steps,
                            callback=callback)
            if stab is not None:
                x = stab.pre_decode(x)
                maps = getattr(stab, "last_maps", {}) or {}
                if "confidence" in maps:
                    confidence.append(maps["confidence"].float().cpu())
            latents.append(x.float().cpu())
            images.append(model.decode(x).float().cpu())
            activity.append((guided.activity / max(guided.evaluations, 1)).cpu())
            tails.append((guided.tail_sum / max(guided.evaluations, 1)).cpu())
    finally:
        if probe is not None:
            probe.detach()
    report = stab.report() if stab is not None else {"enabled": False}
    if probe_note:
        report.setdefault("notes", []).append(probe_note)
    if probe is not None:
        report["probe"] = {"maps": probe.maps, "failures": dict(probe.failures)}
    conf = torch.cat(confidence) if len(confidence) == len(latents) and confidence else None
    return JobResult(
        latents=torch.cat(latents), images=torch.cat(images), activity=torch.cat(activity),
        confidence=conf, report=report, seconds=time.perf_counter() - t0,
        cfg_x0_tail_share=[float(v) for v in torch.cat(tails)],
    )


def _make_probe(model: Any, settings: Settings | None, spec: JobSpec,
                stab: Stabilizer | None) -> tuple[EntropyProbe | None, str | None]:
    """An attached probe when AQClip runs in Attn mode and the model has a probe layer."""
    if stab is None or not (settings.aqclip_enabled and settings.aqclip_mode == "attn"):
        return None, None
    finder = getattr(model, "probe_layer", None)
    found = finder() if finder is not None else None
    if found is None:
        return None, f"{getattr(model, 'name', 'model')}: no attention layer to probe; AQClip uses Lite confidence"
    _, module, factor = found
    probe = EntropyProbe(heads=settings.probe_heads,
                         max_queries=settings.probe_queries or default_max_queries(spec.device))
    probe.attach(module, factor=factor)
    return probe, None
