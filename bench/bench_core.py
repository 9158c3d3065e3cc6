"""QSilk core benchmark: cost ratios measured side by side in one run (issue #2).

(a) `Stabilizer.post_cfg` (Balanced, Lite confidence) ÷ one UNet evaluation — target ≤ 0.5 %;
    the entropy probe on the real probed layer + its map + `post_cfg` with it ÷ one UNet
    evaluation — target ≤ 2 %. Random-weight SD1.5-size UNet, 512² image → 64×64 latent, CPU.
    The UNet sees batch 2: one image's cond and uncond rows, as AUTOMATIC1111 runs them (2·B rows for
    batch size B = 1); post_cfg and the map work on that one image's x0.
(b) micro_clamp + aqclip ÷ a literal reading of the paper's Algorithm 1 (`bench/paper_alg1.py`:
    torch.quantile, unfold/fold, a loop over samples) at 128² and 640² latents — target ≥ 5× faster.
(c) on CUDA, (a) with an SDXL-size UNet at 1024² (latent 128², fp16); skipped on CPU with a note.

Each measured thing alternates with the others inside one loop (warm-up, then repeats; the order
flips every repeat). Every sample is timed twice: wall clock, and the process's CPU time (on CPU;
all threads). CPU time is the work done, which other jobs on a shared machine do not inflate —
with `--threads 1` it is also free of thread scheduling. Every ratio is given as the median of
the per-repeat ratios and as the ratio of the best (minimum) times.

    python bench/bench_core.py [--quick] [--reps N] [--threads N] [--unet auto|diffusers|local] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `bench` and `qsilk` importable from the checkout
    sys.path.insert(0, str(ROOT))

from bench.paper_alg1 import literal_pipeline  # noqa: E402
from bench.sd_unet import SD15, SDXL, TINY, UNetConfig, UNetModel, dummy_inputs  # noqa: E402
from qsilk import EntropyProbe, Settings, Stabilizer, aqclip, find_probe_layer, micro_clamp  # noqa: E402
from qsilk.probe import probe_layer_factor  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "results" / "core.json"
TARGET_POST_CFG = 0.005
TARGET_PROBE = 0.02
TARGET_SPEEDUP = 5.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[dict, object]:
    """``({"wall": s, "cpu": s}, fn())``; CPU time is the whole process's (all threads)."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}, out


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in CLOCKS}


def build_unet(kind: str, cfg: UNetConfig, device: torch.device, dtype: torch.dtype):
    """``(module, call(x, t, ctx, y), description)``. `kind`: diffusers | local | auto."""
    if kind in ("auto", "diffusers") and cfg == SD15:
        try:
            from diffusers import UNet2DConditionModel
        except ImportError:
            if kind == "diffusers":
                raise
        else:
            torch.manual_seed(0)
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to(device).eval()
            if dtype != torch.float32:
                unet = unet.to(dtype)
            return (unet, lambda x, t, c, y: unet(x, t, encoder_hidden_states=c).sample,
                    "diffusers UNet2DConditionModel, SD1.5 config, random weights")
    torch.manual_seed(0)
    unet = UNetModel(cfg).to(device, dtype).eval()
    label = {SD15: "SD1.5", SDXL: "SDXL", TINY: "tiny (smoke test)"}.get(cfg, "custom")
    return unet, lambda x, t, c, y: unet(x, t, c, y), f"bench/sd_unet.py {label}-size ldm-layout UNet, random weights"


def _summary(samples: list[dict], clock: str, ratios: dict[str, Callable[[dict], float]]) -> dict:
    """Medians, minima and, per named ratio, its median over repeats and its value on the minima."""
    keys = samples[0].keys()
    med = {k: statistics.median(s[k][clock] for s in samples) for k in keys}
    best = {k: min(s[k][clock] for s in samples) for k in keys}
    out = {"median_s": med, "min_s": best}
    for name, f in ratios.items():
        out[name] = statistics.median(f({k: s[k][clock] for k in keys}) for s in samples)
        out[name + "_best"] = f(best)
    return out


UNET_RATIOS = {
    "post_cfg_ratio": lambda m: m["post_cfg"] / m["unet"],
    "probe_ratio": lambda m: (m["probe_hooks"] + m["take_map"] + m["post_cfg_attn"]) / m["unet"],
    "probe_only_ratio": lambda m: (m["probe_hooks"] + m["take_map"]) / m["unet"],
    "unet_with_probe_ratio": lambda m: m["unet_with_probe"] / m["unet"] - 1.0,
}


