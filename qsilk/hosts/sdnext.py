"""SD.Next adapter (vladmandic/sdnext, diffusers-only backend; read at master ``058a7f0c``).

SD.Next keeps A1111's Script API (``process``/``postprocess``, infotext, paste, XYZ) but runs
diffusers pipelines only, so this module is thin glue over the diffusers adapter
(`qsilk.hosts.diffusers`). Facts it relies on (``shared/research/diffusers-sdnext.md``):

- After the script's ``process()`` every pass gets a NEW scheduler object
  (``processing_helpers.update_sampler`` → ``sd_samplers.create_sampler`` → ``model.scheduler =``);
  the hires pass may switch the pipeline class (``set_diffuser_pipe``, same UNet); the refiner is
  ``shared.sd_refiner``. The diffusers run is attached in ``process()`` to the denoiser of
  ``shared.sd_model`` (and of ``shared.sd_refiner``) through callables returning the CURRENT
  pipeline, so its pre-hook wraps whichever scheduler each pass created.
- ``p.is_hr_pass`` / ``p.is_refiner_pass`` label the passes; ``modules.processing_callbacks.p`` is
  the processing object of the pipeline call running now (``set_pipeline_args`` sets it). Detailer
  passes run a shallow ``copy(p)`` with ``recursion = True`` through ``process_images_inner``,
  calling the script's ``process``/``postprocess`` again: they are left alone deliberately (the
  detail pass is an inpaint of a face or hand crop with its own settings; QSilk's corridor
  statistics of a crop are not the image's) — ``nested_pass`` makes the hooks do nothing and the
  run labels those passes ``skip``.
- ``postprocess`` is skipped on interrupt; ``script_callbacks.after_process_callback`` always runs
  (from a ``finally``): `after_process` detaches whatever the job still has.
- Exceptions in script hooks are logged and swallowed (HTTP 200), and so are ``ValueError``,
  ``RuntimeError`` and ``AssertionError`` raised inside the pipeline call. Another exception type
  raised from a denoiser forward pre-hook reaches the API (the middleware answers with the
  exception's ``status_code`` when it has one): `refuse` raises `QSilkArgumentError` there.
- SD.Next's own ``callback_on_step_end`` (progress, interrupt, "Latent corrections", cfg_end) runs
  after ``scheduler.step`` and is not touched; its corrections act on the latent QSilk produced.
- It has ``InputAccordion`` but not its JavaScript: no header checkbox is drawn, so the controls
  get a plain accordion with a visible "Enable QSilk" checkbox (`INPUT_ACCORDION`).
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import torch

from ..settings import Settings
from . import common
from . import diffusers as qd

log = logging.getLogger("qsilk")

HOST = "sdnext"
#: SD.Next ships ``InputAccordion`` without ``inputAccordion.js``: use a visible checkbox instead.
INPUT_ACCORDION = False
#: Attribute (in ``p.__dict__``) holding the refusal hooks of a job with bad arguments.
REFUSAL_ATTR = "qsilk_refusal"


class QSilkArgumentError(Exception):
    """Bad QSilk arguments, raised inside the pipeline call so the request fails visibly.

    Deliberately not a ``ValueError`` (SD.Next swallows ValueError/RuntimeError/AssertionError
    raised in the pipeline and returns the image without QSilk). ``status_code`` and ``detail``
    are read by SD.Next's API middleware: the client gets HTTP 422 with the message, which names
    the field and its range, under ``errors``."""

    def __init__(self, message: str):
        super().__init__(message)
        self.status_code = 422
        self.detail = message


def _module(name: str) -> Any:
    return sys.modules.get(name)


def _shared() -> Any:
    return _module("modules.shared")


def running_p() -> Any:
    """The processing object of the pipeline call running now (``processing_callbacks.p``)."""
    return getattr(_module("modules.processing_callbacks"), "p", None)


def nested_pass(p: Any) -> bool:
    """A detailer pass (``p.recursion``): its ``process``/``postprocess`` leave the parent job alone."""
    return bool(getattr(p, "recursion", False))


class Job:
    """One SD.Next job: the diffusers run attached to the current base (and refiner) pipelines."""

    def __init__(self, p: Any, settings: Settings, run: qd.DiffusersRun):
        self.p = p
        self.settings = settings
        self.run = run
        self.stabilizer = run.stabilizer
        self._cb_model_loaded = self._on_model_loaded
        self._skipped: set[str] = set()

    # the pipelines, always the current objects (SD.Next replaces them between passes)
    @staticmethod
    def base_pipe() -> Any:
        return getattr(_shared(), "sd_model", None)

    @staticmethod
    def refiner_pipe() -> Any:
        return getattr(_shared(), "sd_refiner", None)

    def attach(self) -> bool:
        """Attach to the base model, and to the refiner when one is loaded. False (with a visible
        note) when the base model has nothing QSilk can hook."""
        try:
            self.run.add_pipeline(self.base_pipe)
        except Exception as exc:
            self.run.note(f"this model cannot be hooked ({exc}); the image was made without QSilk")
            log.warning("QSilk: %s", exc)
            return False
        if self.refiner_pipe() is not None:
            try:
                self.run.add_pipeline(self.refiner_pipe)
            except Exception as exc:
                self.run.note(f"the refiner cannot be hooked ({exc}); refiner passes run without QSilk")
        callbacks = _module("modules.script_callbacks")
        if callbacks is not None and hasattr(callbacks, "on_model_loaded"):
            callbacks.on_model_loaded(self._cb_model_loaded)
        return True

    def _on_model_loaded(self, sd_model: Any) -> None:
        """A model (re)loaded during the job (a refiner loaded on demand): hook its denoiser too."""
        for pipe_of in (self.base_pipe, self.refiner_pipe):
            if pipe_of() is sd_model:
                try:
                    self.run.add_pipeline(pipe_of)
                except Exception as exc:
                    self.run.note(f"a model loaded during the job cannot be hooked ({exc})")

    def pass_kind(self, pipe: Any) -> str:
        """``base`` / ``hires`` / ``refiner`` for this job's passes; ``skip`` for detailer passes and
        for pipeline calls of another processing object (nested processing by another script)."""
        current = running_p()
        if nested_pass(current):
            self._skip_note("detailer passes ran without QSilk (by design: a crop's statistics are not the image's)")
            return "skip"
        if current is not None and current is not self.p:
            self._skip_note("a pipeline call of another processing object (nested processing) was left alone")
            return "skip"
        p = self.p
        if getattr(p, "is_refiner_pass", False):
            return "refiner"
        if getattr(p, "is_hr_pass", False):
            return "hires"
        return "base"

    def _skip_note(self, message: str) -> None:
        if message not in self._skipped:
            self._skipped.add(message)
            self.run.note(message)

    def detach(self) -> dict | None:
        callbacks = _module("modules.script_callbacks")
        remover = getattr(callbacks, "remove_callbacks_for_function", None)
        if callable(remover):
            try:
                remover(self._cb_model_loaded)
            except Exception:
                log.exception("QSilk: removing the model-loaded callback failed")
        return self.run.detach()


# -- the adapter function set (see qsilk.hosts) ----------------------------------------------
def start_job(p: Any, settings: Settings) -> Job | None:
    """From ``process()``: attach the diffusers run (nothing at all when the settings do nothing)."""
    remove_refusal(p)
    stabilizer = common.job_stabilizer(p, settings)
    if stabilizer is None:
        return None
    holder: dict[str, Job] = {}
    # no pipeline yet: Job.attach adds them one by one, so a refiner that cannot be hooked only
    # costs the refiner passes; the job's stabilizer carries its Q-Sched pre-conditioner
    run = qd.attach(settings=settings, stabilizer=stabilizer, host=HOST, echo=False,
                    pass_kind=lambda pipe: holder["job"].pass_kind(pipe),
                    on_note=lambda message: common.add_note(p, message))
    job = holder["job"] = Job(p, settings, run)
    for note in stabilizer.notes:  # set-up notes (Q-Sched) in the infotext now; add_note keeps one copy
        common.add_note(p, note)
    if not job.attach():
        job.detach()
        return None
    return job


def before_every_sampling(p: Any, job: Job | None, **kwargs: Any) -> None:
    """Never called on SD.Next (no ``process_before_every_sampling``)."""


def before_hr(p: Any, job: Job | None) -> None:
    """Never called on SD.Next (no ``before_hr``): the hires pass is labelled from ``p.is_hr_pass``."""


def end_job(p: Any, job: Job | None, processed: Any = None) -> dict | None:
    """From ``postprocess()`` or `after_process`: detach, then the summary line (console or log,
    per the settings page), the Show-maps images and the notes on ``processed``, as on A1111."""
    remove_refusal(p)
    if job is None:
        return None
    report = job.detach()
    if report is None:
        return None
    return common.present_report(report, job.stabilizer, processed, HOST)


def after_process(p: Any) -> None:
    """``on_after_process`` (always runs, also after an interrupt or an exception): whatever this
    ``p`` still has — a job whose ``postprocess`` was skipped, a refusal hook — is removed."""
    if nested_pass(p):
        return
    remove_refusal(p)
    job = common.pop_job(p)
    if job is not None:
        end_job(p, job)


# -- refusing bad arguments --------------------------------------------------------------------
def refuse(p: Any, error: Exception) -> None:
    """Make this job fail with `error`'s message (which names the field and its range).

    A forward pre-hook on the base (and refiner) denoiser raises `QSilkArgumentError` at the first
    evaluation: it is not one of the exception types SD.Next swallows inside the pipeline, so the
    request fails (API: HTTP 422, ``errors`` = the message; UI: the error is shown). `after_process`
    removes the hook."""
    message = str(error)
    remove_refusal(p)
    log.error("%s", message)
    common.add_note(p, message)

    def raise_refusal(module: Any, args: Any) -> None:
        raise QSilkArgumentError(message)

    handles = []
    for pipe in (Job.base_pipe(), Job.refiner_pipe()):
        module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if isinstance(module, torch.nn.Module):
            handles.append(module.register_forward_pre_hook(raise_refusal))
    if not handles:
        log.error("QSilk: no denoiser found to refuse the job on; it runs WITHOUT QSilk")
        common.add_note(p, "the job ran without QSilk")
    p.__dict__[REFUSAL_ATTR] = handles


def remove_refusal(p: Any) -> None:
    for handle in getattr(p, "__dict__", {}).pop(REFUSAL_ATTR, None) or []:
        handle.remove()
