"""Test double of ComfyUI's model patcher, wrappers, CFG guider, sampling function and KSampler.

Written from a reading of Comfy-Org/ComfyUI ``a125cd84`` (v0.3.64, 2025-10-12); no ComfyUI code is
copied. It mirrors the signatures, data flow and call order QSilk relies on:

- ``comfy/model_patcher.py`` `ModelPatcher`: ``model_options = {"transformer_options": {}}``;
  ``clone()`` deep-copies ``model_options``, copies each wrapper list and shares ``model``;
  ``set_model_sampler_post_cfg_function`` appends to a new list; ``set_model_patch`` appends to
  ``transformer_options["patches"][name]``; ``set_model_patch_replace`` copies the nested dicts and
  stores one function per ``(block, number[, transformer_index])``; ``add_wrapper_with_key`` /
  ``remove_wrappers_with_key`` / ``get_wrappers`` on ``self.wrappers[type][key]``.
- ``comfy/patcher_extension.py``: `WrappersMP` names, `WrapperExecutor` (a wrapper gets the
  executor first and calls it to go on; ``class_obj`` is the object whose method is wrapped),
  ``get_all_wrappers(type, model_options, is_model_options=True)`` reads
  ``transformer_options["wrappers"]``, ``copy_nested_dicts`` / ``merge_nested_dicts``.
- ``comfy/sampler_helpers.py``: ``prepare_model_patcher`` merges the patcher's wrappers into the
  guider's options; ``prepare_mask`` = ``comfy/utils.py`` ``reshape_mask`` (bilinear to the latent
  size, channels and batch repeated).
- ``comfy/samplers.py``: `calc_cond_batch` (chunks of B rows, newest first, several per call; a fresh
  ``transformer_options`` per call with ``cond_or_uncond``, ``uuids`` and ``sigmas`` = the
  evaluation's timestep tensor itself; a None cond list leaves zeros), `cfg_function` (post-CFG
  args ``denoised, cond, uncond, cond_scale, model, uncond_denoised, cond_denoised, sigma,
  model_options, input``), `sampling_function` (CFG 1: ``uncond`` None, ``uncond_denoised`` zeros),
  `KSamplerX0Inpaint` (``denoise_mask``: outside it the output is the input latent), `KSAMPLER.sample`,
  `CFGGuider` (``sample`` → OUTER_SAMPLE wrappers → ``outer_sample`` (mask prepared) →
  ``inner_sample``: ``process_latent_in``, ``transformer_options["sample_sigmas"]``, SAMPLER_SAMPLE
  wrappers around ``sampler.sample``, ``process_latent_out``).
- ``comfy/samplers.py`` ``KSAMPLER_NAMES`` / ``SAMPLER_NAMES`` / ``sampler_object`` and
  ``comfy/extra_samplers/uni_pc.py`` ``sample_unipc``: every listed sampler, mirroring what it does
  to the sigmas tensor it is given (uni_pc and uni_pc_bh2 set a final 0 to 0.001 in place).
- ``execution.py`` ``validate_inputs``: queue-time checks of widget values and ``VALIDATE_INPUTS``.
- ``comfy/ldm/modules/attention.py`` `BasicTransformerBlock` and ``openaimodel.py``: the same
  ``attn1_patch`` / ``patches_replace["attn1"]`` / ``to_q`` / ``to_k`` contract and ``block`` /
  ``block_index`` / ``original_shape`` keys as Forge's backend (a ComfyUI port), so the UNet,
  Flux-like and video models of `forge_backend` are reused; ComfyUI's ``BaseModel`` names its
  helper ``model_sampling`` (old Forge's `KModel` family).

Simplified: conds are ``{"c_crossattn": (B, T, D)}`` dicts (no areas, hooks or ControlNet); the
batch size per UNet call is ``model.max_chunks_per_call`` chunks (ComfyUI: free memory).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from . import forge_backend as fb
from .k_diffusion import sample_dpm_2, sample_euler, sample_heun


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    SAMPLER_SAMPLE = "sampler_sample"
    PREDICT_NOISE = "predict_noise"


def copy_nested_dicts(d):
    out = dict(d)
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = copy_nested_dicts(v)
        elif isinstance(v, list):
            out[k] = list(v)
    return out


def merge_nested_dicts(into, other, copy_dict1=True):
    merged = copy_nested_dicts(into) if copy_dict1 else into
    for k, v in other.items():
        if isinstance(v, dict):
            merged[k] = merge_nested_dicts(v, merged.setdefault(k, {}))
        elif isinstance(v, list):
            merged.setdefault(k, []).extend(v)
        else:
            merged[k] = v
    return merged


def get_all_wrappers(wrapper_type, model_options):
    found = []
    for fns in model_options.get("transformer_options", {}).get("wrappers", {}).get(wrapper_type, {}).values():
        found.extend(fns)
    return found


class WrapperExecutor:
    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# ModelPatcher
# --------------------------------------------------------------------------------------------
class ModelPatcher(fb.UnetPatcher):
    """The patch-setting methods are Forge's (Forge's patcher is a ComfyUI port); ComfyUI's
    adds the wrappers (and attachments), which ``clone()`` copies list by list."""

    def __init__(self, model):
        super().__init__(model)
        self.wrappers = {}
        self.attachments = {}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: list(fns) for k, fns in keyed.items()} for t, keyed in self.wrappers.items()}
        n.attachments = dict(self.attachments)
        self.clones += 1
        return n

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])


class BaseModel(fb.KModel):
    """``comfy/model_base.py`` `BaseModel`: ``model_sampling``, ``diffusion_model``, ``apply_model`` (x0),
    ``process_latent_in`` / ``out`` (the latent format's scale)."""

    def __init__(self, diffusion_model, prediction, latent_scale=1.0):
        super().__init__(diffusion_model, prediction, family=fb.FORGE_OLD)
        self.latent_scale = latent_scale

    def process_latent_in(self, latent):
        return latent * self.latent_scale

    def process_latent_out(self, latent):
        return latent / self.latent_scale


def sd15_like(**kwargs) -> ModelPatcher:
    """A MODEL with an SD1.x-like UNet (the probe lands on latent/1), ε-prediction."""
    return ModelPatcher(BaseModel(fb.TinyUNet(**kwargs), fb.Prediction("epsilon")))


def sdxl_like(**kwargs) -> ModelPatcher:
    return ModelPatcher(BaseModel(fb.TinyUNet(attention_levels=(1,), depth=2, **kwargs), fb.Prediction("epsilon")))


def flux_like() -> ModelPatcher:
    return ModelPatcher(BaseModel(fb.TinyFlux(), fb.Prediction("const")))


def video_like() -> ModelPatcher:
    return ModelPatcher(BaseModel(fb.TinyVideoDiT(), fb.Prediction("const")))


# --------------------------------------------------------------------------------------------
# samplers.py
# --------------------------------------------------------------------------------------------
def calc_cond_batch(model, conds, x_in, timestep, model_options):
    out = [torch.zeros_like(x_in) for _ in conds]
    counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = [(c, i) for i, cond in enumerate(conds) if cond is not None for c in cond]
    while to_run:
        first = to_run[0][0]["c_crossattn"].shape
        fits = [j for j, (c, _) in enumerate(to_run) if c["c_crossattn"].shape == first]
        fits.reverse()
        picked = [to_run.pop(j) for j in fits[: max(1, model.max_chunks_per_call)]]
        cond_or_uncond = [i for _, i in picked]
        input_x = torch.cat([x_in] * len(picked))
        context = torch.cat([c["c_crossattn"] for c, _ in picked])
        transformer_options = copy_nested_dicts(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["uuids"] = [id(c) for c, _ in picked]
        transformer_options["sigmas"] = timestep
        timestep_ = torch.cat([timestep] * len(picked))
        output = model.apply_model(input_x, timestep_, c_crossattn=context,
                                   transformer_options=transformer_options).chunk(len(picked))
        for o, i in zip(output, cond_or_uncond):
            out[i] += o
            counts[i] += 1.0
    return [o / c for o, c in zip(out, counts)]


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    skip = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    uncond_ = None if skip else uncond
    out = calc_cond_batch(model, [cond, uncond_], x, timestep, model_options)
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options, cond=cond,
                        uncond=uncond_)


class KSamplerX0Inpaint:
    def __init__(self, model, sigmas):
        self.inner_model, self.sigmas = model, sigmas

    def __call__(self, x, sigma, denoise_mask, model_options={}, seed=None):
        if denoise_mask is not None:
            latent_mask = 1.0 - denoise_mask
            scaled = self.inner_model.inner_model.model_sampling.noise_scaling(
                sigma.reshape(-1, *([1] * (x.dim() - 1))), self.noise, self.latent_image)
            x = x * denoise_mask + scaled * latent_mask
        out = self.inner_model(x, sigma, model_options=model_options, seed=seed)
        if denoise_mask is not None:
            out = out * denoise_mask + self.latent_image * latent_mask
        return out


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}

