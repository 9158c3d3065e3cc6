"""Forge host adapter: new Forge and Forge Neo (``backend/``), old Forge, Forge Classic and
reForge (``ldm_patched``).

Translates Forge's patch API into `Stabilizer` calls; it holds no math. Host facts are in
``shared/research/forge.md`` and ``hosts-2026.md`` and were checked against Forge main dfdcbab6,
Forge tag ``previous`` bfee03d8, reForge main 3b56b268, Forge Neo release 2.26 and Forge Classic
1f95d717. No Forge module is imported: everything is reached through the job's ``p`` (duck
typing), so this module also loads, and is tested, without a WebUI.

What is installed, from the script's ``process_before_every_sampling`` (Forge resets
``p.sd_model.forge_objects`` before every pass, so earlier hooks cannot patch the UNet):

- **Per evaluation**: a clone of ``forge_objects.unet`` with a post-CFG *closure* (``clone()``
  deep-copies ``model_options``; a bound method would drag a copy of its object along), written
  back to ``forge_objects``. New Forge calls the hook 1 + 2 times with hires fix and throws the
  first hires call's clone away, so installing is idempotent: a patcher already holding our
  function is left alone.
- **Per pass**: the pass's sampler ``sample`` / ``sample_img2img`` are wrapped. The wrapper starts
  the pass (`Stabilizer.begin_pass`: exactly once per sampler invocation, however often the hook
  ran) and stabilises the pass's output latent once, before whatever follows it: the first-pass
  decode for an image upscaler, the latent upscale, the hires final decode, the final decode.
- **Refiner switch**: a job-scoped ``on_cfg_denoiser`` guard re-installs on the refiner's patcher
  (the switch reloads the model inside the denoiser without calling the hook).
- **Entropy probe** (SD1.x/SD2/SDXL UNets): `qsilk.hosts.patcher.AttentionCapture` — forward
  hooks on the probed ``attn1``'s ``to_q`` / ``to_k``, an *observing* ``attn1_patch`` (the patch
  list composes) and an identity post-CFG "fence" put first; no attention *replace* key is taken,
  so SAG / PAG / StyleAlign keep theirs. DiT models (Flux, Flux.2, SD3, Chroma, Z-Image,
  Qwen-Image, Wan, Anima) have no UNet self-attention and Neo patches no DiT attention: AQClip uses
  Lite there, with a visible note naming the model. Wan-VAE models on Neo (Wan, Qwen-Image, Anima)
  sample 5-D latents ``(B, C, T, H, W)``; the `Stabilizer` treats each latent frame as an image.

Family differences handled here by feature checks: ``model.predictor`` (new Forge) vs
``model.model_sampling`` (old Forge, Classic, reForge); ``cond_scale`` in the post-CFG args
(reForge, Neo) or not (the others); ``uncond_denoised`` zeros (Forge) or None (reForge) and ``p.uc``
None at CFG 1 (new Forge, Neo) — QSilk reads none of them; the hook runs 1 + 2 (new Forge) or 1
(the others) times for a hires pass.

Forge does not catch exceptions raised in post-CFG functions (the job aborts), so every piece of
glue here is wrapped; the `Stabilizer` never raises. Module hooks live only while ``p.sample``
runs (released in ``finally``: an error skips ``postprocess``).
"""
from __future__ import annotations

import logging
import sys
import weakref
from typing import Any, Callable

import torch

from ..settings import Settings
from ..stabilizer import Stabilizer
from . import common
from .common import expected_evaluations
from .patcher import AttentionCapture, attn1_observer, fence_function, fitting_mask, runs_per_step, wants_probe

log = logging.getLogger("qsilk")

#: Attribute on the functions QSilk puts on a sampler: the job they belong to.
JOB_ATTR = "_qsilk_job"

#: Jobs not ended yet, so that `cleanup_all` and the next job can release their module hooks.
_LIVE_JOBS: "weakref.WeakSet[ForgeJob]" = weakref.WeakSet()


# -- the adapter function set (see qsilk.hosts) ----------------------------------------------
def start_job(p: Any, settings: Settings) -> "ForgeJob | None":
    """From ``process()``: a job, or None when the settings do nothing (then nothing is installed)."""
    for stale in list(_LIVE_JOBS):
        stale.release()
    common.restore_sample(p)
    stabilizer = common.job_stabilizer(p, settings)
    if stabilizer is None:
        return None
    job = ForgeJob(p, settings, stabilizer)
    original = p.sample

    def sample(*args: Any, **kwargs: Any) -> Any:
        try:
            job.add_refiner_guard()
            return original(*args, **kwargs)
        finally:
            job.release()
            # before the WebUI writes this batch's infotext, so a NaN pass-through is recorded there
            job.stabilizer.nonfinite_samples()
            job.post_notes()

    common.put_sample(p, sample)
    _LIVE_JOBS.add(job)
    job.post_notes()
    return job


