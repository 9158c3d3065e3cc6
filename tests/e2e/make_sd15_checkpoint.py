"""Write a random-weight, full-architecture SD1.5 checkpoint (.safetensors).

The checkpoint has the original (ldm) key layout that ComfyUI's model detection
recognises as SD1.5: ``model.diffusion_model.*`` (UNet),
``cond_stage_model.transformer.*`` (CLIP-L text encoder) and
``first_stage_model.*`` (VAE).  Shapes come from ComfyUI's own model classes,
instantiated on the ``meta`` device (no memory, no download); the values are
seeded random numbers at a small scale so that a few sampling steps stay finite.

Run it with the Python that runs ComfyUI:

    python tests/e2e/make_sd15_checkpoint.py --comfyui /path/to/ComfyUI --out sd15_random.safetensors

The images it makes are noise patterns, not pictures: it exists to test that a
workflow runs and that a node changes (or does not change) the result.
"""

import argparse
import math
import os
import sys


def shapes(comfyui):
    sys.path.insert(0, comfyui)
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # model_management must not look for CUDA
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    import comfy.sd1_clip

    ops = comfy.ops.disable_weight_init
    out = {}
    with torch.device("meta"):
        unet = UNetModel(
            image_size=32, in_channels=4, out_channels=4, model_channels=320,
            num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            use_spatial_transformer=True, use_linear_in_transformer=False,
            context_dim=768, num_heads=8, num_head_channels=-1, legacy=False,
            adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
            dtype=torch.float32, device="meta", operations=ops,
        )
        for k, v in unet.state_dict().items():
            out["model.diffusion_model." + k] = (tuple(v.shape), v.dtype)
        del unet
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        for k, v in vae.state_dict().items():
            out["first_stage_model." + k] = (tuple(v.shape), v.dtype)
        del vae
    clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
    for k, v in clip.state_dict().items():
        if k.startswith("transformer."):
            out["cond_stage_model." + k] = (tuple(v.shape), v.dtype)
    return out


def build(comfyui, seed=0, gain=0.6):
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (shape, dtype) in sorted(shapes(comfyui).items()):
        name = key.rsplit(".", 1)[-1]
        if key.endswith("position_ids"):
            t = torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
        elif key.endswith("logit_scale"):
            t = torch.full(shape, math.log(100.0))
        elif name == "bias" or (name == "weight" and len(shape) == 1):
            # biases 0, norm scales 1
            t = torch.zeros(shape) if name == "bias" else torch.ones(shape)
        elif "embedding" in key:
            t = torch.randn(shape, generator=g) * 0.02
        else:
            fan_in = max(1, math.prod(shape[1:]))
            t = torch.randn(shape, generator=g) * (gain / math.sqrt(fan_in))
        if t.is_floating_point():
            t = t.to(torch.float16)
        sd[key] = t.contiguous()
    return sd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True, help="ComfyUI checkout (its comfy package gives the shapes)")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    sd = build(os.path.abspath(args.comfyui), seed=args.seed)
    n = sum(t.numel() for t in sd.values())
    tmp = args.out + ".part"
    save_file(sd, tmp, metadata={"format": "pt", "qsilk_e2e": "random-weight SD1.5, seed %d" % args.seed})
    os.replace(tmp, args.out)
    print("wrote %s: %d tensors, %.0fM parameters" % (args.out, len(sd), n / 1e6))


if __name__ == "__main__":
    main()
