"""Tiny random denoisers for the quant tests, and the low-bit storage they are tested in.

The quantizers are written here, independently of `qsilk.quant.lowbit`, so that the tests do not
check the code with itself: `fp8_storage` casts weights to torch.float8_e4m3fn and back (what
A1111's "FP8 weight" and Forge's float8 storage do); `group4_storage` rounds consecutive blocks of
32 weights to 15 symmetric levels of the block's absmax (`clip` < 1 shrinks the scale and
saturates the largest weights, as percentile-clipping quantizers do).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn


class TinyEps(nn.Module):
    """A 3-layer random conv ε-predictor (residual middle layer, log σ input channel; VE frame)."""

    def __init__(self, channels: int = 4, hidden: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.b = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.c = nn.Conv2d(hidden, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=g) / math.sqrt(p[0].numel() if p.dim() > 1 else 9))

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        z = x / math.sqrt(sigma ** 2 + 1)
        e = torch.full_like(x[:, :1], math.log(sigma) / 4)
        h = torch.tanh(self.a(torch.cat([z, e], 1)))
        h = h + torch.tanh(self.b(h))
        return self.c(h)  # like a UNet's conv_out: all of ε comes through the last layer


def eps_denoiser(net: nn.Module):
    """k-diffusion ε wrapper: ``D(x, σ) = x − σ·ε̂(x, σ)`` (prompts unused)."""
    def denoise(x, sigma, prompts=None):
        with torch.no_grad():
            return x - sigma * net(x, float(sigma))
    return denoise


def fp8_storage(net: nn.Module) -> nn.Module:
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(m.weight.to(torch.float8_e4m3fn).to(m.weight.dtype))
    return twin


def group4_storage(net: nn.Module, block: int = 32, clip: float = 1.0) -> nn.Module:
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight.reshape(-1, block)
                scale = clip * w.abs().amax(dim=1, keepdim=True) / 7
                m.weight.copy_((torch.clamp(torch.round(w / scale), -7, 7) * scale).reshape(m.weight.shape))
    return twin


@pytest.fixture(scope="session")
def tiny_net() -> TinyEps:
    return TinyEps()