def before_every_sampling(p: Any, job: "ForgeJob | None", **kwargs: Any) -> None:
    """From ``process_before_every_sampling(p, x=, noise=, c=, uc=)``: install for this pass."""
    if job is None or job.closed:
        return
    try:
        job.install(p)
    except Exception as exc:  # the host would swallow it and run the pass without QSilk
        job.glue_error("installing the hooks", exc)


def before_hr(p: Any, job: "ForgeJob | None") -> None:
    """Nothing to do: the hires pass is installed by the sampling hook that follows."""


def end_job(p: Any, job: "ForgeJob | None", processed: Any = None) -> dict | None:
    """From ``postprocess()``: make everything inert, report, add debug maps. Returns the report."""
    common.restore_sample(p)
    if job is None:
        return None
    job.close()
    report = job.stabilizer.report()
    job.post_notes()
    return common.present_report(report, job.stabilizer, processed, job.family)


def cleanup_all() -> None:
    """``on_script_unloaded``: release whatever a job still has installed."""
    for job in list(_LIVE_JOBS):
        job.close()


class ForgeJob:
    """One job's state on Forge. What Forge calls (post-CFG function, attention patch, sampler
    wrappers) are closures over it."""

    def __init__(self, p: Any, settings: Settings, stabilizer: Stabilizer):
        from . import detect_host
        self.family = detect_host()
        self.settings = settings
        self.stabilizer = stabilizer
        self.closed = False
        self.glue_errors = 0
        self.notes_posted = 0
        self._p = weakref.ref(p)
        self.wants_probe = wants_probe(settings)
        self.per_step = runs_per_step(settings) or stabilizer.preconditioner is not None
        self.capture = AttentionCapture(settings, self.note)
        self._wrapped: list[tuple[Any, str, Callable, bool, Callable]] = []  # sampler, name, wrapper, had_own, original
        self._pass_active = False
        self._sampler: Any = None
        self._total: int | None = None
        self._timesteps_count: int | None = None
        self._guard: Callable | None = None
        self.post_cfg_function = _post_cfg_function(self)
        live = lambda: None if self.closed else self.capture  # noqa: E731 (closures Forge holds)
        self.fence_function = fence_function(live, self.glue_error)
        self.attn1_observer = attn1_observer(live, self._evaluation_in_window, self.glue_error)

    @property
    def ambiguous_evaluations(self) -> int:
        return self.capture.ambiguous_evaluations

    # -- per pass ---------------------------------------------------------------------------
    def install(self, p: Any) -> None:
        sampler = getattr(p, "sampler", None)
        if sampler is not None:
            self._wrap_sampler(sampler)  # every pass is begun, also one QSilk leaves alone
        if not self.per_step or not (self.settings.hires or not getattr(p, "is_hr_pass", False)):
            return
        forge_objects = p.sd_model.forge_objects
        unet = forge_objects.unet
        if self.post_cfg_function in unet.model_options.get("sampler_post_cfg_function", ()):
            return  # this patcher (or the one it was cloned from) already has it
        unet = unet.clone()
        unet.set_model_sampler_post_cfg_function(self.post_cfg_function)
        diffusion_model = getattr(getattr(unet, "model", None), "diffusion_model", None)
        if self.wants_probe and self.capture.prepare(diffusion_model, model_name(p, diffusion_model)):
            unet.set_model_attn1_patch(self.attn1_observer)
            options = unet.model_options  # the clone's own (deep-copied) dict: a new list goes first
            options["sampler_post_cfg_function"] = [self.fence_function, *options["sampler_post_cfg_function"]]
        forge_objects.unet = unet

    def _wrap_sampler(self, sampler: Any) -> None:
        for name in ("sample", "sample_img2img", "get_timesteps"):
            original = getattr(sampler, name, None)
            if original is None or getattr(original, JOB_ATTR, None) is self:
                continue
            had_own = name in getattr(sampler, "__dict__", {})
            if name == "get_timesteps":  # timestep samplers: DDIM/PLMS evaluation counts need it
                wrapper = _timesteps_wrapper(self, original)
            else:
                wrapper = _pass_wrapper(self, sampler, original)
            setattr(sampler, name, wrapper)
            self._wrapped.append((sampler, name, wrapper, had_own, original))

    def run_pass(self, sampler: Any, original: Callable, args: tuple, kwargs: dict) -> Any:
        """One sampler invocation: begin the pass, sample, stabilise the output before decode."""
        p = self._p()
        is_hr = bool(getattr(p, "is_hr_pass", False))
        self.stabilizer.begin_pass(evaluations_per_step=_evaluations_per_step(sampler), is_hires=is_hr)
        self._pass_active = self.settings.hires or not is_hr
        self._sampler, self._total, self._timesteps_count = sampler, None, None
        self.capture.begin_pass()
        try:
            samples = original(*args, **kwargs)
        finally:
            self._sampler = None
            self.capture.end_pass()
        if (self.closed or not self._pass_active or not isinstance(samples, torch.Tensor)
                or samples.dim() not in (4, 5)):
            return samples
        try:
            out = self.stabilizer.pre_decode(samples, nmask=_nmask(p, sampler, samples))
        except Exception as exc:
            self.glue_error("stabilising before decode", exc)
            out = samples
        self.post_notes()
        return out

    # -- per evaluation ---------------------------------------------------------------------
    def _position(self) -> tuple[int | None, int | None]:
        """Evaluation index (the denoiser's ``step``, incremented after the post-CFG functions)
        and the pass's evaluation count. Python ints: no device sync."""
        sampler = self._sampler
        denoiser = getattr(sampler, "model_wrap_cfg", None)
        step = getattr(denoiser, "step", None)
        if not isinstance(step, int):
            return None, None
        if self._total is None:
            self._total = expected_evaluations(sampler, denoiser, self._timesteps_count)
        total = self._total
        return (min(step, total - 1) if total else step), total

    def _evaluation_in_window(self) -> bool:
        """For the probe, at the first UNet call of an evaluation: is it inside the step window?"""
        return self.stabilizer.in_window(*self._position())

    def post_cfg(self, args: dict) -> torch.Tensor:
        x0, sigma = args["denoised"], args.get("sigma")
        self.capture.take_map(args)
        probe_map = self.capture.map_for(sigma)
        step, total = self._position()
        c_skip = skip_factor(args.get("model"), sigma) if self.stabilizer.preconditioner is not None else None
        return self.stabilizer.post_cfg(x0, step, total, probe_map, sigma=sigma,
                                        nmask=_nmask(self._p(), self._sampler, x0),
                                        x_noisy=args.get("input"), c_skip=c_skip)

    # -- refiner ------------------------------------------------------------------------------
    def add_refiner_guard(self) -> None:
        """Register the job's ``on_cfg_denoiser`` guard for this ``p.sample`` call.

        The refiner switch (``sd_samplers_common.apply_refiner``) reloads the model inside the
        denoiser, and LoRA activation then resets ``forge_objects.unet`` — without calling
        ``process_before_every_sampling``. The ``cfg_denoiser`` callbacks run after that and
        before the sampling function reads ``forge_objects.unet``, so the guard re-installs on the
        new model's patcher there (one list-membership check per evaluation otherwise)."""
        callbacks = sys.modules.get("modules.script_callbacks")
        register = getattr(callbacks, "on_cfg_denoiser", None)
        if not self.per_step or self._guard is not None or not callable(register):
            return
        self._guard = _refiner_guard(self)
        register(self._guard)

    def _remove_refiner_guard(self) -> None:
        guard, self._guard = self._guard, None
        callbacks = sys.modules.get("modules.script_callbacks")
        if guard is None or callbacks is None:
            return
        remover = getattr(callbacks, "remove_callbacks_for_function", None)  # A1111 ≥ 1.6, every Forge
        if callable(remover):
            remover(guard)
        for entries in (getattr(callbacks, "callback_map", None) or {}).values():
            entries[:] = [e for e in entries if getattr(e, "callback", None) is not guard]
        ordered = getattr(callbacks, "ordered_callbacks_map", None)  # 1.9+: a cache keyed by length
        if isinstance(ordered, dict):
            ordered.pop("cfg_denoiser", None)

    def guard_evaluation(self) -> None:
        p = self._p()
        if self.closed or self._sampler is None or p is None:
            return
        unet = p.sd_model.forge_objects.unet
        if self.post_cfg_function not in unet.model_options.get("sampler_post_cfg_function", ()):
            self.install(p)

    # -- notes, errors, end -----------------------------------------------------------------
    def note(self, message: str) -> None:
        self.stabilizer.note(message)
        self.post_notes()

    def post_notes(self) -> None:
        """Copy new notes to the infotext now: images get their infotext before ``postprocess``."""
        p, notes = self._p(), self.stabilizer.notes
        while p is not None and self.notes_posted < len(notes):
            common.add_note(p, notes[self.notes_posted])
            self.notes_posted += 1

    def glue_error(self, where: str, exc: BaseException) -> None:
        self.glue_errors += 1
        if self.glue_errors == 1:
            log.exception("QSilk: error while %s on Forge; QSilk passes through", where)
        self.note(f"error while {where}, passed through: {exc}")

    def release(self) -> None:
        """Remove the module hooks, the sampler wrappers and the refiner guard (after every
        ``p.sample``, also when it raised). The post-CFG closure stays in that batch's
        throw-away patcher clone."""
        try:
            self._remove_refiner_guard()
        except Exception:  # never let cleanup hide the job's own result or exception
            log.exception("QSilk: removing the cfg_denoiser callback failed")
        self.capture.detach()
        for sampler, name, wrapper, had_own, original in self._wrapped:
            if getattr(sampler, "__dict__", {}).get(name) is wrapper:
                if had_own:
                    setattr(sampler, name, original)
                else:
                    delattr(sampler, name)
        self._wrapped.clear()
        self._sampler = None

    def close(self) -> None:
        """End of the job: release, and make every closure still held by Forge pass through."""
        if not self.closed:
            self.closed = True
            self.release()
        _LIVE_JOBS.discard(self)


