"""Build a tiny random SD1.x checkpoint as a real single file, plus a local config folder.

What users have on disk is an original-format ("LDM") checkpoint: one safetensors file whose keys
are ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.*`` (CLIP text encoder). diffusers' ``from_single_file`` converts
those keys to its own layout. To test that path, this helper builds tiny random diffusers
components, renames their weights to the original layout (`to_ldm_state_dict` — the inverse of
the naming convention, written here from the two layouts' module names) and saves the file. The
config folder (``model_index.json``, component configs, a tokenizer made from a small vocabulary
written here — no download) carries no weights, so every weight comes from the single file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!'-"


def write_tokenizer(folder: Path) -> None:
    """A CLIP byte-level BPE tokenizer over single characters (plus one merge), saved to `folder`."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in VOCAB_CHARS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["og</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\no g</w>\n", encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))


def tiny_components(seed: int = 0) -> dict:
    """Random UNet (2 levels, attention at full resolution), VAE (2 levels: 2× latent) and CLIP text encoder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(VOCAB_CHARS) * 2 + 3, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval(), "scheduler": scheduler}


# -- diffusers → original ("LDM") key names ------------------------------------------------------
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, table: dict[str, str]) -> str:
    head, _, param = key.rpartition(".")
    for old, new in table.items():
        if head == old:
            return f"{new}.{param}"
    return key


def unet_to_ldm(sd: dict, layers_per_block: int, n_levels: int) -> dict:
    """UNet2DConditionModel keys → ``model.diffusion_model.*`` (ldm openaimodel) keys."""
    L = layers_per_block
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "time_embedding":
            new = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + parts[2]
        elif parts[0] == "conv_in":
            new = "input_blocks.0.0." + parts[1]
        elif parts[0] == "conv_norm_out":
            new = "out.0." + parts[1]
        elif parts[0] == "conv_out":
            new = "out.2." + parts[1]
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + i * (L + 1) + j}.0.{_rename(rest, _UNET_RESNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + i * (L + 1) + j}.1.{rest}"
            else:  # downsamplers.0.conv
                new = f"input_blocks.{1 + i * (L + 1) + L}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * j}.{_rename(rest, _UNET_RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            n = i * (L + 1)
            if kind == "resnets":
                new = f"output_blocks.{n + j}.0.{_rename(rest, _UNET_RESNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{n + j}.1.{rest}"
            else:  # upsamplers.0.conv: after the attention if this level has one
                has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
                new = f"output_blocks.{n + L}.{2 if has_attn else 1}.conv.{parts[-1]}"
        else:
            raise KeyError(f"unexpected UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict, n_levels: int) -> dict:
    """AutoencoderKL keys → ``first_stage_model.*`` keys (decoder levels are numbered in reverse)."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        new = key
        if parts[0] in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
            i, kind = int(parts[2]), parts[3]
            level = i if parts[1] == "down_blocks" else n_levels - 1 - i
            stage = "down" if parts[1] == "down_blocks" else "up"
            if kind == "resnets":
                new = f"{parts[0]}.{stage}.{level}.block.{parts[4]}.{_rename('.'.join(parts[5:]), _VAE_RESNET)}"
            else:
                new = f"{parts[0]}.{stage}.{level}.{'downsample' if stage == 'down' else 'upsample'}.conv.{parts[-1]}"
        elif parts[0] in ("encoder", "decoder") and parts[1] == "mid_block":
            kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"{parts[0]}.mid.block_{j + 1}.{_rename(rest, _VAE_RESNET)}"
            else:
                new = f"{parts[0]}.mid.attn_1.{_rename(rest, _VAE_ATTN)}"
                if value.dim() == 2:  # linear → 1×1 conv
                    value = value[:, :, None, None]
        elif parts[0] in ("encoder", "decoder") and parts[1] == "conv_norm_out":
            new = f"{parts[0]}.norm_out.{parts[2]}"
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(sd: dict) -> dict:
    """CLIPTextModel keys → ``cond_stage_model.transformer.text_model.*`` (SD1.x files; transformers ≥ 5.6
    dropped the ``text_model.`` level from CLIPTextModel's own keys, the files keep it)."""
    prefix = "cond_stage_model.transformer."
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def build_single_file(folder: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """Write ``tiny-sd15.safetensors`` and a weight-free ``config/`` folder; return both and the components."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    parts = tiny_components(seed)
    tok_dir = folder / "tok"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    config = folder / "config"
    pipe.save_pretrained(str(config), safe_serialization=True)
    for weights in list(config.rglob("*.safetensors")) + list(config.rglob("*.bin")):
        weights.unlink()
    state = {}
    state.update(unet_to_ldm(parts["unet"].state_dict(), 1, 2))
    state.update(vae_to_ldm(parts["vae"].state_dict(), 2))
    state.update(text_encoder_to_ldm(parts["text_encoder"].state_dict()))
    path = folder / "tiny-sd15.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, config, parts


def tiny_sdxl_components(seed: int = 0) -> dict:
    """Random SDXL-layout parts: UNet with text-time micro-conditioning and attention at the
    ½-resolution level like SDXL's, 2-level VAE, two CLIP text encoders (the second with projection),
    SDXL's Euler scheduler. No tokenizers (`write_tokenizer` makes the one both use)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
        norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=16)
    text_cfg = dict(vocab_size=len(VOCAB_CHARS) * 2 + 3, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=0,
                    eos_token_id=1, pad_token_id=1)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval(), "text_encoder_2": text_2.eval(),
            "scheduler": scheduler}


def build_sdxl_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny random SDXL pipeline (`tiny_sdxl_components`) saved as a diffusers folder."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    write_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tok"))
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed), tokenizer=tokenizer, tokenizer_2=tokenizer)
    out = folder / "tiny-sdxl"
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out
