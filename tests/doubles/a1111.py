"""Test double of the AUTOMATIC1111 WebUI modules an always-on script touches.

Mirrors stable-diffusion-webui **v1.10.1** (commit ``82a973c04367123ae98bd9abdf80d9eda9b910e2``),
with a **v1.6.0** (``5ef669de``) variant, written from ``shared/research/a1111.md`` and a reading
of those tags (no WebUI code copied). What is mirrored, with the real signatures:

- ``modules.script_callbacks``: ``callback_map`` of ``ScriptCallback`` entries (v1.9+: a dataclass
  with ``script, callback, name``; v1.6–v1.8: a ``(script, callback)`` namedtuple), ``add_callback``
  taking the registering file from ``inspect.stack()``, ``on_*(callback[, *, name])`` (``name``
  from v1.9), the v1.9+ ``ordered_callbacks_map`` cache (reused while the list length is
  unchanged), ``remove_callbacks_for_function`` (present since v1.6; cleans the ordered cache from
  v1.9.1), the parameter classes (``CFGDenoiserParams.denoiser`` only from v1.8) and dispatchers
  that report and swallow a callback's exception.
- ``modules.sd_samplers_cfg_denoiser.CFGDenoiser.forward(x, sigma, uncond, cond, cond_scale,
  s_min_uncond, image_cond)`` in the real order: interrupt check → refiner switch →
  ``reconstruct_multicond_batch``/``reconstruct_cond_batch`` at ``self.step`` → blend before
  (timestep samplers) → layout ``[image i's cond rows × repeats[i]…] + [x]`` → ``cfg_denoiser``
  callback (x, image_cond, sigma, text_cond, text_uncond read back) → NGMS uncond skip (rows dropped
  after the callback) → one batched UNet call, or B-row chunks (``batch_cond_uncond`` off), or
  cond chunks then the uncond call (different token lengths) → fake uncond rows when skipped →
  ``cfg_denoised`` callback → ``combine_denoised`` → blend after (k-diffusion) → ``last_latent`` →
  ``cfg_after_cfg`` callback (x read back) → ``step += 1``.
- ``modules.sd_samplers_common.Sampler``: ``launch_sampling`` sets ``denoiser.steps``,
  ``denoiser.total_steps = config.total_steps(steps)`` (×2 for ``second_order``) and returns
  ``last_latent`` on ``InterruptedException``; ``initialize`` resets ``step`` and sets
  ``p``/``mask``/``nmask``; ``callback_state`` sets ``state.sampling_step = i`` after step i.
- k-diffusion samplers ``Euler`` and ``Heun`` (second order, a plain Euler step to σ = 0) with
  ``CompVisDenoiser``/``CompVisVDenoiser`` (x0 out); timestep samplers ``DDIM`` and ``PLMS``
  (``CFGDenoiserTimesteps``: ε out, ``sigma`` is t, ``alphas`` = the model's ``alphas_cumprod``,
  blend before denoising) with ``get_timesteps(p, steps)`` and ``sample_img2img`` using
  ``timesteps[:t_enc]``.
- ``modules.processing``: ``process_images`` → ``before_process`` → ``process_images_inner``:
  ``process`` hook, ``p.init``, per batch ``before_process_batch``/``process_batch``,
  ``p.setup_conds``, ``p.sample(conditioning=…, …)``, ``post_sample`` (v1.8+), decode unless
  already decoded, ``postprocess_batch``, infotext from ``extra_generation_params``; ``postprocess``
  at the end (not reached when anything raised). ``Txt2Img.sample``: ``create_sampler`` →
  ``process_before_every_sampling`` (v1.10) → ``sampler.sample`` → return, or first decode (pixel
  upscaler) → hires checkpoint reload → ``sample_hr_pass``: interrupted → return the latent;
  ``is_hr_pass``; new sampler; latent interpolate or upscale + encode; new noise; ``before_hr`` →
  hook → ``sample_img2img`` → hires decode → ``DecodedSamples``. ``Img2Img``: sampler and encode
  in ``init``; ``sample`` → hook → ``sample_img2img`` → inpaint blend.
- ``modules.scripts.ScriptRunner``: hooks get ``p.script_args[args_from:args_to]``; every hook's
  exception is reported and swallowed.

The model is tiny (random weights) but shaped like ldm/sgm: ``sd_model.model.diffusion_model`` is
a UNet with ``input_blocks``/``middle_block``/``output_blocks`` whose ``SpatialTransformer``
blocks hold ``transformer_blocks.{j}.attn1`` self-attention modules with ldm's attributes
(``heads``, ``scale``, ``to_q``/``to_k``/``to_v`` without bias, ``to_out``). ``sgm=True`` puts no
attention at full latent resolution (SDXL-like). The VAE decodes by a fixed 1×1 map and 8× nearest
upsampling. Counters (`WebUI.log`) record evaluations, decodes, latent upscales and encodes.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import inspect
import math
import os
import sys
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import load_script  # noqa: F401  (Harness uses it; shared with the Forge double)
from . import module, put_modules, restore_modules
from .k_diffusion import sample_euler, sample_heun

_webui: "WebUI | None" = None  # the installed double (the real WebUI is global state too)

LATENT_CHANNELS = 4
CONTEXT_DIM = 16
TOKENS = 8


def W() -> "WebUI":
    assert _webui is not None, "no WebUI double installed"
    return _webui


# =============================================================================================
# The model (ldm/sgm-shaped, random weights)
# =============================================================================================
class CrossAttention(nn.Module):
    """ldm.modules.attention.CrossAttention's attributes and forward(x, context=None, mask=None)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 4, dim_head: int = 8):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None, **kwargs):
        q = self.to_q(x)
        context = x if context is None else context
        k, v = self.to_k(context), self.to_v(context)
        b, n, inner = q.shape
        h, d = self.heads, inner // self.heads
        q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, inner)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim // heads)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=heads, dim_head=dim // heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(4, channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context=context)
        return self.proj_out(y.transpose(1, 2).reshape(b, c, h, w)) + x


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        self.emb_layers = nn.Linear(8, channels)

    def forward(self, x, emb):
        return x + self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]


