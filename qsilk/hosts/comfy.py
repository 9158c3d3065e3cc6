"""ComfyUI host adapter: the glue behind the nodes in `qsilk.hosts.comfy_nodes`.

Translates ComfyUI's patch API into `Stabilizer` calls; it holds no math and imports no ComfyUI
module (every object is reached through the arguments, duck typing), so it loads, and is tested,
without ComfyUI. Host facts were read at Comfy-Org/ComfyUI ``a125cd84`` (v0.3.64):
``comfy/model_patcher.py``, ``comfy/patcher_extension.py``, ``comfy/samplers.py``,
``comfy/sampler_helpers.py``, ``comfy/ldm/modules/attention.py``, ``comfy/model_sampling.py``.

`patch_model` returns a clone of the MODEL (``clone()`` deep-copies ``model_options``; the
functions put there are closures, which ``deepcopy`` keeps as they are) carrying:

- **Per sampler run**: a ``sampler_sample`` wrapper (``WrappersMP.SAMPLER_SAMPLE``, keyed
  ``"qsilk"``). ``CFGGuider.inner_sample`` runs it once per run with the run's sigmas (the same
  tensor it puts in ``transformer_options["sample_sigmas"]``), the noise and the inpainting mask
  already at latent size, inside the model load. It starts a fresh `Stabilizer` (`begin_pass`), hooks
  the probe, samples, removes the hooks (``finally``), stabilises the run's output before decode
  (``pre_decode``: only when the run ends at σ = 0, i.e. no leftover noise) and logs the WebUIs'
  one-line summary. The output is still in the model's latent space there (before
  ``process_latent_out``), the space the post-CFG x0 lives in. "Ends at σ = 0" is read from a CPU
  copy of the sigmas taken before sampling starts (one read per run): ``uni_pc`` / ``uni_pc_bh2``
  (``comfy/extra_samplers/uni_pc.py``) set the last σ of the tensor they are given to 0.001 in
  place; no other sampler of ``comfy/samplers.py`` ``SAMPLER_NAMES`` writes to it.
- **Per evaluation**: a post-CFG function on ``denoised`` (x0). The step window is the evaluation's
  step in the run: ``i`` = the steps the sampler reported done through its callback (wrapped in
  the ``sampler_sample`` wrapper; no read of the σ tensor per evaluation) — for samplers that
  evaluate between two sigmas after reporting a step (``REPORT_OFFSETS``), counted so that each
  evaluation gets `step_of_sigma`'s index — of ``n = len(sigmas) − 1`` (progress ``i/(n−1)``, as the WebUIs' evaluation index). ComfyUI skips the
  uncond pass at CFG 1 (``uncond`` None, ``uncond_denoised`` zeros): QSilk reads neither.
- **Entropy probe** (SD1.x/SD2/SDXL UNets): forward hooks on the probed ``attn1``'s ``to_q`` / ``to_k``
  (attached only while a run of this model samples) and an observing ``attn1_patch`` that returns
  its inputs unchanged; an identity post-CFG "fence" put first takes the map before other nodes'
  post-CFG functions (SAG, PAG) run extra UNet passes. No ``patches_replace`` key is taken. The
  bookkeeping is the Forge family's (`qsilk.hosts.patcher.AttentionCapture`): Forge copied
  ComfyUI's ``transformer_options`` (``block``, ``block_index``, ``cond_or_uncond``, ``sigmas`` — the
  evaluation's σ tensor, the same object as the post-CFG ``sigma`` — and ``original_shape``).
  Models without UNet self-attention (Flux, SD3, Chroma, …) get Lite confidence with a console
  note; video latents ``(B, C, T, H, W)`` (Wan, Hunyuan video) are stabilised frame by frame
  (`Stabilizer`) and skip the probe.

Nothing raises into the sampler: glue errors pass the latent through with a logged note.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..probe import find_probe_layer
from ..settings import Settings
from ..stabilizer import Stabilizer
from . import common
from .common import call_arg, with_call_arg
from .patcher import AttentionCapture, attn1_observer, fence_function, fitting_mask, runs_per_step, wants_probe

log = logging.getLogger("qsilk")

HOST = "comfyui"
#: ``comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE`` (spelled out: nothing of ComfyUI is imported).
SAMPLER_SAMPLE = "sampler_sample"
#: Key of QSilk's wrapper and attribute marking every function QSilk puts on a model.
WRAPPER_KEY = "qsilk"
MARK = "_qsilk_comfy"


# -- the MODEL patch ---------------------------------------------------------------------------
def patch_model(model: Any, settings: Settings) -> Any:
    """A clone of ComfyUI's MODEL (a ``ModelPatcher``) that stabilises every sampler run, or `model`
    itself (same object: bit-identical sampling) when the settings do nothing.

    A QSilk patch already on `model` (an earlier QSilk node) is replaced, not stacked."""
    if not Stabilizer(settings).enabled:
        return model
    if not callable(getattr(model, "add_wrapper_with_key", None)):
        raise RuntimeError("QSilk needs a ComfyUI with model wrappers (comfy.patcher_extension, December 2024 "
                           "or newer); please update ComfyUI")
    patched = model.clone()
    if _remove_qsilk(patched):
        log.info("QSilk: an earlier QSilk patch on this model was replaced")
    state = _RunState(settings)
    if state.per_step:
        patched.set_model_sampler_post_cfg_function(_mark(_post_cfg_function(state)))
        if state.wants_probe and _probe_layer(patched) is not None:
            observer = attn1_observer(state.run_capture, state.window_open, state.glue_error)
            patched.set_model_attn1_patch(_mark(observer))
            options = patched.model_options  # the clone's own dict: a new list, the fence first
            options["sampler_post_cfg_function"] = [_mark(fence_function(state.run_capture, state.glue_error)),
                                                    *options["sampler_post_cfg_function"]]
    patched.add_wrapper_with_key(SAMPLER_SAMPLE, WRAPPER_KEY, _mark(_sampler_wrapper(state)))
    return patched


def last_report(model: Any) -> dict | None:
    """The report of the last sampler run of a model `patch_model` returned (or a clone of it)."""
    for wrapper in getattr(model, "get_wrappers", lambda *_: [])(SAMPLER_SAMPLE, WRAPPER_KEY):
        state = getattr(wrapper, "qsilk_state", None)
        if state is not None:
            return state.last_report
    return None


def _mark(fn: Callable) -> Callable:
    setattr(fn, MARK, True)
    return fn


def _remove_qsilk(patched: Any) -> bool:
    """Take QSilk's functions off a fresh clone (its own deep-copied options). True if any were."""
    options = patched.model_options
    found = False
    post = options.get("sampler_post_cfg_function")
    if post:
        kept = [f for f in post if not getattr(f, MARK, False)]
        found |= len(kept) != len(post)
        options["sampler_post_cfg_function"] = kept
    patches = options.get("transformer_options", {}).get("patches", {})
    if patches.get("attn1_patch"):
        kept = [f for f in patches["attn1_patch"] if not getattr(f, MARK, False)]
        found |= len(kept) != len(patches["attn1_patch"])
        patches["attn1_patch"] = kept
    if patched.get_wrappers(SAMPLER_SAMPLE, WRAPPER_KEY):
        patched.remove_wrappers_with_key(SAMPLER_SAMPLE, WRAPPER_KEY)
        found = True
    return found


