"""Tiny random diffusers pipelines built in code for the diffusers adapter tests (no download).

SD1.5 and SDXL layouts reuse the command line's tiny checkpoint parts (`tests/cli/tiny_checkpoint.py`);
the SD3 and Flux ones follow the sizes of diffusers' own pipeline tests (one transformer block, a
one-level VAE) and are called with prompt embeddings, so they need no text encoder. Real diffusers
classes throughout (the installed release; the adapter's facts were read at 0.42.1).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from tiny_checkpoint import tiny_components, tiny_sdxl_components, write_tokenizer  # noqa: E402

def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer
    write_tokenizer(tmp / "tok")
    return CLIPTokenizer.from_pretrained(str(tmp / "tok"))


def sd15(tmp: Path, seed: int = 0):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(**tiny_components(seed), tokenizer=_tokenizer(tmp), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_call(seed: int = 1, **kw):
    """Call arguments of a 32×32 (16×16 latent), 4-step txt2img with CFG, as a tensor output."""
    args = dict(prompt="a dog", num_inference_steps=4, height=32, width=32, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt")
    args.update(kw)
    return args


def sdxl(tmp: Path, seed: int = 0, *, img2img: bool = False):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    tok = _tokenizer(tmp)
    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    pipe = cls(**tiny_sdxl_components(seed), tokenizer=tok, tokenizer_2=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit_vae(latent_channels: int):
    from diffusers import AutoencoderKL
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def sd3(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    torch.manual_seed(seed)
    tr = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                               pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_dit_vae(4), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=tr.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_call(seed: int = 1, **kw):
    g = torch.Generator().manual_seed(seed)
    args = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 64, generator=g),
                negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, 64, generator=g), height=32, width=32,
                num_inference_steps=4, guidance_scale=5.0, generator=g, output_type="pt")
    args.update(kw)
    return args


def flux(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8])
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_dit_vae(1), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_call(seed: int = 1, **kw):
    """A 32×48 image (non-square: the token grid must come from the pipeline, not the count)."""
    g = torch.Generator().manual_seed(seed)
    args = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                height=32, width=48, num_inference_steps=4, generator=g, output_type="pt")
    args.update(kw)
    return args
