"""Test double of the Forge WebUI layer around the backend double (`forge_backend`).

Written from shared/research/forge.md and a reading of the hosts' source (no code copied).
It mirrors the call order an always-on script sees:

- **new Forge** main ``dfdcbab6``: ``modules/processing.py`` — ``process_images_inner`` resets
  ``sd_model.forge_objects`` from ``forge_objects_original`` at each batch, then (after LoRA
  activation) from ``forge_objects_after_applying_lora``, then ``process_batch``, ``p.sample``,
  ``post_sample``, decode unless already decoded, ``postprocess_batch``; ``postprocess`` at the
  end (not reached when ``p.sample`` raises). ``Txt2Img.sample``: create the sampler, reset
  ``forge_objects``, ``process_before_every_sampling(x=noise, noise=noise, c, uc)``, sample, decode
  right away when an image upscaler is used, then ``sample_hr_pass``: new sampler, latent upscale
  (interpolate) or decode→upscale→encode, new noise, ``before_hr``, hook (**discarded**: the next
  line resets ``forge_objects``), reset, hook again, ``sample_img2img``, decode. ``uc`` / ``hr_uc``
  are None when ``cfg_scale`` / ``hr_cfg`` is 1. ``Img2Img.sample``: reset, hook
  (``x=init_latent, noise=noise``), ``sample_img2img``, inpaint blend.
  ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward``: interrupt check, inpaint
  ``x = x·nmask + noised(init)·mask``, ``cfg_denoiser`` callbacks, ``hr_cfg`` in the hires pass,
  "Skip Early CFG" (cond_scale 1 while ``step/total_steps ≤ skip_early_cond``), sampling function,
  inpaint blend, ``last_latent``, ``cfg_after_cfg`` callbacks, ``step += 1``.
  ``modules/sd_samplers_common.py``: ``launch_sampling`` sets ``steps`` and ``total_steps =
  config.total_steps(steps)`` (×2 for second-order samplers) and returns ``last_latent`` on
  interrupt; ``initialize`` sets ``step = 0``, ``mask``/``nmask``. ``modules/scripts.py``
  ``ScriptRunner``: every hook call is wrapped and exceptions are reported, not raised;
  ``process_before_every_sampling`` iterates ``alwayson_scripts`` in order.
- **old Forge** tag ``previous`` ``bfee03d8``: hires pass is ``before_hr``, reset, one hook call;
  ``p.uc`` is always a tensor.
- **reForge** main ``3b56b268``: hires pass is reset, ``before_hr``, one hook call; "Skip Early
  CFG" / NGMS call the sampling function with ``uncond=None`` and scale 1.
- **Forge Neo** release 2.26 (exo101/sd-webui-forge-neo-v3 ``5692d2d1``, ``webui/modules/processing.py``):
  new Forge's flow, but the hires pass is ``before_hr``, reset, **one** hook call; ``uc`` / ``hr_uc``
  None at CFG 1 (``hr_cfg`` defaults to 1); Wan-VAE models (``sd_model.is_wan``) sample latents of
  shape ``(C, T, H/8, W/8)`` per sample and decode each latent frame to images.
  ``modules/ui_components.py``: ``InputAccordion`` is a factory function, as in new Forge.
  **Neo of February 2026** (an earlier build than 2.26; `NEO_2026_02`, ``Processing(build=
  NEO_2026_02)``; Haoming02/sd-webui-forge-classic ``neo`` ``modules/processing.py`` as stored at
  ``050733fb``): new Forge's hires flow — ``before_hr``, hook, reset, hook (**1 + 2** calls with
  hires) — and Latent hires upscalers (``latent_scale_mode``), which 2.26 does not list.
- **Forge Classic** ``1f95d717``: old Forge's flow (``before_hr``, reset, one hook call; ``p.uc``
  always a tensor); ``InputAccordion`` is the class.

The k-diffusion samplers (Euler; Heun, two evaluations per step) follow k-diffusion's algorithms.
The VAE is a fixed linear map with an 8× factor.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import forge_backend as fb
from .forge_backend import BACKEND_FAMILIES, FORGE_CLASSIC, FORGE_NEO, FORGE_NEW, FORGE_OLD, REFORGE

#: ``Processing(build=…)`` for a Forge Neo of February 2026 (hires: 1 + 2 hook calls, Latent upscalers).
NEO_2026_02 = "neo-2026"
from . import load_script  # noqa: F401  (A1111's script_loading, which Forge keeps)
from . import module, put_modules, restore_modules

OPT_F = 8


class InterruptedException(BaseException):
    pass


@dataclass
class State:
    interrupted: bool = False
    sampling_step: int = 0
    sampling_steps: int = 0


@dataclass
class Options:
    skip_early_cond: float = 0.0


class Callbacks:
    """``modules/script_callbacks`` lists used inside the denoiser."""

    def __init__(self):
        self.cfg_denoiser: list = []
        self.cfg_after_cfg: list = []


# --------------------------------------------------------------------------------------------
# Model objects
# --------------------------------------------------------------------------------------------
class ForgeObjects:
    def __init__(self, unet, vae=None):
        self.unet, self.vae = unet, vae

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.vae)


class TinyVAE:
    """Linear 'VAE': decode = 1×1 projection to RGB then ×8 nearest; encode = its pseudo-inverse."""

    def __init__(self, latent_channels):
        g = torch.Generator().manual_seed(123)
        self.latent_channels = latent_channels
        self.weight = torch.randn(3, latent_channels, generator=g) * 0.3
        self.decoded: list[torch.Tensor] = []
        self.encoded = 0

    def decode(self, latent):
        self.decoded.append(latent.detach().clone())
        if latent.dim() == 5:  # Wan VAE: every latent frame decodes to images (here: one each)
            latent = latent.transpose(1, 2).flatten(0, 1)
        rgb = torch.einsum("oc,bchw->bohw", self.weight, latent.float())
        return torch.tanh(F.interpolate(rgb, scale_factor=OPT_F, mode="nearest"))

    def encode(self, image):
        self.encoded += 1
        small = F.avg_pool2d(torch.atanh(image.clamp(-0.999, 0.999)), OPT_F)
        return torch.einsum("co,bohw->bchw", torch.linalg.pinv(self.weight), small)


class SdModel:
    """``shared.sd_model``: holds ``forge_objects`` and the three copies Forge resets from."""

    def __init__(self, unet_patcher, vae, is_wan=False):
        self.is_wan = is_wan  # Neo: 5-D latents (B, C, T, H, W)
        self.forge_objects_original = ForgeObjects(unet_patcher, vae)
        self.forge_objects = self.forge_objects_original.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects_original.shallow_copy()

    @property
    def latent_channels(self):
        return self.forge_objects_original.vae.latent_channels


#: Neo's DiT families (``backend/diffusion_engine/*.py``): latent channels and whether the latent
#: is 5-D (Wan's VAE, ``is_wan``). All are flow models ("const"). Flux.2's VAE gives 128 channels
#: (32 channels, 2×2-packed); the 8× pixel factor of the double is kept for every family.
DIT_FAMILIES = {"flux": (16, False), "flux2": (128, False), "zimage": (16, False), "chroma": (16, False),
                "qwen": (16, True), "wan": (16, True), "anima": (16, True)}
#: Neo's engine class per kind (``backend/diffusion_engine/*.py``): what ``shared.sd_model`` is.
ENGINE_NAMES = {"sd15": "StableDiffusion", "sdxl": "StableDiffusionXL", "flux": "Flux", "flux2": "Flux2",
                "zimage": "ZImage", "chroma": "Chroma", "qwen": "QwenImage", "wan": "Wan", "anima": "Anima"}


def make_model(family=FORGE_NEW, kind="sd15", prediction_type="epsilon", seed=0):
    """A Forge model: ``kind`` 'sd15' (attention at latent/1 and /2), 'sdxl' (latent/2 only,
    transformer depth 2), or one of `DIT_FAMILIES` (no UNet, flow prediction; 'qwen', 'wan' and
    'anima' on 5-D latents)."""
    is_wan = False
    if kind in DIT_FAMILIES:
        channels, is_wan = DIT_FAMILIES[kind]
        net = fb.TinyVideoDiT(channels, seed=seed) if is_wan else fb.TinyFlux(channels, seed=seed)
        prediction_type = "const"
    elif kind == "sdxl":
        net, channels = fb.TinyUNet(attention_levels=(1,), depth=2, heads=5, seed=seed), 4
    else:
        net, channels = fb.TinyUNet(attention_levels=(0, 1), heads=4, seed=seed), 4
    net.eval().requires_grad_(False)
    model = fb.KModel(net, fb.Prediction(prediction_type), family=family)
    engine = type(ENGINE_NAMES[kind], (SdModel,), {})
    return engine(fb.UnetPatcher(model), TinyVAE(channels), is_wan=is_wan)


# --------------------------------------------------------------------------------------------
# Sampler + CFGDenoiser
# --------------------------------------------------------------------------------------------
@dataclass
class SamplerData:
    name: str
    funcname: str
    options: dict

    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order", False) else steps


SAMPLERS = {"Euler": SamplerData("Euler", "sample_euler", {}),
            "Heun": SamplerData("Heun", "sample_heun", {"second_order": True}),
            "DDIM": SamplerData("DDIM", "ddim", {})}


@dataclass
class CFGDenoiserParams:
    x: torch.Tensor
    image_cond: Any
    sigma: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    text_cond: Any
    text_uncond: Any
    denoiser: Any = None


@dataclass
class AfterCFGCallbackParams:
    x: torch.Tensor
    sampling_step: int
    total_sampling_steps: int


class CFGDenoiser:
    def __init__(self, sampler):
        self.sampler = sampler
        self.p = None
        self.mask = self.nmask = self.init_latent = None
        self.steps = self.total_steps = None
        self.step = 0
        self.calls = 0
        self.classic_ddim_eps_estimation = False

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        p, env = self.p, self.p.env
        if env.state.interrupted:
            raise InterruptedException
        if self.classic_ddim_eps_estimation:  # timestep samplers: t → σ, x to the k-diffusion frame
            acd = env.unet_model(p).prediction.alphas_cumprod
            fake_sigmas = ((1 - acd) / acd) ** 0.5
            sigma = fake_sigmas[sigma.round().long().clip(0, fake_sigmas.shape[0] - 1)]
            x = x * ((sigma ** 2 + 1.0) ** 0.5)[:, None, None, None]
        apply_refiner(self)
        if self.mask is not None:
            noise = torch.randn(self.init_latent.shape, generator=torch.Generator().manual_seed(self.step))
            x = x * self.nmask + env.unet_model(p).prediction.noise_scaling(sigma[:, None, None, None], noise, self.init_latent) * self.mask
        params = CFGDenoiserParams(x, image_cond, sigma, env.state.sampling_step, env.state.sampling_steps, cond, uncond, self)
        for cb in list(env.callbacks.cfg_denoiser):
            cb(params)
        if p.is_hr_pass:
            cond_scale = p.hr_cfg
        skip = env.opts.skip_early_cond > 0 and self.step / self.total_steps <= env.opts.skip_early_cond
        if skip:
            cond_scale = 1.0
        self.calls += 1
        denoised = sampling_function(self, params, cond_scale, skip_uncond=skip)
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.sampler.last_latent = denoised
        after = AfterCFGCallbackParams(denoised, env.state.sampling_step, env.state.sampling_steps)
        for cb in list(env.callbacks.cfg_after_cfg):
            cb(after)
        denoised = after.x
        self.step += 1
        if self.classic_ddim_eps_estimation:
            return (x - denoised) / sigma[:, None, None, None]
        return denoised

    __call__ = forward


def apply_refiner(denoiser):
    """``sd_samplers_common.apply_refiner``: at ``step/total_steps ≥ refiner_switch_at`` the
    model is reloaded (``p.sd_model`` is ``shared.sd_model``: now the refiner) and LoRA activation
    resets ``forge_objects.unet`` to the loaded model's — no script hook is called."""
    p = denoiser.p
    if p.refiner is None or p.sd_model is p.refiner or denoiser.step / denoiser.total_steps < p.refiner_switch_at:
        return False
    p.sd_model = p.refiner
    p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
    return True


