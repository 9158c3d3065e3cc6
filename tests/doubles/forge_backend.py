"""Test double of Forge's model patcher, predictor, UNet and sampling function.

Written from the facts in shared/research/forge.md and a reading of the hosts' source; no host
code is copied. It mirrors the signatures, data flow and call order QSilk relies on:

- **new Forge**, lllyasviel/stable-diffusion-webui-forge main ``dfdcbab6``:
  ``backend/patcher/base.py`` (`ModelPatcher`: ``model_options = {"transformer_options": {}}``;
  ``clone()`` deep-copies ``model_options``; ``set_model_sampler_post_cfg_function`` appends to a
  list; ``set_model_patch`` appends to ``transformer_options["patches"][name]``;
  ``set_model_options_patch_replace`` copies the dicts and stores one function per key
  ``(block_name, number[, transformer_index])``), ``backend/patcher/unet.py`` (`UnetPatcher.clone`),
  ``backend/modules/k_prediction.py`` (``calculate_input`` / ``calculate_denoised`` per
  ``prediction_type``), ``backend/modules/k_model.py`` (`KModel.apply_model`: denoised is x0 for
  every family), ``backend/nn/unet.py`` (the UNet sets ``original_shape``, ``transformer_index``
  and ``block``; `SpatialTransformer` sets ``block_index``; `BasicTransformerBlock` runs the
  ``attn1_patch`` list on the normalised state, then an ``attn1`` replace looked up by the 3-tuple
  then the 2-tuple key — with ``to_q``/``to_k``/``to_v`` applied before it — else the attention
  module), ``backend/sampling/sampling_function.py`` (`calc_cond_uncond_batch`: chunks of B rows,
  batched newest-first so ``cond_or_uncond`` is ``[1, 0]`` when both fit one call, split over
  several calls when memory is short; ``transformer_options`` gets ``cond_or_uncond``, ``sigmas``
  (the evaluation's timestep tensor itself), ``cond_indices``; `sampling_function_inner`: the CFG-1
  optimisation, pre-CFG functions, CFG, then each post-CFG function with the keys
  ``denoised, cond, uncond, model, uncond_denoised, cond_denoised, sigma, model_options, input``).
  A skipped uncond pass leaves ``uncond_denoised`` all zeros (0 / 1e-37).
- **old Forge**, tag ``previous`` ``bfee03d8``: ``ldm_patched/modules/model_patcher.py``,
  ``modules_forge/unet_patcher.py``, ``ldm_patched/modules/samplers.py`` — the same contract; the
  model is a ``BaseModel`` whose helper is ``model.model_sampling`` (no ``predictor``).
- **reForge** main ``3b56b268``: ``ldm_patched/modules/samplers.py`` (`calc_cond_batch` then
  `cfg_function`): post-CFG args also carry ``cond_scale``; ``uncond_denoised`` is **None** when the
  uncond pass is skipped, and then ``denoised`` is the cond prediction.
- **Forge Neo** release 2.26 (Haoming02's ``neo`` line, read in the copy exo101/sd-webui-forge-neo-v3
  ``5692d2d1``, ``webui/``): new Forge's ``backend/`` — ``backend/sampling/sampling_function.py``
  `sampling_function_inner` builds the post-CFG args as ComfyUI does, *with* ``cond_scale``
  (``denoised, cond, uncond, cond_scale, model, uncond_denoised, cond_denoised, sigma,
  model_options, input``); a skipped uncond leaves zeros; the helper is ``model.predictor``. Its DiT
  families (``backend/diffusion_engine/``: Flux, Flux.2, Z-Image, Chroma, Qwen-Image, Wan, Anima)
  take no attention patch; the Wan-VAE ones (``is_wan``: Wan, Qwen-Image, Anima) sample 5-D
  latents ``(B, C, T, H, W)`` (``modules/processing.py``: ``(C, T, H/8, W/8)`` per sample).
- **Forge Classic** branch ``classic`` ``1f95d717``: old Forge's ``ldm_patched`` — the post-CFG args
  have **no** ``cond_scale``; the helper is ``model.model_sampling``.

Conditions are simplified to ``{"c_crossattn": tensor (B, T, D), "strength": w}`` dicts; the
attention is real (multi-head softmax), so the entropy probe sees real q/k.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

FORGE_NEW, FORGE_OLD, REFORGE = "forge_new", "forge_old", "reforge"
FORGE_NEO, FORGE_CLASSIC = "forge_neo", "forge_classic"
#: Families built on ``backend/`` (helper ``model.predictor``); the others use ``ldm_patched``.
BACKEND_FAMILIES = (FORGE_NEW, FORGE_NEO)
#: Families whose post-CFG args carry ``cond_scale``.
COND_SCALE_IN_POST_CFG = (REFORGE, FORGE_NEO)


# --------------------------------------------------------------------------------------------
# Model patcher (backend/patcher/base.py + unet.py; ldm_patched model_patcher + unet_patcher)
# --------------------------------------------------------------------------------------------
def set_model_options_patch_replace(model_options, patch, name, block_name, number, transformer_index=None):
    """Copies the nested dicts (so a one-off options dict does not change the patcher's)."""
    to = dict(model_options["transformer_options"])
    replace = dict(to.get("patches_replace", {}))
    replace[name] = dict(replace.get(name, {}))
    key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    replace[name][key] = patch
    to["patches_replace"] = replace
    model_options["transformer_options"] = to
    return model_options


class UnetPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.clones = 0

    def clone(self):
        n = UnetPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        self.clones += 1
        return n

    def set_model_sampler_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_cfg_function"] = fn
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = self.model_options.get("sampler_post_cfg_function", []) + [fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_unet_function_wrapper(self, wrapper):
        self.model_options["model_function_wrapper"] = wrapper

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.model_options = set_model_options_patch_replace(self.model_options, patch, name, block_name,
                                                             number, transformer_index)

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_replace_all(self, patch, target="attn1"):
        for block_name in ("input", "middle", "output"):
            for number in range(16):
                for transformer_index in range(16):
                    self.set_model_patch_replace(patch, target, block_name, number, transformer_index)


# --------------------------------------------------------------------------------------------
# Prediction (backend/modules/k_prediction.py; ldm_patched model_sampling)
# --------------------------------------------------------------------------------------------
class Prediction(nn.Module):
    """``prediction_type`` 'epsilon' | 'v_prediction' | 'const' (flow). Discrete SD schedule
    (linear β 0.00085..0.012, 1000 steps) or, for 'const', σ ∈ (0, 1]."""

    def __init__(self, prediction_type="epsilon", sigma_data=1.0):
        super().__init__()
        self.prediction_type = prediction_type
        self.sigma_data = sigma_data
        if prediction_type == "const":
            sigmas = torch.linspace(1.0, 1000.0, 1000) / 1000.0
            acp = 1.0 / (1.0 + sigmas.double() ** 2)
        else:
            betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
            acp = torch.cumprod(1.0 - betas, 0)
            sigmas = ((1 - acp) / acp) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("alphas_cumprod", acp.float())

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        if self.prediction_type == "const":
            return sigma
        dists = sigma.log()[:, None] - self.sigmas.log()[None]
        return dists.abs().argmin(dim=1).view(sigma.shape).float()

    def calculate_input(self, sigma, noise):
        if self.prediction_type == "const":
            return noise
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        if self.prediction_type == "v_prediction":
            sd2 = self.sigma_data ** 2
            return model_input * sd2 / (sigma ** 2 + sd2) - model_output * sigma * self.sigma_data / (sigma ** 2 + sd2) ** 0.5
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image):
        if self.prediction_type == "const":
            return sigma * noise + (1.0 - sigma) * latent_image
        return noise * sigma + latent_image


# --------------------------------------------------------------------------------------------
# UNet (backend/nn/unet.py; ldm_patched openaimodel + attention) — tiny, same names and patch points
# --------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    def __init__(self, query_dim, heads, dim_head, context_dim=None):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, value=None, transformer_options=None):
        q = self.to_q(x)
        context = x if context is None else context
        k = self.to_k(context)
        v = self.to_v(context if value is None else value)
        return self.to_out(attention_function(q, k, v, self.heads))


def attention_function(q, k, v, heads):
    """``backend.attention.attention_function`` / ``optimized_attention``: (B, N, H·D) in and out."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, n_heads, d_head)
        self.attn2 = CrossAttention(dim, n_heads, d_head, context_dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x, context=None, transformer_options=None):
        transformer_options = transformer_options or {}
        extra_options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        extra_options["n_heads"], extra_options["dim_head"] = self.n_heads, self.d_head
        patches = transformer_options.get("patches", {})
        replace = transformer_options.get("patches_replace", {}).get("attn1", {})
        block = transformer_options.get("block")
        block_index = transformer_options.get("block_index", 0)

        n = self.norm1(x)
        context_attn1 = value_attn1 = None
        if "attn1_patch" in patches:
            context_attn1 = value_attn1 = n
            for p in patches["attn1_patch"]:
                n, context_attn1, value_attn1 = p(n, context_attn1, value_attn1, extra_options)
        key = (block[0], block[1], block_index) if block is not None else None
        if key not in replace:
            key = block
        if key in replace:
            context_attn1 = n if context_attn1 is None else context_attn1
            value_attn1 = context_attn1 if value_attn1 is None else value_attn1
            q, k, v = self.attn1.to_q(n), self.attn1.to_k(context_attn1), self.attn1.to_v(value_attn1)
            n = self.attn1.to_out(replace[key](q, k, v, extra_options))
        else:
            n = self.attn1(n, context=context_attn1, value=value_attn1, transformer_options=extra_options)
        x = x + n
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels, n_heads, d_head, depth, context_dim):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(8, channels)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x, context, transformer_options):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            t = block(t, context=context, transformer_options=transformer_options)
        return x + self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Linear(emb_dim, out_ch)
        self.out_layers = nn.Sequential(nn.GroupNorm(8, out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, output_shape=None):
        size = tuple(output_shape[2:]) if output_shape is not None else None
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None, transformer_options=None, output_shape=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
                transformer_options["transformer_index"] += 1
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
        return x


class TinyUNet(nn.Module):
    """Two levels (latent/1, latent/2). ``attention_levels`` picks where transformers sit:
    (0, 1) is SD1.x-like (the probe lands on latent/1), (1,) is SDXL-like (latent/1 has no
    attention; transformers of ``depth`` blocks at latent/2). Module names match Forge's:
    ``output_blocks.{i}.1.transformer_blocks.{j}.attn1.to_q``."""

    def __init__(self, in_channels=4, ch=32, heads=4, d_head=8, context_dim=16, attention_levels=(0, 1), depth=1,
                 seed=0):
        super().__init__()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.model_channels = ch
            emb = ch * 2
            self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))

            def level_block(in_ch, level, *extra):
                layers = [ResBlock(in_ch, ch, emb)]
                if level in attention_levels:
                    layers.append(SpatialTransformer(ch, heads, d_head, depth, context_dim))
                return TimestepEmbedSequential(*layers, *extra)

            self.input_blocks = nn.ModuleList([
                TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1)),
                level_block(ch, 0),
                TimestepEmbedSequential(Downsample(ch)),
                level_block(ch, 1),
            ])
            self.middle_block = TimestepEmbedSequential(
                ResBlock(ch, ch, emb), SpatialTransformer(ch, heads, d_head, depth, context_dim), ResBlock(ch, ch, emb))
            self.output_blocks = nn.ModuleList([
                level_block(2 * ch, 1),
                level_block(2 * ch, 1, Upsample(ch)),
                level_block(2 * ch, 0),
                level_block(2 * ch, 0),
            ])
            self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
            for p in self.out[-1].parameters():  # small outputs keep the sampler stable
                p.data.mul_(0.1)

    def forward(self, x, timesteps, context=None, transformer_options=None, **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        half = self.model_channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = timesteps.float()[:, None] * freqs[None]
        emb = self.time_embed(torch.cat([args.cos(), args.sin()], dim=1))
        hs, h = [], x
        for i, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", i)
            h = module(h, emb, context, transformer_options)
            hs.append(h)
        transformer_options["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, transformer_options)
        for i, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", i)
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context, transformer_options, hs[-1].shape if hs else None)
        transformer_options["block"] = ("last", 0)
        return self.out(h)


class TinyFlux(nn.Module):
    """A 16-channel DiT-like model: no ``output_blocks``, ignores ``transformer_options`` (as
    ``backend/nn/flux.py`` does), so no attention patch reaches it."""

    def __init__(self, in_channels=16, ch=32, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.img_in = nn.Linear(in_channels * 4, ch)
            self.double_blocks = nn.ModuleList([nn.TransformerEncoderLayer(ch, 4, ch * 2, 0.0, batch_first=True)])
            self.final_layer = nn.Linear(ch, in_channels * 4)
            self.final_layer.weight.data.mul_(0.1)

    def forward(self, x, timesteps, context=None, transformer_options=None, **kwargs):
        b, c, h, w = x.shape
        t = F.pixel_unshuffle(x, 2).flatten(2).transpose(1, 2)  # 2×2 patches
        t = self.img_in(t) + timesteps.float()[:, None, None]
        for block in self.double_blocks:
            t = block(t)
        t = self.final_layer(t).transpose(1, 2).reshape(b, c * 4, h // 2, w // 2)
        return F.pixel_shuffle(t, 2)


class TinyVideoDiT(TinyFlux):
    """A DiT-like video model on ``(B, C, T, H, W)`` latents (Wan; the image models on Wan's VAE
    run the same shape with T = 1): the Flux-like blocks over every frame's 2×2-patch tokens at
    once; it ignores ``transformer_options`` (no attention patch reaches a DiT in Neo)."""

    def forward(self, x, timesteps, context=None, transformer_options=None, **kwargs):
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        tokens = F.pixel_unshuffle(frames, 2).flatten(2).transpose(1, 2).reshape(b, -1, c * 4)
        tokens = self.img_in(tokens) + timesteps.float()[:, None, None]
        for block in self.double_blocks:
            tokens = block(tokens)
        out = self.final_layer(tokens).reshape(b * t, -1, c * 4).transpose(1, 2).reshape(b * t, c * 4, h // 2, w // 2)
        return F.pixel_shuffle(out, 2).reshape(b, t, c, h, w).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# KModel (new) / BaseModel (old Forge, reForge)
# --------------------------------------------------------------------------------------------
class KModel(nn.Module):
    """``apply_model(x, t, c_crossattn, transformer_options)``; returns x0 for every family.
    New Forge names the helper ``predictor``; old Forge and reForge ``model_sampling``."""

    def __init__(self, diffusion_model, prediction, family=FORGE_NEW):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.family = family
        helper = "predictor" if family in BACKEND_FAMILIES else "model_sampling"
        setattr(self, helper, prediction)
        self.helper_name = helper
        #: chunks of B rows batched into one UNet call at most (Forge batches by free memory)
        self.max_chunks_per_call = 8
        self.unet_calls = 0

    @property
    def prediction(self):
        return getattr(self, self.helper_name)

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **kwargs):
        self.unet_calls += 1
        pred = self.prediction
        xc = pred.calculate_input(t, x)
        out = self.diffusion_model(xc, pred.timestep(t), context=c_crossattn,
                                   transformer_options=transformer_options if transformer_options is not None else {})
        return pred.calculate_denoised(t, out.float(), x)


# --------------------------------------------------------------------------------------------
# Sampling function (backend/sampling/sampling_function.py; ldm_patched samplers.py)
# --------------------------------------------------------------------------------------------
COND, UNCOND = 0, 1


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    """Runs the UNet on every (cond, uncond) chunk of B rows; returns (cond_pred, uncond_pred).

    Chunks whose contexts can be concatenated go into one call, newest first; at most
    ``model.max_chunks_per_call`` per call. No uncond: ``uncond_pred`` is 0 / 1e-37 = zeros."""
    out = {COND: torch.zeros_like(x_in), UNCOND: torch.zeros_like(x_in)}
    count = {COND: torch.ones_like(x_in) * 1e-37, UNCOND: torch.ones_like(x_in) * 1e-37}
    to_run = [(c, COND) for c in cond] + ([(u, UNCOND) for u in uncond] if uncond is not None else [])
    while to_run:
        first = to_run[0][0]["c_crossattn"].shape
        fits = [i for i, (c, _) in enumerate(to_run) if c["c_crossattn"].shape == first]
        fits.reverse()
        batch = fits[: max(1, model.max_chunks_per_call)]
        picked = [to_run.pop(i) for i in batch]
        cond_or_uncond = [kind for _, kind in picked]
        input_x = torch.cat([x_in] * len(picked))
        context = torch.cat([c["c_crossattn"] for c, _ in picked])
        transformer_options = dict(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        b = x_in.shape[0]
        transformer_options["cond_indices"] = [i * b + r for i, k in enumerate(cond_or_uncond) if k == COND for r in range(b)]
        transformer_options["uncond_indices"] = [i * b + r for i, k in enumerate(cond_or_uncond) if k == UNCOND for r in range(b)]
        timestep_ = torch.cat([timestep] * len(picked))
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](model.apply_model, {
                "input": input_x, "timestep": timestep_, "c": {"c_crossattn": context, "transformer_options": transformer_options},
                "cond_or_uncond": cond_or_uncond})
        else:
            output = model.apply_model(input_x, timestep_, c_crossattn=context, transformer_options=transformer_options)
        for chunk, kind in zip(output.chunk(len(picked)), cond_or_uncond):
            out[kind] += chunk
            count[kind] += 1.0
    return out[COND] / count[COND], out[UNCOND] / count[UNCOND]


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options, seed=None, return_full=False):
    """Forge's CFG step; ``model.family == REFORGE`` gives reForge's `cfg_function` semantics."""
    edit_strength = sum(item.get("strength", 1.0) for item in cond)
    skip_uncond = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    uncond_ = None if skip_uncond else uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    reforge = getattr(model, "family", None) == REFORGE
    if reforge and uncond_ is None:
        uncond_pred = None
    if "sampler_cfg_function" in model_options:
        cfg_result = x - model_options["sampler_cfg_function"]({
            "cond": x - cond_pred, "uncond": None if uncond_pred is None else x - uncond_pred,
            "cond_scale": cond_scale, "timestep": timestep, "input": x, "sigma": timestep,
            "cond_denoised": cond_pred, "uncond_denoised": uncond_pred, "model": model, "model_options": model_options})
    elif uncond_pred is None:
        cfg_result = cond_pred
    elif not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond if not reforge else uncond_, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}
        if getattr(model, "family", None) in COND_SCALE_IN_POST_CFG:
            args["cond_scale"] = cond_scale
        cfg_result = fn(args)
    if return_full:
        return cfg_result, cond_pred, uncond_pred
    return cfg_result