#: ``comfy/samplers.py`` ``KSAMPLER_NAMES`` and ``SAMPLER_NAMES`` at a125cd84: every sampler the
#: KSampler node lists.
KSAMPLER_NAMES = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
                  "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
                  "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
                  "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
                  "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
                  "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
                  "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
                  "sa_solver_pece"]
SAMPLER_NAMES = KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]


def sample_unipc(model, noise, sigmas, extra_args=None, callback=None, disable=False, variant="bh1"):
    """``comfy/extra_samplers/uni_pc.py`` ``sample_unipc``'s treatment of its sigmas: a schedule
    ending at 0 is sampled to 0.001 through ``timesteps = sigmas[:]`` (a view) and
    ``timesteps[-1] = 0.001`` — the caller's tensor changes in place; any other schedule is cloned.
    The stepping is Euler over those timesteps (the double's stand-in for the UniPC solver)."""
    if sigmas[-1] == 0:
        timesteps = sigmas[:]
        timesteps[-1] = 0.001
    else:
        timesteps = sigmas.clone()
    return sample_euler(model, noise, timesteps, extra_args=extra_args, callback=callback, disable=disable)


def sample_unipc_bh2(model, noise, sigmas, extra_args=None, callback=None, disable=False):
    return sample_unipc(model, noise, sigmas, extra_args, callback, disable, variant="bh2")


