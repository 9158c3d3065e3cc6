"""The per-job stabilizer: step window, per-pass EMA state, ε↔x0, and the run report (spec §4).

A host adapter creates one `Stabilizer` per job, calls `begin_pass` before each sampler
invocation, `post_cfg` (or `post_cfg_eps`) on every denoiser evaluation, and `pre_decode` on
each pass's output latent before it is decoded or upscaled. Nothing here reads globals; the
state dies with the object.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .aqclip import AQClipState, aqclip_unmasked
from .clamp import clamp_unmasked
from .confidence import entropy_to_confidence
from .settings import Settings

log = logging.getLogger("qsilk")

#: ᾱ below this is a zero-terminal-SNR row: x0 from ε is undefined there, so the row passes through.
ALPHA_BAR_MIN = 1e-6

#: ``f(denoised, x_noisy, sigma, c_skip, progress) -> denoised``: a pre-conditioner (Q-Sched,
#: `qsilk.quant`) run on every evaluation before the clamp, whatever the step window; `progress` is
#: the evaluation's position in the pass (0..1) or None. It may carry per-σ micro-clamp targets as
#: ``.thresholds``: ``g(x, sigma, *, shape, alpha, per_channel) -> x`` replacing `micro_clamp`.
Preconditioner = Callable[[torch.Tensor, torch.Tensor | None, Any, Any, Any], torch.Tensor]


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 from a variance-preserving latent and its ε prediction.

    Math: ``x0 = (x_t − √(1−ᾱ)·ε) / √ᾱ``; `alpha_bar` is per row (shape ``(B,)``) or a scalar.
    """
    a = _rows(alpha_bar, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε from a variance-preserving latent and an x0: ``ε = (x_t − √ᾱ·x0) / √(1−ᾱ)``."""
    a = _rows(alpha_bar, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def eps_after_x0_change(eps: torch.Tensor, alpha_bar: torch.Tensor, x0: torch.Tensor,
                        x0_new: torch.Tensor) -> torch.Tensor:
    """The ε whose x0 is `x0_new`, computed as a correction so unchanged rows stay bit-exact.

    Math: ``ε' = ε − √(ᾱ/(1−ᾱ))·(x0' − x0)`` (spec §4.1). Rows with ᾱ < 1e-6 return ε unchanged.
    """
    a = _rows(alpha_bar, eps).to(torch.float32)
    scale = torch.where(a < ALPHA_BAR_MIN, torch.zeros_like(a), (a / (1 - a).clamp_min(1e-12)).sqrt())
    delta = (x0_new.to(torch.float32) - x0.to(torch.float32)) * scale
    return torch.where(delta == 0, eps, (eps.to(torch.float32) - delta).to(eps.dtype))


def _rows(v: Any, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, device=like.device, dtype=torch.float32)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """A video latent ``(B, C, T, H, W)`` as a batch of ``B·T`` images ``(B·T, C, H, W)``.

    Row ``b·T + t`` is frame t of sample b. QSilk treats each latent frame as an image: a causal
    video VAE (Wan, and the Wan-VAE image models Qwen-Image and Anima) encodes the first frame alone
    and every later latent frame from four, so statistics pooled over a clip would clamp frame 0
    with the other frames' corridor.

    >>> frames_to_batch(torch.arange(12.).reshape(1, 2, 3, 1, 2))[:, :, 0, 0].tolist()
    [[0.0, 6.0], [2.0, 8.0], [4.0, 10.0]]
    """
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def batch_to_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The inverse of `frames_to_batch`: ``(B·T, C, H, W)`` back to ``(B, C, T, H, W)``."""
    bt, c, h, w = x.shape
    return x.reshape(bt // frames, frames, c, h, w).transpose(1, 2)


def _frame_rows(v: Any, frames: int, batch: int) -> Any:
    """A per-sample value (sigma, skip factor: ``(B,)`` or ``(B, 1, …)``) repeated for each frame
    row of `frames_to_batch`; a 5-D tensor (a mask or a latent) is folded like the latent; scalars,
    Python numbers and None pass as they are."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return v
    if v.dim() == 5:
        return frames_to_batch(v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v)
    if v.shape[0] == batch:
        return v.repeat_interleave(frames, dim=0)
    return v


def progress(step: int, total_steps: int) -> float:
    """Progress ``i/(n−1)`` of evaluation i of n in a pass; 1.0 for a one-evaluation pass."""
    return 1.0 if total_steps <= 1 else min(1.0, max(0.0, step / (total_steps - 1)))


def progress_from_sigma(sigma: float, sigma_max: float, sigma_min: float) -> float:
    """Progress by noise level: ``(log σ_max − log σ)/(log σ_max − log σ_min)``, clipped to [0, 1]."""
    if not (sigma_max > sigma_min > 0) or not sigma > 0:
        return 1.0 if sigma <= sigma_min else 0.0
    p = (math.log(sigma_max) - math.log(sigma)) / (math.log(sigma_max) - math.log(sigma_min))
    return min(1.0, max(0.0, p))


@dataclass
class _PassState:
    active: bool = True
    evaluations_per_step: int = 1
    sigma_max: float | None = None
    sigma_min: float | None = None
    aq_state: AQClipState = field(default_factory=AQClipState)
    ran_last_eval: dict = field(default_factory=lambda: {"qsilk": False, "aqclip": False})


class Stabilizer:
    """One per job. Applies QSilk and AQClip where the settings say, and counts what it did."""

    def __init__(self, settings: Settings, *, preconditioner: Preconditioner | None = None):
        self.settings = settings
        self.preconditioner = preconditioner
        self.corridor = getattr(preconditioner, "thresholds", None)
        self._pass = _PassState(active=False)
        self.passes = 0
        self.evaluations = 0
        self.lite_fallbacks = 0
        self.attn_maps = 0
        self.errors = 0
        self.pre_decodes = 0
        self.seconds = 0.0
        self.notes: list[str] = []
        # device counters, read once in report(): per-evaluation parts are kept (no op to add them)
        # and summed every COUNTER_FOLD evaluations
        self._finite_parts: list[torch.Tensor] = []  # (B,) bool per application
        self._finite_total: torch.Tensor | None = None
        self._rows = 0  # samples seen (host int)
        self._changed_parts: list[torch.Tensor] = []  # (C,) values changed per channel
        self._clipped: torch.Tensor | None = None  # per-channel count of values changed
        self._seen = 0  # values seen per channel (host int)
        self._terminal_rows: torch.Tensor | None = None
        self._pre_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_maps: dict[str, torch.Tensor] = {}

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """Whether this job does anything at all (off, or the Off preset, installs nothing)."""
        s = self.settings
        return bool(s.enabled and (s.qsilk_enabled or s.aqclip_enabled or self.preconditioner is not None))

    def begin_pass(self, *, evaluations_per_step: int = 1, is_hires: bool = False,
                   sigma_max: float | None = None, sigma_min: float | None = None) -> None:
        """Start a sampler invocation: fresh EMA state, nothing carried over (spec §3.5)."""
        self.passes += 1
        self._pass = _PassState(
            active=self.enabled and (self.settings.hires or not is_hires),
            evaluations_per_step=max(1, int(evaluations_per_step)),
            sigma_max=sigma_max, sigma_min=sigma_min,
        )
        self._pre_cache = None

    def note(self, message: str) -> None:
        """Record a user-visible message once (shown in the report and the console)."""
        if message not in self.notes:
            self.notes.append(message)
            log.warning("QSilk: %s", message)

    # -- per evaluation -------------------------------------------------------------------
    def position(self, step: int | None, total_steps: int | None, sigma: float | None = None) -> float | None:
        """Progress of this evaluation through the pass (0..1), or None when unknown."""
        ps = self._pass
        if step is not None and total_steps:
            return progress(step, total_steps)
        if sigma is not None and ps.sigma_max is not None and ps.sigma_min is not None:
            return progress_from_sigma(float(sigma), ps.sigma_max, ps.sigma_min)
        return None

    def in_window(self, step: int | None, total_steps: int | None, sigma: float | None = None) -> bool:
        s = self.settings
        p = self.position(step, total_steps, sigma)
        if p is None:
            p = 0.5 * (s.step_start + s.step_end)  # unknown position: treat as inside the window
        return s.step_start <= p <= s.step_end

    def post_cfg(self, x0: torch.Tensor, step: int | None, total_steps: int | None,
                 probe_map: torch.Tensor | None = None, *, sigma: Any = None,
                 nmask: torch.Tensor | None = None, x_noisy: torch.Tensor | None = None,
                 c_skip: Any = None, noise_sigma: Any = None) -> torch.Tensor:
        """Stabilise one evaluation's post-CFG x0 prediction (spec §4.1).

        Args:
            x0: ``(B, C, H, W)`` denoised prediction, any float dtype; a video latent
                ``(B, C, T, H, W)`` is stabilised frame by frame (`frames_to_batch`).
            step, total_steps: evaluation index i and count n in this pass (None if unknown).
            probe_map: ``(B, 1, h, w)`` normalised attention entropy of this evaluation, or None.
            sigma: this evaluation's noise level as a Python float (step-window fallback) or the
                host's per-row sigma (passed on to the pre-conditioner).
            nmask: inpainting latent mask, 1 = generated; the change is applied only there.
            x_noisy, c_skip: the evaluation's noisy input and skip factor, for the pre-conditioner.
            noise_sigma: σ in k-diffusion's frame when `sigma` is in other units (ε samplers pass
                the timestep); used by the pre-conditioner and the per-σ clamp targets.
        Returns: a tensor like `x0`; `x0` itself when nothing applies. Never raises.
        """
        ps = self._pass
        if not ps.active:
            return x0
        if x0.dim() == 5:
            return self._per_frame(x0, lambda x, fold: self.post_cfg(
                x, step, total_steps, fold(probe_map), sigma=fold(sigma), nmask=fold(nmask),
                x_noisy=fold(x_noisy), c_skip=fold(c_skip), noise_sigma=fold(noise_sigma)))
        t0 = time.perf_counter()
        self.evaluations += 1
        try:
            out = x0
            float_sigma = sigma if isinstance(sigma, (int, float)) else None
            model_sigma = sigma if noise_sigma is None else noise_sigma
            if self.preconditioner is not None:
                where = self.position(step, total_steps, float_sigma)
                out = self.preconditioner(out, x_noisy, model_sigma, c_skip, where)
            window = self.in_window(step, total_steps, float_sigma)
            out = self._apply(out, probe_map, nmask, per_step=True, window=window, sigma=model_sigma)
            return out
        except Exception as exc:  # the sampler must never see our exception (spec §0)
            self.errors += 1
            if self.errors == 1:
                log.exception("QSilk: stabilizer failed; this evaluation passes through unchanged")
                self.note(f"stabilizer error, passed through: {exc}")
            return x0
        finally:
            self.seconds += time.perf_counter() - t0

    def post_cfg_eps(self, x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor,
                     step: int | None, total_steps: int | None,
                     probe_map: torch.Tensor | None = None, *, sigma: Any = None,
                     nmask: torch.Tensor | None = None) -> torch.Tensor:
        """`post_cfg` for ε samplers: ε→x0 with the sampler's ᾱ, stabilise, back to ε (spec §4.1)."""
        if not self._pass.active:
            return eps
        a = _rows(alpha_bar, x_t)
        if self._terminal_rows is None:
            self._terminal_rows = torch.zeros((), dtype=torch.int64, device=eps.device)
        self._terminal_rows += (a.flatten() < ALPHA_BAR_MIN).sum()
        safe_a = a.clamp_min(ALPHA_BAR_MIN)
        x0 = eps_to_x0(x_t.float(), eps.float(), safe_a)
        x_ve = noise_sigma = None
        if self.preconditioner is not None or self.corridor is not None:
            # k-diffusion's frame: x = x_t/√ᾱ, σ = √((1−ᾱ)/ᾱ), so s(σ) keeps its usual meaning
            x_ve, noise_sigma = x_t.float() / safe_a.sqrt(), ((1 - safe_a) / safe_a).sqrt().flatten()
        x0_new = self.post_cfg(x0, step, total_steps, probe_map, sigma=sigma, nmask=nmask, x_noisy=x_ve,
                               noise_sigma=noise_sigma)
        if x0_new is x0:
            return eps
        return eps_after_x0_change(eps, a, x0, x0_new)

    def pre_decode(self, latent: torch.Tensor, nmask: torch.Tensor | None = None) -> torch.Tensor:
        """Stabilise a pass's output latent before it is decoded or upscaled (spec §4.2).

        ``auto`` runs a component only if it did not run post-CFG on the pass's last evaluation;
        ``always`` runs every enabled component; ``off`` nothing. No EMA (fresh Lite confidence).
        The same latent object is stabilised at most once however many decodes it feeds.
        """
        if not self._pass.active or self.settings.pre_decode == "off":
            return latent
        if latent.dim() == 5:
            if self._pre_cache is not None and any(latent is t for t in self._pre_cache):
                return self._pre_cache[1]
            out = self._per_frame(latent, lambda x, fold: self.pre_decode(x, fold(nmask)))
            self._pre_cache = (latent, out)
            return out
        if self._pre_cache is not None and any(latent is t for t in self._pre_cache):  # incl. our own output
            return self._pre_cache[1]
        t0 = time.perf_counter()
        try:
            out = self._apply(latent, None, nmask, per_step=False, window=True)
        except Exception as exc:
            self.errors += 1
            log.exception("QSilk: pre-decode stabilisation failed; latent passes through")
            self.note(f"pre-decode error, passed through: {exc}")
            out = latent
        finally:
            self.seconds += time.perf_counter() - t0
        if out is not latent:
            self.pre_decodes += 1
        self._pre_cache = (latent, out)
        return out

    def _per_frame(self, x: torch.Tensor, run: Callable[[torch.Tensor, Callable[[Any], Any]], torch.Tensor]
                   ) -> torch.Tensor:
        """Run `run` on a video latent's frames as a batch (`frames_to_batch`); `run` gets the
        folded latent and the function that folds its per-sample arguments the same way. Returns
        `x` itself when nothing changed."""
        frames = x.shape[2]
        folded = frames_to_batch(x)
        out = run(folded, lambda v: _frame_rows(v, frames, x.shape[0]))
        return x if out is folded else batch_to_frames(out, frames)

    # -- the two components ---------------------------------------------------------------
    def _runs(self, component: str, per_step: bool, window: bool) -> bool:
        s = self.settings
        if not getattr(s, f"{component}_enabled"):
            return False
        placement = getattr(s, f"{component}_placement")
        if per_step:
            return placement == "per_step" and window
        if s.pre_decode == "always":
            return True
        return not (placement == "per_step" and self._pass.ran_last_eval[component])

    def _apply(self, x: torch.Tensor, probe_map: torch.Tensor | None, nmask: torch.Tensor | None,
               *, per_step: bool, window: bool, sigma: Any = None) -> torch.Tensor:
        s, ps = self.settings, self._pass
        run_qs = self._runs("qsilk", per_step, window)
        run_aq = self._runs("aqclip", per_step, window)
        if per_step:
            ps.ran_last_eval = {"qsilk": run_qs, "aqclip": run_aq}
        if not (run_qs or run_aq):
            return x
        # float32 throughout (one conversion for half inputs); the last component writes x's dtype
        x32 = x.float()
        out, finite = x32, None
        aq_last = run_aq and nmask is None
        if run_qs:
            if self.corridor is not None and per_step and sigma is not None:
                clamped = self.corridor(out, sigma, shape=s.qsilk_shape, alpha=s.qsilk_alpha,
                                        per_channel=s.qsilk_per_channel)
            else:  # non-finite samples are restored once, below
                qs_last = not run_aq and nmask is None and s.qsilk_strength >= 1.0
                clamped, finite = clamp_unmasked(out, s.q_lo, s.q_hi, s.qsilk_shape, s.qsilk_alpha,
                                                 s.qsilk_per_channel, out_dtype=x.dtype if qs_last else None)
            out = _blend(out, clamped, s.qsilk_strength, nmask)
        if run_aq:
            use_attn = per_step and s.aqclip_mode == "attn" and probe_map is not None
            if use_attn:
                self.attn_maps += 1
            elif per_step and s.aqclip_mode == "attn" and not ps.aq_state.has_attn:
                self.lite_fallbacks += 1
            beta = s.ema_beta ** (1.0 / ps.evaluations_per_step)
            result, finite, maps = aqclip_unmasked(
                out, entropy_to_confidence(probe_map, s.aqclip_variant) if use_attn else None,
                tile=s.tile, stride=s.stride,
                shape=s.aqclip_shape, alpha=s.aqclip_alpha, variant=s.aqclip_variant,
                p_wide=s.p_wide, p_narrow=s.p_narrow, strength=s.aqclip_strength if nmask is None else 1.0,
                state=ps.aq_state if per_step else None, sigma_floor=s.sigma_floor,
                ema_beta=beta, finite=finite, return_maps=s.show_maps, out_dtype=x.dtype if aq_last else None,
            )
            if s.show_maps:
                self.last_maps = maps
            out = result if nmask is None else _blend(out, result, s.aqclip_strength, nmask)
        if out is x32:
            out = x  # nothing changed the latent (strength 0)
        elif out.dtype != x.dtype:
            out = out.to(x.dtype)
        if finite is None:  # only the Q-Sched corridor ran: it passes non-finite samples through itself
            finite = _finite_rows(x)
        elif out is not x:
            out = torch.where(finite.view(-1, *([1] * (x.dim() - 1))), out, x)
        self._count(x, out, finite)
        return out

    # -- counters (device tensors; no host sync until report()) ---------------------------
    def _count(self, before: torch.Tensor, after: torch.Tensor, finite: torch.Tensor) -> None:
        """Keep this application's counts on the device: which samples were finite, and per channel
        how many values changed (bit patterns compared, so a NaN passed through is unchanged).
        Two ops per application; the parts are summed every `COUNTER_FOLD` applications."""
        self._finite_parts.append(finite)
        self._rows += finite.shape[0]
        if after is not before:
            bits = _BITS[before.element_size()]
            changed = torch.ne(after.view(bits), before.view(bits)).sum(dim=(0, 2, 3))
            if self._changed_parts and self._changed_parts[0].shape != changed.shape or (
                    self._clipped is not None and self._clipped.shape != changed.shape):
                self._changed_parts, self._clipped, self._seen = [], None, 0  # channel count changed
            self._changed_parts.append(changed)
            self._seen += before.shape[0] * before.shape[2] * before.shape[3]
        if len(self._finite_parts) >= COUNTER_FOLD or len(self._changed_parts) >= COUNTER_FOLD:
            self._fold_counters()

    def _fold_counters(self) -> None:
        if self._finite_parts:
            total = torch.cat(self._finite_parts).sum()
            self._finite_total = total if self._finite_total is None else self._finite_total + total
            self._finite_parts = []
        if self._changed_parts:
            total = torch.stack(self._changed_parts).sum(0)
            self._clipped = total if self._clipped is None else self._clipped + total
            self._changed_parts = []

    def nonfinite_samples(self) -> int:
        """How many samples passed through because they held NaN/Inf; notes it when any did.

        Reads a device counter (one host sync): call it after a sampler run, never per step."""
        self._fold_counters()
        nonfinite = self._rows - int(self._finite_total.item()) if self._finite_total is not None else 0
        if nonfinite:
            self.note("non-finite values (NaN/Inf) in the denoised latent; those samples passed through unchanged")
        return nonfinite

    def report(self) -> dict[str, Any]:
        """What the job did. Reads the device counters once (call at the end of the job)."""
        nonfinite = self.nonfinite_samples()
        share = []
        if self._clipped is not None:
            share = (self._clipped.double() / max(1, self._seen)).tolist()
        return {
            "passes": self.passes,
            "evaluations": self.evaluations,
            "pre_decodes": self.pre_decodes,
            "nan_passthrough": nonfinite,
            "lite_fallbacks": self.lite_fallbacks,
            "attn_maps": self.attn_maps,
            "terminal_snr_rows": int(self._terminal_rows.item()) if self._terminal_rows is not None else 0,
            "changed_share_per_channel": share,
            "errors": self.errors,
            "seconds": self.seconds,
            "notes": list(self.notes),
        }


#: Applications between two sums of the kept counter parts (bounds the list; ~0.01 op per evaluation).
COUNTER_FOLD = 256
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``(B,)``: whether sample b holds only finite values (a float64 sum of float values is
    non-finite iff one of them is NaN/±Inf)."""
    total = x.reshape(x.shape[0], -1).sum(1, dtype=torch.float64)
    return torch.sub(total, total) == 0


def _blend(x: torch.Tensor, y: torch.Tensor, strength: float, nmask: torch.Tensor | None) -> torch.Tensor:
    """``x + s·nmask·(y − x)``; exact `y` at s = 1 without a mask, exact `x` where the weight is 0."""
    if y is x:
        return x
    if nmask is None:
        if strength >= 1.0:
            return y
        if strength <= 0.0:
            return x
        return torch.lerp(x, y, strength)
    w = (nmask.to(torch.float32) * strength).to(x.dtype)
    return torch.where(w == 0, x, torch.lerp(x, y, w))
