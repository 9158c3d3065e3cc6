"""Write a random-weight, full-size SD1.5 pipeline as a diffusers folder (``save_pretrained`` layout).

    python tests/e2e/make_diffusers_folder.py OUT_DIR --tokenizer CLIP_TOKENIZER_DIR [--seed 0] [--dtype fp16]

For end-to-end runs of diffusers-only hosts (SD.Next loads ``<data-dir>/models/Diffusers/<name>``)
where no weights can be downloaded. The UNet, VAE and text encoder are the ones
``make_checkpoint.py`` builds for the single-file checkpoint (same seed, same weights). The tokenizer
cannot be generated: point ``--tokenizer`` at any CLIP-L tokenizer folder holding ``vocab.json`` and
``merges.txt`` (for example ComfyUI's ``comfy/sd1_tokenizer``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import sd15_components  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True, help="folder with a CLIP tokenizer (vocab.json, merges.txt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    args = ap.parse_args(argv)
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    parts = sd15_components(args.seed)
    # SD1.5's own scheduler config (scaled_linear 0.00085–0.012, 1000 steps, PNDM with PLMS steps skipped).
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text"], tokenizer=CLIPTokenizer.from_pretrained(args.tokenizer, model_max_length=77),
        unet=parts["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    if args.dtype == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