def _stand_in(name):
    """A k-diffusion sampler of ComfyUI's list: its name (``sample_<name>``, what QSilk reads for
    the evaluations per step) on the double's Euler, Heun or DPM-2 (midpoint) stepping. None of them
    writes to its sigmas at a125cd84: ``offset_first_sigma_for_snr`` clones before changing σ₀,
    ``dpm_fast`` / ``dpm_adaptive`` only read ``sigmas[-1]`` / ``sigmas[-2]``."""
    midpoint = name in ("dpm_2", "dpmpp_sde")  # the report, then an evaluation between two sigmas
    second_order = name in ("heun", "dpm_2_ancestral", "dpmpp_2s_ancestral")
    base = sample_dpm_2 if midpoint else sample_heun if second_order else sample_euler

    def sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return base(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)

    sampler_function.__name__ = {"dpm_fast": "dpm_fast_function",
                                 "dpm_adaptive": "dpm_adaptive_function"}.get(name, f"sample_{name}")
    return sampler_function


def sampler_object(name):
    """``comfy/samplers.py`` ``sampler_object``: uni_pc / uni_pc_bh2 as their own KSAMPLERs, ddim as
    Euler (``ksampler("euler", inpaint_options={"random": True})``), the rest through ``ksampler``."""
    if name == "uni_pc":
        return KSAMPLER(sample_unipc)
    if name == "uni_pc_bh2":
        return KSAMPLER(sample_unipc_bh2)
    if name in SAMPLERS:
        return KSAMPLER(SAMPLERS[name])
    if name == "ddim":
        return KSAMPLER(sample_euler)
    if name not in KSAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}")
    return KSAMPLER(_stand_in(name))