def sampling_function(denoiser, params, cond_scale, skip_uncond=False):
    """``backend/sampling/sampling_function.py sampling_function`` (new) / ``forge_sample`` (old) /
    reForge's denoiser body: compile conds and call the CFG step on the current patcher."""
    p = denoiser.p
    unet = p.sd_model.forge_objects.unet
    cond = [{"c_crossattn": t, "strength": w} for t, w in params.text_cond]
    uncond = None if params.text_uncond is None else [{"c_crossattn": params.text_uncond}]
    family = unet.model.family
    if family == REFORGE and skip_uncond:
        uncond, cond_scale = None, 1.0
    return fb.sampling_function_inner(unet.model, params.x, params.sigma, uncond, cond, cond_scale,
                                      unet.model_options, seed=p.seeds[0])


def create_sampler(name, sd_model):
    return CompVisSampler(name, sd_model) if name == "DDIM" else KDiffusionSampler(name, sd_model)


class KDiffusionSampler:
    def __init__(self, name, sd_model):
        self.config = SAMPLERS[name]
        self.funcname = self.config.funcname  # the k-diffusion function's name
        self.model_wrap_cfg = CFGDenoiser(self)
        self.last_latent = None
        self.p = None

    def get_sigmas(self, p, steps):
        pred = p.env.unet_model(p).prediction
        lo, hi = float(pred.sigma_min), float(pred.sigma_max)
        if pred.prediction_type == "const":
            sig = torch.linspace(hi, lo, steps)
        else:
            ramp = torch.linspace(0, 1, steps)
            rho = 7.0
            sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        return torch.cat([sig, sig.new_zeros(1)])

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.step = 0

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        self.p.env.state.sampling_steps, self.p.env.state.sampling_step = steps, 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def _extra(self, p, c, uc):
        return {"cond": c, "uncond": uc, "cond_scale": p.cfg_scale, "s_min_uncond": 0.0, "image_cond": None}

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        self.initialize(p)
        sigmas = self.get_sigmas(p, steps)
        x = p.env.unet_model(p).prediction.noise_scaling(sigmas[0], x, torch.zeros_like(x))
        extra = self._extra(p, conditioning, unconditional_conditioning)
        return self.launch_sampling(steps, lambda: self.run(x, sigmas, extra))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        self.initialize(p)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = p.env.unet_model(p).prediction.noise_scaling(sigma_sched[0], noise, x)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        extra = self._extra(p, conditioning, unconditional_conditioning)
        return self.launch_sampling(t_enc + 1, lambda: self.run(xi, sigma_sched, extra))

    def run(self, x, sigmas, extra):
        """k-diffusion ``sample_euler`` / ``sample_heun`` (no churn)."""
        model, s_in = self.model_wrap_cfg, x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            self.p.env.state.sampling_step = i
            denoised = model(x, sigmas[i] * s_in, **extra)
            d = (x - denoised) / sigmas[i]
            dt = sigmas[i + 1] - sigmas[i]
            if self.config.options.get("second_order") and sigmas[i + 1] != 0:
                x_2 = x + d * dt
                denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra)
                d = (d + (x_2 - denoised_2) / sigmas[i + 1]) / 2
            x = x + d * dt
        return x