def _probe_layer(patcher: Any) -> tuple[str, torch.nn.Module] | None:
    diffusion_model = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    return find_probe_layer(diffusion_model) if isinstance(diffusion_model, torch.nn.Module) else None


class _RunState:
    """What the closures on one patched model share: the settings and the run now sampling.
    Runs are sequential in ComfyUI; a nested run (a node sampling inside a run) is stacked."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.per_step = runs_per_step(settings)
        self.wants_probe = wants_probe(settings)
        self.run: ComfyRun | None = None
        self.last_report: dict | None = None

    # what the patcher's closures ask, answered by the run now sampling (if any)
    def run_capture(self) -> AttentionCapture | None:
        return self.run.capture if self.run is not None else None

    def window_open(self) -> bool:
        return self.run is not None and self.run.evaluation_in_window()

    def glue_error(self, where: str, exc: BaseException) -> None:
        if self.run is not None:
            self.run.glue_error(where, exc)


#: k-diffusion samplers of ``comfy/k_diffusion/sampling.py`` (a125cd84) whose evaluations right
#: after a step report are not all at the next step by `step_of_sigma`: ``name → (offsets, first)``,
#: the offsets, from the steps reported done, of the evaluations after the report of step ``i``
#: (for ``i ≥ first``); later evaluations get offset 0. Checked against the real samplers by
#: recording each evaluation's σ and the steps reported before it.
REPORT_OFFSETS: dict[str, tuple[tuple[int, ...], int]] = {
    "sample_dpm_2": ((-1,), 0),  # step i: σ_i, report i, the midpoint between σ_i and σ_i+1
    "sample_dpmpp_sde": ((-1,), 0),  # the same shape (its midpoint in log σ)
    "sample_dpmpp_sde_gpu": ((-1,), 0),
    "sample_seeds_2": ((-1,), 0),
    "sample_seeds_3": ((-1, -1), 0),  # two stages between σ_i and σ_i+1 after the report
    "sample_sa_solver_pece": ((-1,), 1),  # from step 1 on: the corrector evaluates at σ_i again after report i
    "sample_heunpp2": ((0, 1), 0),  # after report i: σ_i+1, σ_i+2, σ_i+1
}


# -- one sampler run -----------------------------------------------------------------------------
class ComfyRun:
    """One sampler run: its `Stabilizer` (fresh state), attention capture and step window."""

    def __init__(self, settings: Settings, sampler: Any, sigmas: Any, denoise_mask: Any):
        self.settings = settings
        self.stabilizer = Stabilizer(settings)
        self.capture = AttentionCapture(settings, self.note)
        self.glue_errors = 0
        # The schedule as it is before sampling: one host read per run (a sampler may change the
        # tensor: uni_pc's last σ), never one per evaluation.
        self._schedule: list[float] | None = None
        if isinstance(sigmas, torch.Tensor):
            self._schedule = [float(v) for v in sigmas.detach().float().cpu().reshape(-1)]
        #: The run ends at σ = 0 (no leftover noise): decided before sampling, from the copy.
        self.ends_at_zero = not self._schedule or self._schedule[-1] <= 0.0
        self._steps_done: int | None = None  # steps the sampler reported done (its callback)
        self._since_report = 0  # evaluations since the sampler's latest step report
        self._evaluations = 0
        self._sigma_fallback = False  # the sampler reports no steps: σ is read per evaluation
        s = settings
        self._needs_position = s.step_start > 0.0 or s.step_end < 1.0
        self._mask = denoise_mask if isinstance(denoise_mask, torch.Tensor) else None
        self._shape_noted = False
        name = getattr(getattr(sampler, "sampler_function", None), "__name__", "")
        self._report_offsets = REPORT_OFFSETS.get(name, ((), 0))
        self.stabilizer.begin_pass(evaluations_per_step=2 if name in common.SECOND_ORDER_LAST_SINGLE else 1)

    def note(self, message: str) -> None:
        self.stabilizer.note(message)

    def start_probe(self, guider: Any, latent: Any) -> None:
        """Hook the probed layer for this run (call `release` afterwards, also on error)."""
        if not wants_probe(self.settings):
            return
        patcher = getattr(guider, "model_patcher", None)
        diffusion_model = getattr(getattr(patcher, "model", None), "diffusion_model", None)
        if isinstance(latent, torch.Tensor) and latent.dim() == 5:
            self.note(f"video latent ({type(diffusion_model).__name__}): each frame is stabilised as an image; "
                      "AQClip uses Lite confidence (no attention probe on video models)")
            return
        if patcher is not None and self.capture.prepare(diffusion_model, type(diffusion_model).__name__):
            self.capture.begin_pass()

    def release(self) -> None:
        self.capture.detach()

    # -- step window: the evaluation's σ in the run's schedule ------------------------------------
    def evaluation_in_window(self) -> bool:
        """For the probe, at the first UNet call of an evaluation: is it inside the step window?"""
        return self.stabilizer.in_window(*self._position_of(self.capture.evaluation_sigmas))

    def _position_of(self, sigma: Any) -> tuple[int | None, int | None]:
        """(evaluation index, count); (None, None) when the window is the whole run or the
        schedule is unknown. The index is the sampler's own step counter (`step_callback`: the
        steps it reported done), so σ — a device tensor — is not read back per evaluation; a
        second-order sampler's extra evaluation after its step's report counts as the next step,
        as in `step_of_sigma` for one at the next σ (Heun); samplers whose evaluations after a
        report lie elsewhere (a midpoint σ: `REPORT_OFFSETS`) get `step_of_sigma`'s index by
        their count since the report. A sampler that reports no step by its third evaluation falls back to
        σ's position in the schedule (one host read per evaluation, noted)."""
        if not self._needs_position or self._schedule is None or not isinstance(sigma, torch.Tensor):
            return None, None
        n = len(self._schedule) - 1
        if self._steps_done is not None or self._evaluations < 3:
            if n < 1:
                return None, None
            done = self._steps_done or 0
            offsets, first = self._report_offsets
            if self._steps_done is not None and done - 1 >= first and self._since_report < len(offsets):
                done += offsets[self._since_report]
            return min(max(done, 0), n - 1), n
        if not self._sigma_fallback:
            self._sigma_fallback = True
            self.note("this sampler reports no steps: the step window is placed by σ (one host read per "
                      "evaluation)")
        return step_of_sigma(float(sigma.detach().reshape(-1)[0]), self._schedule)

    def step_callback(self, callback: Any) -> Callable:
        """The sampler callback to pass on: records the step the sampler reports done (ComfyUI's
        ``KSAMPLER`` calls it after each step as ``callback(i, denoised, x, total_steps, …)``), then
        calls the node's own callback, if any."""
        def qsilk_step_callback(step, *args, **kwargs):
            if isinstance(step, int):
                self._steps_done = step + 1
                self._since_report = 0
            if callback is not None:
                return callback(step, *args, **kwargs)
            return None

        return qsilk_step_callback

    # -- per evaluation ---------------------------------------------------------------------------
    def post_cfg(self, args: Mapping[str, Any]) -> torch.Tensor:
        x0, sigma = args["denoised"], args.get("sigma")
        self.capture.take_map(args)
        probe_map = self.capture.map_for(sigma)
        if not isinstance(x0, torch.Tensor) or x0.dim() not in (4, 5):
            if not self._shape_noted:
                self._shape_noted = True
                self.note(f"{getattr(x0, 'dim', lambda: '?')()}-D latent: QSilk works on image (4-D) and video "
                          "(5-D) latents; passed through")
            return x0
        step, total = self._position_of(sigma)
        self._evaluations += 1
        self._since_report += 1
        return self.stabilizer.post_cfg(x0, step, total, probe_map, sigma=sigma, nmask=fitting_mask(self._mask, x0))

    def finish(self, samples: Any) -> Any:
        """The run's output: stabilised before decode when the run ends at σ = 0 (as its sigmas
        were before sampling)."""
        if not isinstance(samples, torch.Tensor) or samples.dim() not in (4, 5):
            return samples
        if self.settings.pre_decode != "off" and not self.ends_at_zero:
            self.note("the run ends with leftover noise (σ > 0): before-decode stabilisation left to the "
                      "run that finishes it")
            return samples
        try:
            return self.stabilizer.pre_decode(samples, nmask=fitting_mask(self._mask, samples))
        except Exception as exc:
            self.glue_error("stabilising before decode", exc)
            return samples

    def glue_error(self, where: str, exc: BaseException) -> None:
        self.glue_errors += 1
        if self.glue_errors == 1:
            log.exception("QSilk: error while %s on ComfyUI; QSilk passes through", where)
        self.note(f"error while {where}, passed through: {exc}")


