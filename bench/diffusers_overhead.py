"""Per-step cost of QSilk on a real diffusers pipeline, side by side in one run.

Builds a random-weight ``StableDiffusionPipeline`` in code (no download) and times every denoising
step (``callback_on_step_end`` timestamps: UNet call, CFG, scheduler step, QSilk) without QSilk and
with it (`qsilk.diffusers`), runs interleaved, median over steps × repeats. QSilk's own time is also
clocked directly (CPU ops are synchronous): the step wrapper minus the scheduler's own ``step``,
the denoiser pre-hook and the probe's ``to_q`` / ``to_k`` hooks. Every time is taken twice, by wall
clock and by the thread's CPU time (``time.thread_time``; with ``--threads 1`` torch computes on the
calling thread), so that a shared, loaded machine still gives QSilk's share of a step. The pipeline is the
test suite's tiny SD1.5 layout (``--size tiny``) or the SD1.5 UNet's real widths (``--size sd15``,
diffusers' default ``UNet2DConditionModel`` config: 860 M random parameters, slow on a CPU).

    .venv/bin/python bench/diffusers_overhead.py                       # tiny, 64×64 latent, CPU
    .venv/bin/python bench/diffusers_overhead.py --size sd15 --latent 32 --steps 4 --repeats 2

Prints one table; ``--json PATH`` also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "cli"))

MODES = {
    "off": None,
    "Gentle (micro-clamp)": dict(preset="Gentle"),
    "Balanced, Lite": dict(preset="Balanced", aqclip_mode="lite"),
    "Balanced (Attn probe)": dict(preset="Balanced"),
}


def build(size: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_checkpoint import tiny_components

    parts = tiny_components(0)
    if size == "sd15":
        torch.manual_seed(0)
        parts["unet"] = UNet2DConditionModel(cross_attention_dim=32).eval()  # SD1.5 widths; tiny text width
        parts["vae"] = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32).eval()
    parts["scheduler"] = EulerDiscreteScheduler.from_config(parts["scheduler"].config)
    pipe = StableDiffusionPipeline(**parts, tokenizer=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


class Clock:
    """Seconds spent in QSilk's per-step code (patched in for the benchmark only)."""

    def __init__(self):
        from qsilk import probe as qp
        from qsilk.hosts import diffusers as qd
        self.seconds = 0.0
        self.cpu = 0.0
        clock = self
        step, pre_hook, on_projection = qd.DiffusersRun.step, qd.DiffusersRun._pre_hook, qp.EntropyProbe._on_projection

        def timed_step(run, scheduler, original, args, kwargs):
            inner = [0.0, 0.0]

            def timed_original(*a, **k):
                t, c = time.perf_counter(), time.thread_time()
                try:
                    return original(*a, **k)
                finally:
                    inner[0] += time.perf_counter() - t
                    inner[1] += time.thread_time() - c

            t, c = time.perf_counter(), time.thread_time()
            try:
                return step(run, scheduler, timed_original, args, kwargs)
            finally:
                clock.seconds += time.perf_counter() - t - inner[0]
                clock.cpu += time.thread_time() - c - inner[1]

        def timed(fn):
            def wrapper(*a, **k):
                t, c = time.perf_counter(), time.thread_time()
                try:
                    return fn(*a, **k)
                finally:
                    clock.seconds += time.perf_counter() - t
                    clock.cpu += time.thread_time() - c
            return wrapper

        qd.DiffusersRun.step = timed_step
        qd.DiffusersRun._pre_hook = timed(pre_hook)
        qp.EntropyProbe._on_projection = timed(on_projection)


def one_run(pipe, mode: dict | None, latent: int, steps: int, embeds: tuple,
            clock: Clock) -> tuple[list[tuple[float, float]], dict | None, tuple[float, float]]:
    import qsilk

    stamps: list[tuple[float, float]] = []

    def stamp(p, i, t, kw):
        stamps.append((time.perf_counter(), time.thread_time()))
        return kw

    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    kwargs = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=steps,
                  height=latent * scale, width=latent * scale, guidance_scale=5.0, output_type="latent",
                  generator=torch.Generator().manual_seed(0), callback_on_step_end=stamp)
    report = None
    clock.seconds = clock.cpu = 0.0
    with torch.inference_mode():
        if mode is None:
            stamps.append((time.perf_counter(), time.thread_time()))
            pipe(**kwargs)
        else:
            with qsilk.diffusers(pipe, echo=False, **mode) as run:
                stamps.append((time.perf_counter(), time.thread_time()))
                pipe(**kwargs)
            report = run.last_report
    # the first interval includes the pipeline's set-up before its loop: keep steps 2…n
    return ([(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[1:], stamps[2:])], report,
            (clock.seconds / steps, clock.cpu / steps))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    ap.add_argument("--latent", type=int, default=64, help="latent side (image = latent × VAE factor)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = build(args.size, args.device, dtype)
    width = pipe.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(1)
    embeds = tuple(torch.randn(1, 16, width, generator=g).to(args.device, dtype) for _ in range(2))
    clock = Clock()
    one_run(pipe, None, args.latent, 2, embeds, clock)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in MODES}
    own: dict[str, list[float]] = {name: [] for name in MODES}
    reports: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, mode in MODES.items():  # interleaved, so load changes hit every mode alike
            dt, report, per_step = one_run(pipe, mode, args.latent, args.steps, embeds, clock)
            times[name] += dt
            own[name].append(per_step)
            if report is not None:
                reports[name] = report
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {args.device}, {torch.get_num_threads()} "
          f"threads; {args.size} SD1.5-layout UNet, latent {args.latent}×{args.latent}, batch 1 with CFG (2 rows), "
          f"Euler, {args.steps} steps × {args.repeats} runs (median per step, first step excluded); wall / CPU time")
    print(f"{'mode':24} {'step ms':>17} {'QSilk ms/step':>17} {'QSilk share':>13}")
    rows = []
    for name in MODES:
        step_wall = statistics.median(t[0] for t in times[name])
        step_cpu = statistics.median(t[1] for t in times[name])
        own_wall = statistics.median(o[0] for o in own[name])
        own_cpu = statistics.median(o[1] for o in own[name])
        rep = reports.get(name)
        rows.append({"mode": name, "step_ms_wall": 1e3 * step_wall, "step_ms_cpu": 1e3 * step_cpu,
                     "qsilk_ms_wall": 1e3 * own_wall, "qsilk_ms_cpu": 1e3 * own_cpu,
                     "attn_maps": rep["attn_maps"] if rep else 0})
        print(f"{name:24} {1e3 * step_wall:8.1f} / {1e3 * step_cpu:6.1f} {1e3 * own_wall:8.2f} / {1e3 * own_cpu:6.2f} "
              f"{100 * own_wall / step_wall:5.2f}% / {100 * own_cpu / max(step_cpu, 1e-9):5.2f}%")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
