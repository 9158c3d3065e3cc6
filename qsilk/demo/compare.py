"""``qsilk compare``: the same seeds with and without QSilk (or across presets / parameter values).

Writes to ``--out``: ``grid.png`` (every variant side by side with zoomed crops, like the paper's
Figs. 1–3), ``maps.png`` (AQClip confidence and clip-activity heatmaps), ``metrics.json`` and
``metrics.md``.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..settings import PARAM_BY_NAME, Settings, SettingsError
from . import metrics as M
from .progress import Progress
from .report import write_outputs
from .run import JobResult, JobSpec, run_job
from .samplers import SAMPLER_ALIASES, SAMPLERS

log = logging.getLogger("qsilk")

HELP = "same seeds with and without QSilk: grid with zoomed crops, heatmaps, metrics"
DEFAULT_OUT = "qsilk-out/compare"


@dataclass
class Variant:
    label: str
    settings: Settings  # the Off preset (or enabled=False) runs with no hook at all


# -- arguments ------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="analytic",
                   help="'analytic' (built-in, no weights) or a .safetensors/.ckpt checkpoint (SD1.x/SDXL) "
                        "or a diffusers model folder (needs the 'models' extra)")
    g.add_argument("--config", default=None,
                   help="local diffusers config folder for a single-file checkpoint (offline use)")
    g.add_argument("--arch", choices=("auto", "sd15", "sdxl"), default="auto",
                   help="checkpoint architecture (auto: from the checkpoint's keys)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="checkpoint weights' dtype (default: float16 on CUDA, float32 on CPU)")
    g.add_argument("--analytic-grain", type=float, default=0.3,
                   help="analytic model: per-value std s of each data component (default 0.3)")
    g.add_argument("--analytic-uncond", choices=("gaussian", "mixture"), default="gaussian",
                   help="analytic model's unconditional row (see README)")

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default="euler",
                   help="euler | euler_a | dpmpp_2m | ddim (also 'Euler a', 'DPM++ 2M')")
    g.add_argument("--steps", type=int, default=10)
    g.add_argument("--cfg", type=float, default=None,
                   help="CFG scale (default 10 on the analytic model, 7 on checkpoints)")
    g.add_argument("--seeds", default="1,2,3", help="comma list and ranges, e.g. 1,2,5-8")
    g.add_argument("--prompt", action="append", default=None,
                   help="repeatable; seeds cycle through the prompts. Analytic model: discs | stripes")
    g.add_argument("--negative", default="", help="negative prompt (checkpoints)")
    g.add_argument("--size", default=None,
                   help="image WxH in pixels, multiples of 8 (default 512x512; SDXL checkpoints 1024x1024)")
    g.add_argument("--batch-size", type=int, default=4)

    g = p.add_argument_group("what to compare")
    g.add_argument("--presets", default=None,
                   help="comma list of presets, one column each (default: Off,Balanced)")
    g.add_argument("--preset", default="Balanced", help="base preset for --set (default Balanced)")
    g.add_argument("--set", dest="sweeps", action="append", default=[], metavar="NAME=V1,V2",
                   help="sweep a parameter over values (repeatable: the product of all sweeps)")
    g.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="fix a parameter in every QSilk column (repeatable)")
    g.add_argument("--no-baseline", action="store_true", help="with --set: no 'Off' column first")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    g.add_argument("--crop", type=int, default=None, help="zoomed crop side in image pixels (default: an eighth)")
    g.add_argument("--cell", type=int, default=384,
                   help="side of each grid cell in pixels: full images are shown at most this large, "
                        "crops are enlarged to it (default 384)")
    g.add_argument("--metric", action="append", default=[], help="learned metric: " + ", ".join(sorted(M.LEARNED)))
    g.add_argument("--clip-model", default=None, help="local CLIP model folder for --metric clip_score")
    g.add_argument("--tail-k", type=float, default=3.0, help="k of the latent tail share |z| > k")
    g.add_argument("--save-images", action="store_true", help="also write every image")
    g.add_argument("--no-progress", action="store_true")


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"1,2,5-7"`` → (1, 2, 5, 6, 7)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if sep and lo else [int(part)]
        except ValueError:
            raise SettingsError(f"--seeds: {part!r} is not an integer or a range a-b") from None
    if not seeds:
        raise SettingsError("--seeds: at least one seed is needed")
    return tuple(seeds)


def parse_size(text: str, scale: int) -> tuple[int, int]:
    """``"WxH"`` (pixels, multiples of the latent scale) → latent ``(H, W)``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SettingsError(f"--size must be WxH, e.g. 256x256 (got {text!r})") from None
    if w <= 0 or h <= 0 or w % scale or h % scale:
        raise SettingsError(f"--size: width and height must be positive multiples of {scale} (got {text!r})")
    return h // scale, w // scale


