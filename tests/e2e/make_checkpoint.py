"""Write a random-weight, full-size SD1.5 checkpoint in the original ("LDM") single-file layout.

    python tests/e2e/make_checkpoint.py OUT.safetensors [--seed 0] [--dtype fp16]

For end-to-end runs of real WebUIs (`tests/e2e/webui_api.py`) where no weights can be downloaded.
The components are diffusers / transformers classes built from SD1.5's configs written here (UNet
320/640/1280/1280, 2 layers per level, 8 heads, context 768; VAE 128/256/512/512; CLIP-L text
encoder 12 × 768), with their keys renamed to ``model.diffusion_model.*``,
``first_stage_model.*`` and ``cond_stage_model.transformer.text_model.*`` by the converters of
``tests/cli/tiny_checkpoint.py``. The output layers are scaled down so that the noise prediction
and the decoded pixels stay moderate and finite (images are mid-grey texture, not saturated).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from tiny_checkpoint import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm  # noqa: E402


def sd15_components(seed: int) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.5)  # ε prediction of order 0.1
        unet.conv_out.bias.zero_()
        vae.decoder.conv_out.weight.mul_(0.5)  # pixels: mid-grey ± ~0.15
        vae.decoder.conv_out.bias.zero_()
    return {"unet": unet.eval(), "vae": vae.eval(), "text": text.eval()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--check", action="store_true", help="run each component once on random input and print stats")
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    parts = sd15_components(args.seed)
    if args.check:
        with torch.no_grad():
            ids = torch.randint(0, 49406, (1, 77))
            ctx = parts["text"](ids).last_hidden_state
            eps = parts["unet"](torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=ctx).sample
            img = parts["vae"].decode(torch.randn(1, 4, 8, 8)).sample
        for name, t in (("context", ctx), ("eps", eps), ("image", img)):
            print(f"{name}: mean {t.mean():.3f} std {t.std():.3f} min {t.min():.3f} max {t.max():.3f}")
    state = {}
    state.update(unet_to_ldm(parts["unet"].state_dict(), 2, 4))
    state.update(vae_to_ldm(parts["vae"].state_dict(), 4))
    state.update(text_encoder_to_ldm(parts["text"].state_dict()))
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out)
    print(f"wrote {args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.0f} M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