def measure_unet_ratios(cfg: UNetConfig = SD15, *, latent_hw=(64, 64), unet_batch: int = 2, reps: int = 5,
                        warmup: int = 1, device="cpu", dtype=torch.float32, unet_kind: str = "auto",
                        max_queries: int = 0) -> dict:
    """(a)/(c): post_cfg and probe cost relative to one UNet evaluation, side by side."""
    device = torch.device(device)
    unet, call, desc = build_unet(unet_kind, cfg, device, dtype)
    n_params = sum(p.numel() for p in unet.parameters())
    name, layer = find_probe_layer(unet)
    factor = probe_layer_factor(unet, name)
    x, t, ctx, y = dummy_inputs(cfg, unet_batch, latent_hw, device, dtype)
    images = max(1, unet_batch // 2)
    x0 = torch.randn(images, 4, *latent_hw, generator=torch.Generator().manual_seed(1)).mul(1.5).to(device, dtype)

    lite, attn = Stabilizer(Settings.from_preset("Balanced")), Stabilizer(Settings.from_preset("Balanced"))
    lite.begin_pass()
    attn.begin_pass()
    probe = EntropyProbe(heads=2, max_queries=max_queries)
    in_hooks = {k: 0.0 for k in CLOCKS}
    on_projection = probe._on_projection

    def timed_projection(which, out):  # the time spent inside the probe's hooks
        spent, _ = _timed(lambda: on_projection(which, out), device)
        for k in CLOCKS:
            in_hooks[k] += spent[k]

    probe._on_projection = timed_projection
    samples, failures = [], []
    with torch.inference_mode():
        for rep in range(warmup + reps):
            step = rep % 20
            sample = {}

            def plain():
                sample["unet"] = _timed(lambda: call(x, t, ctx, y), device)[0]

            def probed():
                probe.attach(layer, factor=factor)
                probe.begin_evaluation(latent_hw, images)
                in_hooks.update(wall=0.0, cpu=0.0)
                sample["unet_with_probe"] = _timed(lambda: call(x, t, ctx, y), device)[0]
                sample["probe_hooks"] = dict(in_hooks)
                sample["take_map"], sample["map"] = _timed(probe.take_map, device)
                probe.detach()

            for fn in ((plain, probed) if rep % 2 == 0 else (probed, plain)):
                fn()
            emap = sample.pop("map")
            if emap is None:
                failures.append(probe.last_failure)
            sample["post_cfg"] = _timed(lambda: lite.post_cfg(x0, step, 20), device)[0]
            sample["post_cfg_attn"] = _timed(lambda: attn.post_cfg(x0, step, 20, probe_map=emap), device)[0]
            if rep >= warmup:
                samples.append(sample)
    result = {
        "unet": desc, "unet_params_M": round(n_params / 1e6, 2), "latent": list(latent_hw),
        "unet_batch": unet_batch, "images": images, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "probe_layer": name, "probe_factor": factor,
        "probe_queries": max_queries or (1024 if device.type == "cuda" else 256), "reps": reps, "warmup": warmup,
        "samples": samples, "probe_failures": sorted(set(filter(None, failures))),
        "lite_report": {k: lite.report()[k] for k in ("evaluations", "errors", "nan_passthrough")},
        "attn_report": {k: attn.report()[k] for k in ("evaluations", "attn_maps", "lite_fallbacks", "errors")},
    }
    for clock in CLOCKS if device.type == "cpu" else ("wall",):
        result[clock] = _summary(samples, clock, UNET_RATIOS)
    del unet
    return result


CORE_RATIOS = {
    "speedup_qsilk": lambda m: m["literal"] / m["ours_qsilk"],
    "speedup_paper": lambda m: m["literal"] / m["ours_paper"],
}


def measure_core_vs_literal(sizes=(128, 640), *, batch: int = 1, reps: int = 5, warmup: int = 1,
                            device="cpu") -> list[dict]:
    """(b): our micro_clamp + aqclip (qsilk and paper variants) vs the literal Algorithm 1."""
    device = torch.device(device)
    out = []
    for size in sizes:
        x = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(size)).mul(1.5).to(device)
        fns = [("ours_qsilk", lambda: aqclip(micro_clamp(x))),
               ("ours_paper", lambda: aqclip(micro_clamp(x), variant="paper")),
               ("literal", lambda: literal_pipeline(x))]
        samples = []
        with torch.inference_mode():
            for rep in range(warmup + reps):
                sample = {k: _timed(fn, device)[0] for k, fn in (fns if rep % 2 == 0 else fns[::-1])}
                if rep >= warmup:
                    samples.append(sample)
        result = {"latent": [size, size], "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
                  "reps": reps, "samples": samples}
        for clock in CLOCKS if device.type == "cpu" else ("wall",):
            result[clock] = _summary(samples, clock, CORE_RATIOS)
        out.append(result)
    return out


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _pct(v: float) -> str:
    return f"{100 * v:.3f} %"


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _clock_pair(r: dict, name: str, fmt: Callable[[float], str]) -> str:
    """``wall median / best | cpu median / best`` of one ratio."""
    parts = [f"{fmt(r[c][name])} / {fmt(r[c][name + '_best'])}" for c in CLOCKS if c in r]
    return " | ".join(parts)


def _all(r: dict, name: str) -> list[float]:
    """Median and best-time wall-clock values of a ratio: the targets are about elapsed time (CPU
    time with several threads also counts threads waiting for each other)."""
    return [r["wall"][name], r["wall"][name + "_best"]]