class TimestepEmbedSequential(nn.ModuleList):
    """ldm's container: children get (x, emb, context) as they need."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)  # ⌈H/2⌉ × ⌈W/2⌉

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TinyUNet(nn.Module):
    """ldm UNetModel names at two levels: latent/1 and latent/2. `attention_at_full` False is the
    SDXL (sgm) layout, where the highest-resolution level has no attention."""

    def __init__(self, channels: int = 16, heads: int = 2, attention_at_full: bool = True):
        super().__init__()
        c = channels

        def level(full: bool):
            blocks: list[nn.Module] = [ResBlock(c)]
            if attention_at_full or not full:
                blocks.append(SpatialTransformer(c, heads, CONTEXT_DIM))
            return blocks

        self.time_embed = nn.Sequential(nn.Linear(8, 8), nn.SiLU())
        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential([nn.Conv2d(LATENT_CHANNELS, c, 3, padding=1)]),
            TimestepEmbedSequential(level(True)),
            TimestepEmbedSequential([Downsample(c)]),
            TimestepEmbedSequential(level(False)),
        ])
        self.middle_block = TimestepEmbedSequential([ResBlock(c), SpatialTransformer(c, heads, CONTEXT_DIM), ResBlock(c)])
        self.output_blocks = nn.ModuleList([
            TimestepEmbedSequential(level(False)),
            TimestepEmbedSequential(level(False) + [Upsample(c)]),
            TimestepEmbedSequential(level(True)),
            TimestepEmbedSequential(level(True)),
        ])
        self.out = nn.Sequential(nn.GroupNorm(4, c), nn.SiLU(), nn.Conv2d(c, LATENT_CHANNELS, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, **kwargs):
        t = timesteps.float().reshape(-1, 1) / 1000.0
        freqs = torch.arange(1, 5, dtype=torch.float32, device=x.device).reshape(1, -1)
        emb = self.time_embed(torch.cat([torch.sin(t * freqs), torch.cos(t * freqs)], dim=1).to(x.dtype))
        full = x.shape[-2:]
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(h, emb, context, size=full)
        return self.out(h)


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet
        self.conditioning_key = "crossattn"


class CheckpointInfo:
    def __init__(self, name: str):
        self.name = self.title = self.short_title = self.name_for_extra = name
        self.shorthash = hashlib.sha256(name.encode()).hexdigest()[:10]


class TinyLDM(nn.Module):
    """The parts of ldm's ``LatentDiffusion`` the WebUI and the script use."""

    def __init__(self, name: str = "tiny", seed: int = 0, parameterization: str = "eps", sgm: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = DiffusionWrapper(TinyUNet(attention_at_full=not sgm))
            self.vae_decode = nn.Conv2d(LATENT_CHANNELS, 3, 1)
            self.vae_encode = nn.Conv2d(3, LATENT_CHANNELS, 1)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.parameterization = parameterization
        self.cond_stage_key = "txt"
        self.is_sdxl = sgm
        self.sd_checkpoint_info = CheckpointInfo(name)
        self.sd_model_hash = self.sd_checkpoint_info.shorthash
        self.scale_factor = 0.18215
        self._text_gen_seed = seed + 1000
        del gen

    # conditioning ---------------------------------------------------------------------------
    def get_learned_conditioning(self, texts: list[str]) -> torch.Tensor:
        out = []
        for text in texts:
            seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
            tokens = TOKENS * (2 if "BREAK" in text else 1)
            out.append(torch.randn(tokens, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed)))
        lengths = {t.shape[0] for t in out}
        assert len(lengths) == 1, "one batch of conds has one token length (the WebUI pads)"
        return torch.stack(out)

    def apply_model(self, x_noisy, t, cond):
        context = torch.cat(cond["c_crossattn"], 1)
        return self.model.diffusion_model(x_noisy, timesteps=t, context=context)

    # VAE --------------------------------------------------------------------------------------
    def decode_first_stage(self, z):
        img = torch.tanh(self.vae_decode(z / self.scale_factor))
        return F.interpolate(img, scale_factor=8, mode="nearest")

    def encode_first_stage(self, img):
        return self.vae_encode(F.avg_pool2d(img, 8))

    def get_first_stage_encoding(self, z):
        return z * self.scale_factor


