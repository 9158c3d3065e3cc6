"""Test double of SD.Next (vladmandic/sdnext master ``058a7f0c``, 2026-07-23) driving a REAL tiny
diffusers pipeline.

Written from ``shared/research/diffusers-sdnext.md`` and a reading of these files at that commit
(signatures, call order and behaviour; no SD.Next code copied):

- ``modules/scripts_manager.py`` (``modules/scripts.py`` re-exports it): ``Script`` with the hooks
  SD.Next keeps (no ``process_before_every_sampling``, no ``before_hr``), ``AlwaysVisible``,
  ``ScriptRunner`` whose hooks pass ``p.per_script_args.get(script.title(),
  p.script_args[args_from:args_to])`` and report and swallow every exception (``errors.display``).
- ``modules/script_callbacks.py``: ``callback_map`` without ``callbacks_extra_noise`` (so
  ``on_extra_noise`` raises ``KeyError``), ``ScriptCallback(script, callback)`` entries,
  ``add_callback(callbacks, fun)``, ``remove_callbacks_for_function``, dispatchers that report and
  swallow; ``cfg_denoiser``/``cfg_denoised``/``cfg_after_cfg`` exist and are never called.
- ``modules/processing.py``: ``process_images`` (``before_process`` hook, then ``try:
  process_images_inner`` ``finally: after_process_callback``), ``process_images_inner``
  (``process`` hook → ``p.init`` → per batch ``before_process_batch``/``process_batch``/
  ``process_images`` hooks → ``process_diffusers(p)`` looked up at call time → on interrupt the
  last preview or nothing → ``postprocess_batch``/``postprocess_batch_list`` → ``process_samples``
  (infotext, detailer) → ``postprocess`` only when not interrupted or skipped).
- ``modules/processing_diffusers.py``: ``process_diffusers`` → ``process_base`` (``update_sampler``
  → ``process_pre`` → ``set_pipeline_args`` → pipeline call; ``AssertionError`` logged,
  ``ValueError``/``RuntimeError`` logged and the job marked interrupted, others propagate) →
  ``process_hires`` (``p.is_hr_pass = True``, latent upscale when ``hr_resize_mode > 0``, second
  pass only for a latent upscaler or ``hr_force`` with strength > 0, the pipeline switched to
  img2img (``from_pipe``: same UNet and scheduler), ``update_sampler(second_pass=True)``,
  ``AssertionError``/``RuntimeError`` caught) → ``process_refine`` (``p.is_refiner_pass``, the
  refiner pipeline, a new scheduler) → ``process_decode`` (SD.Next decodes the latent itself).
- ``modules/processing_helpers.py`` ``update_sampler`` and ``modules/sd_samplers.py``
  ``create_sampler``: every pass gets a NEW scheduler object built from the model's default
  scheduler config and assigned to ``model.scheduler`` (``Default`` restores a deep copy of the
  default scheduler); ``modules/sd_samplers_diffusers.py``: the sampler names used here and the
  diffusers classes they make.
- ``modules/processing_args.py``: ``set_callbacks_p(p)``; only arguments in the pipeline's
  ``__call__`` signature are passed; ``callback_on_step_end=diffusers_callback``.
- ``modules/processing_callbacks.py``: ``diffusers_callback(pipe, step, timestep, kwargs)``: state
  step, interrupt → ``AssertionError('Interrupted...')``, then ``processing_correction
  .correction_callback`` (SD.Next's "Latent corrections", skipped for ``p.recursion``).
- ``modules/detailer/detailer.py``: for ``detailer_enabled``, a shallow ``copy(p)`` with
  ``recursion = True`` run through ``process_images_inner`` as img2img (after ``switch_class``).
- ``modules/api/script.py`` ``init_script_args`` (UI defaults, request args over them, and the
  request's args AS SENT in ``p.per_script_args[title]``), ``modules/api/generate.py``
  ``post_text2img``, ``modules/api/middleware.py`` (an exception → HTTP 500, or the exception's
  own ``status_code``, body ``{"error": type, "errors": str(e), …}``).
- ``modules/generation_parameters_copypaste.py`` paste: callable targets are called; a plain
  value goes through ``should_skip(key)`` (``key.lower()``); ``gr.update`` passes.
- ``scripts/xyz_grid.py`` (module name ``xyz_grid.py``) with ``scripts/xyz/xyz_grid_classes.py``'s
  ``AxisOption(label, tipe, apply, fmt, confirm, cost, choices)``; cells are ``copy(p)``.
- ``modules/ui_components.py`` ``InputAccordion`` without its JavaScript (`sdnext_ui`).

The model is a real ``StableDiffusionPipeline`` with tiny random components
(``tests/cli/tiny_checkpoint.py``) and SD1.5's default scheduler (PNDM, ``skip_prk_steps``).
"""
from __future__ import annotations