class CompVisSampler(KDiffusionSampler):
    """``modules/sd_samplers_timesteps.py``: timesteps ``range(0, 1000, 1000 // steps) + 1``; the
    denoiser runs with ``classic_ddim_eps_estimation`` (its post-CFG functions still see x0, it
    returns ε); DDIM makes ``len(timesteps) − 1`` evaluations (``sd_samplers_timesteps_impl.ddim``)."""

    def __init__(self, name, sd_model):
        super().__init__(name, sd_model)
        self.model_wrap_cfg.classic_ddim_eps_estimation = True

    def get_timesteps(self, p, steps):
        return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        self.initialize(p)
        timesteps = self.get_timesteps(p, steps)
        extra = self._extra(p, conditioning, unconditional_conditioning)
        return self.launch_sampling(steps, lambda: self.ddim(x, timesteps, extra))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        self.initialize(p)
        timesteps = self.get_timesteps(p, steps)
        acp = p.env.unet_model(p).prediction.alphas_cumprod
        a = acp[timesteps[t_enc]]
        xi = x * a.sqrt() + noise * (1 - a).sqrt()
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        extra = self._extra(p, conditioning, unconditional_conditioning)
        return self.launch_sampling(t_enc + 1, lambda: self.ddim(xi, timesteps[:t_enc], extra))

    def ddim(self, x, timesteps, extra):
        acp = self.p.env.unet_model(self.p).prediction.alphas_cumprod
        alphas = acp[timesteps]
        alphas_prev = torch.cat([acp[:1], acp[timesteps[:-1]]])
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(timesteps) - 1):
            index = len(timesteps) - 1 - i
            self.p.env.state.sampling_step = i
            e_t = self.model_wrap_cfg(x, timesteps[index].float() * s_in, **extra)
            a_t, a_prev = alphas[index], alphas_prev[index]
            pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
            x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
        return x