# =============================================================================================
# k-diffusion wrappers and samplers (k-diffusion 0.0.16's algorithms)
# =============================================================================================
class CompVisDenoiser(nn.Module):
    """ε-prediction wrapper: ``denoised = x − σ·ε(x·c_in, t(σ))`` (c_skip 1, c_out −σ)."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        self.register_buffer("sigmas", ((1 - model.alphas_cumprod) / model.alphas_cumprod) ** 0.5)

    def sigma_to_t(self, sigma):
        return (self.sigmas.log()[None, :] - sigma.log()[:, None]).abs().argmin(1).float()

    def get_scalings(self, sigma):
        return 1.0, -sigma, 1 / (sigma ** 2 + 1) ** 0.5

    def forward(self, input, sigma, **kwargs):
        c_skip, c_out, c_in = (torch.as_tensor(s, dtype=input.dtype).reshape(-1, 1, 1, 1) if torch.is_tensor(s)
                               else s for s in self.get_scalings(sigma))
        out = self.get_model_output(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input * c_skip + out * c_out

    def get_model_output(self, x, t, **kwargs):
        return self.inner_model.apply_model(x, t, **kwargs)

    def get_sigmas(self, n):
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n)
        return torch.cat([self.sigmas[t.round().long()], torch.zeros(1)])


class CompVisVDenoiser(CompVisDenoiser):
    """v-prediction: c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1), c_in = 1/√(σ²+1)."""

    def get_scalings(self, sigma):
        return 1 / (sigma ** 2 + 1), -sigma / (sigma ** 2 + 1) ** 0.5, 1 / (sigma ** 2 + 1) ** 0.5


# =============================================================================================
# prompt_parser
# =============================================================================================
ScheduledPromptConditioning = collections.namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


@dataclasses.dataclass
class ComposableScheduleCondition:
    schedules: list
    weight: float = 1.0


@dataclasses.dataclass
class MulticondLearnedConditioning:
    shape: tuple
    batch: list  # per image: list of ComposableScheduleCondition (one per AND sub-prompt)


def get_multicond_learned_conditioning(model, prompts, steps):
    batch = []
    for prompt in prompts:
        parts = [s.strip() for s in prompt.split(" AND ")]
        conds = model.get_learned_conditioning(parts)
        batch.append([ComposableScheduleCondition([ScheduledPromptConditioning(steps, conds[i])]) for i in range(len(parts))])
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def get_learned_conditioning(model, prompts, steps):
    conds = model.get_learned_conditioning(prompts)
    return [[ScheduledPromptConditioning(steps, conds[i])] for i in range(len(prompts))]


def _scheduled(schedules, current_step):
    """The schedule entry for this step; the first one when the step is past every end (the
    WebUI's default index 0 — Heun-type samplers count more denoiser steps than prompt steps)."""
    return next((s for s in schedules if current_step <= s.end_at_step), schedules[0]).cond


def reconstruct_cond_batch(c, current_step):
    return torch.stack([_scheduled(schedules, current_step) for schedules in c])


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        conds_for_image = []
        for composable in composable_prompts:
            cond = _scheduled(composable.schedules, current_step)
            conds_for_image.append((len(tensors), composable.weight))
            tensors.append(cond)
        conds_list.append(conds_for_image)
    return conds_list, torch.stack(tensors)


# =============================================================================================
# sd_samplers_common / cfg_denoiser / kdiffusion / timesteps
# =============================================================================================
class InterruptedException(BaseException):
    pass


class SamplerData(collections.namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])):
    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order", False) else steps


def setup_img2img_steps(p, steps=None):
    if W().opts.img2img_fix_steps or steps is not None:
        requested = steps or p.steps
        steps = int(requested / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


def apply_refiner(cfg_denoiser, sigma=None):
    p = cfg_denoiser.p
    info = getattr(p, "refiner_checkpoint_info", None)
    if info is None or W().shared.sd_model.sd_checkpoint_info.name == info.name:
        return False
    if cfg_denoiser.step / cfg_denoiser.total_steps < p.refiner_switch_at:
        return False
    p.extra_generation_params["Refiner"] = info.short_title
    W().sd_models.reload_model_weights(info=info)
    p.setup_conds()
    cfg_denoiser.update_inner_model()
    return True


class CFGDenoiser(nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = self.nmask = self.init_latent = None
        self.steps = self.total_steps = None
        self.step = 0
        self.sampler = sampler
        self.p = None
        self.mask_before_denoising = False
        self.cond_scale_miltiplier = 1.0

    @property
    def inner_model(self):
        raise NotImplementedError

    def update_inner_model(self):
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        webui = W()
        state, opts, cbs = webui.state, webui.opts, webui.script_callbacks
        webui.log["evaluations"] += 1
        if state.interrupted or state.skipped:
            raise InterruptedException
        if apply_refiner(self, sigma):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]
        conds_list, tensor = reconstruct_multicond_batch(cond, self.step)
        uncond = reconstruct_cond_batch(uncond, self.step)

        def apply_blend(latent):
            return latent * self.nmask + self.init_latent * self.mask

        if self.mask_before_denoising and self.mask is not None:
            x = apply_blend(x)
        batch_size = len(conds_list)
        repeats = [len(c) for c in conds_list]

        def make_condition_dict(c_crossattn, c_concat):
            return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [image_cond])

        if webui.version >= (1, 8):
            params = cbs.CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps,
                                           tensor, uncond, self)
        else:
            params = cbs.CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps,
                                           tensor, uncond)
        cbs.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        skip_uncond = bool(self.step % 2 and s_min_uncond > 0 and sigma[0] < s_min_uncond)
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                                  cond=make_condition_dict(cond_in[a:b], image_cond_in[a:b]))
        else:
            x_out = torch.zeros_like(x_in)
            chunk = batch_size * 2 if opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], chunk):
                b = min(a + chunk, tensor.shape[0])
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                              cond=make_condition_dict(tensor[a:b], image_cond_in[a:b]))
            if not skip_uncond:
                x_out[-uncond.shape[0]:] = self.inner_model(x_in[-uncond.shape[0]:], sigma_in[-uncond.shape[0]:],
                                                            cond=make_condition_dict(uncond, image_cond_in[-uncond.shape[0]:]))
        denoised_image_indexes = [c[0][0] for c in conds_list]
        if skip_uncond:
            x_out = torch.cat([x_out, torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])])
        cbs.cfg_denoised_callback(cbs.CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps, self.inner_model))
        denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0 if skip_uncond else cond_scale * self.cond_scale_miltiplier)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = apply_blend(denoised)
        self.sampler.last_latent = self.get_pred_x0(torch.cat([x_in[i:i + 1] for i in denoised_image_indexes]),
                                                    torch.cat([x_out[i:i + 1] for i in denoised_image_indexes]), sigma)
        after = cbs.AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cbs.cfg_after_cfg_callback(after)
        denoised = after.x
        webui.log["after_cfg_outputs"].append(denoised)
        self.step += 1
        return denoised


