"""The built-in default model: exact denoisers of a small, known data set (no weights, no download).

The data set is a mixture of isotropic Gaussians in a 4-channel latent-like space, ``K`` components
per class and two classes ("discs", "stripes"). Component ``k`` has mean ``μ_k`` — a procedurally
generated picture: a smooth background, a few class-specific shapes and a fixed micro-texture —
and standard deviation ``s`` per value (fresh grain in every sample). Under the variance-exploding
("Karras") parametrisation ``x = x0 + σ·ε`` the minimum-MSE denoiser of such a distribution is
known in closed form, so the "model" has no error of its own: every difference between two runs
is the sampler's, CFG's and the stabilizer's.

Conditional row (class c, components S_c, uniform weights)::

    w_k = softmax_{k∈S_c}( (x·μ_k − |μ_k|²/2) / (s² + σ²) )        (|x|² cancels in the softmax)
    D_c(x, σ) = E[x0 | x, c] = r·x + (1 − r)·Σ_k w_k μ_k,   r = s² / (s² + σ²)

Unconditional row (default ``uncond="gaussian"``): the exact denoiser of the Gaussian with the
whole data set's per-value mean ``μ̄`` and variance ``v`` (between-component variance + s²)::

    D_u(x, σ) = μ̄ + v/(v + σ²)·(x − μ̄)

i.e. an unconditional model that knows less than the conditional one, as a text-to-image model's
empty-prompt branch does. With ``uncond="mixture"`` (the exact denoiser of the union of both
classes) the two rows agree as soon as the class is identifiable, which in 4096 dimensions is
almost at once, and CFG then does next to nothing.

The "VAE decoder" is a fixed linear map from the 4 latent channels to RGB (`DECODER_MATRIX`, plus
0.5) followed by a bicubic 8× upsample. It exists to make pictures; it has no learned weights.

What this model is evidence of: the sampler loop, the CFG arithmetic and the stabilizer's hook
points behave as designed on a distribution whose exact answer is known, and high CFG produces
the same kind of overshoot tails (values far outside the data's range) that the paper targets.
What it is not evidence of: image quality on SD/SDXL — a real UNet's errors, its attention and
its latent statistics are absent here (AQClip runs in Lite mode: there is no attention to probe).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..settings import SettingsError
from .samplers import scaled_linear_alphas_cumprod, sigmas_from_alphas_cumprod

#: RGB = 0.5 + DECODER_MATRIX @ z (per pixel). Channel 0 ≈ luminance, 1 ≈ red–green, 2 ≈ blue–yellow,
#: 3 ≈ a "detail" channel that decodes weakly to luminance (like SD's 4th channel, mostly texture).
DECODER_MATRIX = torch.tensor([
    [0.20, 0.16, -0.06, 0.05],
    [0.20, -0.10, -0.06, 0.05],
    [0.20, -0.02, 0.18, 0.05],
])
LATENT_SCALE = 8  # image pixels per latent pixel
CLASSES = ("discs", "stripes")


def _smooth_field(g: torch.Generator, channels: int, h: int, w: int, cells: int) -> torch.Tensor:
    """Low-frequency random field: a ``cells×cells`` Gaussian grid, bicubic-upsampled to h×w."""
    coarse = torch.randn(1, channels, cells, cells, generator=g, dtype=torch.float64)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]


def _prototype(cls: int, g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """One picture (4, h, w) of class `cls`: background + shapes + fixed micro-texture."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64),
                            torch.linspace(0, 1, w, dtype=torch.float64), indexing="ij")
    z = 0.6 * _smooth_field(g, 4, h, w, 3)
    z[3] *= 0.5
    if cls == 0:  # discs: 3 soft-edged bright warm discs
        for _ in range(3):
            cy, cx, rad = torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([0.7, 0.7, 0.12]) \
                + torch.tensor([0.15, 0.15, 0.14], dtype=torch.float64)
            d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
            inside = torch.sigmoid((rad - d) * 4 * max(h, w) / 8)
            colour = torch.tensor([1.8, 1.6, -1.2, 0.0], dtype=torch.float64) \
                + 0.4 * torch.randn(4, generator=g, dtype=torch.float64)
            z += inside[None] * colour[:, None, None]
    else:  # stripes: one band pattern of a random angle and period, cool colours
        angle = float(torch.rand(1, generator=g)) * math.pi
        period = 0.12 + 0.12 * float(torch.rand(1, generator=g))
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        band = torch.tanh(3 * torch.sin(2 * math.pi * phase))
        colour = torch.tensor([0.9, -0.6, 1.2, 0.3], dtype=torch.float64) \
            + 0.3 * torch.randn(4, generator=g, dtype=torch.float64)
        z += band[None] * colour[:, None, None]
    texture = torch.randn(4, h, w, generator=g, dtype=torch.float64) * torch.tensor(
        [0.25, 0.1, 0.1, 0.6], dtype=torch.float64)[:, None, None]
    return z + texture