import collections
import copy
import enum
import inspect
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch

from . import module, put_modules, restore_modules
# SD.Next's modules/shared.py keeps A1111's Options / OptionInfo (the fork's settings store): one double
from .a1111 import OptionInfo, Options

_HERE = Path(__file__).resolve().parent
_sdnext: "SDNext | None" = None
LATENT_SCALE = 2  # the tiny VAE has two levels: latent = image / 2


def S() -> "SDNext":
    assert _sdnext is not None, "no SD.Next double installed"
    return _sdnext


# =============================================================================================
# the tiny pipelines (built once per process: ~0.1 s each)
# =============================================================================================
_PIPES: dict[int, Any] = {}


def tiny_pipeline(seed: int = 0):
    """A fresh ``StableDiffusionPipeline`` sharing cached random components of `seed`."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    if seed not in _PIPES:
        sys.path.insert(0, str(_HERE.parent / "cli"))
        try:
            from tiny_checkpoint import tiny_components, write_tokenizer
        finally:
            sys.path.remove(str(_HERE.parent / "cli"))
        parts = tiny_components(seed)
        tok_dir = Path(tempfile.mkdtemp(prefix="qsilk-sdnext-tok-"))
        write_tokenizer(tok_dir)
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(str(tok_dir))
        # SD1.5's scheduler_config.json
        parts["scheduler"] = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False,
                                           steps_offset=1)
        _PIPES[seed] = parts
    pipe = StableDiffusionPipeline(**_PIPES[seed], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# =============================================================================================
# modules.errors, modules.shared
# =============================================================================================
def display(e: BaseException, what: str) -> None:
    S().log["errors"].append((what, type(e).__name__, str(e)))


class State:
    """``modules.shared_state.State``: the fields the processing path reads (not A1111's ``State``:
    SD.Next's has ``paused``, ``job`` and a ``step()``, and no ``job_count``)."""

    def __init__(self):
        self.interrupted = self.skipped = self.paused = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.current_latent = None
        self.current_image = None
        self.interrupt_at: tuple[str, int] | None = None  # test hook: (job name, step)
        self.job = ""

    def step(self):
        self.sampling_step += 1

    def interrupt(self):
        self.interrupted = True


# =============================================================================================
# modules.script_callbacks
# =============================================================================================
ScriptCallback = collections.namedtuple("ScriptCallback", ["script", "callback"])
_CATEGORIES = ("app_started", "before_process", "after_process", "model_loaded", "ui_settings", "ui_tabs",
               "before_image_saved", "image_saved", "image_save_btn", "cfg_denoiser", "cfg_denoised",
               "cfg_after_cfg", "before_component", "after_component", "image_grid", "infotext_pasted",
               "script_unloaded", "before_ui", "after_ui", "on_reload")


def _make_script_callbacks() -> types.ModuleType:
    m = types.ModuleType("modules.script_callbacks")
    m.ScriptCallback = ScriptCallback
    m.callback_map = {f"callbacks_{c}": [] for c in _CATEGORIES}  # no callbacks_extra_noise

    def add_callback(callbacks, fun):
        filename = sys._getframe().f_back.f_back.f_code.co_filename
        callbacks.append(ScriptCallback(filename, fun))

    def remove_callbacks_for_function(callback_func):
        for callback_list in m.callback_map.values():
            for entry in [cb for cb in callback_list if cb.callback == callback_func]:
                callback_list.remove(entry)

    def dispatcher(category):
        def run(*args):
            for c in list(m.callback_map[f"callbacks_{category}"]):
                try:
                    c.callback(*args)
                except Exception as e:  # SD.Next: report_exception → errors.display
                    display(e, f"Executing callback: {c.script} {category}")
        return run

    def registrar(key):
        def on(callback):
            add_callback(m.callback_map[key], callback)
        return on

    for c in _CATEGORIES:
        setattr(m, f"on_{c}" if c != "on_reload" else "on_before_reload", registrar(f"callbacks_{c}"))
        setattr(m, f"{c}_callback", dispatcher(c))
    m.on_extra_noise = registrar("callbacks_extra_noise")  # KeyError, as on SD.Next
    m.add_callback = add_callback
    m.remove_callbacks_for_function = remove_callbacks_for_function
    return m


# =============================================================================================
# modules.scripts_manager
# =============================================================================================
AlwaysVisible = object()


# Apart from the A1111 double's Script / ScriptRunner on purpose: SD.Next's (058a7f0c) has no
# ``process_before_every_sampling`` nor ``before_hr``, builds ``elem_id`` as ``{tab}_script_{title}_{id}``,
# starts ``args_from``/``args_to`` at 0, and its runner reads a script's args from ``p.per_script_args``
# first; each double has the hooks its host's processing path calls.
class Script:
    name = None
    filename = None
    args_from = args_to = 0
    alwayson = False
    is_txt2img = is_img2img = False
    infotext_fields = None
    paste_field_names = None
    parent = None

    def title(self):
        raise NotImplementedError

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def elem_id(self, item_id):
        title = self.title().lower().replace(" ", "_")
        return f"{'img2img' if self.is_img2img else 'txt2img'}_script_{title}_{item_id}"

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def process_images(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    """The hooks SD.Next calls, each with ``p.per_script_args.get(title, p.script_args[a:b])``."""

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.alwayson_scripts = [s for s in self.scripts if s.alwayson]

    def _each(self, name, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            try:
                if script.args_to > 0 and script.args_to >= script.args_from:
                    sargs = p.per_script_args.get(script.title(), p.script_args[script.args_from:script.args_to])
                    getattr(script, name)(p, *args, *sargs, **kwargs)
            except Exception as e:
                display(e, f"Running script {name}: {script.filename}")

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def process_images(self, p):
        self._each("process_images", p)
        return None

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._each("postprocess_batch", p, images, **kwargs)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)


# =============================================================================================
# modules.sd_models, modules.sd_samplers, modules.processing_helpers
# =============================================================================================
class DiffusersTaskType(enum.Enum):
    TEXT_2_IMAGE = 1
    IMAGE_2_IMAGE = 2


def get_diffusers_task(pipe):
    return DiffusersTaskType.IMAGE_2_IMAGE if "Img2Img" in type(pipe).__name__ else DiffusersTaskType.TEXT_2_IMAGE


def set_diffuser_pipe(pipe, new_type):
    """A pipeline of the task's class made ``from_pipe`` (components shared, scheduler included),
    carrying SD.Next's own attributes over."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    if get_diffusers_task(pipe) == new_type:
        return pipe
    cls = StableDiffusionImg2ImgPipeline if new_type == DiffusersTaskType.IMAGE_2_IMAGE else StableDiffusionPipeline
    new = cls.from_pipe(pipe)
    new.set_progress_bar_config(disable=True)
    for attr in ("sd_checkpoint_info", "default_scheduler"):
        if hasattr(pipe, attr):
            setattr(new, attr, getattr(pipe, attr))
    S().log["pipe_switches"].append(cls.__name__)
    return new


#: ``sd_samplers_diffusers.samplers_data_diffusers`` entries used here: name → (class, config changes).
#: (LMSD is left out: diffusers needs scipy for it, which the project venv does not have.)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "KDPM2": ("KDPM2DiscreteScheduler", {}),
}


def create_sampler(name, model, scheduler_overrides=None):
    import diffusers

    if name is None or name == "None":
        return model.scheduler
    if getattr(model, "default_scheduler", None) is None:
        model.default_scheduler = copy.deepcopy(model.scheduler)
    if name == "Default":
        model.scheduler = copy.deepcopy(model.default_scheduler)
        S().log["schedulers"].append(type(model.scheduler).__name__)
        return model.scheduler
    cls_name, changes = SAMPLERS[name]
    cls = getattr(diffusers, cls_name)
    config = {k: v for k, v in model.default_scheduler.config.items() if not k.startswith("_")}
    config.update(changes)
    model.scheduler = cls.from_config(config)
    S().log["schedulers"].append(type(model.scheduler).__name__)
    return model.scheduler


def update_sampler(p, sd_model, second_pass=False):
    selection = p.hr_sampler_name if second_pass else p.sampler_name
    if hasattr(sd_model, "scheduler"):
        if selection == "None":
            return
        create_sampler(selection if selection in SAMPLERS or selection == "Default" else "Default", sd_model)


def is_refiner_enabled(p):
    return p.enable_hr and p.refiner_steps > 0 and 0 < p.refiner_start < 1 and S().shared.sd_refiner is not None


# =============================================================================================
# modules.processing_callbacks, modules.processing_correction, modules.processing_args
# =============================================================================================
def _make_callbacks_module() -> types.ModuleType:
    m = types.ModuleType("modules.processing_callbacks")
    m.p = None

    def set_callbacks_p(processing):
        m.p = processing

    def diffusers_callback(pipe, step: int = 0, timestep: int = 0, kwargs: dict | None = None):
        kwargs = kwargs or {}
        state = S().shared.state
        state.step()
        if state.interrupt_at is not None and state.interrupt_at == (state.job, step):
            state.interrupted = True  # the user pressed Stop during this step
        if state.interrupted or state.skipped:
            raise AssertionError("Interrupted...")
        if m.p is None or kwargs.get("latents") is None:
            return kwargs
        if step != getattr(pipe, "num_timesteps", 0):
            kwargs = S().processing_correction.correction_callback(m.p, timestep, kwargs, pipe=pipe,
                                                                   initial=step == 0, step=step)
        return kwargs

    m.set_callbacks_p = set_callbacks_p
    m.diffusers_callback = diffusers_callback
    return m


def correction_callback(p, timestep, kwargs, pipe=None, initial=False, step=0):
    """SD.Next's "Latent corrections" (off by default; skipped for detailer passes): here a
    recorded brightness shift of the latents when ``opts.latent_correction`` is set."""
    if getattr(p, "recursion", False):
        return kwargs
    shift = S().shared.opts.data.get("latent_correction", 0.0)
    if shift:
        kwargs["latents"] = kwargs["latents"] + shift
        S().log["corrections"].append(step)
    return kwargs


def set_pipeline_args(p, model, prompts, negative_prompts, desc="", **kwargs):
    """Only what the pipeline's ``__call__`` accepts; SD.Next's callback; a seeded generator."""
    possible = set(inspect.signature(type(model).__call__).parameters)
    S().processing_callbacks.set_callbacks_p(p)
    args = {"prompt": list(prompts), "negative_prompt": list(negative_prompts)}
    for k, v in kwargs.items():
        if k in possible and v is not None:
            args[k] = v
    args["generator"] = [torch.Generator("cpu").manual_seed(int(s)) for s in p.seeds]
    args["callback_on_step_end"] = S().processing_callbacks.diffusers_callback
    args["callback_on_step_end_tensor_inputs"] = ["latents"]
    return args


# =============================================================================================
# modules.processing_diffusers
# =============================================================================================
def _call(model, args, job):
    state = S().shared.state
    state.job = job
    S().log["passes"].append((job, type(model).__name__, type(model.scheduler).__name__))
    S().log["hooks_at_call"].append(S().hooks())
    return model(**args)


def process_base(p):
    shared = S().shared
    update_sampler(p, shared.sd_model)
    args = set_pipeline_args(p, shared.sd_model, p.prompts, p.negative_prompts, num_inference_steps=p.steps,
                             guidance_scale=p.cfg_scale, height=p.height, width=p.width, output_type="latent",
                             image=[_latent(i) for i in p.init_images] if p.init_images else None,
                             strength=p.denoising_strength if p.init_images else None, desc="Base")
    if p.init_images:
        args["image"] = torch.cat(args["image"])
    return _guarded_pass(shared.sd_model, args, "Base", (ValueError, RuntimeError), None)


def _guarded_pass(model, args: dict, desc: str, interrupting: tuple, failed):
    """One pipeline pass guarded as ``process_base`` / ``process_hires`` guard theirs: ``AssertionError``
    (the interrupt) logged; the `interrupting` errors (base: ``ValueError``, ``RuntimeError``; hires:
    ``RuntimeError``) shown and the job marked interrupted; any other propagates. After an error:
    `failed` (base: ``None``; hires: the base output)."""
    try:
        return _call(model, args, desc)
    except AssertionError as e:
        S().log["info"].append(str(e))
    except interrupting as e:
        S().shared.state.interrupted = True
        display(e, "Processing")
    return failed


def _latent(image) -> torch.Tensor:
    """An init "image" of this double is a latent tensor ``(1, 4, h, w)`` (no VAE encode)."""
    return image


def process_hires(p, output):
    shared = S().shared
    if output is None or getattr(output, "images", None) is None or not p.enable_hr:
        return output
    p.is_hr_pass = True
    p.init_hr(p.hr_scale, p.hr_upscaler, force=p.hr_force)
    if p.hr_resize_mode > 0 and p.hr_upscaler != "None":
        p.ops.append("upscale")
        output.images = torch.nn.functional.interpolate(output.images, scale_factor=p.hr_scale, mode="bilinear")
    strength = p.hr_denoising_strength if p.hr_denoising_strength > 0 else p.denoising_strength
    if p.hr_upscaler is not None and (p.hr_upscaler.lower().startswith("latent") or p.hr_force) and strength > 0:
        p.ops.append("hires")
        p.hr_force = True
    if p.hr_force:
        shared.sd_model = set_diffuser_pipe(shared.sd_model, DiffusersTaskType.IMAGE_2_IMAGE)
        update_sampler(p, shared.sd_model, second_pass=True)
        steps = max(1, int((p.hr_second_pass_steps or p.steps) // strength) + 1)
        args = set_pipeline_args(p, shared.sd_model, p.prompts, p.negative_prompts, num_inference_steps=steps,
                                 guidance_scale=p.cfg_scale, output_type="latent", image=output.images,
                                 strength=strength, desc="Hires")
        output = _guarded_pass(shared.sd_model, args, "Hires", (RuntimeError,), output)
    p.is_hr_pass = False
    return output


def process_refine(p, output):
    shared = S().shared
    if output is None or getattr(output, "images", None) is None or not is_refiner_enabled(p):
        return output
    p.is_refiner_pass = True
    shared.sd_refiner = set_diffuser_pipe(shared.sd_refiner, DiffusersTaskType.IMAGE_2_IMAGE)
    images = []
    for i in range(len(output.images)):
        update_sampler(p, shared.sd_refiner, second_pass=True)
        args = set_pipeline_args(p, shared.sd_refiner, [p.prompts[i]], [p.negative_prompts[i]],
                                 num_inference_steps=p.refiner_steps, guidance_scale=p.cfg_scale,
                                 image=output.images[i:i + 1], output_type="latent", desc="Refiner")
        args["generator"] = args["generator"][i:i + 1]
        try:
            images.append(_call(shared.sd_refiner, args, "Refiner").images)
        except AssertionError as e:
            S().log["info"].append(str(e))
        except RuntimeError as e:
            shared.state.interrupted = True
            display(e, "Processing")
    p.is_refiner_pass = False
    if images:
        output.images = torch.cat(images)
    return output


def process_decode(p, output):
    """SD.Next decodes the final latent itself (``processing_vae.vae_decode``) into PIL images; the
    latent it decoded is kept in ``log["decoded"]`` for exact comparisons."""
    if output is None or getattr(output, "images", None) is None:
        return []
    model = S().shared.sd_refiner if is_refiner_enabled(p) else S().shared.sd_model
    latents = output.images
    S().log["decoded"].append(latents.clone())
    with torch.no_grad():
        pixels = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    return model.image_processor.postprocess(pixels, output_type="pil")


def process_diffusers(p):
    shared = S().shared
    orig_pipeline = shared.sd_model
    if shared.state.interrupted or shared.state.skipped:
        return []
    output = process_base(p)
    if shared.state.interrupted or shared.state.skipped:
        shared.sd_model = orig_pipeline
        return []
    output = process_hires(p, output)
    if shared.state.interrupted or shared.state.skipped:
        shared.sd_model = orig_pipeline
        return []
    output = process_refine(p, output)
    if shared.state.interrupted or shared.state.skipped:
        shared.sd_model = orig_pipeline
        return []
    results = process_decode(p, output)
    shared.sd_model = orig_pipeline
    return results


# =============================================================================================
# modules.processing (+ processing_class, processing_info, detailer)
# =============================================================================================
class StableDiffusionProcessing:
    def __init__(self, prompt="a dog", negative_prompt="", seed=1, steps=4, cfg_scale=6.0, width=16, height=16,
                 batch_size=1, n_iter=1, sampler_name="Default", hr_sampler_name="Default", enable_hr=False,
                 hr_scale=2.0, hr_upscaler="None", hr_resize_mode=0, hr_force=False, hr_denoising_strength=0.0,
                 hr_second_pass_steps=0, denoising_strength=0.5, refiner_steps=0, refiner_start=0.0,
                 init_images=None, detailer_enabled=False, scripts=None, script_args=None, **kwargs):
        self.prompt, self.negative_prompt, self.seed, self.steps = prompt, negative_prompt, seed, steps
        self.cfg_scale, self.width, self.height = cfg_scale, width, height
        self.batch_size, self.n_iter = batch_size, n_iter
        self.sampler_name, self.hr_sampler_name = sampler_name, hr_sampler_name
        self.enable_hr, self.hr_scale, self.hr_upscaler = enable_hr, hr_scale, hr_upscaler
        self.hr_resize_mode, self.hr_force, self.hr_denoising_strength = hr_resize_mode, hr_force, hr_denoising_strength
        self.hr_second_pass_steps, self.denoising_strength = hr_second_pass_steps, denoising_strength
        self.refiner_steps, self.refiner_start = refiner_steps, refiner_start
        self.init_images = init_images or []
        self.detailer_enabled = detailer_enabled
        self.extra_generation_params: dict[str, Any] = {}
        self.comments: dict[str, int] = {}
        self.ops: list[str] = []
        self.per_script_args: dict[str, Any] = {}
        self.is_hr_pass = False
        self.is_refiner_pass = False
        self.xyz = False
        self.scripts = scripts
        self.script_args = script_args or []
        for k, v in kwargs.items():
            setattr(self, k, v)

    @property
    def sd_model(self):
        return S().shared.sd_model

    def comment(self, text):
        self.comments[text] = 1

    def init(self):
        shared = S().shared
        shared.sd_model = set_diffuser_pipe(shared.sd_model, DiffusersTaskType.TEXT_2_IMAGE)

    def init_hr(self, scale=None, upscaler=None, force=False):
        self.hr_upscale_to_x = int(self.width * (scale or self.hr_scale))
        self.hr_upscale_to_y = int(self.height * (scale or self.hr_scale))


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def init(self):
        shared = S().shared
        if self.init_images:
            shared.sd_model = set_diffuser_pipe(shared.sd_model, DiffusersTaskType.IMAGE_2_IMAGE)


class Processed:
    def __init__(self, p, images, infotexts):
        self.images = images
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.comments = ""
        self.seed = p.seed


def create_infotext(p) -> str:
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "Seed": p.seed, "CFG scale": p.cfg_scale,
              "Size": f"{p.width}x{p.height}", **p.extra_generation_params}
    line = ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)
    return f"{p.prompt}\nNegative prompt: {p.negative_prompt}\n{line}"


def detailer_restore(sample, p):
    """``detailer.restore``: one detail pass per image as img2img on a shallow copy with recursion set."""
    if S().shared.state.interrupted or hasattr(p, "recursion"):
        return sample
    pc = copy.copy(p)
    pc.__class__ = StableDiffusionProcessingImg2Img
    pc.ops = list(p.ops) + ["detailer"]
    pc.init_images = [S().log["decoded"][-1][:1]]  # the double's img2img takes the latent (no VAE encode)
    pc.enable_hr = False
    pc.detailer_enabled = False
    pc.keep_prompts = True
    pc.recursion = True
    S().log["detailer_passes"].append(1)
    pp = process_images_inner(pc)
    del pc.recursion
    return pp.images[0] if pp is not None and pp.images else sample


def process_samples(p, samples):
    images, infotexts = [], []
    for sample in samples:
        if p.detailer_enabled and not S().shared.state.interrupted:
            p.ops.append("detailer")
            sample = detailer_restore(sample, p)
        images.append(sample)
        infotexts.append(create_infotext(p))
    return images, infotexts


def process_images(p):
    shared = S().shared
    if p.scripts is not None:
        p.scripts.before_process(p)
    try:
        S().script_callbacks.before_process_callback(p)
        results = process_images_inner(p)
    finally:
        S().script_callbacks.after_process_callback(p)
    return results


def process_images_inner(p):
    shared = S().shared
    if p.scripts is not None:
        p.scripts.process(p)
    output_images, infotexts = [], []
    if not hasattr(p, "keep_prompts"):
        p.all_prompts = [p.prompt] * (p.batch_size * p.n_iter)
        p.all_negative_prompts = [p.negative_prompt] * (p.batch_size * p.n_iter)
    p.all_seeds = [p.seed + i for i in range(p.batch_size * p.n_iter)]
    p.init()
    for n in range(p.n_iter):
        p.iteration = n
        if shared.state.interrupted:
            break
        if not hasattr(p, "keep_prompts"):
            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        else:
            p.prompts, p.negative_prompts = [p.prompt], [p.negative_prompt]
        p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
        if p.scripts is not None:
            p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds)
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds)
            p.scripts.process_images(p)
        samples = sys.modules["modules.processing_diffusers"].process_diffusers(p)  # looked up per batch
        if shared.state.interrupted:
            samples = []
        if p.scripts is not None:
            p.scripts.postprocess_batch(p, samples, batch_number=n)
        batch_images, batch_infotexts = process_samples(p, samples)
        output_images += batch_images
        infotexts += batch_infotexts
        if shared.state.interrupted:
            break
    results = Processed(p, output_images, infotexts)
    if p.scripts is not None and not (shared.state.interrupted or shared.state.skipped):
        p.scripts.postprocess(p, results)
    return results


# =============================================================================================
# XYZ (scripts/xyz_grid.py + scripts/xyz/xyz_grid_classes.py), paste, API
# =============================================================================================
# Apart from the A1111 double's: SD.Next's AxisOption has no ``prepare``, its script class is
# ``XYZGridScript``, and its cells carry ``pc.xyz = True``.
class AxisOption:
    def __init__(self, label, tipe, apply, fmt=None, confirm=None, cost=0.0, choices=None):
        self.label, self.type, self.apply, self.format_value = label, tipe, apply, fmt
        self.confirm, self.cost, self.choices = confirm, cost, choices


def _make_xyz_module() -> types.ModuleType:
    mod = types.ModuleType("xyz_grid.py")
    mod.AxisOption = AxisOption
    mod.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None),
                        AxisOption("[Param] Seed", int, lambda p, x, xs: setattr(p, "seed", x))]

    class XYZGridScript(Script):
        def title(self):
            return "XYZ Grid Script"

    XYZGridScript.__module__ = "xyz_grid.py"
    mod.XYZGridScript = XYZGridScript
    return mod


def run_xyz_cells(p, option_label: str, values: list) -> list:
    """``XYZGridScript.run``: confirm all values, then per cell ``pc = copy(p)``, apply, process."""
    option = next(o for o in S().xyz_module.axis_options if o.label == option_label)
    xs = [option.type(v) for v in values]
    if option.confirm:
        option.confirm(p, xs)
    results = []
    for x in xs:
        pc = copy.copy(p)
        pc.xyz = True
        option.apply(pc, x, xs)
        results.append(process_images(pc))
    return results


def should_skip(key: str) -> bool:
    skip = [s.strip().lower() for s in S().shared.opts.data.get("disable_apply_params", "").split(",") if s.strip()]
    return key.lower() in skip


def paste(fields, params: dict) -> list:
    """``generation_parameters_copypaste`` connect_paste: per ``(component, key)``: a callable key is
    called; None leaves the control; ``gr.update`` passes; a plain value goes through
    ``should_skip(key)`` (``key.lower()``) and is cast to the control's value type."""
    import gradio as gr
    update_type = type(gr.update())
    out = []
    for component, key in fields:
        v = key(params) if callable(key) else params.get(key)
        if v is None or isinstance(v, update_type):
            out.append(v)
            continue
        if should_skip(key):
            out.append(None)
            continue
        valtype = type(component.value)
        if getattr(component, "step", None) is not None and type(component.step) == float:
            valtype = float
        out.append((str(v).lower() != "false") if valtype == bool else valtype(v))
    return out


class HTTPResult:
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body


# =============================================================================================
# the SD.Next object
# =============================================================================================
class SDNext:
    """A fresh double of SD.Next's global state; `install()` puts its modules in ``sys.modules``."""

    def __init__(self, *, refiner: bool = False):
        self.log: dict[str, list] = collections.defaultdict(list)
        self.opts = Options(scheduler_eta=None)
        self.state = State()
        self.script_callbacks = _make_script_callbacks()
        self.xyz_module = _make_xyz_module()
        self._saved: dict[str, Any] = {}
        model = tiny_pipeline(0)
        _set_defaults(model, "tiny")
        refiner_model = None
        if refiner:
            refiner_model = tiny_pipeline(1)
            _set_defaults(refiner_model, "tiny-refiner")
        self._build(model, refiner_model)

    def _build(self, model, refiner_model):
        self.shared = module("modules.shared", opts=self.opts, state=self.state, sd_model=model,
                             sd_refiner=refiner_model, OptionInfo=OptionInfo,
                             cmd_opts=types.SimpleNamespace(lowvram=False, medvram=False))
        scripts_manager = module("modules.scripts_manager", Script=Script, AlwaysVisible=AlwaysVisible,
                                 ScriptRunner=ScriptRunner, scripts_data=[
                                     types.SimpleNamespace(script_class=self.xyz_module.XYZGridScript,
                                                           path="scripts/xyz_grid.py", module=self.xyz_module)])
        scripts = module("modules.scripts", **{k: v for k, v in vars(scripts_manager).items()
                                               if not k.startswith("__")}, scripts_manager=scripts_manager)
        self.processing_callbacks = _make_callbacks_module()
        self.processing_correction = module("modules.processing_correction", correction_callback=correction_callback)
        self.modules = {
            "modules": module("modules", __path__=[]),
            "modules.shared": self.shared,
            "modules.errors": module("modules.errors", display=display),
            "modules.script_callbacks": self.script_callbacks,
            "modules.scripts_manager": scripts_manager,
            "modules.scripts": scripts,
            "modules.sd_models": module("modules.sd_models", set_diffuser_pipe=set_diffuser_pipe,
                                        DiffusersTaskType=DiffusersTaskType, get_diffusers_task=get_diffusers_task),
            "modules.sd_samplers": module("modules.sd_samplers", create_sampler=create_sampler),
            "modules.sd_samplers_diffusers": module("modules.sd_samplers_diffusers"),
            "modules.processing_helpers": module("modules.processing_helpers", update_sampler=update_sampler,
                                                 is_refiner_enabled=is_refiner_enabled),
            "modules.processing_callbacks": self.processing_callbacks,
            "modules.processing_correction": self.processing_correction,
            "modules.processing_args": module("modules.processing_args", set_pipeline_args=set_pipeline_args),
            "modules.processing_diffusers": module("modules.processing_diffusers", process_diffusers=process_diffusers,
                                                   process_base=process_base, process_hires=process_hires,
                                                   process_refine=process_refine),
            "modules.processing": module("modules.processing", process_images=process_images,
                                         process_images_inner=process_images_inner, Processed=Processed,
                                         StableDiffusionProcessingTxt2Img=StableDiffusionProcessingTxt2Img,
                                         StableDiffusionProcessingImg2Img=StableDiffusionProcessingImg2Img),
            "modules.paths": module("modules.paths", models_path=str(_HERE / "_models")),
            "modules.ui_components": module("modules.ui_components", InputAccordion=_input_accordion_class()),
        }
        for name in ("shared", "script_callbacks", "scripts", "scripts_manager", "sd_models", "sd_samplers",
                     "processing", "paths", "processing_callbacks", "processing_diffusers"):
            setattr(self.modules["modules"], name, self.modules[f"modules.{name}"])

    def install(self) -> "SDNext":
        global _sdnext
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        put_modules(self.modules, self._saved)
        _sdnext = self
        return self

    def uninstall(self) -> None:
        global _sdnext
        restore_modules(self._saved)
        torch.set_num_threads(getattr(self, "_threads", torch.get_num_threads()))
        if _sdnext is self:
            _sdnext = None

    # helpers for tests -------------------------------------------------------------------
    def hooks(self) -> int:
        """Forward (pre-)hooks on every module of the base and refiner models."""
        models = [self.shared.sd_model, self.shared.sd_refiner]
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for pipe in models if pipe is not None
                   for comp in pipe.components.values() if isinstance(comp, torch.nn.Module)
                   for m in comp.modules())

    def callbacks(self, category: str) -> list:
        return [e.callback for e in self.script_callbacks.callback_map[f"callbacks_{category}"]]


def _set_defaults(model, name: str) -> None:
    """``sd_models.set_defaults`` at model load: checkpoint info and ``default_scheduler``, a deep
    copy of the scheduler the model came with."""
    model.sd_checkpoint_info = types.SimpleNamespace(name=name, title=name)
    model.default_scheduler = copy.deepcopy(model.scheduler)


def _input_accordion_class():
    try:
        from .sdnext_ui import InputAccordion
    except ImportError:  # pragma: no cover
        return None
    return InputAccordion


class Harness:
    """Drives the real ``scripts/qsilk.py`` through this double as SD.Next's UI and API do: loads
    the script, builds its UI (``init_default_script_args``: the API's defaults), and runs jobs."""

    def __init__(self, root: str, sdnext: SDNext, *, is_img2img: bool = False):
        import gradio as gr

        from . import load_script
        self.sdnext = sdnext
        self.module = load_script(root)
        self.script = self.module.QSilkScript()
        self.script.is_img2img, self.script.is_txt2img = is_img2img, not is_img2img
        self.script.alwayson = self.script.show(is_img2img) is AlwaysVisible
        with gr.Blocks():
            self.components = self.script.ui(is_img2img)
        self.script.args_from, self.script.args_to = 1, 1 + len(self.components)
        self.defaults = [c.value for c in self.components]
        self.runner = ScriptRunner([self.script])

    def ui_txt2img(self, values: list | None = None, **kwargs) -> Processed:
        """A UI request: every control's value positionally (``values`` replace the first ones)."""
        args = list(self.defaults)
        for i, v in enumerate(values or []):
            args[i] = v
        p = StableDiffusionProcessingTxt2Img(scripts=self.runner, script_args=[0] + args, **kwargs)
        self.last_p = p
        return process_images(p)

    def api_img2img(self, alwayson_scripts: dict | None = None, **kwargs) -> HTTPResult:
        """``POST /sdapi/v1/img2img`` (the double's init images are latents ``(1, 4, h, w)``)."""
        return self.api_txt2img(alwayson_scripts, _cls=StableDiffusionProcessingImg2Img, **kwargs)

    def api_txt2img(self, alwayson_scripts: dict | None = None, _cls=None, **kwargs) -> HTTPResult:
        """``POST /sdapi/v1/txt2img``: defaults + request args in ``script_args``, the request's args
        as sent in ``p.per_script_args``; an exception becomes the middleware's JSON error."""
        p = (_cls or StableDiffusionProcessingTxt2Img)(scripts=self.runner, **kwargs)
        script_args = [0] + list(self.defaults)
        for name, obj in (alwayson_scripts or {}).items():
            if name.lower() != self.script.title().lower():
                return HTTPResult(422, {"detail": f"Always on script not found: {name}"})
            if "args" in obj:
                for i in range(min(len(self.defaults), len(obj["args"]))):
                    script_args[1 + i] = obj["args"][i]
                p.per_script_args[self.script.title()] = obj["args"]
        p.script_args = tuple(script_args)
        self.last_p = p
        try:
            processed = process_images(p)
        except Exception as e:  # modules/api/middleware.py handle_exception
            return HTTPResult(vars(e).get("status_code", 500), {"error": type(e).__name__, "errors": str(e),
                                                                 "detail": vars(e).get("detail", "")})
        return HTTPResult(200, {"images": processed.images, "info": processed.info})

    def without_script(self, **kwargs) -> Processed:
        p = StableDiffusionProcessingTxt2Img(scripts=None, **kwargs)
        self.last_p = p
        return process_images(p)
