"""AUTOMATIC1111 stable-diffusion-webui adapter (v1.6 – v1.10).

Facts used (``shared/research/a1111.md``, checked against the WebUI source at v1.6.0 … v1.10.1):

- The after-CFG callback (``on_cfg_after_cfg``) receives the combined prediction of every denoiser
  evaluation; ``params.x`` is read back. k-diffusion samplers: x0 in model latent space. Timestep
  samplers (DDIM, DDIM CFG++, PLMS, UniPC — ``CFGDenoiserTimesteps``): ε, with ``sigma`` being the
  timestep t; v-prediction models are turned into x0 (k-diffusion) or ε (timestep) before CFG.
- The denoiser callback (``on_cfg_denoiser``) fires just before the UNet with the batch laid out as
  image 0's cond rows (``repeats[0]`` with AND prompts), image 1's, …, then the B uncond rows (two
  blocks of B for edit models). The last B rows are the latent the sampler passed in.
- ``params.denoiser`` (the CFGDenoiser) exists from v1.8; v1.6–v1.7 have the same object as the
  sampler's ``model_wrap_cfg`` and the same ``step``/``steps`` counters, just not in the params.
  ``state.sampling_step`` lags one evaluation behind and is never used here.
- Every sampler is made by ``modules.sd_samplers.create_sampler`` (txt2img: inside ``p.sample``
  for each pass; img2img: in ``p.init()``), and a pass's output latent is what the WebUI decodes or
  upscales next (hires first-pass decode or latent interpolation, hires final decode, final decode;
  also after an interrupt, when the sampler returns its last x0).
- An exception inside ``p.sample`` fails the job; hooks' exceptions are swallowed.

Design: everything QSilk installs lives exactly as long as one call of the job's ``p.sample``
(one per batch): a wrapper put on ``p`` in ``process()`` registers the two per-evaluation callbacks
and a model-loaded callback, patches ``create_sampler`` (and wraps an img2img ``p.sampler`` made
before), attaches the attention probe, and removes all of it in ``finally`` — so an error, an
interrupt or a skipped ``postprocess`` leaves nothing behind. A job whose settings do nothing
installs nothing at all.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..probe import EntropyProbe, find_probe_layer, probe_layer_factor
from ..settings import Settings
from ..stabilizer import Stabilizer
from . import common
from .common import expected_evaluations

log = logging.getLogger("qsilk")

#: Attribute marking functions QSilk put on a ``p`` or a module (value: what they replaced).
ORIGINAL_ATTR = "_qsilk_original"
JOB_ATTR = "_qsilk_job"

_live_jobs: "weakref.WeakSet[Job]" = weakref.WeakSet()


def _module(name: str) -> Any:
    """A WebUI module, looked up when used (so tests can swap WebUI doubles between versions)."""
    return importlib.import_module(name)


def c_skip_for(model_wrap: Any, sigma: torch.Tensor) -> Any:
    """k-diffusion's skip factor of the model wrapper: ε-prediction (``CompVisDenoiser``) 1,
    v-prediction (``CompVisVDenoiser``) ``1/(σ²+1)`` per row; None where unknown (SD3, forks)."""
    name = type(model_wrap).__name__
    if name == "CompVisDenoiser":
        return 1.0
    if name == "CompVisVDenoiser":
        return 1.0 / (sigma.float() ** 2 + 1.0)
    return None


def is_timestep_denoiser(denoiser: Any) -> bool:
    """Whether the denoiser's after-CFG output is ε (DDIM, DDIM CFG++, PLMS, UniPC)."""
    mod = sys.modules.get("modules.sd_samplers_timesteps")
    cls = getattr(mod, "CFGDenoiserTimesteps", None)
    if cls is not None and isinstance(denoiser, cls):
        return True
    return type(denoiser).__name__ == "CFGDenoiserTimesteps"