# --------------------------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------------------------
class Script:
    """``modules.scripts.Script``: hooks with the real signatures; ``sorting_priority`` (Forge
    only) orders always-on accordions in the UI, larger = lower."""
    args_from = args_to = 0
    sorting_priority = 0
    filename = "script.py"

    def elem_id(self, item_id):
        return f"script_txt2img_{type(self).__name__.lower()}_{item_id}"

    def process(self, p, *args): ...
    def before_process_batch(self, p, *args, **kwargs): ...
    def process_batch(self, p, *args, **kwargs): ...
    def process_before_every_sampling(self, p, *args, **kwargs): ...
    def before_hr(self, p, *args): ...
    def post_sample(self, p, ps, *args): ...
    def postprocess_batch(self, p, *args, **kwargs): ...
    def postprocess(self, p, processed, *args): ...


class ScriptRunner:
    """Each hook is run for every always-on script; an exception is reported, never raised."""

    def __init__(self, scripts, script_args):
        self.alwayson_scripts = list(scripts)
        self.errors: list[tuple[str, BaseException]] = []
        self.hook_calls: list[str] = []
        pos = 0
        for script, args in zip(self.alwayson_scripts, script_args):
            script.args_from, script.args_to = pos, pos + len(args)
            pos += len(args)
        self.script_args = [a for args in script_args for a in args]

    def _run(self, hook, p, *extra, **kwargs):
        self.hook_calls.append(hook)
        for script in self.alwayson_scripts:
            try:
                getattr(script, hook)(p, *extra, *self.script_args[script.args_from:script.args_to], **kwargs)
            except Exception as exc:
                self.errors.append((hook, exc))

    def process(self, p): self._run("process", p)
    def before_process_batch(self, p, **kw): self._run("before_process_batch", p, **kw)
    def process_batch(self, p, **kw): self._run("process_batch", p, **kw)
    def process_before_every_sampling(self, p, **kw): self._run("process_before_every_sampling", p, **kw)
    def before_hr(self, p): self._run("before_hr", p)
    def post_sample(self, p, ps): self._run("post_sample", p, ps)
    def postprocess_batch(self, p, images, **kw): self._run("postprocess_batch", p, images=images, **kw)
    def postprocess(self, p, processed): self._run("postprocess", p, processed)


