"""A literal implementation of the paper's QSilk + Algorithm 1 (AQClip-Lite), the benchmark's baseline.

Written line by line from the paper's text (shared/seeds/000: §3 and Algorithm 1) the way a direct
reading implements it: a Python loop over the samples, `torch.quantile` for the global corridor,
`unfold` → per-tile statistics → `fold(U')/fold(1)`. With the spec's sign fix on the lower bound
(``l = μ + ndtri(q_ℓ)·σ``) and ndtri clamped to ±4.89; first step (EMA = current bounds). Sizes
must satisfy ``(H − T) % S == 0`` (the paper does not say how borders are handled).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def qsilk_literal(x: torch.Tensor, q_lo: float = 0.001, q_hi: float = 0.999) -> torch.Tensor:
    """Per-sample quantile corridor with the fast hard clamp."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        v = x[b].float()
        lo = torch.quantile(v.flatten(), q_lo)
        hi = torch.quantile(v.flatten(), q_hi)
        out[b] = torch.clamp(v, lo, hi).to(x.dtype)
    return out


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def aqclip_lite_literal(z: torch.Tensor, tile: int = 32, stride: int = 16, alpha: float = 2.0,
                        eps: float = 1e-6) -> torch.Tensor:
    """Algorithm 1, one denoising step, one sample at a time."""
    out = torch.empty_like(z)
    kx = _SOBEL_X.view(1, 1, 3, 3).to(z.device)
    ky = kx.transpose(-1, -2)
    for b in range(z.shape[0]):
        zb = z[b:b + 1].float()
        # 2: z_m ← mean_channel(z); g ← avgpool(‖∇z_m‖, T, S); Ĥ ← g / max(g)
        zm = zb.mean(dim=1, keepdim=True)
        grad = torch.sqrt(F.conv2d(zm, kx, padding=1) ** 2 + F.conv2d(zm, ky, padding=1) ** 2)
        g = F.avg_pool2d(grad, tile, stride).flatten()
        H_hat = g / g.max().clamp_min(1e-12)
        # 3: q_ℓ ← 0.5·Ĥ²; q_h ← 1 − 0.5·(1 − Ĥ)²
        q_l = 0.5 * H_hat ** 2
        q_h = 1 - 0.5 * (1 - H_hat) ** 2
        # 4: U ← unfold(z, T, S); μ ← mean(U); σ ← std(U)
        U = F.unfold(zb, tile, stride=stride)            # (1, C·T·T, L)
        mu = U.mean(dim=1, keepdim=True)
        sigma = U.std(dim=1, unbiased=False, keepdim=True)
        # 5: ℓ ← μ + ndtri(q_ℓ)·σ (sign fixed); h ← μ + ndtri(q_h)·σ
        lo = mu + torch.special.ndtri(q_l).clamp(-4.89, 4.89).view(1, 1, -1) * sigma
        hi = mu + torch.special.ndtri(q_h).clamp(-4.89, 4.89).view(1, 1, -1) * sigma
        # 6: EMA — first step: the current bounds
        # 7–8: y ← tanh(α·(U − m)/(δ + ε)); U' ← m + δ·y
        m, delta = (lo + hi) / 2, (hi - lo) / 2
        U2 = m + delta * torch.tanh(alpha * (U - m) / (delta + eps))
        # 9: z' ← fold(U') / fold(1)
        size = zb.shape[-2:]
        num = F.fold(U2, size, tile, stride=stride)
        den = F.fold(torch.ones_like(U2), size, tile, stride=stride)
        out[b] = (num / den)[0].to(z.dtype)
    return out


def literal_pipeline(x: torch.Tensor) -> torch.Tensor:
    """QSilk global clamp, then AQClip-Lite, as the paper places them post-CFG."""
    return aqclip_lite_literal(qsilk_literal(x))
