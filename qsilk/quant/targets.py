"""Command-line glue: calibration targets from the command line's models (`qsilk.demo`).

A model there is the analytic default (its "weights" are the data means μ_k) or a checkpoint
(its UNet is a torch module). The low-bit twin is the same model with its weights stored in a
simulated low-bit format (`lowbit.simulate_storage` / `round_weight`) — what the WebUIs' weight-only
storage does — or a second checkpoint given by the user. Nothing is written back to any weights.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..settings import SettingsError
from .calibrate import Job, Target
from .lowbit import SIMULATED, round_weight, simulate_storage

#: storage string written to coefficient files for each simulated mode (what the hosts detect)
STORAGE_OF = {"q8_0": "gguf-Q8_0"}
_MODULE_ATTRS = ("unet", "diffusion_model", "net", "model")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model, low-bit and sampling options shared by `calibrate` and `diagnose`."""
    g = p.add_argument_group("model (the command line's loaders; see `qsilk compare --help`)")
    g.add_argument("--model", default="analytic", help="'analytic' (built-in) or a checkpoint / diffusers folder")
    g.add_argument("--config", default=None, help="local diffusers config folder for a single-file checkpoint")
    g.add_argument("--arch", choices=("auto", "sd15", "sdxl"), default="auto")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    g.add_argument("--analytic-grain", type=float, default=0.3)
    g.add_argument("--analytic-uncond", choices=("gaussian", "mixture"), default="gaussian")
    g.add_argument("--lowbit", choices=SIMULATED, default="nf4",
                   help="simulated weight storage of the low-bit model (default nf4)")
    g.add_argument("--lowbit-model", default=None,
                   help="a second checkpoint to use as the low-bit model instead of --lowbit simulation")
    g.add_argument("--model-hash", default=None,
                   help="hash written to the file (default: sha256[:10] of the checkpoint, as the WebUIs show it)")
    g.add_argument("--storage", default=None, help="storage written to the file (default: from --lowbit)")
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default="euler", help="euler | euler_a | lcm | dpmpp_2m")
    g.add_argument("--steps", type=int, default=8)
    g.add_argument("--cfg", type=float, default=None, help="CFG scale (default 10 analytic, 7 checkpoints)")
    g.add_argument("--seeds", default="1-8", help="calibration seeds, e.g. 1-8 or 1,2,5")
    g.add_argument("--prompt", action="append", default=None, help="repeatable; seeds cycle through prompts")
    g.add_argument("--prompts-file", default=None, help="one prompt per line")
    g.add_argument("--size", default=None, help="image WxH (multiples of 8)")
    g.add_argument("--no-progress", action="store_true")


def lowbit_twin(model: Any, mode: str) -> Any:
    """`model` with its weights in simulated `mode` storage (a copy; the original is untouched)."""
    means = getattr(model, "means", None)
    if isinstance(means, torch.Tensor) and dataclasses.is_dataclass(model):
        return dataclasses.replace(model, means=round_weight(means.float(), mode).to(means.dtype))
    for attr in _MODULE_ATTRS:
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            twin = copy.copy(model)
            setattr(twin, attr, simulate_storage(module, mode))
            return twin
    raise SettingsError(f"--lowbit: cannot find weights to quantize in {type(model).__name__} "
                        f"(looked for {', '.join(_MODULE_ATTRS)}); use --lowbit-model")


def model_hash(args: argparse.Namespace, model: Any) -> str:
    """The hash the WebUIs show (first 10 hex digits of the file's sha256), or the analytic data's."""
    if args.model_hash:
        return args.model_hash
    path = Path(args.model)
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        return h.hexdigest()[:10]
    means = getattr(model, "means", None)
    if isinstance(means, torch.Tensor):
        h.update(means.double().numpy().tobytes())
        return h.hexdigest()[:10]
    raise SettingsError("--model-hash is needed for a model that is not a single file")


def read_prompts(args: argparse.Namespace, model: Any) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [ln.strip() for ln in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return prompts or list(getattr(model, "default_prompts", ("",)))


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Load the 16-bit model and its low-bit twin; return both targets, jobs and file metadata."""
    from ..demo import compare  # the command line's model loader and argument parsers

    if args.steps < 1:
        raise SettingsError(f"--steps must be at least 1 (got {args.steps})")
    device = args.device or compare.default_device()
    model = compare.load_model(args, device)
    if args.lowbit_model:
        low_model = compare.load_model(argparse.Namespace(**{**vars(args), "model": args.lowbit_model}), device)
        storage = args.storage or "unknown"
    else:
        low_model = lowbit_twin(model, args.lowbit)
        storage = args.storage or STORAGE_OF.get(args.lowbit, args.lowbit)
    hw = getattr(model, "latent_hw", None) if args.model == "analytic" else None
    if hw is None:
        hw = compare.parse_size(args.size or model.default_size, model.latent_scale)
    cfg = args.cfg if args.cfg is not None else (10.0 if args.model == "analytic" else 7.0)
    prompts = read_prompts(args, model)
    seeds = compare.parse_seeds(args.seeds)
    jobs = [Job(prompts[i % len(prompts)], s) for i, s in enumerate(seeds)]
    from ..demo.samplers import karras_sigmas

    sigmas = karras_sigmas(args.steps, model.sigma_min, model.sigma_max)
    shape = (model.latent_channels, *hw)
    prediction = getattr(model, "prediction", "eps")
    ref = Target(guided(model, cfg, device), shape, sigmas, args.sampler.strip().lower(), prediction,
                 decode=model.decode)
    low = dataclasses.replace(ref, denoise=guided(low_model, cfg, device))
    meta = {"model_name": Path(str(args.model)).stem, "model_hash": model_hash(args, model), "storage": storage,
            "prediction": prediction, "sampler": ref.sampler, "steps": args.steps, "cfg_scale": cfg,
            "resolution": f"{hw[1] * model.latent_scale}x{hw[0] * model.latent_scale}",
            "prompts": len(prompts), "seeds": args.seeds, "created_by": _version()}
    return {"model": model, "low_model": low_model, "ref": ref, "low": low, "jobs": jobs, "meta": meta,
            "cfg": cfg, "device": device}


def guided(model: Any, cfg: float, device: Any):
    """``denoise(x, σ, prompts)``: one call on ``[uncond; cond]`` and CFG, like the WebUIs."""
    from ..demo.run import stack_conditioning

    cache: dict[tuple, Any] = {}

    def denoise(x: torch.Tensor, sigma: float, prompts: list) -> torch.Tensor:
        key = tuple(prompts)
        if key not in cache:
            cache[key] = stack_conditioning(*reversed(model.encode_prompts(list(prompts))))
        d = model.denoise(torch.cat([x, x]).to(device), float(sigma), cache[key])
        d_uncond, d_cond = d.float().cpu().chunk(2)
        return d_uncond + cfg * (d_cond - d_uncond)

    denoise.parts = lambda x, sigma, prompts: _parts(model, cache, device, x, sigma, prompts)
    return denoise


def _parts(model, cache, device, x, sigma, prompts):
    from ..demo.run import stack_conditioning

    key = tuple(prompts)
    if key not in cache:
        cache[key] = stack_conditioning(*reversed(model.encode_prompts(list(prompts))))
    d = model.denoise(torch.cat([x, x]).to(device), float(sigma), cache[key])
    d_uncond, d_cond = d.float().cpu().chunk(2)
    return d_cond, d_uncond


def _version() -> str:
    from .. import __version__

    return f"qsilk {__version__}"