def _post_cfg_function(job: ForgeJob) -> Callable[[dict], torch.Tensor]:
    def qsilk_post_cfg(args):
        x0 = args["denoised"]
        if job.closed:
            return x0
        try:
            return job.post_cfg(args)
        except Exception as exc:
            job.glue_error("stabilising an evaluation", exc)
            return x0

    return qsilk_post_cfg


def _refiner_guard(job: ForgeJob) -> Callable[[Any], None]:
    def qsilk_refiner_guard(params):
        try:
            job.guard_evaluation()
        except Exception as exc:
            job.glue_error("re-installing after a model switch", exc)

    return qsilk_refiner_guard


def _timesteps_wrapper(job: ForgeJob, original: Callable) -> Callable:
    def qsilk_get_timesteps(*args, **kwargs):
        timesteps = original(*args, **kwargs)
        try:
            job._timesteps_count = len(timesteps)
        except TypeError:
            pass
        return timesteps

    setattr(qsilk_get_timesteps, JOB_ATTR, job)
    return qsilk_get_timesteps


def _pass_wrapper(job: ForgeJob, sampler: Any, original: Callable) -> Callable:
    def qsilk_sampler_pass(*args, **kwargs):
        if job.closed:
            return original(*args, **kwargs)
        return job.run_pass(sampler, original, args, kwargs)

    setattr(qsilk_sampler_pass, JOB_ATTR, job)
    return qsilk_sampler_pass


