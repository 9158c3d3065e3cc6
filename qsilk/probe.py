"""Attention-entropy probe (spec §5).

CONTRACT STUB — to be implemented (issue #2). Signatures and behaviour below are fixed; host
adapters (A1111, Forge, the command line) are written against them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def entropy_map(q: torch.Tensor, k: torch.Tensor, grid_hw: tuple[int, int], *, num_heads: int, heads: int = 2,
                max_queries: int = 1024) -> torch.Tensor:
    """Normalised attention entropy ``(B, 1, h, w)`` in [0, 1] from `to_q`/`to_k` outputs
    ``(B, N, num_heads·d)`` of one self-attention layer whose N = h·w tokens form `grid_hw`.
    Sampled heads ⌊(j+½)·num_heads/heads⌋, strided queries (≤ max_queries), all keys, entropy of
    softmax(q·kᵀ/√d) / log N, each sampled query filling its s×s token block. Chunked over queries
    (≤ 32 MiB of logits at once), never an N×N matrix."""
    raise NotImplementedError


def grid_for_tokens(latent_hw: tuple[int, int], n_tokens: int) -> tuple[int, int, int] | None:
    """``(h, w, f)`` with ``h = ⌈H/f⌉, w = ⌈W/f⌉, h·w = n_tokens`` for f in 1, 2, 4, 8; None if none fits."""
    raise NotImplementedError


def upsample_to_latent(emap: torch.Tensor, latent_hw: tuple[int, int], factor: int) -> torch.Tensor:
    """Each token fills its f×f latent pixels (nearest), cropped to the latent: ``(B,1,H,W)``."""
    raise NotImplementedError


def find_probe_layer(unet: nn.Module) -> tuple[str, nn.Module] | None:
    """The default probed self-attention: the last ``attn1`` of the decoder at the highest-resolution
    level that has attention. Understands ldm/sgm/Forge names
    (``output_blocks.{i}.1.transformer_blocks.{j}.attn1``) and diffusers names
    (``up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn1``). None if the UNet has none
    (e.g. Flux/SD3 or unknown architectures)."""
    raise NotImplementedError


#: ``selector(rows_in_this_call) -> [(row_index_in_call, image_index), ...]`` for the cond rows of one
#: UNet call, or None to ignore this call. Set by the host adapter (row layout is host-specific).
RowSelector = Callable[[int], Sequence[tuple[int, int]] | None]


class EntropyProbe:
    """Observing forward hooks on one attention layer's `to_q` and `to_k` (spec §5).

    Usage by a host adapter, per job::

        probe = EntropyProbe(heads=2, max_queries=256)
        probe.attach(attn1_module)            # reads attn1_module.heads; hooks to_q / to_k
        ...per evaluation:
        probe.begin_evaluation(latent_hw=(H, W), batch_size=B, row_selector=sel)
        ...UNet runs (one or more calls); hooks compute entropy for the selected cond rows at once,
           keeping no reference to full q/k...
        emap = probe.take_map()               # (B,1,H,W) in [0,1] at latent resolution, or None
        ...after the job (also on error/interrupt):
        probe.detach()

    `take_map` returns None — and sets `last_failure` to a short reason — when no capture happened,
    the token count matched no grid (Hypertile, ToMe), an image got no cond row, or a row was seen
    twice in one evaluation (`mark_ambiguous`, or the selector returned an image twice per call set).
    Hooks never change the module's output.
    """

    def __init__(self, *, heads: int = 2, max_queries: int = 1024):
        raise NotImplementedError

    def attach(self, attn: nn.Module) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    @property
    def attached(self) -> bool:
        raise NotImplementedError

    def begin_evaluation(self, latent_hw: tuple[int, int], batch_size: int,
                         row_selector: RowSelector | None = None) -> None:
        raise NotImplementedError

    def mark_ambiguous(self, reason: str = "rows seen twice in one evaluation") -> None:
        raise NotImplementedError

    def take_map(self) -> torch.Tensor | None:
        raise NotImplementedError
