"""x0 from what a diffusers scheduler's ``step`` receives, per scheduler class and prediction type.

Every supported scheduler forms its x0 estimate from the (guided) model output ``m`` and the sample
``s`` it is given as ``x0 = a·s + b·m`` with scalars ``a, b`` of the current step. Changing x0 to
x0' is then exactly the model output ``m' = m + (x0' − x0)/b`` (`write_back`). Facts read from
diffusers 0.42.1 ``schedulers/scheduling_*.py`` (each scheduler's ``step`` or
``convert_model_output``); no diffusers module is imported here — schedulers are recognised by
class name (a subclass counts only if it keeps the class's own ``step``).

Families (σ below is ``scheduler.sigmas[step_index]``, a CPU tensor in every one of them):

- ``"k"`` Euler, Euler a, Heun, LMS (k-diffusion style, σ in VE units):
  ε ``s − σ·m``; v ``s/(σ²+1) − σ/√(σ²+1)·m``; sample ``m``. Heun's interleaved sigmas make
  ``sigmas[step_index]`` right on both of its calls.
- ``"dpm"`` DPM++ multistep / singlestep, UniPC, DEIS: ``αₜ, σₜ = _sigma_to_alpha_sigma_t(σ)``;
  ε ``(s − σₜ·m)/αₜ``; v ``αₜ·s − σₜ·m``; sample ``m``; flow ``s − σ·m``.
- ``"alpha"`` DDIM, DDPM, LCM, TCD: ``ᾱ = alphas_cumprod[t]``; ε ``(s − √(1−ᾱ)·m)/√ᾱ``;
  v ``√ᾱ·s − √(1−ᾱ)·m``; sample ``m`` (ᾱ is looked up on the model output's device: no sync).
- ``"flow"`` FlowMatch Euler / Heun: ``s − σ·m``.

Not covered (pass through): KDPM2 (its second call uses ``sigmas_interpol``), PNDM / IPNDM (the
warm-up combines outputs), EDM schedulers (``precondition_outputs``), Euler / Heun with
``s_churn > 0``, FlowMatch with per-token timesteps, DDPM with learned variance, unknown classes.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ..stabilizer import ALPHA_BAR_MIN

FAMILIES = {
    "EulerDiscreteScheduler": "k", "EulerAncestralDiscreteScheduler": "k", "HeunDiscreteScheduler": "k",
    "LMSDiscreteScheduler": "k",
    "DPMSolverMultistepScheduler": "dpm", "DPMSolverSinglestepScheduler": "dpm",
    "UniPCMultistepScheduler": "dpm", "DEISMultistepScheduler": "dpm",
    "DDIMScheduler": "alpha", "DDPMScheduler": "alpha", "LCMScheduler": "alpha", "TCDScheduler": "alpha",
    "FlowMatchEulerDiscreteScheduler": "flow", "FlowMatchHeunDiscreteScheduler": "flow",
}
#: Why a known scheduler is left alone (shown once, naming it).
UNSUPPORTED = {
    "KDPM2DiscreteScheduler": "its second evaluation uses interpolated sigmas",
    "KDPM2AncestralDiscreteScheduler": "its second evaluation uses interpolated sigmas",
    "PNDMScheduler": "its warm-up and PLMS steps combine several model outputs",
    "IPNDMScheduler": "its steps combine several model outputs",
    "EDMEulerScheduler": "EDM pre-conditioning (precondition_outputs) is not covered",
    "EDMDPMSolverMultistepScheduler": "EDM pre-conditioning (precondition_outputs) is not covered",
    "DPMSolverSDEScheduler": "its second evaluation uses a midpoint sigma (not covered yet)",
    "CMStochasticIterativeScheduler": "consistency-model pre-conditioning is not covered",
}
#: Schedulers that evaluate the model twice per step (Heun-type).
SECOND_ORDER = frozenset({"HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"})


class Coefficients(NamedTuple):
    """``x0 = a·s + b·m``; Python floats, or 0-d float32 tensors on the model output's device.
    `keep` (a 0-d bool tensor, or None for always): whether a change of x0 may be written back —
    False on a zero-terminal-SNR step (ᾱ < `ALPHA_BAR_MIN`), where ε determines no x0."""
    a: Any
    b: Any
    keep: Any = None


def scheduler_family(scheduler: Any) -> tuple[str | None, str]:
    """``(family, class name)``: the family of the first class in the scheduler's MRO that is in the
    table and whose ``step`` the scheduler still uses; ``(None, reason)`` otherwise."""
    cls = type(scheduler)
    name = cls.__name__
    for base in cls.__mro__:
        family = FAMILIES.get(base.__name__)
        if family is not None:
            if getattr(cls, "step", None) is not getattr(base, "step", None):
                return None, f"{name} overrides {base.__name__}.step"
            return family, base.__name__
        if base.__name__ in UNSUPPORTED:
            return None, UNSUPPORTED[base.__name__]
    return None, "not a scheduler QSilk knows (no x0 formula for it)"


def prediction_type(scheduler: Any) -> str:
    config = getattr(scheduler, "config", None)
    value = getattr(config, "prediction_type", None)
    if value is None and isinstance(config, dict):
        value = config.get("prediction_type")
    return str(value or "epsilon")


def _cpu_float(v: Any) -> float | None:
    """A CPU scalar as a Python float (no device sync); None for a device tensor."""
    if isinstance(v, torch.Tensor):
        return float(v) if v.device.type == "cpu" and v.numel() == 1 else None
    return float(v)


def _current_sigma(scheduler: Any, family: str, name: str) -> float | None:
    index = getattr(scheduler, "step_index", None)
    sigmas = getattr(scheduler, "sigmas", None)
    if index is None or sigmas is None or not 0 <= index < len(sigmas):
        return None
    return _cpu_float(sigmas[index])


def coefficients(scheduler: Any, family: str, name: str, timestep: Any,
                 like: torch.Tensor, cache: dict | None = None) -> Coefficients | str:
    """The step's ``(a, b)`` or, when there is none, a short reason (a string).

    Must run before the scheduler's own ``step`` (its step index then points at this evaluation);
    call ``ensure_step_index`` first. `cache` (one dict per pass) keeps ``alphas_cumprod`` on the
    model output's device, so the ᾱ lookup is one device gather per step and no host read."""
    kind = prediction_type(scheduler)
    if family == "alpha":
        acp = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(acp, torch.Tensor):
            return "no alphas_cumprod"
        if not isinstance(timestep, torch.Tensor):
            abar = torch.as_tensor(float(acp[int(timestep)]), dtype=torch.float32, device=like.device)
        else:
            cache = {} if cache is None else cache
            key = (id(acp), like.device)
            if key not in cache:
                cache[key] = acp.to(device=like.device, dtype=torch.float32)
            # index_select, not ``[t]``: indexing with a 0-d tensor reads it back (`.item()`, a host
            # sync on CUDA every step)
            abar = cache[key].index_select(0, timestep.to(like.device).long().reshape(1)).reshape(())
        if kind == "epsilon":
            # ᾱ → 0 (a zero-terminal-SNR schedule's first step): no x0; as `Stabilizer.post_cfg_eps`,
            # x0 is formed with ᾱ clamped and the step's ε is kept as it is
            safe = abar.clamp_min(ALPHA_BAR_MIN)
            ra, rb = safe.sqrt(), (1 - safe).sqrt()
            return Coefficients(1 / ra, -rb / ra, abar >= ALPHA_BAR_MIN)
        ra, rb = abar.sqrt(), (1 - abar).sqrt()
        if kind == "v_prediction":
            return Coefficients(ra, -rb)
        if kind == "sample":
            return Coefficients(0.0, 1.0)
        return f"prediction type {kind!r}"
    sigma = _current_sigma(scheduler, family, name)
    if sigma is None:
        return "no current sigma (step index unknown or sigmas on the device)"
    if family == "flow" or (family == "dpm" and kind == "flow_prediction"):
        return Coefficients(1.0, -sigma)
    if family == "k":
        if kind == "epsilon":
            return Coefficients(1.0, -sigma)
        if kind == "v_prediction":
            return Coefficients(1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0))
        if kind in ("sample", "original_sample") and name != "EulerAncestralDiscreteScheduler":
            return Coefficients(0.0, 1.0)
        return f"prediction type {kind!r}"
    # dpm: α_t, σ_t from the scheduler's own conversion
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(torch.tensor(sigma, dtype=torch.float64))
    alpha_t, sigma_t = float(alpha_t), float(sigma_t)
    if kind == "epsilon":
        return Coefficients(1.0 / alpha_t, -sigma_t / alpha_t)
    if kind == "v_prediction":
        return Coefficients(alpha_t, -sigma_t)
    if kind == "sample":
        return Coefficients(0.0, 1.0)
    return f"prediction type {kind!r}"


