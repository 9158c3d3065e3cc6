"""Scorers for the reference-free calibration search (quant.md §5.3).

A scorer turns one batch of generated samples into one float per sample, higher is better. It
declares whether it needs decoded images, whether it needs a 16-bit reference, and whether it is
*weak* (a heuristic, not a learned judgement). Specs combine scorers linearly, as Q-Sched's JAQ
objective does (alignment + k·quality, k = 2): ``"clip+2*hpsv2"``; ``"jaq"`` is that alias.

Built in, always available:

- ``heuristic`` — WEAK, weight-free: log Laplacian variance (sharpness) minus penalties for
  clipped pixels and over-saturation. It cannot tell detail from noise; use it to exercise the
  pipeline or as a tie-breaker, not as evidence of quality.
- ``paired`` — negative RMS distance of the final latent to the 16-bit model's for the same seed
  (the fidelity notion of seed 001); needs a reference run.

Adapters that activate only when the user already has the package *and* the weights locally
(they run with the Hugging Face hub offline, so nothing is ever downloaded): ``clip`` (CLIP
image-text similarity via ``transformers``; ``QSILK_CLIP_MODEL`` = a local folder or cached id)
and ``hpsv2`` (the ``hpsv2`` package, v2.1; ``QSILK_HPS_CHECKPOINT`` = the checkpoint file).
"""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


class ScorerUnavailable(RuntimeError):
    """A scorer's package or weights are not installed; the message says what is missing."""


@dataclass
class Batch:
    """What a scorer sees: final latents ``(B, C, h, w)``, decoded images ``(B, 3, H, W)`` in [0, 1]
    (or None), the prompts, and the 16-bit reference latents (or None)."""

    latents: torch.Tensor
    images: torch.Tensor | None
    prompts: list[str]
    reference: torch.Tensor | None = None


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[[Batch], torch.Tensor]
    needs_images: bool = True
    needs_reference: bool = False
    weak: bool = False

    def __call__(self, batch: Batch) -> torch.Tensor:
        if self.needs_images and batch.images is None:
            raise ValueError(f"QSilk: scorer {self.name!r} needs decoded images")
        if self.needs_reference and batch.reference is None:
            raise ValueError(f"QSilk: scorer {self.name!r} needs a 16-bit reference run")
        return self.fn(batch).double().cpu()


