"""The attention-entropy probe on hosts with ComfyUI's model-patcher API: the Forge family and ComfyUI.

Both call every ``attn1_patch`` function of a patcher with ``extra_options`` holding ``block``
(``("input" | "middle" | "output", number)``), ``block_index`` (the transformer block in it),
``cond_or_uncond`` (the kind of each B-row chunk of this UNet call: 0 cond, 1 uncond), ``sigmas``
(the evaluation's σ tensor — the *same object* in every UNet call of one evaluation and in that
evaluation's post-CFG args) and ``original_shape`` (the latent's). Forge copied this from ComfyUI
(checked at Forge main dfdcbab6 / Neo 2.26 and ComfyUI a125cd84).

`AttentionCapture` turns that into one attention-entropy map per evaluation. It observes only:
forward hooks on one ``attn1``'s ``to_q`` / ``to_k`` (`EntropyProbe`) and an ``attn1_patch`` that
returns its inputs unchanged, so other extensions' attention patches and replaces keep working. A
post-CFG "fence" put first in the patcher's list calls `take_map` as soon as the evaluation's own
UNet calls are done, before other post-CFG functions (SAG, PAG) run extra UNet passes; more cond
chunks than the evaluation has conds before the fence (a reference-style pass inside the UNet call)
makes that evaluation's map ambiguous: no map. Host adapters own the capture and its closures.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch

from .. import probe as _probe
from ..probe import EntropyProbe, find_probe_layer
from ..settings import Settings

_TRANSFORMER_ATTN1 = re.compile(r"(?:^|\.)(input_blocks|middle_block|output_blocks)(?:\.(\d+))?\.\d+"
                                r"\.transformer_blocks\.(\d+)\.attn1$")
_BLOCK_KIND = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def transformer_block_of(name: str) -> tuple[tuple[str, int], int] | None:
    """The ``(extra_options["block"], extra_options["block_index"])`` that the patches see in the
    transformer block holding the named ``attn1``.

    >>> transformer_block_of("output_blocks.11.1.transformer_blocks.0.attn1")
    (('output', 11), 0)
    >>> transformer_block_of("middle_block.1.transformer_blocks.3.attn1")
    (('middle', 0), 3)
    """
    m = _TRANSFORMER_ATTN1.search(name)
    if m is None:
        return None
    kind, number, index = m.groups()
    return (_BLOCK_KIND[kind], int(number or 0)), int(index)


def runs_per_step(settings: Settings) -> bool:
    """Whether a component runs on every evaluation (so a post-CFG function is needed)."""
    s = settings
    return bool((s.qsilk_enabled and s.qsilk_placement == "per_step")
                or (s.aqclip_enabled and s.aqclip_placement == "per_step"))


def fitting_mask(mask: Any, latent: torch.Tensor) -> torch.Tensor | None:
    """`mask` (1 = generated, ``(B|1, 1, [T,] H, W)``) if it fits `latent`'s layout and size, else None."""
    if isinstance(mask, torch.Tensor) and mask.dim() == latent.dim() in (4, 5) and mask.shape[2:] == latent.shape[2:]:
        return mask
    return None


def wants_probe(settings: Settings) -> bool:
    """Whether these settings use the attention map (AQClip on, Attn confidence, every step)."""
    s = settings
    return bool(s.aqclip_enabled and s.aqclip_mode == "attn" and s.aqclip_placement == "per_step")