@dataclass
class Env:
    """What ``shared`` holds: state, options, callbacks."""
    state: State = field(default_factory=State)
    opts: Options = field(default_factory=Options)
    callbacks: Callbacks = field(default_factory=Callbacks)

    @staticmethod
    def unet_model(p):
        return p.sd_model.forge_objects.unet.model


def text_embedding(text, batch, tokens=8, dim=16):
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, dim, generator=g).expand(batch, tokens, dim).contiguous()


# --------------------------------------------------------------------------------------------
# Processing
# --------------------------------------------------------------------------------------------
@dataclass
class Processing:
    sd_model: SdModel
    family: str = FORGE_NEW
    prompt: str = "a cat"
    negative_prompt: str = ""
    width: int = 64
    height: int = 64
    steps: int = 4
    cfg_scale: float = 5.0
    sampler_name: str = "Euler"
    batch_size: int = 1
    n_iter: int = 1
    seed: int = 1
    scripts: Any = None
    env: Env = field(default_factory=Env)
    extra_generation_params: dict = field(default_factory=dict)
    denoising_strength: float = 0.6
    refiner: Any = None  # an SdModel to switch to inside the denoiser
    refiner_switch_at: float = 0.5
    frames: int = 1  # latent frames T of a Wan-VAE model's (C, T, H, W) latent
    build: str = ""  # FORGE_NEO only: NEO_2026_02 for February 2026's hires flow (else release 2.26's)
    is_hr_pass: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        self.sampler = None
        self.seeds = [self.seed]
        self.iteration = 0
        self.c = self.uc = None

    def rng(self, shape, offset=0):
        g = torch.Generator().manual_seed(self.seed + 1000 * self.iteration + offset)
        return torch.randn((self.batch_size, *shape), generator=g)

    def conds(self, prompt, negative, cfg):
        c = [(text_embedding(part.strip(), self.batch_size), 1.0) for part in prompt.split(" AND ")]
        if self.family in BACKEND_FAMILIES and cfg == 1:
            return c, None
        return c, text_embedding(negative, self.batch_size)

    def setup_conds(self):
        self.c, self.uc = self.conds(self.prompt, self.negative_prompt, self.cfg_scale)

    def reset_forge_objects(self):
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()

    @property
    def latent_shape(self):
        size = (self.height // OPT_F, self.width // OPT_F)
        if getattr(self.sd_model, "is_wan", False):
            return (self.sd_model.latent_channels, self.frames, *size)
        return (self.sd_model.latent_channels, *size)


@dataclass
class Txt2Img(Processing):
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"  # "Latent" (latent upscale) or anything else (image upscaler)
    hr_second_pass_steps: int = 0
    hr_cfg: float = 5.0
    hr_sampler_name: str | None = None
    hr_checkpoint: Any = None  # an SdModel: the hires pass reloads to it (``forge_model_reload``)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = create_sampler(self.sampler_name, self.sd_model)
        x = self.rng(self.latent_shape)
        self.reset_forge_objects()
        self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning)
        if not self.enable_hr:
            return samples
        decoded = None
        if self.hr_upscaler != "Latent":
            decoded = decode_latent_batch(self.sd_model, samples)
        if self.hr_checkpoint is not None:  # ``p.sd_model`` is ``shared.sd_model``: now the new one
            self.sd_model = self.hr_checkpoint
            self.sd_model.forge_objects_after_applying_lora = self.sd_model.forge_objects_original.shallow_copy()
        return self.sample_hr_pass(samples, decoded)

    def sample_hr_pass(self, samples, decoded):
        if self.env.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        th, tw = int(self.height * self.hr_scale) // OPT_F, int(self.width * self.hr_scale) // OPT_F
        if self.hr_upscaler == "Latent":
            size = (samples.shape[2], th, tw) if samples.dim() == 5 else (th, tw)
            samples = F.interpolate(samples, size=size, mode="trilinear" if samples.dim() == 5 else "bilinear")
        else:
            images = F.interpolate(decoded, size=(th * OPT_F, tw * OPT_F), mode="bilinear")
            samples = self.sd_model.forge_objects.vae.encode(images)
        noise = self.rng(samples.shape[1:], offset=1)
        self.hr_c, self.hr_uc = self.conds(self.prompt, self.negative_prompt, self.hr_cfg)
        hook = lambda: self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        if self.family == FORGE_NEW or (self.family == FORGE_NEO and self.build == NEO_2026_02):
            self.scripts.before_hr(self)
            hook()
            self.reset_forge_objects()
            hook()
        elif self.family in (FORGE_OLD, FORGE_NEO, FORGE_CLASSIC):
            self.scripts.before_hr(self)
            self.reset_forge_objects()
            hook()
        else:
            self.reset_forge_objects()
            self.scripts.before_hr(self)
            hook()
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps)
        self.sampler = None
        decoded = DecodedSamples(decode_latent_batch(self.sd_model, samples))
        self.is_hr_pass = False
        return decoded