# -- built-ins ------------------------------------------------------------------------------
_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def heuristic_score(batch: Batch) -> torch.Tensor:
    """WEAK weight-free score: ``log(var(∇²Y) + 1e-6) − 10·clipped − 5·max(0, M − 0.45)``.

    Y = luma; clipped = share of pixels with a channel at 0 or 1 (±0.002); M = Hasler–Süsstrunk
    colourfulness (0..~1 on [0, 1] images). Rewards edges, punishes blown/crushed and garish output.
    """
    img = batch.images.float().clamp(0, 1)
    r, g, b = img[:, 0], img[:, 1], img[:, 2]
    y = (0.299 * r + 0.587 * g + 0.114 * b)[:, None]
    lap = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), _LAPLACE.to(img)[None, None])
    sharp = torch.log(lap.flatten(1).var(dim=1) + 1e-6)
    clipped = ((img <= 0.002) | (img >= 0.998)).any(dim=1).flatten(1).float().mean(dim=1)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    m = (rg.var(1) + yb.var(1)).sqrt() + 0.3 * (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()
    return sharp - 10 * clipped - 5 * (m - 0.45).clamp_min(0)


def paired_score(batch: Batch) -> torch.Tensor:
    """Fidelity to the 16-bit model: ``−RMS(latent − reference)`` per sample."""
    d = (batch.latents.double() - batch.reference.double().to(batch.latents.device)).flatten(1)
    return -(d.pow(2).mean(dim=1)).sqrt()


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def clip_scorer() -> Scorer:
    """CLIP image-text similarity ×100 (CLIPScore without the 2.5 factor). Needs ``transformers``
    and a CLIP model already on disk (``QSILK_CLIP_MODEL``, default ``openai/clip-vit-large-patch14``
    from the local cache)."""
    if importlib.util.find_spec("transformers") is None:
        raise ScorerUnavailable("QSilk: scorer 'clip' needs the 'transformers' package (not installed)")
    _offline()
    from transformers import CLIPModel, CLIPProcessor  # noqa: PLC0415 (optional dependency)

    ident = os.environ.get("QSILK_CLIP_MODEL", "openai/clip-vit-large-patch14")
    try:
        model = CLIPModel.from_pretrained(ident, local_files_only=True).eval()
        proc = CLIPProcessor.from_pretrained(ident, local_files_only=True)
    except Exception as exc:
        raise ScorerUnavailable(f"QSilk: scorer 'clip' found no local CLIP weights at {ident!r} "
                                f"(set QSILK_CLIP_MODEL to a local folder): {exc}") from None

    def fn(batch: Batch) -> torch.Tensor:
        pil = _to_pil(batch.images)
        inputs = proc(text=batch.prompts, images=pil, return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            out = model(**inputs)
        im = F.normalize(out.image_embeds, dim=-1)
        tx = F.normalize(out.text_embeds, dim=-1)
        return 100 * (im * tx).sum(-1)

    return Scorer("clip", fn)


def hpsv2_scorer() -> Scorer:
    """HPSv2.1 human-preference score via the ``hpsv2`` package and a local checkpoint
    (``QSILK_HPS_CHECKPOINT``); the hub stays offline, so missing base weights fail, not download."""
    if importlib.util.find_spec("hpsv2") is None:
        raise ScorerUnavailable("QSilk: scorer 'hpsv2' needs the 'hpsv2' package (not installed)")
    cp = os.environ.get("QSILK_HPS_CHECKPOINT", "")
    if not cp or not os.path.isfile(cp):
        raise ScorerUnavailable("QSilk: scorer 'hpsv2' needs QSILK_HPS_CHECKPOINT = a local HPSv2.1 "
                                "checkpoint file (QSilk never downloads weights)")
    _offline()
    import hpsv2  # noqa: PLC0415 (optional dependency)

    def fn(batch: Batch) -> torch.Tensor:
        vals = [float(hpsv2.score([img], prompt, cp=cp, hps_version="v2.1")[0])
                for img, prompt in zip(_to_pil(batch.images), batch.prompts)]
        return torch.tensor(vals, dtype=torch.float64)

    return Scorer("hpsv2", fn)


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arr = (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


BUILTIN: dict[str, Callable[[], Scorer]] = {
    "heuristic": lambda: Scorer("heuristic", heuristic_score, weak=True),
    "paired": lambda: Scorer("paired", paired_score, needs_images=False, needs_reference=True),
    "clip": clip_scorer,
    "hpsv2": hpsv2_scorer,
}
ALIASES = {"jaq": "clip+2*hpsv2"}


def register(name: str, factory: Callable[[], Scorer]) -> None:
    """Add a scorer (e.g. a local ImageReward or pyiqa wrapper) under `name`."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"QSilk: scorer name must be lower-case letters, digits, _ (got {name!r})")
    BUILTIN[name] = factory


def parse_spec(spec: str) -> list[tuple[float, str]]:
    """``"clip+2*hpsv2"`` → ``[(1.0, "clip"), (2.0, "hpsv2")]``.

    >>> parse_spec("jaq"), parse_spec("heuristic")
    ([(1.0, 'clip'), (2.0, 'hpsv2')], [(1.0, 'heuristic')])
    """
    spec = ALIASES.get(spec.strip().lower(), spec.strip().lower())
    terms = []
    for part in spec.split("+"):
        m = re.fullmatch(r"\s*(?:([0-9]*\.?[0-9]+)\s*\*\s*)?([a-z][a-z0-9_]*)\s*", part)
        if not m:
            raise ValueError(f"QSilk: scorer spec term {part!r} is not 'name' or 'k*name' (spec {spec!r})")
        terms.append((float(m.group(1) or 1.0), m.group(2)))
    return terms


def get_scorer(spec: str) -> Scorer:
    """A scorer from a spec; unknown names and unavailable adapters raise with a clear message."""
    terms = parse_spec(spec)
    parts = []
    for k, name in terms:
        if name not in BUILTIN:
            raise ValueError(f"QSilk: unknown scorer {name!r}; known: {', '.join(BUILTIN)} (and 'jaq')")
        parts.append((k, BUILTIN[name]()))
    if len(parts) == 1 and parts[0][0] == 1.0:
        return parts[0][1]

    def fn(batch: Batch) -> torch.Tensor:
        return sum(k * s(batch) for k, s in parts)

    return Scorer("+".join(f"{k:g}*{s.name}" for k, s in parts), fn,
                  needs_images=any(s.needs_images for _, s in parts),
                  needs_reference=any(s.needs_reference for _, s in parts),
                  weak=all(s.weak for _, s in parts))