def cond_rows(text_cond: Any) -> int | None:
    """Rows of the cond text embedding (a tensor, or SDXL's dict with ``crossattn``)."""
    if isinstance(text_cond, dict):
        text_cond = text_cond.get("crossattn")
    shape = getattr(text_cond, "shape", None)
    return int(shape[0]) if shape else None


def repeats_of(conditioning: Any, batch: int) -> list[int] | None:
    """Cond rows per image: one per AND sub-prompt (``MulticondLearnedConditioning.batch``)."""
    groups = getattr(conditioning, "batch", None)
    if isinstance(groups, (list, tuple)) and len(groups) == batch:
        return [max(1, len(g)) for g in groups]
    return None


@dataclass
class _Pass:
    sampler: Any
    denoiser: Any
    batch: int
    repeats: list[int] | None
    is_hires: bool
    active: bool
    evaluations: int = 0
    total: int | None = None
    timesteps_count: int | None = None
    eps: bool | None = None  # ε after CFG (timestep samplers); decided at the first evaluation
    alphas: Any = None  # the sampler's ᾱ table on the latent's device, copied once per pass


@dataclass
class _Evaluation:
    step: int
    total: int | None
    x_t: torch.Tensor
    sigma: torch.Tensor
    alpha_bar: torch.Tensor | None
    c_skip: Any
    nmask: Any
    probing: bool


@dataclass
class _Installed:
    callbacks: list[Callable] = field(default_factory=list)
    create_sampler: tuple[Any, Any, Any] | None = None  # (module, original, wrapper)
    samplers: list[tuple[Any, str, Any, Any, bool]] = field(default_factory=list)


