"""A literal implementation of the paper's QSilk §3.1 and Algorithm 1 (AQClip-Lite), for the
`paper`-variant equality test and the side-by-side benchmark.

Written from the paper's text (`shared/seeds/000_*.txt`: §3.1, §3.2, §3.3, Algorithm 1) — not
from `qsilk/` — in the straightforward way: a Python loop over samples, `torch.quantile`, full
`unfold` of all tiles, `fold(U')/fold(1)`. Where the project's spec fixes the paper, this follows
the spec (so the test checks the fixes, not the bugs):

- **sign** of line 5: ``ℓ = μ + ndtri(q_ℓ)·σ`` (the paper's ``μ − ndtri(q_ℓ)σ`` puts ℓ above μ);
  ndtri clamped to ±4.89;
- **borders**: the latent is reflect-padded at the bottom/right so every pixel lies in a tile
  (spec §3.1: ``T_eff = min(T, H, W)``, ``S_eff = max(1, min(S, ⌈T_eff/2⌉))``); the gradient map
  of line 2 is computed on the unpadded latent (3×3 Sobel, replicate padding) and padded the same
  way; the result is cropped;
- **ε** of line 7: none; a tile with ``h = ℓ`` (constant tile) is clamped to ``[ℓ, h]``;
- arithmetic in float64 by default (`compute_dtype`; the paper asks for FP32 statistics); σ is the
  population std; ``Ĥ = g / max(g)`` with the max floored at 1e-12;
- the EMA of line 6 starts from the first bounds (state per sample, passed in and returned).

Everything else is the paper's: channel-mean gradient, max normalisation, pooled (all-channel)
tile statistics, the asymmetric quantile mapping of Eq. (2), tanh soft clip with slope α, box
overlap-add.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Z_MAX = 4.89


def paper_micro_clamp(x: torch.Tensor, q_lo: float = 0.001, q_hi: float = 0.999, shape: str = "hard",
                      alpha: float = 2.0) -> torch.Tensor:
    """§3.1 per sample: ``ℓ, h = quantile(x_b, q)``; hard clamp, or Eq. (1) without ε (shape="tanh")."""
    out = []
    for xb in x.float():
        flat = xb.flatten()
        l, h = torch.quantile(flat, q_lo), torch.quantile(flat, q_hi)
        if shape == "hard":
            out.append(xb.clamp(l, h))
        else:
            m, d = (l + h) / 2, (h - l) / 2
            out.append(m + d * torch.tanh(alpha * (xb - m) / d))
    return torch.stack(out).to(x.dtype)


def _geometry(h: int, w: int, tile: int, stride: int):
    t = min(tile, h, w)
    s = max(1, min(stride, math.ceil(t / 2)))
    pad_h = (s - (h - t) % s) % s
    pad_w = (s - (w - t) % s) % s
    return t, s, pad_h, pad_w


def _grad_magnitude(zm: torch.Tensor) -> torch.Tensor:
    """‖∇ z_m‖ with the 3×3 Sobel operator (replicate padding), ``(1, 1, H, W)``."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=zm.dtype)
    k = torch.stack([kx, kx.t()]).unsqueeze(1)
    g = F.conv2d(F.pad(zm, (1, 1, 1, 1), mode="replicate"), k)
    return torch.sqrt(g[:, :1] ** 2 + g[:, 1:] ** 2)


def paper_aqclip(z: torch.Tensor, tile: int = 32, stride: int = 16, alpha: float = 2.0, beta: float = 0.8,
                 state: dict | None = None, h_hat_map: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float64):
    """Algorithm 1 (one denoising step) for a ``(B, C, H, W)`` latent.

    `h_hat_map`: optional ``(B, 1, H, W)`` map used as Ĥ instead of line 2's gradient (AQClip-Attn,
    §3.3: "normalize to [0,1] to obtain Ĥ"; pooled to tiles and divided by the max like g).
    `state`: ``{b: (ℓ, h)}`` from the previous step (EMA), updated in place; None = no EMA.
    `compute_dtype`: float64 for the equality tests (an oracle), float32 for the benchmark (the
    paper's "stats in FP32").
    Returns z' like `z`.
    """
    b_, c_, h_, w_ = z.shape
    t, s, pad_h, pad_w = _geometry(h_, w_, tile, stride)
    out = []
    for b in range(b_):
        zb = z[b:b + 1].to(compute_dtype)
        src = (_grad_magnitude(zb.mean(dim=1, keepdim=True)) if h_hat_map is None
               else h_hat_map[b:b + 1].to(compute_dtype))
        zp = F.pad(zb, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else zb
        srcp = F.pad(src, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else src
        # line 2: g ← avgpool(‖∇z_m‖, T, S); Ĥ ← g / max(g)
        g = F.avg_pool2d(srcp, t, s).flatten()
        h_hat = g / g.max().clamp_min(1e-12)
        # line 3
        q_l = 0.5 * h_hat ** 2
        q_h = 1 - 0.5 * (1 - h_hat) ** 2
        # line 4: U ← unfold(z, T, S); μ, σ over each tile (all channels)
        u = F.unfold(zp, t, stride=s)[0]                       # (C·T·T, L)
        mu = u.mean(dim=0)
        sigma = u.var(dim=0, unbiased=False).sqrt()
        # line 5 (sign fixed)
        lo = mu + torch.special.ndtri(q_l).clamp(-Z_MAX, Z_MAX) * sigma
        hi = mu + torch.special.ndtri(q_h).clamp(-Z_MAX, Z_MAX) * sigma
        # line 6: per-tile EMA across steps
        if state is not None:
            if b in state:
                lo = beta * state[b][0] + (1 - beta) * lo
                hi = beta * state[b][1] + (1 - beta) * hi
            state[b] = (lo, hi)
        # lines 7–8
        m, d = (lo + hi) / 2, (hi - lo) / 2
        y = torch.tanh(alpha * (u - m) / torch.where(d > 0, d, torch.ones_like(d)))
        u2 = torch.where(d > 0, m + d * y, u.clamp(lo, hi))
        # line 9: z' ← fold(U') / fold(1)
        size = (h_ + pad_h, w_ + pad_w)
        zf = F.fold(u2[None], size, t, stride=s) / F.fold(torch.ones_like(u2)[None], size, t, stride=s)
        out.append(zf[..., :h_, :w_])
    return torch.cat(out).to(z.dtype)
