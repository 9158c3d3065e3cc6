"""A random-weight Stable Diffusion UNet for timing, built like the ldm/sgm `openaimodel.UNetModel`.

Only for the benchmark (no checkpoint can be loaded here): the same layer types, widths, depths,
head counts and module names as SD1.5 (`v1-inference.yaml`) and SDXL (`sd_xl_base.yaml`), so a
forward pass costs what the real one costs and `qsilk.find_probe_layer` finds the same layer
(``output_blocks.11.1.transformer_blocks.0.attn1`` for SD1.5, ``output_blocks.5.1.transformer_blocks.1.attn1``
for SDXL). Attention runs A1111's "sdp" way (``F.scaled_dot_product_attention``).
Written for this project from the published architecture; no code was taken from the originals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; 0 = no attention
    middle_depth: int = 1
    num_heads: int | None = 8           # SD1: fixed head count …
    head_channels: int | None = None    # … SDXL: fixed head width (64)
    context_dim: int = 768
    adm_in_channels: int | None = None  # SDXL's pooled-text + size conditioning
    linear_proj: bool = False           # SDXL projects in/out with Linear, SD1 with 1×1 conv
    groups: int = 32


SD15 = UNetConfig()
SDXL = UNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), middle_depth=10, num_heads=None,
                  head_channels=64, context_dim=2048, adm_in_channels=2816, linear_proj=True)
#: A tiny UNet with the SD1.5 layout, for smoke tests.
TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                  num_heads=2, context_dim=32, groups=8)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CrossAttention(nn.Module):
    """``heads``, ``to_q``/``to_k``/``to_v`` (no bias), ``to_out = [Linear, Dropout]`` — ldm's attributes."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        B, _, inner = q.shape
        q, k, v = (t.view(B, -1, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, -1, inner))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, depth: int, cfg: UNetConfig):
        super().__init__()
        heads = cfg.num_heads or ch // cfg.head_channels
        self.norm = nn.GroupNorm(cfg.groups, ch, eps=1e-6)
        self.linear = cfg.linear_proj
        self.proj_in = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(ch, heads, ch // heads, cfg.context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class ResBlock(nn.Module):
    def __init__(self, ch: int, out: int, emb: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out else nn.Conv2d(ch, out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """``forward(x, timesteps, context, y=None)`` → ε, as ldm's ``UNetModel``."""

    def __init__(self, cfg: UNetConfig = SD15):
        super().__init__()
        mc, emb = cfg.model_channels, cfg.model_channels * 4
        self.cfg = cfg
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb), nn.SiLU(),
                                                         nn.Linear(emb, emb)))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(4, mc, 3, padding=1))])
        chans, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * mc, emb, cfg.groups)]
                ch = mult * mc
                if cfg.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, cfg.transformer_depth[level], cfg))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, ch, emb, cfg.groups),
                                                    SpatialTransformer(ch, cfg.middle_depth, cfg),
                                                    ResBlock(ch, ch, emb, cfg.groups))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), mult * mc, emb, cfg.groups)]
                ch = mult * mc
                if cfg.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, cfg.transformer_depth[level], cfg))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(cfg.groups, ch), nn.SiLU(), nn.Conv2d(mc, 4, 3, padding=1))

    def forward(self, x, timesteps, context, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))
        if self.cfg.adm_in_channels:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            skip = hs.pop()
            if h.shape[-2:] != skip.shape[-2:]:  # odd sizes: match the skip (A1111's cat hijack does this)
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)


def dummy_inputs(cfg: UNetConfig, batch: int, latent_hw: tuple[int, int], device="cpu", dtype=torch.float32):
    """Random latent, timesteps, 77-token context (and SDXL's vector) for one UNet call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, *latent_hw, generator=g)
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g)
    y = torch.randn(batch, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None
    t = torch.full((batch,), 500.0)
    cast = lambda v: None if v is None else v.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), t.to(device), cast(ctx), cast(y)