class Job:
    """One generation job's QSilk state: settings, stabiliser, probe and what is installed."""

    def __init__(self, p: Any, settings: Settings, stabilizer: Stabilizer | None = None):
        self.p = p
        self.settings = settings
        self.stabilizer = stabilizer if stabilizer is not None else Stabilizer(settings)
        self.installed: _Installed | None = None
        self.pass_: _Pass | None = None
        self.evaluation: _Evaluation | None = None
        self.probe: EntropyProbe | None = None
        self.probe_layer: str | None = None
        self.notes_posted = 0
        s = settings
        self.wants_probe = bool(s.aqclip_enabled and s.aqclip_mode == "attn" and s.aqclip_placement == "per_step")
        # The callbacks as stable objects, so removal by function finds exactly these.
        self._cb_denoiser = self._on_cfg_denoiser
        self._cb_after_cfg = self._on_cfg_after_cfg
        self._cb_model_loaded = self._on_model_loaded

    # -- install / remove around one p.sample call ----------------------------------------
    def run_sample(self, original: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            self.install()
        except Exception as exc:  # a WebUI QSilk does not understand: run the batch without it, say so
            log.exception("QSilk: installing the job's hooks failed")
            self.uninstall()
            self._note(f"could not hook into this WebUI ({exc}); this batch ran without QSilk")
            return original(*args, **kwargs)
        try:
            return original(*args, **kwargs)
        finally:
            self.uninstall()
            # before the WebUI writes this batch's infotext, so a NaN pass-through is recorded there
            self.stabilizer.nonfinite_samples()
            self._post_notes()

    def install(self) -> None:
        if self.installed is not None:
            return
        _remove_stale()
        self.installed = _Installed()
        _live_jobs.add(self)
        callbacks = _module("modules.script_callbacks")
        for category, fn in (("cfg_denoiser", self._cb_denoiser), ("cfg_after_cfg", self._cb_after_cfg),
                             ("model_loaded", self._cb_model_loaded)):
            _register(callbacks, category, fn)
            self.installed.callbacks.append(fn)
        _forget_ordered(callbacks)

        samplers = _module("modules.sd_samplers")
        original = samplers.create_sampler
        job = self

        def create_sampler(*args: Any, **kwargs: Any) -> Any:
            sampler = original(*args, **kwargs)
            if job.installed is not None:
                job._wrap_sampler(sampler)
            return sampler

        setattr(create_sampler, ORIGINAL_ATTR, original)
        setattr(create_sampler, JOB_ATTR, self)
        samplers.create_sampler = create_sampler
        self.installed.create_sampler = (samplers, original, create_sampler)

        existing = getattr(self.p, "sampler", None)
        if existing is not None:  # img2img made its sampler in p.init(), before p.sample
            self._wrap_sampler(existing)
        if self.wants_probe:
            self._attach_probe(_module("modules.shared").sd_model)

    def uninstall(self) -> None:
        installed, self.installed = self.installed, None
        if installed is None:
            return
        self.pass_ = None
        self.evaluation = None
        try:
            _remove_callbacks(installed.callbacks)
        except Exception:  # never let cleanup hide the job's own result or exception
            log.exception("QSilk: removing callbacks failed")
        if installed.create_sampler is not None:
            module, original, wrapper = installed.create_sampler
            if getattr(module, "create_sampler", None) is wrapper:
                module.create_sampler = original
            # else: another extension wrapped ours; our wrapper passes through from now on
        for sampler, name, original, wrapper, had_own in installed.samplers:
            if sampler.__dict__.get(name) is wrapper:
                if had_own:
                    setattr(sampler, name, original)
                else:
                    del sampler.__dict__[name]
            if sampler.__dict__.get(JOB_ATTR) is self:
                del sampler.__dict__[JOB_ATTR]
        if self.probe is not None:
            try:
                self.probe.detach()
            except Exception:
                log.exception("QSilk: detaching the attention probe failed")
        _live_jobs.discard(self)

    # -- sampler passes -------------------------------------------------------------------
    def _wrap_sampler(self, sampler: Any) -> None:
        if sampler.__dict__.get(JOB_ATTR) is self:
            return
        sampler.__dict__[JOB_ATTR] = self
        for name in ("sample", "sample_img2img"):
            original = getattr(sampler, name, None)
            if original is None:
                continue
            had_own = name in sampler.__dict__
            wrapper = self._pass_wrapper(sampler, original, img2img=(name == "sample_img2img"))
            setattr(sampler, name, wrapper)
            self.installed.samplers.append((sampler, name, original, wrapper, had_own))
        if "get_timesteps" in dir(sampler):
            self._record_timesteps(sampler)

    def _record_timesteps(self, sampler: Any) -> None:
        """Remember how many timesteps a timestep sampler's schedule has (evaluation count)."""
        original = sampler.get_timesteps
        had_own = "get_timesteps" in sampler.__dict__
        job = self

        def get_timesteps(*args: Any, **kwargs: Any) -> Any:
            timesteps = original(*args, **kwargs)
            if job.pass_ is not None and job.pass_.sampler is sampler:
                job.pass_.timesteps_count = len(timesteps)
            return timesteps

        sampler.get_timesteps = get_timesteps
        self.installed.samplers.append((sampler, "get_timesteps", original, get_timesteps, had_own))

    def _pass_wrapper(self, sampler: Any, original: Callable, *, img2img: bool) -> Callable:
        job = self

        def run_pass(p: Any, *args: Any, **kwargs: Any) -> Any:
            if job.installed is None:
                return original(p, *args, **kwargs)
            return job._run_pass(sampler, original, p, args, kwargs, img2img)

        setattr(run_pass, ORIGINAL_ATTR, original)
        return run_pass

    def _run_pass(self, sampler: Any, original: Callable, p: Any, args: tuple, kwargs: dict,
                  img2img: bool) -> Any:
        # sample(p, x, conditioning, uncond, steps, image_conditioning)
        # sample_img2img(p, x, noise, conditioning, uncond, steps, image_conditioning)
        x = args[0] if args else kwargs.get("x")
        cond_index = 2 if img2img else 1
        conditioning = args[cond_index] if len(args) > cond_index else kwargs.get("conditioning")
        batch = int(x.shape[0])
        is_hires = bool(getattr(p, "is_hr_pass", False))
        config = getattr(sampler, "config", None)
        second_order = bool(getattr(config, "options", {}).get("second_order", False)) if config else False
        self.stabilizer.begin_pass(evaluations_per_step=2 if second_order else 1, is_hires=is_hires)
        active = self.stabilizer.enabled and (self.settings.hires or not is_hires)
        self.pass_ = _Pass(sampler=sampler, denoiser=getattr(sampler, "model_wrap_cfg", None), batch=batch,
                           repeats=repeats_of(conditioning, batch), is_hires=is_hires, active=active)
        try:
            samples = original(p, *args, **kwargs)
        finally:
            self.pass_ = None
            self.evaluation = None
        nmask = getattr(p, "nmask", None) if img2img and not is_hires else None
        out = self.stabilizer.pre_decode(samples, nmask=nmask)
        self._post_notes()
        return out

    # -- per evaluation -------------------------------------------------------------------
    def _on_cfg_denoiser(self, params: Any) -> None:
        self.evaluation = None
        ps = self.pass_
        if self.installed is None or ps is None or not ps.active:
            return
        denoiser = getattr(params, "denoiser", None)
        if denoiser is not None and ps.denoiser is not None and denoiser is not ps.denoiser:
            return  # an evaluation of a sampler this job did not start (nested processing)
        denoiser = denoiser if denoiser is not None else ps.denoiser
        step = getattr(denoiser, "step", None)
        if not isinstance(step, int):
            step = ps.evaluations  # forks without the counter: count calls ourselves
        ps.evaluations += 1
        if ps.total is None:
            ps.total = expected_evaluations(ps.sampler, denoiser, ps.timesteps_count)
        total = ps.total
        if total is not None and step >= total:
            step = total - 1  # an estimate that was short (UniPC, Restart): clip progress to 1

        x = params.x
        batch = ps.batch
        x_t = x[-batch:]
        sigma = params.sigma[-batch:]
        alpha_bar = None
        c_skip = None
        if ps.eps is None:
            ps.eps = is_timestep_denoiser(denoiser)
        if ps.eps:
            if ps.alphas is None or ps.alphas.device != x.device:  # once per pass, not per evaluation
                alphas = getattr(denoiser, "alphas", None)
                if alphas is None:
                    alphas = _module("modules.shared").sd_model.alphas_cumprod
                ps.alphas = alphas.to(x.device)
            alpha_bar = ps.alphas[sigma.to(torch.long)]  # the WebUI truncates t the same way
        else:
            c_skip = c_skip_for(getattr(denoiser, "inner_model", None), sigma)
        nmask = getattr(denoiser, "nmask", None)  # set from p.nmask per pass; 1 = generated

        probing = False
        if self.probe is not None and self.probe.attached and self.stabilizer.in_window(step, total):
            probing = self._begin_probe(params, x, batch)
        self.evaluation = _Evaluation(step, total, x_t, sigma, alpha_bar, c_skip, nmask, probing)

    def _begin_probe(self, params: Any, x: torch.Tensor, batch: int) -> bool:
        n_cond = cond_rows(params.text_cond)
        repeats = self.pass_.repeats
        if repeats is None and n_cond == batch:
            repeats = [1] * batch
        if n_cond is None or repeats is None or sum(repeats) != n_cond:
            self._note("attention map unavailable (cond rows per image unknown); AQClip used Lite")
            return False
        image_of_row = [i for i, r in enumerate(repeats) for _ in range(r)]
        total_rows = int(x.shape[0])
        probe = self.probe
        offset = [0]

        def selector(rows: int):
            start = offset[0]
            offset[0] = start + rows
            if start + rows > total_rows:
                probe.mark_ambiguous("the probed layer saw more rows than this evaluation has, from "
                                     "Hypertile-style tiling or an extra UNet pass by another extension")
                return None
            # the third element names the row within the evaluation: a row computed twice (an
            # extension re-running the UNet) makes the probe drop this evaluation's map
            chosen = [(r, image_of_row[start + r], start + r) for r in range(rows) if start + r < n_cond]
            return chosen or None

        try:
            probe.begin_evaluation(latent_hw=(int(x.shape[-2]), int(x.shape[-1])), batch_size=batch,
                                   row_selector=selector)
        except Exception as exc:
            log.exception("QSilk: probe failed")
            self._note(f"attention probe failed ({exc}); AQClip used Lite")
            return False
        return True

    def _on_cfg_after_cfg(self, params: Any) -> None:
        ev, self.evaluation = self.evaluation, None
        if ev is None or self.installed is None:
            return
        probe_map = None
        if ev.probing and self.probe is not None:
            probe_map = self.probe.take_map()
            if probe_map is None:
                reason = self.probe.last_failure or "no capture"
                self._note(f"attention map unavailable ({reason}); AQClip used Lite")
        if ev.alpha_bar is not None:
            params.x = self.stabilizer.post_cfg_eps(ev.x_t, params.x, ev.alpha_bar, ev.step, ev.total, probe_map,
                                                    sigma=ev.sigma, nmask=ev.nmask)
        else:
            params.x = self.stabilizer.post_cfg(params.x, ev.step, ev.total, probe_map, sigma=ev.sigma,
                                                nmask=ev.nmask, x_noisy=ev.x_t, c_skip=ev.c_skip)
        self._post_notes()

    # -- the attention probe --------------------------------------------------------------
    def _attach_probe(self, sd_model: Any) -> None:
        """Attach the entropy probe to the model's probed layer; on any failure, no probe (Lite)."""
        try:
            self._attach_probe_to(sd_model)
        except Exception as exc:  # the probe is optional; a generation never fails because of it
            log.exception("QSilk: attaching the attention probe failed")
            self._note(f"attention probe unavailable ({exc}); AQClip used Lite")
            if self.probe is not None:
                self.probe.detach()
            self.probe = None
            self.wants_probe = False

    def _attach_probe_to(self, sd_model: Any) -> None:
        if self.probe is not None:
            self.probe.detach()
        unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
        found = find_probe_layer(unet) if isinstance(unet, torch.nn.Module) else None
        if found is None:
            self.probe_layer = None
            self._note("no self-attention layer to probe on this model; AQClip used Lite")
            return
        name, module = found
        if self.probe is None:  # probe_queries 0 = auto (1024 on CUDA, 256 on CPU)
            self.probe = EntropyProbe(heads=self.settings.probe_heads, max_queries=self.settings.probe_queries)
        self.probe.attach(module, factor=probe_layer_factor(unet, name))
        self.probe_layer = name

    def _on_model_loaded(self, sd_model: Any) -> None:
        """A checkpoint or VAE (re)load during the job (hires checkpoint, refiner): the UNet may be
        a different object now, so the probe moves to the new model's layer."""
        if self.installed is not None and self.wants_probe:
            self._attach_probe(sd_model)

    # -- notes ----------------------------------------------------------------------------
    def _note(self, message: str) -> None:
        self.stabilizer.note(message)
        self._post_notes()

    def _post_notes(self) -> None:
        notes = self.stabilizer.notes
        while self.notes_posted < len(notes):
            common.add_note(self.p, notes[self.notes_posted])
            self.notes_posted += 1


# -- callbacks bookkeeping -------------------------------------------------------------------
def _register(callbacks: Any, category: str, fn: Callable) -> None:
    """Register a callback for this job. Appended last, so it runs after every callback registered
    at start-up (other extensions' post-CFG edits come first; QSilk sees the final x0).

    v1.9+'s ``add_callback(..., category=, filename=)`` is used when present: ``on_*`` walks the
    whole stack (``inspect.stack()``) to find the caller's file, which costs tens of milliseconds
    per call in a deep server stack. Older versions go through ``on_<category>``."""
    add = getattr(callbacks, "add_callback", None)
    entries = getattr(callbacks, "callback_map", {}).get(f"callbacks_{category}")
    if add is not None and entries is not None and _accepts_filename(add):
        add(entries, fn, category=category, filename=__file__)
    else:
        getattr(callbacks, f"on_{category}")(fn)


def _accepts_filename(add_callback: Callable) -> bool:
    try:
        return "filename" in inspect.signature(add_callback).parameters
    except (TypeError, ValueError):
        return False


def _forget_ordered(callbacks_module: Any) -> None:
    """Drop the v1.9+ cache of sorted callbacks for the categories we touch, so the next call
    sorts again (v1.9.0's removal does not clean it; the cache is keyed only by list length)."""
    ordered = getattr(callbacks_module, "ordered_callbacks_map", None)
    if isinstance(ordered, dict):
        for category in ("cfg_denoiser", "cfg_after_cfg", "model_loaded"):
            ordered.pop(category, None)


def _remove_callbacks(functions: list[Callable]) -> None:
    """Remove exactly these callbacks from every category. ``remove_callbacks_for_function``
    exists from v1.6 (it also cleans the ordered cache from v1.9.1); entries are
    ``ScriptCallback`` namedtuples (v1.6–v1.8) or dataclasses with a name (v1.9+), both with
    ``.callback``."""
    callbacks = _module("modules.script_callbacks")
    remover = getattr(callbacks, "remove_callbacks_for_function", None)
    for fn in functions:
        if callable(remover):
            remover(fn)
        for entries in getattr(callbacks, "callback_map", {}).values():
            entries[:] = [e for e in entries if getattr(e, "callback", None) != fn]
    _forget_ordered(callbacks)


def _remove_stale() -> None:
    """Remove anything a job that is no longer running left behind (belt and braces: jobs clean
    up in ``finally``; this covers a process-level failure inside cleanup itself)."""
    callbacks = _module("modules.script_callbacks")
    stale = []
    for entries in getattr(callbacks, "callback_map", {}).values():
        for entry in entries:
            fn = getattr(entry, "callback", None)
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, Job) and owner.installed is None:
                stale.append(fn)
    if stale:
        log.warning("QSilk: removing %d stale callback(s) of an earlier job", len(stale))
        _remove_callbacks(stale)
    samplers = _module("modules.sd_samplers")
    fn = getattr(samplers, "create_sampler", None)
    while fn is not None and getattr(getattr(fn, JOB_ATTR, None), "installed", 1) is None:
        samplers.create_sampler = fn = getattr(fn, ORIGINAL_ATTR)