class KSAMPLER:
    def __init__(self, sampler_function):
        self.sampler_function = sampler_function

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        x = model_wrap.inner_model.model_sampling.noise_scaling(sigmas[0], noise, latent_image)
        k_callback = None
        total_steps = len(sigmas) - 1
        if callback is not None:  # KSAMPLER turns k-diffusion's dict payload into ComfyUI's arguments
            k_callback = lambda d: callback(d["i"], d["denoised"], d["x"], total_steps)  # noqa: E731
        return self.sampler_function(model_k, x, sigmas, extra_args=extra_args, callback=k_callback,
                                     disable=disable_pbar)


def prepare_mask(mask, shape):
    """``comfy/utils.py`` ``reshape_mask`` for 4-D and 5-D latents."""
    if len(shape) == 4:
        m = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]), size=tuple(shape[2:]), mode="bilinear")
    else:
        m = mask if mask.dim() == 5 else mask.reshape(1, 1, -1, mask.shape[-2], mask.shape[-1])
        m = F.interpolate(m, size=tuple(shape[2:]), mode="trilinear")
    if m.shape[1] < shape[1]:
        m = m.repeat(1, shape[1], *([1] * (len(shape) - 2)))[:, : shape[1]]
    if m.shape[0] < shape[0]:
        m = m.repeat(-(-shape[0] // m.shape[0]), *([1] * (len(shape) - 1)))
    return m[: shape[0]]


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.original_conds = {"positive": positive, "negative": negative}

    def set_cfg(self, cfg):
        self.cfg = cfg

    def __call__(self, x, timestep, model_options={}, seed=None):
        return WrapperExecutor(self.predict_noise, self, get_all_wrappers(WrappersMP.PREDICT_NOISE, self.model_options)
                               ).execute(x, timestep, model_options, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"), self.conds.get("positive"),
                                 self.cfg, model_options=model_options, seed=seed)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_image = self.inner_model.process_latent_in(latent_image)
        extra_model_options = copy_nested_dicts(self.model_options)
        extra_model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        extra_args = {"model_options": extra_model_options, "seed": seed}
        executor = WrapperExecutor(sampler.sample, sampler,
                                   get_all_wrappers(WrappersMP.SAMPLER_SAMPLE, extra_args["model_options"]))
        samples = executor.execute(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        return self.inner_model.process_latent_out(samples.to(torch.float32))

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None):
        self.inner_model = self.model_patcher.model
        if denoise_mask is not None:
            denoise_mask = prepare_mask(denoise_mask, noise.shape)
        try:
            return self.inner_sample(noise, latent_image, None, sampler, sigmas, denoise_mask, callback, disable_pbar,
                                     seed)
        finally:
            del self.inner_model

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if sigmas.shape[-1] == 0:
            return latent_image
        self.conds = {k: [dict(c) for c in v] for k, v in self.original_conds.items()}
        orig = self.model_options
        try:
            self.model_options = copy_nested_dicts(orig)
            merge_nested_dicts(self.model_options["transformer_options"].setdefault("wrappers", {}),
                               self.model_patcher.wrappers, copy_dict1=False)
            executor = WrapperExecutor(self.outer_sample, self,
                                       get_all_wrappers(WrappersMP.OUTER_SAMPLE, self.model_options))
            return executor.execute(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            self.model_options = orig


# --------------------------------------------------------------------------------------------
# nodes.py: schedules, KSampler, conditioning
# --------------------------------------------------------------------------------------------
def simple_sigmas(model_patcher, steps, denoise=1.0):
    """``simple_scheduler``: evenly spaced from the model's sigma table, then 0; ``denoise`` < 1
    keeps the last steps of a longer schedule (``KSampler.set_steps``)."""
    table = model_patcher.model.model_sampling.sigmas
    total = steps if denoise >= 1.0 else int(steps / denoise)
    stride = len(table) / total
    sigmas = torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(total)] + [0.0])
    return sigmas[-(steps + 1):]


def conditioning(batch=1, tokens=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"c_crossattn": torch.randn(batch, tokens, dim, generator=g)}]