def step_blocker(family: str, name: str, model_output: torch.Tensor, sample: torch.Tensor,
                 kwargs: dict) -> str | None:
    """Why this particular ``step`` call cannot be handled (churn, per-token timesteps, learned
    variance), or None."""
    churn = kwargs.get("s_churn", 0.0)
    if isinstance(churn, (int, float)) and churn > 0:
        return f"s_churn={churn} (stochastic churn re-noises before x0 is formed)"
    if kwargs.get("per_token_timesteps") is not None:
        return "per-token timesteps"
    if family == "alpha" and model_output.dim() == sample.dim() and model_output.shape[1] == 2 * sample.shape[1]:
        return "learned variance (the model output holds two predictions)"
    if model_output.shape != sample.shape:
        return f"model output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ in shape"
    return None


def ensure_step_index(scheduler: Any, timestep: Any) -> None:
    """Set the scheduler's step index now if its ``step`` would set it first thing (the same call
    the scheduler makes, ``_init_step_index(timestep)``; a no-op once it is set)."""
    if getattr(scheduler, "step_index", 0) is None and callable(getattr(scheduler, "_init_step_index", None)):
        scheduler._init_step_index(timestep)


def x0_of(c: Coefficients, sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """``a·s + b·m`` in float32."""
    return c.a * sample.to(torch.float32) + c.b * model_output.to(torch.float32)


def write_back(model_output: torch.Tensor, c: Coefficients, delta: torch.Tensor) -> torch.Tensor:
    """The model output whose x0 moved by `delta` (= x0' − x0): ``m' = m + delta/b``.

    Computed in float32 and cast to m's dtype; where delta is 0 the element is m's own, bit for bit
    (``-0.0`` included). A step with a non-finite or zero b, or `keep` False, gives m's values back.
    No host read: b may be a device tensor."""
    b = c.b
    if c.keep is not None:
        delta = torch.where(c.keep, delta, torch.zeros_like(delta))
    if isinstance(b, torch.Tensor):
        ok = torch.isfinite(b) & (b != 0)
        delta = torch.where(ok, delta, torch.zeros_like(delta))
        b = torch.where(ok, b, torch.ones_like(b))
    elif not math.isfinite(b) or b == 0:
        return model_output
    m = model_output.to(torch.float32)
    return torch.where(delta == 0, m, m + delta / b).to(model_output.dtype)


# -- Flux-style packed latents -----------------------------------------------------------------------
def unpack_tokens(x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Packed 2×2-patch tokens ``(B, h·w, 4C)`` → a latent ``(B, C, 2h, 2w)``.

    Token ``r·w + q`` holds latent pixel ``(2r + i, 2q + j)`` of channel c at feature ``4c + 2i + j``
    (FluxPipeline's ``_pack_latents`` layout).

    >>> x = torch.arange(16.).reshape(1, 1, 4, 4)
    >>> bool((unpack_tokens(pack_tokens(x), (2, 2)) == x).all())
    True
    """
    b, n, f = x.shape
    h, w = grid_hw
    return x.reshape(b, h, w, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, f // 4, 2 * h, 2 * w)


def pack_tokens(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `unpack_tokens`: ``(B, C, 2h, 2w)`` → ``(B, h·w, 4C)``."""
    b, c, hh, ww = x.shape
    h, w = hh // 2, ww // 2
    return x.reshape(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, 4 * c)


def token_grid(n_tokens: int, img_ids: Any = None) -> tuple[int, int] | None:
    """The ``(h, w)`` token grid of a Flux-style packed latent, from the ``img_ids`` the pipeline
    gives its transformer: rows ``(0, row, col)`` for the generated tokens first (Kontext appends its
    reference image's rows after them). One host read per pass. None without such ids, or when they
    do not describe an ``h × w`` grid of `n_tokens` — other packings (LTX, Flux.2, Qwen-Image) are
    not unpacked.
    """
    if not (isinstance(img_ids, torch.Tensor) and img_ids.dim() >= 2 and img_ids.shape[-1] == 3
            and img_ids.reshape(-1, 3).shape[0] >= n_tokens):
        return None
    h, w = (int(v) + 1 for v in img_ids.reshape(-1, 3)[:n_tokens, 1:].amax(0).tolist())
    return (h, w) if h * w == n_tokens else None