@dataclass
class Img2Img(Processing):
    init_latent: Any = None
    mask: Any = None  # latent mask, 1 = keep the original (A1111's p.mask)

    def __post_init__(self):
        super().__post_init__()
        self.nmask = None if self.mask is None else 1.0 - self.mask
        self.sampler = create_sampler(self.sampler_name, self.sd_model)  # created in init()

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.rng(self.latent_shape)
        self.reset_forge_objects()
        self.scripts.process_before_every_sampling(self, x=self.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning)
        if self.mask is not None:
            samples = samples * self.nmask + self.init_latent * self.mask
        return samples


class DecodedSamples(list):
    already_decoded = True


def decode_latent_batch(sd_model, batch):
    return sd_model.forge_objects.vae.decode(batch)


@dataclass
class Processed:
    """``modules.processing.Processed``: PIL ``images`` (what the gallery shows), ``infotexts``,
    ``comments``; ``samples`` keeps the float images for exact comparisons in tests."""
    images: list
    extra_generation_params: dict
    samples: list = field(default_factory=list)
    infotexts: list = field(default_factory=list)
    comments: str = ""


def process_images(p):
    """``process_images_inner`` order; an exception in ``p.sample`` propagates (no postprocess)."""
    p.scripts.process(p)
    images = []
    for n in range(p.n_iter):
        p.iteration = n
        p.seeds = [p.seed + n]
        p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
        p.scripts.before_process_batch(p, batch_number=n)
        p.sd_model.forge_objects_after_applying_lora = p.sd_model.forge_objects.shallow_copy()  # LoRA
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        p.scripts.process_batch(p, batch_number=n)
        p.setup_conds()
        samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.seeds,
                           subseed_strength=0.0, prompts=[p.prompt])
        if getattr(samples, "already_decoded", False):
            x = torch.stack(list(samples))
        else:
            x = decode_latent_batch(p.sd_model, samples)
        x = torch.clamp((x + 1.0) / 2.0, 0.0, 1.0)
        p.scripts.postprocess_batch(p, x, batch_number=n)
        images.extend(x)
    from PIL import Image
    pil = [Image.fromarray((255.0 * x.permute(1, 2, 0)).round().to(torch.uint8).numpy()) for x in images]
    infotext = ", ".join(f"{k}: {v}" for k, v in p.extra_generation_params.items())
    processed = Processed(pil, p.extra_generation_params, samples=images, infotexts=[infotext] * len(pil))
    p.scripts.postprocess(p, processed)
    return processed


# --------------------------------------------------------------------------------------------
# Other extensions that patch the same UNet (behaviour from Forge's built-ins, written anew)
# --------------------------------------------------------------------------------------------
class SagLike(Script):
    """Self-attention guidance: an ``attn1`` *replace* on ``("middle", 0, 0)`` that records the
    uncond rows' attention, and a post-CFG function (``disable_cfg1_optimization=True``) that runs
    an extra UNet pass on a blurred uncond prediction — with the uncond list passed as ``cond``."""

    def __init__(self):
        self.replace_calls = self.post_cfg_calls = 0

    def process_before_every_sampling(self, p, enabled=True, scale=0.5, **kwargs):
        if not enabled or (p.cfg_scale <= 1 if not p.is_hr_pass else p.hr_cfg <= 1):
            return
        unet = p.sd_model.forge_objects.unet.clone()
        recorded = {}
        script = self

        def attn_and_record(q, k, v, extra_options):
            script.replace_calls += 1
            heads, chunks = extra_options["n_heads"], extra_options["cond_or_uncond"]
            if 1 in chunks:
                b = q.shape[0] // len(chunks)
                i = chunks.index(1)
                d = q.shape[-1] // heads
                qq = q[i * b:(i + 1) * b].view(b, -1, heads, d).transpose(1, 2)
                kk = k[i * b:(i + 1) * b].view(b, -1, heads, d).transpose(1, 2)
                recorded["attn"] = torch.softmax(qq @ kk.transpose(-1, -2) * d ** -0.5, -1)
            return fb.attention_function(q, k, v, heads)

        def post_cfg_function(args):
            script.post_cfg_calls += 1
            uncond_pred, x, denoised = args["uncond_denoised"], args["input"], args["denoised"]
            degraded = F.avg_pool2d(uncond_pred, 3, 1, 1)  # the blur; mask from `recorded` omitted
            sag, _ = fb.calc_cond_uncond_batch(args["model"], args["uncond"], None, degraded + x - uncond_pred,
                                               args["sigma"], args["model_options"])
            return denoised + (degraded - sag) * scale

        unet.set_model_sampler_post_cfg_function(post_cfg_function, disable_cfg1_optimization=True)
        unet.set_model_attn1_replace(attn_and_record, "middle", 0, 0)
        p.sd_model.forge_objects.unet = unet