def _assignment(text: str, option: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or name not in PARAM_BY_NAME:
        raise SettingsError(f"{option}: expected NAME=VALUE with a QSilk parameter name (got {text!r}); "
                            f"known: {', '.join(PARAM_BY_NAME)}")
    return name, value.strip()


def build_variants(args: argparse.Namespace) -> list[Variant]:
    """The columns: presets (default Off, Balanced), or the product of `--set` sweeps on `--preset`."""
    fixed = dict(_assignment(t, "--param") for t in args.param)
    if args.sweeps:
        if args.presets:
            raise SettingsError("use either --presets or --set, not both")
        axes = []
        for text in args.sweeps:
            name, values = _assignment(text, "--set")
            axes.append([(name, v.strip()) for v in values.split(",") if v.strip()])
        variants = [] if args.no_baseline else [Variant("Off", Settings.from_preset("Off"))]
        base = PARAM_BY_NAME["preset"].coerce(args.preset)
        for combo in itertools.product(*axes):
            values = {**fixed, **dict(combo)}
            settings = Settings.from_preset(base, **values)
            label = base + " " + " ".join(f"{k}={settings.as_dict()[k]}" for k, _ in combo)
            variants.append(Variant(label, settings))
        return variants
    names = [n.strip() for n in (args.presets or "Off,Balanced").split(",") if n.strip()]
    variants = []
    for name in names:
        preset = PARAM_BY_NAME["preset"].coerce(name)
        values = fixed if preset != "Off" else {}
        variants.append(Variant(preset, Settings.from_preset(preset, **values)))
    if len(variants) < 1:
        raise SettingsError("--presets: name at least one preset")
    return variants


# -- model ----------------------------------------------------------------------------------
def load_model(args: argparse.Namespace, device: str) -> Any:
    if args.model == "analytic":
        from .analytic import AnalyticModel
        scale = 8
        latent_hw = parse_size(args.size or "512x512", scale)
        return AnalyticModel.procedural(latent_hw, s=args.analytic_grain, uncond=args.analytic_uncond)
    from .checkpoint import load_checkpoint
    return load_checkpoint(args.model, config=args.config, arch=args.arch, device=device, dtype=args.dtype)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- running --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    sampler = SAMPLER_ALIASES.get(args.sampler.strip().lower())
    if sampler is None:
        raise SettingsError(f"--sampler must be one of {', '.join(SAMPLERS)} (got {args.sampler!r})")
    if args.steps < 1:
        raise SettingsError(f"--steps must be at least 1 (got {args.steps})")
    if args.batch_size < 1:
        raise SettingsError(f"--batch-size must be at least 1 (got {args.batch_size})")
    variants = build_variants(args)
    seeds = parse_seeds(args.seeds)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingsError(f"--out {out_dir}: exists and is not a folder")
    learned = [M.load_learned_metric(n, clip_model=args.clip_model) for n in args.metric]
    model = load_model(args, device)
    latent_hw = getattr(model, "latent_hw", None) if args.model == "analytic" else None
    if latent_hw is None:
        latent_hw = parse_size(args.size or model.default_size, model.latent_scale)
    cfg = args.cfg if args.cfg is not None else (10.0 if args.model == "analytic" else 7.0)
    prompts = tuple(args.prompt) if args.prompt else tuple(getattr(model, "default_prompts", ("",)))
    spec = JobSpec(sampler=sampler, steps=args.steps, cfg=cfg, seeds=seeds, prompts=prompts,
                   negative=args.negative, latent_hw=tuple(latent_hw), batch_size=args.batch_size,
                   device=device, tail_k=args.tail_k)
    results = compare(model, variants, spec, progress=not args.no_progress)
    out = write_outputs(out_dir, model, variants, spec, results, learned=learned,
                        crop=args.crop, cell=args.cell, save_images=args.save_images)
    written = [p.name for p in (out / "grid.png", out / "maps.png", out / "metrics.json", out / "metrics.md") if p.exists()]
    print(f"wrote {', '.join(written)} to {out}")
    return 0


def compare(model: Any, variants: list[Variant], spec: JobSpec, *, progress: bool = True) -> list[JobResult]:
    """Run every variant on the same seeds; one progress bar over all evaluations."""
    chunks = math.ceil(len(spec.seeds) / spec.batch_size)
    bar = Progress(len(variants) * chunks * spec.steps, enabled=progress)
    results = []
    try:
        for v in variants:
            bar.set_label(v.label)
            results.append(run_job(model, v.settings, spec, on_step=bar.update))
    finally:
        bar.close()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run ``compare`` alone (the CLI normally dispatches here)."""
    parser = argparse.ArgumentParser(prog="qsilk compare", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