# -- the adapter function set (see qsilk.hosts) ----------------------------------------------
def start_job(p: Any, settings: Settings) -> Job | None:
    """From ``process()``: set the job up, or return None (and install nothing) when the settings
    do nothing. The per-evaluation hooks are installed only while ``p.sample`` runs."""
    common.restore_sample(p)
    stabilizer = common.job_stabilizer(p, settings)
    if stabilizer is None:
        return None
    job = Job(p, settings, stabilizer)
    original = p.sample

    def sample(*args: Any, **kwargs: Any) -> Any:
        return job.run_sample(original, args, kwargs)

    common.put_sample(p, sample)
    return job


def before_every_sampling(p: Any, job: Job | None, **kwargs: Any) -> None:
    """Nothing to do on A1111: the sampler wrappers cover every pass on v1.6–v1.10 alike."""


def before_hr(p: Any, job: Job | None) -> None:
    """Nothing to do on A1111: the hires pass is one more sampler pass (``p.is_hr_pass``)."""


def end_job(p: Any, job: Job | None, processed: Any = None) -> dict | None:
    """From ``postprocess()``: report, add the debug maps, restore ``p``. Returns the report."""
    common.restore_sample(p)
    if job is None:
        return None
    job.uninstall()
    report = job.stabilizer.report()
    job._post_notes()
    return common.present_report(report, job.stabilizer, processed, "a1111")


def cleanup_all() -> None:
    """``on_script_unloaded``: remove whatever any job still has installed."""
    for job in list(_live_jobs):
        job.uninstall()
    _remove_stale()
