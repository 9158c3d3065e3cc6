"""``python -m qsilk calibrate search|paired``: write a Q-Sched coefficient file (README 'quant').

search: reference-free, Q-Sched style (ramp start values, coarse-to-fine, common random numbers,
        pluggable scorer, resumable JSONL log, baseline score beside the winner).
paired: 16-bit trajectory, teacher-forced low-bit evaluations, per-step least squares, smoothing,
        per-σ clamp targets; held-out seeds report the trajectory error before/after.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..settings import Settings, SettingsError
from . import calibrate as cal
from . import search as srch
from .coeffs import CoefficientFileError, resolve, save
from .precondition import QSched
from .scorers import Batch, ScorerUnavailable, get_scorer
from .targets import add_model_arguments, build


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", choices=("search", "paired"), help="reference-free search, or the paired fit")
    p.add_argument("--out", required=True, help="coefficient file name (in --coeff-dir; .safetensors added)")
    p.add_argument("--coeff-dir", default="models/QSilk",
                   help="folder for coefficient files (default models/QSilk: a WebUI's own folder when run "
                        "from the WebUI's root)")
    p.add_argument("--preset", default=None,
                   help="also run the QSilk stabilizer with this preset during calibration (default: Q-Sched only)")
    add_model_arguments(p)
    g = p.add_argument_group("search")
    g.add_argument("--scorer", default="heuristic",
                   help="heuristic (weak, built in) | paired | clip | hpsv2 | jaq (= clip+2*hpsv2) | sums like clip+2*hpsv2")
    g.add_argument("--points", type=int, default=5, help="grid points per axis (default 5)")
    g.add_argument("--levels", type=int, default=2, help="coarse-to-fine levels (default 2)")
    g.add_argument("--half-width", type=float, default=0.1, help="first grid's half-width around 1 (default 0.1)")
    g.add_argument("--log", default=None, help="resumable JSONL log (default <coeff-dir>/<out>.jsonl)")
    g.add_argument("--keep-best", action="store_true",
                   help="write the best candidate even when it does not beat the identity beyond noise")
    g = p.add_argument_group("paired")
    g.add_argument("--holdout-seeds", default="101-104", help="seeds for the before/after check (default 101-104)")
    g.add_argument("--smooth", type=int, default=None,
                   help="[1,2,1] smoothing passes across steps (default: 1 from 12 steps up, else 0 — few "
                        "knots far apart in σ should not be mixed)")
    g.add_argument("--ridge", type=float, default=1e-6, help="pull towards the identity (default 1e-6)")
    g.add_argument("--no-thresholds", action="store_true", help="do not store per-σ clamp targets")
    g.add_argument("--q-lo", type=float, default=0.001)
    g.add_argument("--q-hi", type=float, default=0.999)
    g.add_argument("--per-channel", action="store_true", help="per-channel clamp targets")


def run(args: argparse.Namespace) -> int:
    try:
        path = resolve(args.out, args.coeff_dir)
    except CoefficientFileError as exc:
        raise SettingsError(str(exc).replace("qsched_file", "--out")) from None
    ctx = build(args)
    if args.preset:
        settings = Settings.from_preset(args.preset)
        ctx["ref"].stabilizer_settings = ctx["low"].stabilizer_settings = settings
        ctx["meta"]["qsilk_preset"] = args.preset
    if args.method == "paired":
        summary = _paired(args, ctx, path)
    else:
        summary = _search(args, ctx, path)
    print(json.dumps(summary, indent=2))
    return 0


def _paired(args, ctx, path: Path) -> dict:
    from ..demo.compare import parse_seeds

    jobs = ctx["jobs"]
    progress = None if args.no_progress else srch.Progress(args.steps, "paired fit")
    smooth = args.smooth if args.smooth is not None else (1 if args.steps >= 12 else 0)
    fit = cal.fit_paired(ctx["ref"], ctx["low"], jobs, ridge=args.ridge, smooth=smooth,
                         q_lo=args.q_lo, q_hi=args.q_hi, per_channel=args.per_channel, progress=progress)
    cs = cal.paired_coefficients(fit, ctx["meta"], thresholds=not args.no_thresholds)
    held = [cal.Job(jobs[i % len(jobs)].prompt, s) for i, s in enumerate(parse_seeds(args.holdout_seeds))]
    pre = QSched("file", cs.c_x, cs.c_f, knots=cs.sigmas, prediction=ctx["ref"].prediction)
    before = cal.trajectory_error(ctx["ref"], ctx["low"], held)
    after = cal.trajectory_error(ctx["ref"], ctx["low"], held, pre)
    cs.metadata.update({"holdout_rms_before": f"{before:.6g}", "holdout_rms_after": f"{after:.6g}",
                        "holdout_seeds": args.holdout_seeds})
    save(path, cs)
    return {"file": str(path), "method": "paired", "c_x": [round(float(v), 4) for v in cs.c_x.flip(0)],
            "c_f": [round(float(v), 4) for v in cs.c_f.flip(0)], "clipped_to_band": fit.clipped_to_band,
            "teacher_forced_rms_before": cal._mean(fit.error_before), "teacher_forced_rms_after": cal._mean(fit.error_after),
            "holdout_final_rms_before": before, "holdout_final_rms_after": after,
            "holdout_reduction": 1 - after / before if before > 0 else 0.0}


def _search(args, ctx, path: Path) -> dict:
    try:
        scorer = get_scorer(args.scorer)
    except (ScorerUnavailable, ValueError) as exc:
        raise SettingsError(str(exc)) from None
    if args.points < 1 or args.levels < 1 or not 0 < args.half_width <= 0.5:
        raise SettingsError("--points and --levels must be ≥ 1 and --half-width in (0, 0.5]")
    if scorer.weak:
        print(f"note: scorer {scorer.name!r} is a weak heuristic (sharpness/clipping); it cannot tell detail "
              f"from noise — treat its winner as a starting point, not a measurement")
    ref, low, jobs = ctx["ref"], ctx["low"], ctx["jobs"]
    reference = cal.run(ref, jobs) if scorer.needs_reference else None
    prompts = [j.prompt for j in jobs]

    def evaluate(c_x: float, c_f: float) -> list[float]:
        pre = None if (c_x, c_f) == (1.0, 1.0) else QSched("ramp", c_x, c_f, prediction=low.prediction)
        latents = cal.run(low, jobs, pre=pre)
        images = low.decode(latents) if scorer.needs_images else None
        return scorer(Batch(latents, images, prompts, reference)).tolist()

    config = {"scorer": scorer.name, "points": args.points, "levels": args.levels, "half_width": args.half_width,
              "meta": {k: str(v) for k, v in ctx["meta"].items()}, "preset": args.preset or ""}
    log = srch.SearchLog(args.log or path.with_suffix(".jsonl"), config)
    progress = None if args.no_progress else srch.Progress(srch.search_budget(args.points, args.levels), "search")
    result = srch.search(evaluate, half_width=args.half_width, points=args.points, levels=args.levels,
                        log=log, progress=progress)
    summary = {"method": "search", "scorer": scorer.name, "best": list(result.best), "best_score": result.best_score,
               "baseline_score": result.baseline_score, "gain": result.gain, "gain_se": result.gain_se,
               "significant": result.significant, "candidates": len(result.evaluated), "log": str(log.path)}
    if result.significant or (args.keep_best and result.best != (1.0, 1.0)):
        meta = {**ctx["meta"], "scorer": scorer.name, "grid": f"points={args.points} levels={args.levels} "
                f"half_width={args.half_width:g}"}
        save(path, srch.search_coefficients(result, ref.sigmas, meta))
        summary["file"] = str(path)
    else:
        summary["file"] = None
        print("no candidate beat the identity beyond the seed-to-seed noise; no file written (--keep-best to force)")
    return summary


def main(argv: list[str] | None = None) -> int:  # for `python -m qsilk.quant.cmd_calibrate`
    p = argparse.ArgumentParser(prog="qsilk calibrate")
    add_arguments(p)
    return run(p.parse_args(argv))