# -- small pure helpers ----------------------------------------------------------------------
def _evaluations_per_step(sampler: Any) -> int:
    options = getattr(getattr(sampler, "config", None), "options", None) or {}
    return 2 if options.get("second_order", False) else 1


def skip_factor(model: Any, sigma: Any) -> torch.Tensor | None:
    """The skip factor s(σ) of the model's parametrisation, per row ``(B,)`` float32.

    Math: Forge's denoised is ``D = s(σ)·x + o(σ)·F``, so ``s = D(σ, F=0, x=1)``, evaluated with
    the model's own formula (new Forge ``model.predictor``, old Forge / reForge
    ``model.model_sampling``): 1 for ε and flow (``const``), ``σ_d²/(σ²+σ_d²)`` for v and EDM.
    """
    helper = getattr(model, "predictor", None) or getattr(model, "model_sampling", None)
    if helper is None or not isinstance(sigma, torch.Tensor):
        return None
    s = sigma.reshape(-1).to(torch.float32)
    one = torch.ones(s.shape[0], 1, 1, 1, dtype=torch.float32, device=s.device)
    return helper.calculate_denoised(s, torch.zeros_like(one), one).reshape(-1)


def _nmask(p: Any, sampler: Any, latent: torch.Tensor) -> torch.Tensor | None:
    """The inpainting latent mask (1 = generated) of this pass if it fits `latent`, else None."""
    nmask = getattr(getattr(sampler, "model_wrap_cfg", None), "nmask", None)
    if nmask is None and p is not None and not getattr(p, "is_hr_pass", False):
        nmask = getattr(p, "nmask", None)
    return fitting_mask(nmask, latent)


def model_name(p: Any, diffusion_model: Any = None) -> str:
    """What to call the loaded model in a note: Neo's diffusion engine class (``Flux``, ``Wan``,
    ``ZImage``, ``QwenImage``, ``Anima``, …), else the network's class name."""
    engine = type(getattr(p, "sd_model", None)).__name__
    if engine not in ("NoneType", "ForgeDiffusionEngine"):
        return engine
    return type(diffusion_model).__name__ if diffusion_model is not None else "unknown model"