def step_of_sigma(sigma: float, schedule: Sequence[float]) -> tuple[int | None, int | None]:
    """``(i, n)``: σ's evaluation index in a descending schedule of ``n + 1`` sigmas, where i is the
    last index (below n) whose σ is at least `sigma`; a second-order sampler's extra evaluation at
    the next σ counts as that step, one between two sigmas as the earlier. ``(None, None)`` for a
    schedule that is not descending or has no step.

    >>> step_of_sigma(14.6, [14.6, 7.0, 2.0, 0.0]), step_of_sigma(2.0, [14.6, 7.0, 2.0, 0.0])
    ((0, 3), (2, 3))
    >>> step_of_sigma(4.0, [14.6, 7.0, 2.0, 0.0])
    (1, 3)
    """
    n = len(schedule) - 1
    if n < 1 or any(a < b for a, b in zip(schedule, schedule[1:])):
        return None, None
    tol = 1e-5 * max(1.0, abs(sigma))
    i = sum(1 for s in schedule[:n] if s >= sigma - tol) - 1
    return min(max(i, 0), n - 1), n


# -- the closures ComfyUI calls --------------------------------------------------------------------
def _sampler_wrapper(state: _RunState) -> Callable:
    def qsilk_sampler_sample(executor, *args, **kwargs):
        run = None
        try:
            guider, sigmas = call_arg(args, kwargs, 0, "model_wrap"), call_arg(args, kwargs, 1, "sigmas")
            noise, mask = call_arg(args, kwargs, 4, "noise"), call_arg(args, kwargs, 6, "denoise_mask")
            run = ComfyRun(state.settings, getattr(executor, "class_obj", None), sigmas, mask)
            run.start_probe(guider, noise)
        except Exception:
            log.exception("QSilk: could not start on this sampler run; it runs without QSilk")
            if run is not None:
                run.release()
            return executor(*args, **kwargs)
        previous, state.run = state.run, run
        args, kwargs = with_call_arg(args, kwargs, 3, "callback", run.step_callback(call_arg(args, kwargs, 3, "callback")))
        try:
            samples = executor(*args, **kwargs)
        finally:
            state.run = previous
            run.release()
        out = run.finish(samples)
        try:
            state.last_report = common.present_report(run.stabilizer.report(), run.stabilizer, None, HOST,
                                                       echo=False)
        except Exception:
            log.exception("QSilk: writing the run's summary failed")
        return out

    qsilk_sampler_sample.qsilk_state = state
    return qsilk_sampler_sample