class CFGDenoiserKDiffusion(CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            model = W().shared.sd_model
            cls = CompVisVDenoiser if model.parameterization == "v" else CompVisDenoiser
            self.model_wrap = cls(model)
        return self.model_wrap


class CompVisTimestepsDenoiser(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CompVisTimestepsVDenoiser(CompVisTimestepsDenoiser):
    def forward(self, input, timesteps, **kwargs):
        v = self.inner_model.apply_model(input, timesteps, **kwargs)
        a = self.inner_model.alphas_cumprod[timesteps.to(torch.int)][:, None, None, None]
        return a.sqrt() * v + (1 - a).sqrt() * input


class CFGDenoiserTimesteps(CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.alphas = W().shared.sd_model.alphas_cumprod
        self.mask_before_denoising = True

    def get_pred_x0(self, x_in, x_out, sigma):
        a_t = self.alphas[sigma.to(dtype=int)][:, None, None, None]
        return (x_in - (1 - a_t).sqrt() * x_out) / a_t.sqrt()

    @property
    def inner_model(self):
        if self.model_wrap is None:
            model = W().shared.sd_model
            cls = CompVisTimestepsVDenoiser if model.parameterization == "v" else CompVisTimestepsDenoiser
            self.model_wrap = cls(model)
        return self.model_wrap


def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[F.pad(timesteps[:-1], pad=(1, 0))]
    s_in = x.new_ones((x.shape[0],))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **(extra_args or {}))
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        W().log["ddim_pred_x0"].append(pred_x0)
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})
    return x


def plms(model, x, timesteps, extra_args=None, callback=None, disable=None):
    """PLMS's evaluation pattern: two evaluations on its first step, then one per step."""
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[F.pad(timesteps[:-1], pad=(1, 0))]
    s_in = x.new_ones((x.shape[0],))
    old_eps: list = []

    def step(e_t, index):
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * e_t, pred_x0

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **(extra_args or {}))
        if not old_eps:
            x_prev, _ = step(e_t, index)
            e_next = model(x_prev, timesteps[max(index - 1, 0)].item() * s_in, **(extra_args or {}))
            e_prime = (e_t + e_next) / 2
        else:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        x_prev, pred_x0 = step(e_prime, index)
        old_eps = (old_eps + [e_t])[-3:]
        x = x_prev
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})
    return x


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.func = funcname
        self.config: SamplerData | None = None
        self.last_latent = None
        self.s_min_uncond = None
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None

    def callback_state(self, d):
        W().state.sampling_step = d["i"]

    def launch_sampling(self, steps, func):
        state = W().state
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = p.mask if hasattr(p, "mask") else None
        self.model_wrap_cfg.nmask = p.nmask if hasattr(p, "nmask") else None
        self.model_wrap_cfg.step = 0
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)
        return {}

    def _extra_args(self, p, conditioning, unconditional_conditioning, image_conditioning):
        return {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
                "cond_scale": p.cfg_scale, "s_min_uncond": self.s_min_uncond}


class KDiffusionSampler(Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.func = {"sample_euler": sample_euler, "sample_heun": sample_heun}[funcname]
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        return self.model_wrap.get_sigmas(steps)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps, t_enc = setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, sigma_sched,
                                                                 extra_args=self.sampler_extra_args,
                                                                 callback=self.callback_state, disable=False))

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]
        self.initialize(p)
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, sigmas,
                                                             extra_args=self.sampler_extra_args,
                                                             callback=self.callback_state, disable=False))


class CompVisSampler(Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_timesteps(self, p, steps):
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps, t_enc = setup_img2img_steps(p, steps)
        timesteps = self.get_timesteps(p, steps)
        timesteps_sched = timesteps[:t_enc]
        a = W().shared.sd_model.alphas_cumprod[timesteps[t_enc]]
        xi = x * a.sqrt() + noise * (1 - a).sqrt()
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, timesteps_sched,
                                                                 extra_args=self.sampler_extra_args,
                                                                 callback=self.callback_state, disable=False))

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = self.get_timesteps(p, steps)
        self.initialize(p)
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, timesteps,
                                                             extra_args=self.sampler_extra_args,
                                                             callback=self.callback_state, disable=False))


SAMPLERS = [
    SamplerData("Euler", lambda model: KDiffusionSampler("sample_euler", model), ["k_euler"], {}),
    SamplerData("Heun", lambda model: KDiffusionSampler("sample_heun", model), ["k_heun"], {"second_order": True}),
    SamplerData("DDIM", lambda model: CompVisSampler(ddim, model), ["ddim"], {}),
    SamplerData("PLMS", lambda model: CompVisSampler(plms, model), ["plms"], {}),
]


def create_sampler(name, model):
    config = next(s for s in SAMPLERS if s.name == name)
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


# =============================================================================================
# script_callbacks (v1.10.1, with the v1.6 differences)
# =============================================================================================
class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoiserParamsV16:
    """v1.6–v1.7: no ``denoiser`` field."""

    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond = text_cond, text_uncond


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = x, sampling_step, total_sampling_steps, inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


ScriptCallbackV16 = collections.namedtuple("ScriptCallback", ["script", "callback"])

CATEGORIES = ("app_started", "model_loaded", "ui_settings", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg",
              "script_unloaded", "before_ui", "infotext_pasted", "after_component")