def format_table(results: dict) -> str:
    """The printed report: median times; each ratio as 'median / best' for wall clock | CPU time."""
    mach = results["machine"]
    lines = [f"machine: {mach['cpu_count']} CPU cores ({mach['cpu']}), torch {mach['torch']}, "
             f"{mach['torch_threads']} threads" + (f", GPU {mach['gpu']}" if mach.get("gpu") else ""),
             "ratios: median over repeats / on the best times, for wall clock | process CPU time; "
             "targets judged on wall clock", ""]
    for key, title in (("a", "(a) CPU, SD1.5-size"), ("c", "(c) CUDA, SDXL-size")):
        r = results.get(key)
        if not isinstance(r, dict):
            lines += [f"{title}: {r}", ""]
            continue
        m = r["wall"]["median_s"]
        probe_s = m["probe_hooks"] + m["take_map"]
        lines += [
            f"{title}: {r['unet']} ({r['unet_params_M']} M params), latent {r['latent'][0]}×{r['latent'][1]}, "
            f"UNet batch {r['unet_batch']} (cond+uncond of {r['images']} image), {r['dtype']}, {r['reps']} repeats, "
            f"{r['threads']} thread(s); probe on {r['probe_layer']} (f={r['probe_factor']}, "
            f"{r['probe_queries']} queries × 2 heads)",
            f"  {'measurement':38s} {'wall median':>12s}   ratio to one UNet evaluation",
            f"  {'one UNet evaluation':38s} {m['unet'] * 1e3:9.1f} ms",
            f"  {'post_cfg (Balanced, Lite)':38s} {m['post_cfg'] * 1e3:9.2f} ms   "
            f"{_clock_pair(r, 'post_cfg_ratio', _pct)}   target ≤ 0.5 %: "
            f"{_verdict(max(_all(r, 'post_cfg_ratio')) <= TARGET_POST_CFG)}",
            f"  {'probe hooks + take_map':38s} {probe_s * 1e3:9.2f} ms   {_clock_pair(r, 'probe_only_ratio', _pct)}",
            f"  {'probe + post_cfg with its map (Attn)':38s} {(probe_s + m['post_cfg_attn']) * 1e3:9.2f} ms   "
            f"{_clock_pair(r, 'probe_ratio', _pct)}   target ≤ 2 %: "
            f"{_verdict(max(_all(r, 'probe_ratio')) <= TARGET_PROBE)}",
            f"  {'(UNet with probe − UNet) / UNet':38s} {'':12s}   {_clock_pair(r, 'unet_with_probe_ratio', _pct)}"
            "   (difference of two timings: noise)", ""]
        if r["probe_failures"]:
            lines.insert(-1, f"  probe produced no map: {r['probe_failures']}")
    x = lambda v: f"{v:.2f}×"  # noqa: E731
    lines += ["(b) micro_clamp + aqclip vs literal Algorithm 1 (torch.quantile, unfold/fold, per-sample loop), CPU",
              f"  {'latent':9s} {'ours qsilk':>11s} {'ours paper':>11s} {'literal':>11s}  (wall medians)"]
    for r in results["b"]:
        m = r["wall"]["median_s"]
        lines.append(f"  {r['latent'][0]}×{r['latent'][1]:<5d} {m['ours_qsilk'] * 1e3:8.1f} ms "
                     f"{m['ours_paper'] * 1e3:8.1f} ms {m['literal'] * 1e3:8.1f} ms")
        for variant in ("qsilk", "paper"):
            name = f"speedup_{variant}"
            lines.append(f"      speed-up, {variant} variant: {_clock_pair(r, name, x)}   target ≥ 5×: "
                         f"{_verdict(min(_all(r, name)) >= TARGET_SPEEDUP)}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    """Command-line entry (also `python -m qsilk bench`): measure, print the table, write JSON."""
    ap = argparse.ArgumentParser(prog="bench_core", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny UNet and sizes, 2 repeats (CI smoke; not the targets)")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per measurement (default 5; quick 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own); 1 makes CPU-time ratios scheduling-free")
    ap.add_argument("--unet", choices=("auto", "diffusers", "local"), default="auto",
                    help="SD1.5-size UNet: diffusers' UNet2DConditionModel if installed (auto), or bench/sd_unet.py")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write results (default {DEFAULT_JSON})")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 5)
    warmup = 1
    results = {"machine": machine(), "quick": args.quick, "command": "python bench/bench_core.py "
               + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.quick:
        results["a"] = measure_unet_ratios(TINY, latent_hw=(16, 16), reps=reps, warmup=warmup, unet_kind="local")
        results["b"] = measure_core_vs_literal((32, 64), reps=reps, warmup=warmup)
    else:
        results["a"] = measure_unet_ratios(SD15, reps=reps, warmup=warmup, unet_kind=args.unet)
        results["b"] = measure_core_vs_literal((128, 640), reps=max(reps, 15), warmup=warmup)
    if torch.cuda.is_available():
        cfg, hw = (TINY, (32, 32)) if args.quick else (SDXL, (128, 128))
        results["c"] = measure_unet_ratios(cfg, latent_hw=hw, reps=reps, warmup=max(1, warmup), device="cuda",
                                           dtype=torch.float16, unet_kind="local")
    else:
        results["c"] = "skipped: no CUDA device (the SDXL-size 1024² measurement runs only on a GPU)"
    print(format_table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