class PagLike(Script):
    """Perturbed-attention guidance: a post-CFG function running an extra cond-only UNet pass with
    a one-off ``attn1`` replace on ``("middle", 0)`` that returns ``v``."""

    def __init__(self):
        self.replace_calls = self.post_cfg_calls = 0

    def process_before_every_sampling(self, p, enabled=True, scale=3.0, **kwargs):
        if not enabled:
            return
        unet = p.sd_model.forge_objects.unet.clone()
        script = self

        def identity_attention(q, k, v, extra_options):
            script.replace_calls += 1
            return v

        def post_cfg_function(args):
            script.post_cfg_calls += 1
            options = fb.set_model_options_patch_replace(args["model_options"].copy(), identity_attention, "attn1", "middle", 0)
            degraded, _ = fb.calc_cond_uncond_batch(args["model"], args["cond"], None, args["input"], args["sigma"], options)
            return args["denoised"] + (args["cond_denoised"] - degraded) * scale

        unet.set_model_sampler_post_cfg_function(post_cfg_function)
        p.sd_model.forge_objects.unet = unet


class StyleAlignLike(Script):
    """Shared attention: ``set_model_replace_all`` on attn1; every row also attends to the first
    cond row's keys and values (rows found through ``cond_indices``)."""

    def __init__(self):
        self.replace_calls = 0

    def process_before_every_sampling(self, p, enabled=True, **kwargs):
        if not enabled:
            return
        unet = p.sd_model.forge_objects.unet.clone()
        script = self

        def shared_attention(q, k, v, extra_options):
            script.replace_calls += 1
            ref = extra_options["cond_indices"][:1] or [0]
            k2 = torch.cat([k, k[ref].expand_as(k)], dim=1)
            v2 = torch.cat([v, v[ref].expand_as(v)], dim=1)
            return fb.attention_function(q, k2, v2, extra_options["n_heads"])

        unet.set_model_replace_all(shared_attention, "attn1")
        p.sd_model.forge_objects.unet = unet


class ReferenceLike(Script):
    """A reference-style extension (like ControlNet's reference preprocessors): a UNet function
    wrapper that runs the same chunks once more, inside the evaluation's own UNet call."""

    def __init__(self):
        self.wrapper_calls = 0

    def process_before_every_sampling(self, p, enabled=True, **kwargs):
        if not enabled:
            return
        unet = p.sd_model.forge_objects.unet.clone()
        script = self

        def wrapper(apply_model, d):
            script.wrapper_calls += 1
            apply_model(d["input"], d["timestep"], **d["c"])  # the reference pass (fills its bank)
            return apply_model(d["input"], d["timestep"], **d["c"])

        unet.set_model_unet_function_wrapper(wrapper)
        p.sd_model.forge_objects.unet = unet


# --------------------------------------------------------------------------------------------
# The host's module set, so the real scripts/qsilk.py can be loaded as Forge loads it
# --------------------------------------------------------------------------------------------
AlwaysVisible = object()

#: Modules each family has imported when extension scripts load (see qsilk.hosts.detect_host).
FAMILY_MODULES = {
    FORGE_NEW: {"modules_forge.forge_version": {"version": "2.0.1v1.10.1"}, "backend": {}, "backend.patcher": {},
                "backend.patcher.unet": {}, "backend.sampling": {}, "backend.sampling.sampling_function": {}},
    FORGE_OLD: {"modules_forge.forge_version": {"version": "0.0.17v1.8.0rc"}, "modules_forge.forge_sampler": {},
                "modules_forge.unet_patcher": {}, "ldm_patched": {}, "ldm_patched.modules": {},
                "ldm_patched.modules.samplers": {"calc_cond_uncond_batch": fb.calc_cond_uncond_batch}},
    REFORGE: {"modules_forge.forge_version": {"version": "1.0.0v2-v1.10.1RC"}, "modules_forge.forge_sampler": {},
              "modules_forge.unet_patcher": {}, "ldm_patched": {}, "ldm_patched.modules": {}, "ldm_patched.hooks": {},
              "ldm_patched.modules.samplers": {"calc_cond_batch": fb.calc_cond_uncond_batch}},
    FORGE_NEO: {"modules_forge.forge_version": {"version": "neo", "release": "2.26"}, "backend": {},
                "backend.patcher": {}, "backend.patcher.unet": {}, "backend.sampling": {},
                "backend.sampling.sampling_function": {}, "backend.diffusion_engine.base": {}},
    FORGE_CLASSIC: {"modules_forge.forge_version": {"version": "classic"}, "modules_forge.forge_sampler": {},
                    "modules_forge.unet_patcher": {}, "ldm_patched": {}, "ldm_patched.modules": {},
                    "ldm_patched.modules.samplers": {"calc_cond_uncond_batch": fb.calc_cond_uncond_batch}},
}