def _post_cfg_function(state: _RunState) -> Callable[[dict], torch.Tensor]:
    def qsilk_post_cfg(args):
        run, x0 = state.run, args["denoised"]
        if run is None:
            return x0
        try:
            return run.post_cfg(args)
        except Exception as exc:
            run.glue_error("stabilising an evaluation", exc)
            return x0

    return qsilk_post_cfg


# -- the LATENT stage --------------------------------------------------------------------------------
def stabilize_latent(latent: Mapping[str, Any], settings: Settings) -> Mapping[str, Any]:
    """The before-decode / before-upscale stage on a LATENT dict: every component the settings
    enable, applied once (`Stabilizer.pre_decode` with ``pre_decode="always"``: no earlier step to
    defer to; AQClip with Lite confidence, no EMA). Only where ``noise_mask`` is 1 when the dict has
    one. Returns a new dict with every other key kept, or `latent` itself when nothing applies; the
    input tensor is never changed.

    ComfyUI's LATENT holds the VAE's latent (``process_latent_out`` applied). QSilk is exactly
    equivariant to one scale and shift for all channels (SD1.x, SD2, SDXL, SD3, Flux), so this
    equals the stage in the model's space there; formats normalised per channel differ slightly."""
    settings = settings.replace(pre_decode="always")
    x = latent.get("samples") if isinstance(latent, Mapping) else None
    stabilizer = Stabilizer(settings)
    if not stabilizer.enabled or not isinstance(x, torch.Tensor):
        return latent
    if x.dim() not in (4, 5):
        log.warning("QSilk: %d-D latent: QSilk works on image (4-D) and video (5-D) latents; passed through", x.dim())
        return latent
    stabilizer.begin_pass()
    try:
        nmask = latent_mask(latent.get("noise_mask"), x)
    except Exception as exc:
        log.warning("QSilk: noise_mask %s does not fit the latent %s (%s); latent passed through",
                    tuple(getattr(latent.get("noise_mask"), "shape", ())), tuple(x.shape), exc)
        return latent
    out = stabilizer.pre_decode(x, nmask=nmask)
    common.present_report(stabilizer.report(), stabilizer, None, HOST, echo=False)
    result = dict(latent)
    result["samples"] = out
    return result


def latent_mask(mask: Any, latent: torch.Tensor) -> torch.Tensor | None:
    """A LATENT's ``noise_mask`` (1 = generated, any resolution, usually the image's) at the latent's
    size and batch, as ComfyUI's sampler resizes it (``comfy.utils.reshape_mask``): bilinear for
    ``(B, C, H, W)``, trilinear over frames for ``(B, C, T, H, W)``, batch repeated. None if none."""
    if not isinstance(mask, torch.Tensor):
        return None
    m = mask.to(device=latent.device, dtype=torch.float32)
    if latent.dim() == 4:
        m = F.interpolate(m.reshape(-1, 1, m.shape[-2], m.shape[-1]), size=tuple(latent.shape[-2:]), mode="bilinear")
    else:
        if m.dim() < 5:
            m = m.reshape(1, 1, -1, m.shape[-2], m.shape[-1])
        m = F.interpolate(m, size=tuple(latent.shape[-3:]), mode="trilinear")
    b = latent.shape[0]
    if m.shape[0] < b:
        m = m.repeat(-(-b // m.shape[0]), *([1] * (m.dim() - 1)))
    return m[:b]