def _make_script_callbacks(version: tuple, remover: bool) -> types.ModuleType:
    mod = types.ModuleType("modules.script_callbacks")
    mod.__file__ = "<double>/modules/script_callbacks.py"
    modern = version >= (1, 9)
    mod.callback_map = {f"callbacks_{c}": [] for c in CATEGORIES}
    mod.CFGDenoiserParams = CFGDenoiserParams if version >= (1, 8) else CFGDenoiserParamsV16
    mod.CFGDenoisedParams = CFGDenoisedParams
    mod.AfterCFGCallbackParams = AfterCFGCallbackParams
    mod.ScriptCallback = ScriptCallback if modern else ScriptCallbackV16
    here = __file__

    def add_callback_modern(callbacks, fun, *, name=None, category="unknown", filename=None):
        if filename is None:
            stack = [x for x in inspect.stack() if x.filename != here]  # the real cost: a full stack walk
            filename = stack[0].filename if stack else "unknown file"
        callback_name = f"qsilk/{os.path.basename(filename)}/{category}" + (f"/{name}" if name else "")
        callbacks.append(ScriptCallback(filename, fun, callback_name))

    def add_callback(callbacks, fun, *, name=None, category="unknown"):
        stack = [x for x in inspect.stack() if x.filename != here]  # the real cost: a full stack walk
        filename = stack[0].filename if stack else "unknown file"
        if modern:
            callback_name = f"qsilk/{os.path.basename(filename)}/{category}" + (f"/{name}" if name else "")
            callbacks.append(ScriptCallback(filename, fun, callback_name))
        else:
            callbacks.append(ScriptCallbackV16(filename, fun))

    if modern:
        mod.add_callback = add_callback_modern
    else:
        def add_callback_v16(callbacks, fun):
            add_callback(callbacks, fun)
        mod.add_callback = add_callback_v16

    if modern:
        mod.ordered_callbacks_map = {}

        def ordered_callbacks(category):
            unordered = mod.callback_map["callbacks_" + category]
            cached = mod.ordered_callbacks_map.get(category)
            if cached is not None and len(cached) == len(unordered):
                return cached  # the v1.9+ cache, keyed only by length
            mod.ordered_callbacks_map[category] = list(unordered)
            return mod.ordered_callbacks_map[category]
    else:
        def ordered_callbacks(category):
            return mod.callback_map["callbacks_" + category]

    mod.ordered_callbacks = ordered_callbacks

    def dispatcher(category):
        def run(*args):
            for c in list(ordered_callbacks(category)):
                try:
                    c.callback(*args)
                except Exception as exc:  # the WebUI reports and goes on
                    W().log["callback_errors"].append((category, exc))
        return run

    def register(category):
        if modern:
            def on(callback, *, name=None):
                add_callback(mod.callback_map["callbacks_" + category], callback, name=name, category=category)
        else:
            def on(callback):
                add_callback(mod.callback_map["callbacks_" + category], callback, category=category)
        return on

    for category in CATEGORIES:
        setattr(mod, f"on_{category}", register(category))
    mod.cfg_denoiser_callback = dispatcher("cfg_denoiser")
    mod.cfg_denoised_callback = dispatcher("cfg_denoised")
    mod.cfg_after_cfg_callback = dispatcher("cfg_after_cfg")
    mod.model_loaded_callback = dispatcher("model_loaded")
    mod.ui_settings_callback = dispatcher("ui_settings")
    mod.before_ui_callback = dispatcher("before_ui")
    mod.script_unloaded_callback = dispatcher("script_unloaded")

    def after_component_callback(component, **kwargs):
        """``modules/script_callbacks.py``: called for every Gradio component the UI creates (the
        double's UI code calls it where the WebUI's patched component constructor would)."""
        for c in list(ordered_callbacks("after_component")):
            try:
                c.callback(component, **kwargs)
            except Exception as exc:
                W().log["callback_errors"].append(("after_component", exc))

    mod.after_component_callback = after_component_callback

    if remover:
        def remove_callbacks_for_function(callback_func):
            for entries in mod.callback_map.values():
                for cb in [cb for cb in entries if cb.callback == callback_func]:
                    entries.remove(cb)
            if version >= (1, 9, 1):
                for entries in mod.ordered_callbacks_map.values():
                    for cb in [cb for cb in entries if cb.callback == callback_func]:
                        entries.remove(cb)
        mod.remove_callbacks_for_function = remove_callbacks_for_function

    def clear_callbacks():
        for entries in mod.callback_map.values():
            entries.clear()
        if modern:
            mod.ordered_callbacks_map.clear()

    mod.clear_callbacks = clear_callbacks
    return mod


# =============================================================================================
# shared, sd_models, scripts, processing
# =============================================================================================
class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None, **kwargs):
        self.default, self.label, self.component, self.component_args, self.section = default, label, component, component_args, section

    def needs_reload_ui(self):
        return self


class Options:
    def __init__(self, **data):
        object.__setattr__(self, "data", dict(data))
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


class State:
    def __init__(self):
        self.interrupted = self.skipped = self.stopping_generation = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.job_count = -1

    def interrupt(self):
        self.interrupted = True


class Script:
    """modules.scripts.Script: the attributes and hook signatures."""

    name = None
    section = None
    filename = None
    args_from = args_to = None
    alwayson = False
    is_txt2img = is_img2img = False
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    controls = None

    def title(self):
        raise NotImplementedError

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def elem_id(self, item_id):
        tab = "img2img" if self.is_img2img else "txt2img"
        title = "".join(c if c.isalnum() else "_" for c in self.title().lower())
        return f"script_{tab}_{title}_{item_id}"

    def before_process(self, p, *args): pass
    def process(self, p, *args): pass
    def process_batch(self, p, *args, **kwargs): pass
    def process_before_every_sampling(self, p, *args, **kwargs): pass
    def before_hr(self, p, *args): pass
    def post_sample(self, p, ps, *args): pass
    def postprocess_batch(self, p, *args, **kwargs): pass
    def postprocess(self, p, processed, *args): pass


