"""diffusers host adapter: QSilk on a diffusers pipeline object (no WebUI import).

    >>> import qsilk                                             # doctest: +SKIP
    >>> with qsilk.diffusers(pipe, preset="Balanced") as run:    # doctest: +SKIP
    ...     image = pipe("a cat", num_inference_steps=20).images[0]
    >>> run.report()["summary"]                                  # doctest: +SKIP

Facts read from diffusers 0.42.1 (``pipelines/stable_diffusion*/``, ``pipelines/flux/``,
``schedulers/``): every classic pipeline combines the guided prediction and calls
``scheduler.step(noise_pred, t, latents, **extra_step_kwargs)``, and decides whether to pass
``eta`` / ``generator`` from ``inspect.signature(scheduler.step)``.

What is installed (nothing at all when the settings do nothing):

- **On each attached pipeline's denoiser** (``unet`` or ``transformer``): a forward pre-hook.
  At every evaluation it wraps whatever ``pipeline.scheduler`` is current (a host may replace the
  scheduler for every pass, as SD.Next does) and starts a *pass* when the scheduler or its
  ``timesteps`` tensor is new (``set_timesteps`` makes a new one for every pipeline call).
- **On each scheduler seen**: an instance attribute ``step`` (`StepWrapper`) over the bound
  method, keeping its signature, so ``inspect.signature`` still lists ``eta`` / ``generator``
  (a deep copy of the scheduler gets a plain ``step`` of its own). It forms
  ``x0 = a·s + b·m`` (`qsilk.hosts.diffusers_x0`), stabilises it (`Stabilizer.post_cfg`) and hands
  the scheduler ``m' = m + (x0' − x0)/b`` — exactly the input where nothing changed. Flux's packed
  ``(B, N, 64)`` tokens are unpacked to ``(B, 16, H, W)`` for this and packed back.
- **Before decode** (``pre_decode``): on the last step of a schedule run to its end, the
  ``prev_sample`` the scheduler returns — the latent the pipeline decodes (after its own
  ``callback_on_step_end`` and inpainting blend) — is stabilised (`Stabilizer.pre_decode`). A
  truncated schedule (SDXL ``denoising_end`` handing over to a refiner) is left alone.
- **Entropy probe** (UNet pipelines): forward hooks on the probed ``attn1``'s ``to_q`` / ``to_k``
  (`EntropyProbe`); no attention processor is swapped, so PAG, IP-Adapter and the user's own
  processors keep working. The cond rows follow the pipeline's CFG layout: ``[uncond; cond]`` when
  ``do_classifier_free_guidance``, plus a third (perturbed) chunk with PAG.

`detach` removes every hook and wrapper (idempotent; the ``with`` block calls it also when the
pipeline raises or is interrupted). Nothing raises into the pipeline: a failure inside QSilk
passes that evaluation through and is noted in the report. What QSilk cannot do says so once
(`DiffusersRun.note`): a scheduler without an x0 formula, a DiT model (Lite), fused QKV, a
compiled UNet, a model that keeps running without a step QSilk sees (a pipeline sharing the UNet
that is not attached).
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import sys
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..probe import EntropyProbe, find_probe_layer, probe_layer_factor
from ..settings import DEFAULT_PRESET, Settings
from ..stabilizer import Stabilizer
from . import common
from .common import call_arg, with_call_arg
from . import diffusers_x0 as x0t
from .patcher import wants_probe

log = logging.getLogger("qsilk")

HOST = "diffusers"
#: Labels a pass can get from ``pass_kind``: ``"hires"`` passes run only with the ``hires`` setting,
#: ``"skip"`` passes are left alone (not counted).
PASS_KINDS = ("base", "hires", "refiner", "skip")
#: Attributes on QSilk's ``step`` wrapper: the run it belongs to, and ``(had_own, own)`` — whether
#: the scheduler had its own instance ``step`` before, and which — to take it off exactly.
MARK = "_qsilk_diffusers"
RESTORE = "_qsilk_restore"

#: Denoiser calls in a row without a step of a wrapped scheduler after which QSilk says it is missing
#: steps (a pipeline makes at most 2–3 calls per step: separate CFG calls, skip-layer guidance).
UNSEEN_CALLS = 8

#: Denoiser module → the run attached to it, so a new attachment replaces a stale one (a job whose
#: end was never reached) instead of stacking a second stabiliser on the same pipeline.
_ATTACHED: "weakref.WeakKeyDictionary[torch.nn.Module, DiffusersRun]" = weakref.WeakKeyDictionary()


def attach(*pipes: Any, settings: Settings | None = None, preset: str | None = None, host: str = HOST,
           pass_kind: Callable[[Any], str | None] | None = None, on_note: Callable[[str], None] | None = None,
           echo: bool = True, stabilizer: Stabilizer | None = None, **overrides: Any) -> "DiffusersRun":
    """Attach QSilk to one or more diffusers pipelines (e.g. an SDXL base and its refiner).

    Args:
        pipes: pipeline objects, or zero-argument callables returning the current pipeline (a host
            that swaps pipeline objects between passes); each needs a ``unet`` or ``transformer``
            and a ``scheduler`` attribute.
        settings: a `Settings`; else `preset` (default Balanced) with `overrides` (parameter names
            of `qsilk.settings.PARAMS`, e.g. ``tile=48``). Bad values raise `SettingsError` here,
            naming the field and its range — never inside the pipeline.
        host: the name in the summary line (``QSilk (<host>): …``).
        pass_kind: called with the pipeline at the start of each pass; returns one of
            `PASS_KINDS` or None (``"base"``; ``"refiner"`` for pipelines after the first).
        on_note: receives each user-visible note once, when it is made.
        echo: print the summary line at `DiffusersRun.detach` (else log it at INFO).
        stabilizer: a host's own `Stabilizer` for the job (e.g. with a Q-Sched pre-conditioner);
            by default a new one from the settings.
    Returns: a `DiffusersRun` (a context manager). With settings that do nothing, nothing is
        installed and the pipelines run bit-identically.
    """
    if settings is None:
        settings = Settings.from_preset(preset or DEFAULT_PRESET, **overrides)
    elif preset is not None:
        raise TypeError("QSilk: give either settings= or preset=, not both")
    elif overrides:
        settings = settings.replace(**overrides)
    run = DiffusersRun(settings, host=host, pass_kind=pass_kind, on_note=on_note, echo=echo, stabilizer=stabilizer)
    try:
        for pipe in pipes:
            run.add_pipeline(pipe)
    except BaseException:
        run.detach(echo=False)
        raise
    return run


#: ``with qsilk.diffusers(pipe, preset="Balanced", tile=48) as run: image = pipe(...)``
diffusers = attach


def detach(run: "DiffusersRun") -> dict | None:
    """`DiffusersRun.detach` as a function."""
    return run.detach()


@dataclass
class _Pass:
    """One sampler invocation: a scheduler object and its timesteps tensor."""
    scheduler: Any
    timesteps: Any
    pipe: Any
    kind: str
    family: str | None
    name: str
    active: bool
    total: int | None
    count: int = 0
    ended_at_zero: bool | None = None
    grid: tuple[int, int] | None = None
    eval_probe: EntropyProbe | None = None  # the probe capturing the evaluation now running
    cache: dict = field(default_factory=dict)  # per-pass device copies (alphas_cumprod)


@dataclass
class _Denoiser:
    """One hooked denoiser module and the attached pipelines (indices into ``_pipes``) using it."""
    module: torch.nn.Module
    pipes: list[int]
    probe: EntropyProbe | None = None
    handles: list = field(default_factory=list)
    img_ids: Any = None
    attn: Any = None  # the probed attention module


class DiffusersRun:
    """QSilk attached to diffusers pipelines: one `Stabilizer` (one job), a pass per sampler run."""

    def __init__(self, settings: Settings, *, host: str = HOST,
                 pass_kind: Callable[[Any], str | None] | None = None,
                 on_note: Callable[[str], None] | None = None, echo: bool = True,
                 stabilizer: Stabilizer | None = None):
        self.settings = settings
        self.host = host
        self.pass_kind = pass_kind
        self.on_note = on_note
        self.echo = echo
        self.stabilizer = stabilizer if stabilizer is not None else Stabilizer(settings)
        self.active = self.stabilizer.enabled
        self.detached = False
        self.glue_errors = 0
        self.pass_kinds: list[str] = []
        self.last_report: dict | None = None
        self._pass: _Pass | None = None
        self._denoisers: list[_Denoiser] = []
        self._pipes: list[Callable[[], Any]] = []  # getters of the attached pipelines
        self._wrapped: list[tuple[Any, Callable]] = []  # (scheduler, QSilk's step on it)
        self._warned: set[str] = set()
        self._notes_sent = 0
        self._wants_probe = wants_probe(settings)
        self._calls_since_step = 0  # denoiser calls since the last step of a scheduler QSilk wrapped

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "DiffusersRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # -- set-up ---------------------------------------------------------------------------------
    def add_pipeline(self, pipe: Any) -> None:
        """Attach to one more pipeline (a refiner, or a pipeline a host switches to)."""
        if not self.active or self.detached:
            return
        pipe_of = pipe if callable(pipe) and not hasattr(pipe, "scheduler") else (lambda p=pipe: p)
        current = pipe_of()
        module = _denoiser_of(current)
        if module is None:
            raise TypeError(f"QSilk: {type(current).__name__} has no `unet` or `transformer` module to attach to")
        stale = _ATTACHED.get(module)
        if stale is not None and stale is not self and not stale.detached:
            log.warning("QSilk: an earlier attachment to this %s was still active; detaching it", type(module).__name__)
            stale.detach()
        index = len(self._pipes)
        self._pipes.append(pipe_of)
        scheduler = getattr(current, "scheduler", None)
        if scheduler is not None:
            self._wrap(scheduler)
        den = next((d for d in self._denoisers if d.module is module), None)
        if den is not None:  # pipelines sharing one denoiser (from_pipe, shared components)
            den.pipes.append(index)
            return
        _ATTACHED[module] = self
        den = _Denoiser(module, [index])
        den.handles.append(module.register_forward_pre_hook(functools.partial(self._pre_hook, den),
                                                            with_kwargs=True))
        self._denoisers.append(den)
        self._prepare_probe(den)

    def _prepare_probe(self, den: _Denoiser) -> None:
        if not self._wants_probe:
            return
        module, label = den.module, type(den.module).__name__
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            self.note(f"{label}: a torch.compile'd denoiser; the attention probe may not see inside it "
                      "(AQClip falls back to Lite where it gets no map)")
            module = inner
        found = find_probe_layer(module)
        if found is None:
            self.note(f"no UNet self-attention on this model ({type(module).__name__}): AQClip uses Lite "
                      "confidence (the micro-clamp is unaffected)")
            return
        name, attn = found
        if getattr(attn, "fused_projections", False):
            self.note(f"{type(module).__name__}: fused QKV projections (to_q/to_k are not called); AQClip uses Lite")
            return
        den.probe = EntropyProbe(heads=self.settings.probe_heads, max_queries=self.settings.probe_queries)
        den.probe.attach(attn, factor=probe_layer_factor(module, name))
        den.attn = attn

    def _wrap(self, scheduler: Any) -> None:
        """Put QSilk's ``step`` on this scheduler object (once), keeping the signature."""
        current = getattr(scheduler, "step", None)
        if isinstance(current, StepWrapper) and current.scheduler is not scheduler:
            # a shallow copy of a wrapped scheduler carries that scheduler's wrapper: start afresh
            del scheduler.__dict__["step"]
            current = getattr(scheduler, "step", None)
        if current is None or getattr(current, MARK, None) is self:
            return
        had_own = "step" in getattr(scheduler, "__dict__", {})
        own = scheduler.__dict__.get("step") if had_own else None
        wrapper = StepWrapper(self, scheduler, current, had_own, own)
        scheduler.step = wrapper
        self._wrapped.append((scheduler, wrapper))

    # -- notes, report, end -------------------------------------------------------------------------
    def note(self, message: str) -> None:
        """A user-visible note (report, console once, and `on_note`)."""
        self.stabilizer.note(message)
        self._send_notes()

    def _send_notes(self) -> None:
        notes = self.stabilizer.notes
        while self._notes_sent < len(notes):
            message = notes[self._notes_sent]
            self._notes_sent += 1
            if self.on_note is not None:
                try:
                    self.on_note(message)
                except Exception:
                    log.exception("QSilk: the on_note callback failed")

    def glue_error(self, where: str, exc: BaseException) -> None:
        self.glue_errors += 1
        if self.glue_errors == 1:
            log.exception("QSilk: error while %s on %s; QSilk passes through", where, self.host)
        self.note(f"error while {where}, passed through: {exc}")

    @property
    def ended_at_zero(self) -> bool | None:
        """Whether the latest pass ran to the end of its schedule — σ = 0, or a scheduler's final
        σ_min (DEIS, DDIM without ``set_alpha_to_one``) — so that its output, stabilised before
        decode here, is the latent the pipeline decodes; False for a pass cut short
        (``denoising_end``); None until the pass's last step."""
        return None if self._pass is None else self._pass.ended_at_zero

    @property
    def notes(self) -> list[str]:
        return list(self.stabilizer.notes)

    def report(self) -> dict:
        """What QSilk did so far: `Stabilizer.report` plus ``host``, ``pass_kinds``, ``summary``
        (the one-line summary) and ``enabled``. Reads device counters (one sync): not per step."""
        rep = self.stabilizer.report()
        self._send_notes()
        rep.update(host=self.host, enabled=self.active, pass_kinds=list(self.pass_kinds),
                   summary=common.summary_line(rep, self.host) if self.active else f"QSilk ({self.host}): off")
        return rep

    def detach(self, *, echo: bool | None = None) -> dict | None:
        """Remove every hook and ``step`` wrapper; print (or log, `echo` False; default: the run's
        `echo`) the summary line once. Safe to call again (returns the same report) and after the
        pipeline raised. None when QSilk was off."""
        if self.detached:
            return self.last_report
        self.detached = True
        self._release()
        if not self.active:
            return None
        try:
            self.last_report = common.present_report(self.report(), self.stabilizer, None, self.host,
                                                     echo=self.echo if echo is None else echo)
        except Exception:
            log.exception("QSilk: writing the run's summary failed")
        return self.last_report

    def _release(self) -> None:
        for den in self._denoisers:
            if _ATTACHED.get(den.module) is self:
                del _ATTACHED[den.module]
            for handle in den.handles:
                handle.remove()
            den.handles.clear()
            if den.probe is not None:
                den.probe.detach()
        self._denoisers.clear()
        for scheduler, _ in reversed(self._wrapped):
            _unwrap(scheduler)
        self._wrapped.clear()

    # -- per evaluation: the denoiser's pre-hook ------------------------------------------------------
    def _pre_hook(self, den: _Denoiser, module: Any, args: tuple, kwargs: dict) -> None:
        if self.detached:
            return None
        try:
            self._calls_since_step += 1
            if self._calls_since_step == UNSEEN_CALLS:
                self.note(f"{type(module).__name__} ran {UNSEEN_CALLS} times without a scheduler step QSilk sees: "
                          "a pipeline QSilk is not attached to shares this model (attach that pipeline too), "
                          "or the scheduler is called some other way; those steps were not stabilised")
            ps = self._pass
            fresh = None
            for index in den.pipes:
                pipe = self._pipes[index]()
                scheduler = getattr(pipe, "scheduler", None)
                if scheduler is None:
                    continue
                self._wrap(scheduler)
                if fresh is None and not (ps is not None and ps.scheduler is scheduler
                                          and ps.timesteps is getattr(scheduler, "timesteps", None)):
                    fresh = (scheduler, pipe, index)
            if fresh is not None:
                ps = self._sync_pass(*fresh)
            if "img_ids" in kwargs:
                den.img_ids = kwargs["img_ids"]
            if den.probe is not None and ps is not None and ps.active and ps.eval_probe is None:
                sample = args[0] if args else kwargs.get("sample")
                if isinstance(sample, torch.Tensor) and sample.dim() == 4 and self.stabilizer.in_window(
                        ps.count, ps.total):
                    chunks, cond, probed = _cfg_layout(ps.pipe, den.attn)
                    den.probe.begin_evaluation(tuple(sample.shape[-2:]), sample.shape[0] // chunks,
                                               functools.partial(_cond_rows, probed, cond))
                    ps.eval_probe = den.probe
        except Exception as exc:
            self.glue_error("preparing an evaluation", exc)
        return None

    def _sync_pass(self, scheduler: Any, pipe: Any = None, index: int | None = None) -> _Pass:
        """The current pass; a new one when the scheduler or its timesteps tensor changed. Without
        `pipe`, the attached pipeline using this scheduler (the first such)."""
        ps = self._pass
        timesteps = getattr(scheduler, "timesteps", None)
        if ps is not None and ps.scheduler is scheduler and ps.timesteps is timesteps:
            return ps
        if pipe is None:
            for i, pipe_of in enumerate(self._pipes):
                candidate = pipe_of()
                if getattr(candidate, "scheduler", None) is scheduler:
                    pipe, index = candidate, i
                    break
        running = _calling_pipeline(scheduler)
        if running is not None and running is not pipe:
            # pipelines sharing this scheduler (``Img2ImgPipeline(**pipe.components)``): the pass's
            # loop length and CFG layout are those of the pipeline whose call is running
            pipe = running
            index = next((i for i, pipe_of in enumerate(self._pipes) if pipe_of() is running), index)
        index = index or 0
        kind = None
        if self.pass_kind is not None:
            try:
                kind = self.pass_kind(pipe)
            except Exception as exc:
                self.glue_error("asking the pass kind", exc)
        kind = kind or ("refiner" if index else "base")
        if kind not in PASS_KINDS:
            self.note(f"unknown pass kind {kind!r} (expected one of {', '.join(PASS_KINDS)}); treated as base")
            kind = "base"
        family, name = x0t.scheduler_family(scheduler)
        total = _pass_length(pipe, scheduler)
        active = kind != "skip" and family is not None
        if kind != "skip":
            self.pass_kinds.append(kind)
            self.stabilizer.begin_pass(evaluations_per_step=2 if name in x0t.SECOND_ORDER else 1,
                                       is_hires=kind == "hires")
            if family is None:
                self._warn_once(type(scheduler).__name__, name)
        active = active and (self.settings.hires or kind != "hires")
        self._pass = _Pass(scheduler, timesteps, pipe, kind, family, name if family else type(scheduler).__name__,
                           active, total)
        return self._pass

    def _warn_once(self, key: str, reason: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.note(f"scheduler {key}: {reason}; QSilk passes it through (no stabilisation)")

    # -- per evaluation: the scheduler's step ----------------------------------------------------------
    def step(self, scheduler: Any, original: Callable, args: tuple, kwargs: dict) -> Any:
        """QSilk's ``scheduler.step``: stabilise x0, call the scheduler with ``m'``, pre-decode."""
        self._calls_since_step = 0
        try:
            plan = self._plan(scheduler, args, kwargs)
        except Exception as exc:
            self.glue_error("stabilising an evaluation", exc)
            plan = None
        if plan is None:
            return original(*args, **kwargs)
        new_args, new_kwargs, ps, coeffs = plan
        out = original(*new_args, **new_kwargs)
        try:
            return self._after_step(ps, scheduler, out, call_arg(args, kwargs, 1, "timestep"))
        except Exception as exc:
            self.glue_error("stabilising before decode", exc)
            return out

    def _plan(self, scheduler: Any, args: tuple, kwargs: dict):
        m, t, s = (call_arg(args, kwargs, 0, "model_output"), call_arg(args, kwargs, 1, "timestep"),
                   call_arg(args, kwargs, 2, "sample"))
        if not (isinstance(m, torch.Tensor) and isinstance(s, torch.Tensor)):
            return None
        ps = self._sync_pass(scheduler)
        i = ps.count
        ps.count += 1
        probe_map = self._take_map(ps)
        if not ps.active:
            return None
        blocker = x0t.step_blocker(ps.family, ps.name, m, s, kwargs)
        if blocker is not None:
            self._warn_once(f"{ps.name} ({blocker})", "this step form is not covered")
            return None
        x0t.ensure_step_index(scheduler, t)
        c = x0t.coefficients(scheduler, ps.family, ps.name, t, m, ps.cache)
        if isinstance(c, str):
            self._warn_once(f"{ps.name} ({c})", "no x0 formula")
            return None
        x0 = x0t.x0_of(c, s, m)
        packed = x0.dim() == 3
        img = self._unpack(ps, x0) if packed else x0
        if img is None:
            return None
        if img.dim() not in (4, 5):
            self._warn_once(f"{img.dim()}-D latent", "QSilk works on image (4-D) and video (5-D) latents")
            return None
        new = self.stabilizer.post_cfg(img, i, ps.total, probe_map)
        if new is img:
            return args, kwargs, ps, c
        delta = new - img
        m_new = x0t.write_back(m, c, x0t.pack_tokens(delta) if packed else delta)
        return with_call_arg(args, kwargs, 0, "model_output", m_new) + (ps, c)

    def _take_map(self, ps: _Pass) -> torch.Tensor | None:
        probe, ps.eval_probe = ps.eval_probe, None
        if probe is None:
            return None
        emap = probe.take_map()
        if emap is None:
            self.note(f"attention map unavailable ({probe.last_failure or 'no capture'}); AQClip used Lite")
        return emap

    def _unpack(self, ps: _Pass, x: torch.Tensor) -> torch.Tensor | None:
        if ps.grid is None:
            img_ids = next((d.img_ids for d in self._denoisers if d.img_ids is not None), None)
            ps.grid = x0t.token_grid(x.shape[1], img_ids)
        if ps.grid is None or x.shape[2] % 4:
            self.note(f"packed latent {tuple(x.shape)} without Flux-style img_ids: its layout is unknown, "
                      "so QSilk passes these steps through")
            return None
        return x0t.unpack_tokens(x, ps.grid)

    def _after_step(self, ps: _Pass, scheduler: Any, out: Any, timestep: Any) -> Any:
        """On the last step of a schedule that ends at σ = 0: stabilise the returned latent."""
        if not ps.active or ps.total is None or ps.count < ps.total:
            return out
        if ps.ended_at_zero is None:
            ps.ended_at_zero = _ends_at_zero(scheduler, ps.family, timestep)
        if self.settings.pre_decode == "off":
            return out
        if not ps.ended_at_zero:
            self.note("a pass stopped with leftover noise (denoising_end): before-decode stabilisation is left to "
                      "the pass that finishes it")
            return out
        prev = out[0] if isinstance(out, tuple) else getattr(out, "prev_sample", None)
        if not isinstance(prev, torch.Tensor):
            return out
        img = self._unpack(ps, prev) if prev.dim() == 3 else prev
        if img is None or img.dim() not in (4, 5):
            return out
        new = self.stabilizer.pre_decode(img)
        if new is img:
            return out
        new = x0t.pack_tokens(new) if prev.dim() == 3 else new
        if isinstance(out, tuple):
            return (new.to(prev.dtype), *out[1:])
        out.prev_sample = new.to(prev.dtype)
        return out


# -- helpers ---------------------------------------------------------------------------------------
class StepWrapper:
    """QSilk's ``step`` on one scheduler object (an instance attribute over the class's method).

    Keeps the wrapped method's signature (``__signature__`` / ``__wrapped__``: pipelines read it to
    pass ``eta`` / ``generator``). A ``copy.deepcopy`` of the scheduler (SD.Next keeps a deep copy
    as its default scheduler) gets a plain ``step`` of its own — the copy's bound method, or a copy
    of the instance ``step`` that was there before QSilk — never this wrapper, which would step the
    original object's state."""

    def __init__(self, run: DiffusersRun, scheduler: Any, original: Callable, had_own: bool, own: Any):
        functools.update_wrapper(self, original)
        self.__signature__ = inspect.signature(original)
        self.scheduler = scheduler
        self.original = original
        setattr(self, MARK, run)
        setattr(self, RESTORE, (had_own, own))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        run = getattr(self, MARK)
        if run.detached:
            return self.original(*args, **kwargs)
        return run.step(self.scheduler, self.original, args, kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        had_own, own = getattr(self, RESTORE)
        if had_own:
            return copy.deepcopy(own, memo)
        clone = memo.get(id(self.scheduler))
        return self if clone is None else types.MethodType(type(clone).step, clone)

    def __copy__(self) -> Any:
        return self

    def __repr__(self) -> str:
        return f"<QSilk step of {self.original!r}>"


def _unwrap(scheduler: Any) -> None:
    """Take every ``step`` of a detached QSilk run off the top of this scheduler (its own and stale
    ones beneath it); another library's wrapper put on top of ours is left alone (ours under it
    then passes through)."""
    while True:
        step = getattr(scheduler, "__dict__", {}).get("step")
        run = getattr(step, MARK, None)
        if run is None or not run.detached:
            return
        had_own, own = getattr(step, RESTORE)
        if had_own:
            scheduler.step = own
        else:
            del scheduler.__dict__["step"]


def _denoiser_of(pipe: Any) -> torch.nn.Module | None:
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def _calling_pipeline(scheduler: Any, depth: int = 64) -> Any:
    """The pipeline whose ``__call__`` is running on this thread with this scheduler (the nearest
    such frame), or None. Read once per pass, when it starts: pipelines built from one another's
    components share the scheduler and the denoiser, so only the call stack says which one runs."""
    frame = sys._getframe(1)
    while frame is not None and depth > 0:
        depth -= 1
        if frame.f_code.co_name == "__call__":
            obj = frame.f_locals.get("self")
            try:
                if getattr(obj, "scheduler", None) is scheduler and _denoiser_of(obj) is not None:
                    return obj
            except Exception:
                pass
        frame = frame.f_back
    return None


def _pass_length(pipe: Any, scheduler: Any) -> int | None:
    """Evaluations in this pass: the pipeline's loop length (``_num_timesteps``, set before its
    loop), else the scheduler's timesteps from its begin index."""
    n = getattr(pipe, "_num_timesteps", None)
    if isinstance(n, int) and n > 0:
        return n
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    return max(1, len(timesteps) - int(getattr(scheduler, "begin_index", None) or 0))


def _ends_at_zero(scheduler: Any, family: str | None, timestep: Any) -> bool:
    """After the pass's last step: did it run to the end of its schedule — σ = 0, or the model's
    smallest σ where a scheduler ends there (DEIS, DDIM without ``set_alpha_to_one``) — so that its
    output is the clean latent the pipeline decodes? A pass cut short (SDXL ``denoising_end``) did not.

    σ schedulers: the step index reached the last σ (a Python int). Timestep schedulers (DDIM, DDPM,
    LCM, TCD): the step was the schedule's last timestep (one read, once per pass)."""
    if family == "alpha":
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or not len(timesteps):
            return False
        return bool(torch.as_tensor(timestep).reshape(-1)[0].cpu() == timesteps[-1].cpu())
    sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
    if sigmas is None or index is None:
        return False
    return index >= len(sigmas) - 1


def _cfg_layout(pipe: Any, attn: Any = None) -> tuple[int, int, int]:
    """``(chunks, cond chunk, chunks at the probed layer's to_q)`` of the denoiser's batch:
    ``[uncond; cond]`` with CFG, a third (perturbed) chunk with PAG, else one cond chunk. Where PAG
    put its processor on the probed layer (``PAGCFGIdentitySelfAttnProcessor2_0`` /
    ``PAGIdentitySelfAttnProcessor2_0``: ``to_q`` sees the chunks before the perturbed one only),
    ``to_q``'s rows lack the perturbed chunk."""
    cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
    pag = bool(getattr(pipe, "do_perturbed_attention_guidance", False))
    chunks = 1 + int(cfg) + int(pag)
    pag_here = pag and type(getattr(attn, "processor", None)).__name__.startswith("PAG")
    return chunks, int(cfg), chunks - int(pag_here)


def _cond_rows(chunks: int, cond: int, rows: int) -> list[tuple[int, int, int]] | None:
    if rows % chunks:
        return None
    b = rows // chunks
    return [(cond * b + r, r, cond * b + r) for r in range(b)]