def _input_accordion(family):
    """``modules.ui_components.InputAccordion``: in new Forge a factory function returning an
    ``InputAccordionImpl`` (a hidden ``gr.Checkbox`` that is also an accordion context manager);
    in old Forge and reForge (A1111 1.8+ base) the class itself."""
    import gradio as gr

    # New Forge (Gradio 4) patches ``gradio.component_meta.create_or_modify_pyi`` to skip classes
    # marked ``webui_do_not_create_gradio_pyi_thank_you`` (modules/gradio_extensions.py); Gradio 4
    # would otherwise try to write a .pyi stub for this subclass. Same here, while it is defined.
    meta = getattr(gr, "component_meta", None)
    original_pyi = getattr(meta, "create_or_modify_pyi", None)
    if original_pyi is not None:
        meta.create_or_modify_pyi = lambda cls, *a, **k: (
            None if hasattr(cls, "webui_do_not_create_gradio_pyi_thank_you") else original_pyi(cls, *a, **k))
    try:
        return _define_input_accordion(gr, family)
    finally:
        if original_pyi is not None:
            meta.create_or_modify_pyi = original_pyi


def _define_input_accordion(gr, family):
    class InputAccordionImpl(gr.Checkbox):
        webui_do_not_create_gradio_pyi_thank_you = True
        global_index = 0

        def __init__(self, value=None, setup=False, **kwargs):
            if not setup:
                super().__init__(value=value, **kwargs)
                return
            self.accordion_id = kwargs.get("elem_id") or f"input-accordion-{InputAccordionImpl.global_index}"
            InputAccordionImpl.global_index += 1
            super().__init__(value=value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
            self.accordion = gr.Accordion(label=kwargs.get("label", "Accordion"), open=value, elem_id=self.accordion_id)

        def __enter__(self):
            self.accordion.__enter__()
            return self

        def __exit__(self, *exc):
            self.accordion.__exit__(*exc)

    if family in BACKEND_FAMILIES:
        def InputAccordion(value=None, **kwargs):
            return InputAccordionImpl(value=value, setup=True, **kwargs)
        return InputAccordion

    class InputAccordion(InputAccordionImpl):
        def __init__(self, value=None, **kwargs):
            super().__init__(value=value, setup=True, **kwargs)

    return InputAccordion


class ForgeHost:
    """The WebUI modules an extension script imports, for one Forge family; `install()` puts
    them (and the family's marker modules) in ``sys.modules``, `uninstall()` restores."""

    def __init__(self, family=FORGE_NEW, env=None):
        self.family = family
        self.env = env or Env()
        self.registered: list[tuple[str, Any]] = []  # script_callbacks registrations
        self._saved: dict[str, Any] = {}

        def on(kind):
            def register(callback, *args, **kwargs):
                self.registered.append((kind, callback))
                if kind in ("cfg_denoiser", "cfg_after_cfg"):
                    getattr(self.env.callbacks, kind).append(callback)
            return register

        def remove_callbacks_for_function(fn):
            self.registered[:] = [(k, c) for k, c in self.registered if c != fn]
            for kind in ("cfg_denoiser", "cfg_after_cfg"):
                entries = getattr(self.env.callbacks, kind)
                entries[:] = [c for c in entries if c != fn]

        callbacks = module("modules.script_callbacks", remove_callbacks_for_function=remove_callbacks_for_function,
                           **{f"on_{k}": on(k) for k in (
                               "ui_settings", "before_ui", "script_unloaded", "cfg_denoiser", "cfg_after_cfg",
                               "cfg_denoised", "model_loaded", "infotext_pasted", "ui_tabs", "app_started")})
        self.modules = {
            "modules": module("modules", __path__=[]),
            "modules.scripts": module("modules.scripts", Script=Script, AlwaysVisible=AlwaysVisible, scripts_data=[]),
            "modules.script_callbacks": callbacks,
            "modules.shared": module("modules.shared", opts=self.env.opts, state=self.env.state),
            "modules.paths": module("modules.paths", models_path=os.path.join(os.path.dirname(__file__), "_models")),
            "modules.ui_components": module("modules.ui_components", InputAccordion=_input_accordion(family)),
            "modules_forge": module("modules_forge", __path__=[]),
        }
        for name, attrs in FAMILY_MODULES[family].items():
            self.modules[name] = module(name, **attrs)

    def install(self):
        put_modules(self.modules, self._saved)
        return self

    def uninstall(self):
        restore_modules(self._saved)

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