AlwaysVisible = object()
ScriptClassData = collections.namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class ScriptRunner:
    """Calls each always-on script's hook with its slice of ``p.script_args``; exceptions are
    reported and swallowed, as in the real runner."""

    def __init__(self, scripts: list):
        self.alwayson_scripts = scripts
        self.inputs = [None]

    def _run(self, hook, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            method = getattr(script, hook)
            script_args = p.script_args[script.args_from:script.args_to]
            try:
                if hook in ("postprocess", "post_sample"):
                    method(p, *args, *script_args)
                else:
                    method(p, *script_args, **kwargs)
            except Exception as exc:
                W().log["hook_errors"].append((hook, exc))

    def before_process(self, p): self._run("before_process", p)
    def process(self, p): self._run("process", p)
    def process_batch(self, p, **kw): self._run("process_batch", p, **kw)
    def before_hr(self, p): self._run("before_hr", p)
    def post_sample(self, p, ps): self._run("post_sample", p, ps)
    def postprocess_batch(self, p, images, **kw): self._run("postprocess_batch", p, images=images, **kw)
    def postprocess(self, p, processed): self._run("postprocess", p, processed)

    def process_before_every_sampling(self, p, **kwargs):
        if W().version >= (1, 10):
            self._run("process_before_every_sampling", p, **kwargs)


class DecodedSamples(list):
    already_decoded = True


class Processed:
    def __init__(self, p, images_list, infotexts=None):
        self.images = images_list
        self.infotexts = infotexts or []
        self.comments = "".join(f"{c}\n" for c in p.comments)
        self.extra_generation_params = dict(p.extra_generation_params)


class ImageRNG:
    def __init__(self, shape, seeds):
        self.shape, self.seeds = shape, seeds

    def next(self):
        return torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(int(s))) for s in self.seeds])


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
    W().log["decoded"].append(batch)
    out = []
    for i in range(batch.shape[0]):
        sample = model.decode_first_stage(batch[i:i + 1])[0]
        # devices.test_for_nans: skipped under --disable-nan-check (shared.cmd_opts.disable_nan_check)
        nan_check = check_for_nans and not getattr(W().shared.cmd_opts, "disable_nan_check", False)
        if nan_check and not torch.isfinite(sample).all():
            raise RuntimeError("A tensor with NaNs was produced in VAE.")
        out.append(sample)
    return out


def images_tensor_to_samples(image, approximation=None, model=None):
    model = model or W().shared.sd_model
    W().log["encoded"].append(image)
    return model.get_first_stage_encoding(model.encode_first_stage(image * 2 - 1))


class StableDiffusionProcessing:
    def __init__(self, *, prompt="a cat", negative_prompt="", steps=4, sampler_name="Euler", batch_size=1, n_iter=1,
                 width=64, height=64, cfg_scale=7.0, seed=1, scripts=None, script_args=None, s_min_uncond=0.0,
                 refiner_checkpoint_info=None, refiner_switch_at=None):
        self.prompt, self.negative_prompt, self.steps, self.sampler_name = prompt, negative_prompt, steps, sampler_name
        self.batch_size, self.n_iter, self.width, self.height = batch_size, n_iter, width, height
        self.cfg_scale, self.seed, self.s_min_uncond = cfg_scale, seed, s_min_uncond
        self.scripts, self.script_args = scripts, list(script_args or [])
        self.extra_generation_params: dict = {}
        self.comments: dict = {}
        self.is_hr_pass = False
        self.sampler = None
        self.refiner_checkpoint_info, self.refiner_switch_at = refiner_checkpoint_info, refiner_switch_at
        self.is_api = True

    @property
    def sd_model(self):
        return W().shared.sd_model

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = [self.prompt] * n if isinstance(self.prompt, str) else list(self.prompt)
        self.all_negative_prompts = [self.negative_prompt] * n
        self.all_seeds = [self.seed + i for i in range(n)]

    def get_conds(self):
        return self.c, self.uc

    def setup_conds(self):
        model = W().shared.sd_model
        steps = self.steps
        self.c = get_multicond_learned_conditioning(model, self.prompts, steps)
        self.uc = get_learned_conditioning(model, self.negative_prompts, steps)

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def image_conditioning(self, x):
        return x.new_zeros(x.shape[0], 5, 1, 1)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, *, enable_hr=False, hr_scale=2.0, hr_upscaler="Latent", hr_second_pass_steps=0,
                 denoising_strength=0.5, hr_checkpoint_info=None, hr_sampler_name=None, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr, self.hr_scale, self.hr_upscaler = enable_hr, hr_scale, hr_upscaler
        self.hr_second_pass_steps, self.denoising_strength = hr_second_pass_steps, denoising_strength
        self.hr_checkpoint_info, self.hr_sampler_name = hr_checkpoint_info, hr_sampler_name
        self.latent_scale_mode = {"mode": "nearest"} if hr_upscaler.startswith("Latent") else None
        self.hr_upscale_to_x, self.hr_upscale_to_y = int(self.width * hr_scale), int(self.height * hr_scale)

    def calculate_hr_conds(self):
        self.hr_c, self.hr_uc = self.c, self.uc

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        webui = W()
        self.sampler = webui.sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.image_conditioning(x))
        if not self.enable_hr:
            return samples
        if self.latent_scale_mode is None:
            decoded_samples = torch.stack(decode_latent_batch(self.sd_model, samples, check_for_nans=True)).float()
        else:
            decoded_samples = None
        webui.sd_models.reload_model_weights(info=self.hr_checkpoint_info)
        return self.sample_hr_pass(samples, decoded_samples, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        webui = W()
        if webui.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = webui.sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        target = (self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8)
        if self.latent_scale_mode is not None:
            webui.log["latent_upscaled"].append(samples)
            samples = F.interpolate(samples, size=target, mode=self.latent_scale_mode["mode"])
            image_conditioning = self.image_conditioning(samples)
        else:
            lowres = torch.clamp((decoded_samples + 1.0) / 2.0, 0.0, 1.0)
            upscaled = F.interpolate(lowres, size=(self.hr_upscale_to_y, self.hr_upscale_to_x), mode="bilinear")
            samples = images_tensor_to_samples(upscaled)
            image_conditioning = self.image_conditioning(samples)
        self.rng = ImageRNG(samples.shape[1:], [s + 100 for s in self.seeds])
        noise = self.rng.next()
        self.calculate_hr_conds()
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=image_conditioning)
        self.sampler = None
        decoded = decode_latent_batch(self.sd_model, samples, check_for_nans=True)
        self.is_hr_pass = False
        return DecodedSamples(decoded)


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, *, init_image: torch.Tensor, denoising_strength=0.6, mask: torch.Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.init_image, self.denoising_strength, self.image_mask = init_image, denoising_strength, mask
        self.mask = None
        self.nmask = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.sampler = W().sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        image = self.init_image.expand(self.batch_size, -1, -1, -1)
        self.init_latent = images_tensor_to_samples(image, model=self.sd_model)
        if self.image_mask is not None:
            latmask = F.interpolate(self.image_mask[None, None].float(), size=self.init_latent.shape[-2:])[0, 0].round()
            latmask = latmask[None].expand(self.init_latent.shape[1], -1, -1)
            self.mask = 1.0 - latmask
            self.nmask = latmask

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=self.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                              image_conditioning=self.image_conditioning(x))
        if self.mask is not None:
            samples = samples * self.nmask + self.init_latent * self.mask
        return samples


