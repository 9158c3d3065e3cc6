"""Adapters for learned metrics. Each imports its package only when called, and needs weights the
user already has on disk (nothing is downloaded by QSilk; offline, a missing weight is an error).

- ``lpips``: perceptual distance of each image to the same seed's image in the first column
  (package ``lpips``; its AlexNet backbone comes from torchvision's weight cache).
- ``clip_score``: ``100·cos(image, prompt)`` with a local CLIP model directory
  (``--clip-model PATH``; package ``transformers``).
"""
from __future__ import annotations

from typing import Any

import torch

from ..cli import CommandError
from .metrics import Metric


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise CommandError(f"metric needs the '{module}' package: pip install {extra}") from exc


def lpips_metric(options: dict[str, Any]) -> Metric:
    """LPIPS (Zhang et al. 2018) against the reference column; ``context["reference"]`` holds its images."""
    lpips = _require("lpips", "lpips")
    try:
        net = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as exc:  # a missing backbone weight surfaces as a download error offline
        raise CommandError(f"LPIPS could not load its AlexNet weights ({exc}); put them in torch's cache first") from exc

    def fn(images: torch.Tensor, latents: torch.Tensor, context: dict) -> torch.Tensor:
        ref = context.get("reference", images)
        with torch.no_grad():
            d = net(images.float().cpu() * 2 - 1, ref.float().cpu() * 2 - 1)
        return d.flatten().to(torch.float64)

    return Metric("lpips_vs_first", fn, "LPIPS distance to the first column's image (same seed)", "")


def clip_score_metric(options: dict[str, Any]) -> Metric:
    """CLIP score with a local model directory given as ``--clip-model``; ``context["prompts"]`` per sample."""
    path = options.get("clip_model")
    if not path:
        raise CommandError("clip_score needs --clip-model PATH (a local CLIP model directory)")
    transformers = _require("transformers", "transformers")
    model = transformers.CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = transformers.CLIPProcessor.from_pretrained(path, local_files_only=True)

    def fn(images: torch.Tensor, latents: torch.Tensor, context: dict) -> torch.Tensor:
        prompts = list(context.get("prompts", [""] * images.shape[0]))
        pixels = (images.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        batch = processor(text=prompts, images=list(pixels), return_tensors="pt", padding=True)
        with torch.no_grad():
            img = model.get_image_features(pixel_values=batch["pixel_values"])
            txt = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return (100 * cos.clamp_min(0)).to(torch.float64)

    return Metric("clip_score", fn, "100·cos(CLIP image, CLIP prompt)", "higher")