def ksampler(model, latent, *, seed=0, steps=4, cfg=5.0, sampler_name="euler", positive=None, negative=None,
             denoise=1.0, sigmas=None):
    """``common_ksampler``: noise from the seed, the guider, a new LATENT dict (``latent.copy()``)."""
    latent_image = latent["samples"]
    b = latent_image.shape[0]
    positive = positive if positive is not None else conditioning(b, seed=1)
    negative = negative if negative is not None else conditioning(b, seed=2)
    noise = torch.randn(latent_image.shape, generator=torch.Generator().manual_seed(seed))
    sigmas = simple_sigmas(model, steps, denoise) if sigmas is None else sigmas
    guider = CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    with torch.no_grad():  # ComfyUI samples under torch.inference_mode
        samples = guider.sample(noise, latent_image, sampler_object(sampler_name), sigmas,
                                denoise_mask=latent.get("noise_mask"), seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


# --------------------------------------------------------------------------------------------
# execution.py: queue-time validation of one node's widget values
# --------------------------------------------------------------------------------------------
def validate_inputs(obj_class, inputs):
    """``execution.validate_inputs`` for one node's widget values (links are left out): each value is
    converted by its type (``float(val)`` for FLOAT, so ``"nan"`` becomes NaN); min / max / combo
    checks run only for inputs that ``VALIDATE_INPUTS`` does not name (and only when it has no
    ``**kwargs``); then ``VALIDATE_INPUTS`` gets the named inputs, and any answer other than True adds
    one ``custom_validation_failed`` error per input it was given. Returns the error list (empty:
    the prompt would be queued; otherwise ``/prompt`` answers HTTP 400 with them)."""
    import inspect

    class_inputs = obj_class.INPUT_TYPES()
    spec = {**class_inputs.get("required", {}), **class_inputs.get("optional", {})}
    check = getattr(obj_class, "VALIDATE_INPUTS", None)
    named, has_kwargs = [], False
    if check is not None:
        argspec = inspect.getfullargspec(check)
        named, has_kwargs = argspec.args, argspec.varkw is not None
    errors, values = [], {}
    for name, (input_type, extra) in spec.items():
        if name not in inputs:
            continue
        val = inputs[name]
        try:
            val = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(input_type, lambda v: v)(val) \
                if isinstance(input_type, str) else val
        except Exception as ex:
            errors.append({"type": "invalid_input_type", "details": f"{name}, {val}, {ex}",
                           "extra_info": {"input_name": name}})
            continue
        values[name] = val
        if name not in named and not has_kwargs:
            if "min" in extra and val < extra["min"]:
                errors.append({"type": "value_smaller_than_min", "details": name, "extra_info": {"input_name": name}})
            elif "max" in extra and val > extra["max"]:
                errors.append({"type": "value_bigger_than_max", "details": name, "extra_info": {"input_name": name}})
            elif isinstance(input_type, list) and val not in input_type:
                errors.append({"type": "value_not_in_list", "details": f"{name}: '{val}' not in {input_type}",
                               "extra_info": {"input_name": name}})
    if named or has_kwargs:
        given = {k: v for k, v in values.items() if k in named or has_kwargs}
        answer = check(**given)
        if answer is not True:
            for name in given:
                details = name if answer is False else f"{name} - {answer}"
                errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                               "details": details, "extra_info": {"input_name": name}})
    return errors