def create_infotext(p):
    parts = [f"Steps: {p.steps}", f"Sampler: {p.sampler_name}", f"Seed: {p.seed}"]
    for k, v in p.extra_generation_params.items():
        if v is None:
            continue
        text = str(v)
        if "," in text or ":" in text or '"' in text:
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(k if k == v else f"{k}: {text}")
    return f"{p.prompt}\n" + ", ".join(parts)


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    return process_images_inner(p)


def process_images_inner(p):
    webui = W()
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    infotexts, output_images = [], []
    with torch.no_grad():
        p.init(p.all_prompts, p.all_seeds, [])
        for n in range(p.n_iter):
            p.iteration = n
            if webui.state.interrupted:
                break
            webui.sd_models.reload_model_weights()  # back to the main model after a refiner
            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
            p.rng = ImageRNG((LATENT_CHANNELS, p.height // 8, p.width // 8), p.seeds)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=[])
            p.setup_conds()
            samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=[],
                               subseed_strength=0.0, prompts=p.prompts)
            if p.scripts is not None and webui.version >= (1, 8):
                ps = PostSampleArgs(samples)
                p.scripts.post_sample(p, ps)
                samples = ps.samples
            if getattr(samples, "already_decoded", False):
                x_samples = samples
            else:
                x_samples = decode_latent_batch(p.sd_model, samples, check_for_nans=True)
            x_samples = torch.clamp((torch.stack(list(x_samples)).float() + 1.0) / 2.0, 0.0, 1.0)
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, x_samples, batch_number=n)
            for i, x_sample in enumerate(x_samples):
                output_images.append(_to_image(x_sample))
                infotexts.append(create_infotext(p))
            webui.log["pixels"].append(x_samples)
    res = Processed(p, output_images, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res


def _to_image(x_sample):
    from PIL import Image
    arr = (255.0 * x_sample.permute(1, 2, 0).cpu().numpy()).astype("uint8")
    return Image.fromarray(arr)


# =============================================================================================
# XYZ plot (scripts/xyz_grid.py, loaded under the module name "xyz_grid.py")
# =============================================================================================
class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.choices, self.prepare = confirm, cost, choices, prepare


def _make_xyz_module() -> types.ModuleType:
    mod = types.ModuleType("xyz_grid.py")
    mod.AxisOption = AxisOption
    mod.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None), AxisOption("Seed", int, lambda p, x, xs: setattr(p, "seed", x))]

    class XYZScript(Script):
        def title(self):
            return "X/Y/Z plot"

    XYZScript.__module__ = "xyz_grid.py"
    mod.Script = XYZScript
    return mod


def run_xyz_cells(p, option_label: str, values: list) -> list:
    """What the XYZ script does per cell: confirm all values, then ``pc = copy(p)``,
    ``apply(pc, x, xs)``, ``process_images(pc)``."""
    xyz = W().xyz_module
    option = next(o for o in xyz.axis_options if o.label == option_label)
    xs = [option.type(v) for v in values]
    if option.confirm:
        option.confirm(p, xs)
    results = []
    for x in xs:
        pc = copy.copy(p)
        option.apply(pc, x, xs)
        results.append(process_images(pc))
    return results