@dataclass
class AnalyticModel:
    """Exact posterior-mean denoiser of a two-class Gaussian mixture (see the module docstring).

    Attributes:
        means: ``(K, C, H, W)`` float64 component means μ_k.
        labels: ``(K,)`` int64 class of each component.
        s: within-component standard deviation (per value).
    """

    means: torch.Tensor
    labels: torch.Tensor
    s: float = 0.3
    uncond: str = "gaussian"
    class_names: tuple[str, ...] = CLASSES
    name: str = "analytic"
    latent_scale: int = LATENT_SCALE

    @classmethod
    def procedural(cls, latent_hw: tuple[int, int] = (32, 32), per_class: int = 6, s: float = 0.3,
                   data_seed: int = 0, uncond: str = "gaussian") -> "AnalyticModel":
        """The default data set: `per_class` pictures per class at `latent_hw`, fixed by `data_seed`."""
        h, w = latent_hw
        g = torch.Generator().manual_seed(int(data_seed))
        protos = [_prototype(c, g, h, w) for c in range(2) for _ in range(per_class)]
        labels = torch.tensor([c for c in range(2) for _ in range(per_class)])
        means = torch.stack(protos)
        return cls(means=means, labels=labels, s=float(s), uncond=uncond)

    @property
    def latent_channels(self) -> int:
        return self.means.shape[1]

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.means.shape[2:])

    def encode_prompts(self, prompts: list[str], negative: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Conditioning rows: the class index of each prompt; the unconditional row is −1 (all data).

        A prompt is a class name (``discs`` | ``stripes``) or its index; the negative prompt is
        not used (the unconditional model is the whole data set).
        """
        cond = []
        for p in prompts:
            key = p.strip().lower()
            if key in self.class_names:
                cond.append(self.class_names.index(key))
            elif key.isdigit() and int(key) < len(self.class_names):
                cond.append(int(key))
            else:
                raise SettingsError(f"--prompt: the analytic model's prompts are one of {', '.join(self.class_names)} (got {p!r})")
        cond_t = torch.tensor(cond, dtype=torch.int64)
        return cond_t, torch.full_like(cond_t, -1)

    def __post_init__(self) -> None:
        if self.uncond not in ("gaussian", "mixture"):
            raise ValueError(f"analytic model: uncond must be 'gaussian' or 'mixture' (got {self.uncond!r})")
        mu = self.means.flatten(1)
        self._mean_all = mu.mean(0)
        self._var_all = mu.var(0, unbiased=False) + self.s ** 2

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """Stable Diffusion's training schedule, so that DDIM and the σ range match SD's."""
        return scaled_linear_alphas_cumprod()

    @property
    def sigma_min(self) -> float:
        return float(sigmas_from_alphas_cumprod(self.alphas_cumprod)[0])

    @property
    def sigma_max(self) -> float:
        return float(sigmas_from_alphas_cumprod(self.alphas_cumprod)[-1])

    def probe_layer(self) -> None:
        """No attention here: AQClip runs on Lite confidence with this model."""
        return None

    def denoise(self, x: torch.Tensor, sigma: float, cond: torch.Tensor, t: int | None = None) -> torch.Tensor:
        """``D(x, σ)`` for each row of `x` ``(B, C, H, W)``; `cond` ``(B,)`` class index, −1 = unconditional.

        Returns a tensor like `x` (computed in float64); `t` (a VP timestep) is not needed here.
        """
        xf = x.to(torch.float64).flatten(1)
        mu = self.means.flatten(1)
        var = self.s ** 2 + float(sigma) ** 2
        mixture_rows = cond >= 0 if self.uncond == "gaussian" else torch.ones_like(cond, dtype=torch.bool)
        logits = (xf @ mu.T - 0.5 * (mu * mu).sum(1)) / var
        allowed = (cond[:, None] < 0) | (cond[:, None] == self.labels[None, :])
        weights = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=1)
        r = self.s ** 2 / var
        out = r * xf + (1 - r) * (weights @ mu)
        v = self._var_all
        gaussian = self._mean_all + v / (v + float(sigma) ** 2) * (xf - self._mean_all)
        out = torch.where(mixture_rows[:, None], out, gaussian)
        return out.reshape(x.shape).to(x.dtype)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """RGB ``(B, 3, 8H, 8W)`` in [0, 1]: ``clip(0.5 + M·z)`` per pixel, bicubic 8× upsample."""
        m = DECODER_MATRIX.to(latent.device, torch.float32)
        rgb = 0.5 + torch.einsum("rc,bchw->brhw", m, latent.float())
        rgb = F.interpolate(rgb, scale_factor=self.latent_scale, mode="bicubic", align_corners=False)
        return rgb.clamp(0, 1)

    @property
    def description(self) -> str:
        k = self.means.shape[0]
        return (f"analytic — exact denoisers of {k} procedural pictures in 2 classes (grain s={self.s:g}, "
                f"unconditional row: {self.uncond}); no learned weights")

    default_prompts = ("discs", "stripes")
    extra_metric_help = {
        "data_rms_distance": {"help": "RMS distance of the final latent to the nearest data picture μ_k "
                                      "(a fresh sample of the data set is at ≈ s)", "better": "lower"},
        "class_match": {"help": "share of samples whose nearest data picture has the prompted class",
                        "better": "higher"},
    }

    def extra_metrics(self, latents: torch.Tensor, prompts: list[str]) -> dict[str, list[float]]:
        """Fidelity to the known data set: nearest-picture distance and class agreement, per sample."""
        idx, dist = self.nearest_component(latents)
        cond, _ = self.encode_prompts(prompts)
        match = (self.labels[idx] == cond).to(torch.float64)
        return {"data_rms_distance": [float(d) for d in dist], "class_match": [float(m) for m in match]}

    def nearest_component(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the index of the nearest μ_k and the RMS distance to it (float64)."""
        d2 = torch.cdist(latent.to(torch.float64).flatten(1), self.means.flatten(1)) ** 2
        best, idx = d2.min(dim=1)
        return idx, (best / self.means[0].numel()).sqrt()