class AttentionCapture:
    """One job's (Forge) or one sampler run's (ComfyUI) attention maps, one per evaluation.

    The adapter calls `prepare` with the patcher's UNet before sampling, `begin_pass` / `end_pass`
    around each sampler invocation, `observe` from its observing ``attn1_patch`` (when `watches`
    says the call is at the probed block), `take_map` from its fence and post-CFG function, then
    `map_for` in the post-CFG function, and `detach` when done. `note` receives user-visible
    messages (no map for a reason)."""

    def __init__(self, settings: Settings, note: Callable[[str], None]):
        self.settings = settings
        self.note = note
        self.probe: EntropyProbe | None = None
        self.block: tuple[tuple[str, int], int] | None = None
        self.ambiguous_evaluations = 0
        self._module: torch.nn.Module | None = None
        self._active = False
        self._ev_sigmas: Any = None  # the evaluation being captured
        self._ev_open = False
        self._ev_cond_chunks = 0
        self._ev_chunks: tuple[int, ...] | None = None
        self._ev_map: torch.Tensor | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def prepare(self, diffusion_model: Any, model_label: str) -> bool:
        """Hook the probed layer of this UNet; False (and a note) where there is none."""
        found = find_probe_layer(diffusion_model) if isinstance(diffusion_model, torch.nn.Module) else None
        if found is None:
            self.note(f"no UNet self-attention on this model ({model_label}): AQClip uses Lite confidence "
                      "(the micro-clamp is unaffected)")
            return False
        name, module = found
        block = transformer_block_of(name)
        if block is None:
            self.note(f"attention probe: unknown UNet layout ({name}); AQClip uses Lite confidence")
            return False
        if self.probe is None:  # probe_queries 0 = auto (1024 on CUDA, 256 on CPU)
            self.probe = EntropyProbe(heads=self.settings.probe_heads, max_queries=self.settings.probe_queries)
        if self._module is not module or not self.probe.attached:
            self.probe.attach(module, factor=_probe.probe_layer_factor(diffusion_model, name))
            self._module = module
        self.block = block
        return True

    def detach(self) -> None:
        """Remove the module hooks (after every sampling call, also when it raised)."""
        if self.probe is not None:
            self.probe.detach()
        self._module = None
        self.end_pass()

    def begin_pass(self) -> None:
        self._active, self._ev_sigmas, self._ev_open, self._ev_map = True, None, False, None

    def end_pass(self) -> None:
        self._active, self._ev_sigmas, self._ev_map = False, None, None

    # -- per UNet call --------------------------------------------------------------------------
    def watches(self, extra_options: dict) -> bool:
        """Whether this ``attn1_patch`` call is at the probed transformer block."""
        block = self.block
        return (block is not None and extra_options.get("block") == block[0]
                and extra_options.get("block_index", 0) == block[1])

    def observe(self, extra_options: dict, window_open: Callable[[], bool]) -> None:
        """At the probed block's ``attn1_patch``, just before its ``to_q`` / ``to_k`` run.
        `window_open` says whether the evaluation starting now is inside the step window."""
        sigmas = extra_options.get("sigmas")
        chunks = extra_options.get("cond_or_uncond")
        shape = extra_options.get("original_shape")
        self._ev_chunks = None
        if self.probe is None or not self._active or sigmas is None or not chunks or not shape:
            return
        if sigmas is not self._ev_sigmas:  # the first UNet call of a new evaluation
            self._ev_sigmas, self._ev_cond_chunks, self._ev_map = sigmas, 0, None
            self._ev_open = window_open()
            if self._ev_open:
                self.probe.begin_evaluation((int(shape[-2]), int(shape[-1])), int(shape[0]) // len(chunks),
                                            self._select_rows)
        if not self._ev_open:  # outside the window, or the map was taken (extra passes after the fence)
            return
        self._ev_chunks = tuple(int(c) for c in chunks)
        self._ev_cond_chunks += self._ev_chunks.count(0)

    def _select_rows(self, rows: int) -> list[tuple[int, int]] | None:
        """Cond rows of this UNet call: chunk c holds rows c·B … c·B+B−1, and row r is image r."""
        chunks, self._ev_chunks = self._ev_chunks, None
        if not chunks or rows % len(chunks):
            return None
        b = rows // len(chunks)
        return [(c * b + r, r) for c, kind in enumerate(chunks) if kind == 0 for r in range(b)] or None

    @property
    def evaluation_sigmas(self) -> Any:
        """The σ tensor of the evaluation being captured (None between evaluations)."""
        return self._ev_sigmas

    # -- per evaluation -------------------------------------------------------------------------
    def take_map(self, args: dict) -> None:
        """The evaluation's own UNet calls are done (the fence, or else the post-CFG function):
        close the capture and keep its map for the post-CFG step of the same evaluation."""
        if not (self._ev_open and self._ev_sigmas is args.get("sigma") and self.probe is not None):
            return
        self._ev_open = False
        conds = args.get("cond")
        if isinstance(conds, (list, tuple)) and self._ev_cond_chunks > len(conds):
            self.ambiguous_evaluations += 1
            self.probe.mark_ambiguous("cond rows seen twice in one evaluation (an extra UNet pass by "
                                      "another extension)")
        self._ev_map = self.probe.take_map()
        if self._ev_map is None:
            self.note(f"attention map unavailable ({self.probe.last_failure or 'no capture'}); AQClip used Lite")

    def map_for(self, sigma: Any) -> torch.Tensor | None:
        """The map taken for the evaluation with this σ tensor (once), or None."""
        probe_map = self._ev_map if self._ev_sigmas is sigma else None
        self._ev_map = None
        return probe_map


# -- the closures a patcher holds (plain functions: ``clone()`` deep-copies model_options) ------------
def fence_function(capture_of: Callable[[], AttentionCapture | None],
                   on_error: Callable[[str, BaseException], None]) -> Callable[[dict], torch.Tensor]:
    """An identity post-CFG function, put first in the list, that closes the evaluation's capture."""
    def qsilk_probe_fence(args):
        capture = capture_of()
        if capture is not None:
            try:
                capture.take_map(args)
            except Exception as exc:
                on_error("reading the attention map", exc)
        return args["denoised"]

    return qsilk_probe_fence


def attn1_observer(capture_of: Callable[[], AttentionCapture | None], window_open: Callable[[], bool],
                   on_error: Callable[[str, BaseException], None]) -> Callable:
    """An ``attn1_patch`` that returns its inputs unchanged and feeds the capture at the probed block."""
    def qsilk_attn1_observer(n, context, value, extra_options):
        capture = capture_of()
        if capture is not None and capture.watches(extra_options):
            try:
                capture.observe(extra_options, window_open)
            except Exception as exc:
                on_error("observing attention", exc)
        return n, context, value

    return qsilk_attn1_observer