# =============================================================================================
# sd_models, ui_components, the WebUI object
# =============================================================================================
class WebUI:
    """A fresh double of the WebUI's global state; `install()` puts its modules in sys.modules."""

    def __init__(self, version: str = "1.10.1", *, remover: bool = True, batch_cond_uncond: bool = True,
                 model: TinyLDM | None = None):
        self.version = tuple(int(v) for v in version.split("."))
        self.models = {"tiny": model or TinyLDM("tiny", seed=0)}
        self.log: dict[str, list] = collections.defaultdict(list)
        self.log["evaluations"] = 0  # type: ignore[assignment]
        self.state = State()
        self.opts = Options(batch_cond_uncond=batch_cond_uncond, img2img_fix_steps=False)
        self.script_callbacks = _make_script_callbacks(self.version, remover)
        self.xyz_module = _make_xyz_module()
        self._saved: dict[str, Any] = {}
        self._build_modules()

    def add_model(self, name: str, **kwargs) -> TinyLDM:
        self.models[name] = TinyLDM(name, **kwargs)
        return self.models[name]

    def _build_modules(self):
        webui = self

        self.shared = module("modules.shared", opts=self.opts, state=self.state, sd_model=self.models["tiny"],
                             OptionInfo=OptionInfo, cmd_opts=types.SimpleNamespace())

        def reload_model_weights(sd_model=None, info=None):
            current = webui.shared.sd_model
            target = webui.models["tiny"] if info is None else webui.models[info.name]
            if target is current:
                return current
            webui.shared.sd_model = target
            webui.log["model_loads"].append(target.sd_checkpoint_info.name)
            webui.script_callbacks.model_loaded_callback(target)
            return target

        self.sd_models = module("modules.sd_models", reload_model_weights=reload_model_weights)
        self.sd_samplers = module("modules.sd_samplers", create_sampler=create_sampler, samplers=SAMPLERS)
        self.scripts = module("modules.scripts", Script=Script, AlwaysVisible=AlwaysVisible, scripts_data=[
            ScriptClassData(self.xyz_module.Script, "scripts/xyz_grid.py", ".", self.xyz_module)],
            PostSampleArgs=PostSampleArgs, ScriptRunner=ScriptRunner)
        self.modules = {
            "modules": module("modules", __path__=[]),
            "modules.shared": self.shared,
            "modules.script_callbacks": self.script_callbacks,
            "modules.scripts": self.scripts,
            "modules.sd_models": self.sd_models,
            "modules.sd_samplers": self.sd_samplers,
            "modules.sd_samplers_common": module("modules.sd_samplers_common", Sampler=Sampler, SamplerData=SamplerData,
                                                 InterruptedException=InterruptedException,
                                                 setup_img2img_steps=setup_img2img_steps),
            "modules.sd_samplers_cfg_denoiser": module("modules.sd_samplers_cfg_denoiser", CFGDenoiser=CFGDenoiser),
            "modules.sd_samplers_kdiffusion": module("modules.sd_samplers_kdiffusion", KDiffusionSampler=KDiffusionSampler,
                                                     CFGDenoiserKDiffusion=CFGDenoiserKDiffusion),
            "modules.sd_samplers_timesteps": module("modules.sd_samplers_timesteps", CompVisSampler=CompVisSampler,
                                                    CFGDenoiserTimesteps=CFGDenoiserTimesteps),
            "modules.prompt_parser": module("modules.prompt_parser", reconstruct_multicond_batch=reconstruct_multicond_batch,
                                            reconstruct_cond_batch=reconstruct_cond_batch,
                                            MulticondLearnedConditioning=MulticondLearnedConditioning),
            "modules.processing": module("modules.processing", process_images=process_images,
                                         StableDiffusionProcessingTxt2Img=StableDiffusionProcessingTxt2Img,
                                         StableDiffusionProcessingImg2Img=StableDiffusionProcessingImg2Img,
                                         decode_latent_batch=decode_latent_batch, Processed=Processed),
            "modules.paths": module("modules.paths", models_path=os.path.join(os.path.dirname(__file__), "_models")),
            "modules.ui_components": module("modules.ui_components", InputAccordion=_input_accordion_class()),
        }
        for name in ("shared", "script_callbacks", "scripts", "sd_models", "sd_samplers", "processing", "paths"):
            setattr(self.modules["modules"], name, self.modules[f"modules.{name}"])

    def install(self) -> "WebUI":
        """Put the modules in ``sys.modules``. Also runs torch on one thread while installed: the
        tiny model is dominated by thread hand-off on a loaded machine (CI shares its cores)."""
        global _webui
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        put_modules(self.modules, self._saved)
        _webui = self
        return self

    def uninstall(self) -> None:
        global _webui
        restore_modules(self._saved)
        torch.set_num_threads(getattr(self, "_threads", torch.get_num_threads()))
        if _webui is self:
            _webui = None

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()

    # helpers for tests -------------------------------------------------------------------
    def installed_callbacks(self) -> list:
        return [(cat, e.callback) for cat, entries in self.script_callbacks.callback_map.items() for e in entries]

    def forward_hooks(self) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in self.models.values()
                   for m in model.modules())


def _input_accordion_class():
    """modules.ui_components.InputAccordion (see `a1111_ui`), or None without Gradio."""
    try:
        from .a1111_ui import InputAccordion
    except ImportError:  # pragma: no cover
        return None
    return InputAccordion




class Harness:
    """Drives the real ``scripts/qsilk.py`` through this double like the WebUI/API does: loads the
    script, builds its UI once (defaults = the API's default args), and runs jobs whose
    ``script_args`` are ``[script dropdown] + QSilk's args`` (request args overwrite the first
    values, the rest keep the ``ui()`` defaults — ``Api.init_script_args``)."""

    def __init__(self, root: str, webui: WebUI, *, is_img2img: bool = False):
        import gradio as gr
        self.webui = webui
        self.module = load_script(root)
        self.script = self.module.QSilkScript()
        self.script.is_img2img, self.script.is_txt2img = is_img2img, not is_img2img
        with gr.Blocks():
            self.components = self.script.ui(is_img2img)
        self.script.args_from, self.script.args_to = 1, 1 + len(self.components)
        self.defaults = [c.value for c in self.components]
        self.runner = ScriptRunner([self.script])

    def script_args(self, request_args: list | None = None) -> list:
        args = list(self.defaults)
        for i, value in enumerate(request_args or []):
            if i < len(args):
                args[i] = value
        return [None] + args

    def txt2img(self, request_args: list | None = None, **kwargs) -> Processed:
        p = StableDiffusionProcessingTxt2Img(scripts=self.runner, script_args=self.script_args(request_args), **kwargs)
        self.last_p = p
        return process_images(p)

    def img2img(self, request_args: list | None = None, **kwargs) -> Processed:
        p = StableDiffusionProcessingImg2Img(scripts=self.runner, script_args=self.script_args(request_args), **kwargs)
        self.last_p = p
        return process_images(p)

    def without_script(self, cls=StableDiffusionProcessingTxt2Img, **kwargs) -> Processed:
        p = cls(scripts=None, **kwargs)
        self.last_p = p
        return process_images(p)
