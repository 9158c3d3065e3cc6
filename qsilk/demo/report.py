"""Outputs of ``qsilk compare``: the grid with zoomed crops, the heatmaps, the metric tables.

``grid.png`` — rows are seeds; every column's image (shown at most ``--cell`` px), then every
column's crop (full-resolution pixels, enlarged by nearest neighbour), placed where the columns
differ most. ``maps.png`` — per QSilk column, AQClip's confidence of the last evaluation and the
stabilizer's activity. ``metrics.json`` / ``metrics.md`` — per-seed values, means and changes.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from . import metrics as M
from . import render
from .run import JobResult, JobSpec


def write_outputs(out: Path, model: Any, variants: list, spec: JobSpec, results: list[JobResult], *,
                  learned: list[M.Metric] = (), crop: int | None = None, cell: int = 384,
                  save_images: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    table = metric_table(model, variants, spec, results, learned)
    (out / "metrics.json").write_text(json.dumps(table, indent=2), encoding="utf-8")
    (out / "metrics.md").write_text(markdown(table), encoding="utf-8")
    render.write_png(out / "grid.png", grid_image(variants, spec, results, crop, cell))
    maps = maps_image(variants, spec, results)
    if maps is not None:
        render.write_png(out / "maps.png", maps)
    if save_images:
        for v, r in zip(variants, results):
            for seed, img in zip(spec.seeds, r.images):
                render.write_png(out / "images" / f"{_slug(v.label)}_seed{seed}.png", render.to_uint8(img))
    return out


def grid_image(variants: list, spec: JobSpec, results: list[JobResult], crop: int | None,
               cell: int = 384) -> torch.Tensor:
    """Rows = seeds; columns = each variant's image (shown at most `cell` px), then each variant's
    zoomed crop (full-resolution pixels, enlarged by nearest neighbour to the same cell size).

    The crop (side `crop` px along the longer axis, default an eighth of it) is placed where the
    columns differ most from the first one, and outlined on the full images.
    """
    _, _, h, w = results[0].images.shape
    shrink = min(1.0, cell / max(h, w))
    shown = (max(1, round(h * shrink)), max(1, round(w * shrink)))
    side = min(crop or max(8, max(h, w) // 8), max(h, w))
    factor = max(shown) / side
    size = (max(1, min(h, round(shown[0] / factor))), max(1, min(w, round(shown[1] / factor))))
    rows, row_labels = [], []
    for s, seed in enumerate(spec.seeds):
        imgs = [r.images[s] for r in results]
        y, x = render.pick_crop(imgs, size)
        width = max(2, round(3 / shrink))
        row = [render.downscale_area(render.outline(img, y, x, size, width=width), shown) for img in imgs]
        row += [render.crop_zoom(img, y, x, size, shown) for img in imgs]
        rows.append(row)
        row_labels.append(f"seed {seed}  {spec.prompts[s % len(spec.prompts)]}"[:60])
    labels = [v.label for v in variants] + [f"x{factor:.3g} {v.label}" for v in variants]
    title = f"{spec.sampler} {spec.steps} steps, cfg {spec.cfg:g}"
    return render.layout(rows, labels, row_labels, title=title)


def maps_image(variants: list, spec: JobSpec, results: list[JobResult]) -> torch.Tensor | None:
    """Rows = seeds; per QSilk column: AQClip confidence (0..1) and clip activity (one shared scale).

    Activity is the mean |x0' − x0| per evaluation (all channels); its colour scale ends at the
    99.5th percentile over all maps so that a few extreme pixels do not hide the rest.
    None when no column runs QSilk.
    """
    shown = [(v, r) for v, r in zip(variants, results) if r.report.get("passes")]
    if not shown:
        return None
    _, _, h, w = results[0].images.shape
    cell = (min(h, 192), min(w, 192))
    pooled = torch.cat([r.activity.flatten() for _, r in shown])
    vmax = max(float(torch.quantile(pooled.double(), 0.995)), 1e-12)
    rows, row_labels = [], []
    for s, seed in enumerate(spec.seeds):
        row = []
        for _, r in shown:
            if r.confidence is not None:
                conf = render.colormap(r.confidence[s, 0], 0.0, 1.0)
            else:
                conf = torch.full((3, 8, 8), 0.85)
            row.append(render.upscale_nearest(conf, cell))
            row.append(render.upscale_nearest(render.colormap(r.activity[s, 0], 0.0, vmax), cell))
        rows.append(row)
        row_labels.append(f"seed {seed}")
    labels = []
    for v, r in shown:
        labels += [("conf " if r.confidence is not None else "no aqclip ") + v.label, "activity " + v.label]
    title = ("confidence, last step: 0 blue, 1 yellow\n"
             f"activity: mean |dx0|/step, 0-{vmax:.2g}")
    return render.layout(rows, labels, row_labels, title=title)


def metric_table(model: Any, variants: list, spec: JobSpec, results: list[JobResult],
                 learned: list[M.Metric] = ()) -> dict[str, Any]:
    metrics = M.builtin_metrics(spec.tail_k) + list(learned)
    prompts = [spec.prompts[i % len(spec.prompts)] for i in range(len(spec.seeds))]
    rows = []
    for v, r in zip(variants, results):
        context = {"reference": results[0].images, "prompts": prompts}
        per_seed = M.evaluate(metrics, r.images, r.latents, context)
        extra = getattr(model, "extra_metrics", None)
        if extra is not None:
            per_seed.update(extra(r.latents, prompts))
        per_seed["cfg_x0_tail_share"] = r.cfg_x0_tail_share
        rows.append({
            "label": v.label,
            "settings": v.settings.to_infotext() if v.settings.enabled else "off",
            "mean": {k: sum(vals) / len(vals) for k, vals in per_seed.items()},
            "per_seed": per_seed,
            "report": r.report,
            "seconds": r.seconds,
        })
    help_ = {m.name: {"help": m.help, "better": m.better} for m in metrics}
    help_.update(getattr(model, "extra_metric_help", {}))
    help_["cfg_x0_tail_share"] = {"help": f"share of post-CFG x0 values beyond ±{spec.tail_k:g}σ, mean over "
                                          "evaluations, before the stabilizer (how hard CFG overshoots)",
                                  "better": ""}
    return {
        "config": {
            "model": getattr(model, "description", getattr(model, "name", "model")),
            "sampler": spec.sampler, "steps": spec.steps, "cfg": spec.cfg, "seeds": list(spec.seeds),
            "prompts": list(spec.prompts), "negative": spec.negative, "latent_hw": list(spec.latent_hw),
            "device": spec.device, "torch": torch.__version__, "python": platform.python_version(),
        },
        "metrics": help_,
        "variants": rows,
    }


def markdown(table: dict[str, Any]) -> str:
    cfg = table["config"]
    variants = table["variants"]
    lines = [
        "# QSilk compare",
        "",
        f"Model: {cfg['model']}. Sampler {cfg['sampler']}, {cfg['steps']} steps, CFG {cfg['cfg']:g}, "
        f"seeds {', '.join(map(str, cfg['seeds']))}, latent {cfg['latent_hw'][0]}×{cfg['latent_hw'][1]}. "
        "Values are means over the seeds; Δ is relative to the first column.",
        "",
        "| metric | better | " + " | ".join(v["label"] for v in variants)
        + "".join(f" | Δ {v['label']}" for v in variants[1:]) + " |",
        "|---|---|" + "---:|" * (2 * len(variants) - 1),
    ]
    for name, info in table["metrics"].items():
        vals = [v["mean"].get(name) for v in variants]
        if all(x is None for x in vals):
            continue
        cells = [_fmt(x) for x in vals]
        deltas = [_delta(vals[0], x) for x in vals[1:]]
        lines.append(f"| {name} | {info['better'] or '–'} | " + " | ".join(cells + deltas) + " |")
    lines += ["", "## What the stabilizer did", ""]
    for v in variants:
        rep = v["report"]
        if not rep.get("passes"):
            lines.append(f"- **{v['label']}**: off (no hook called).")
            continue
        share = rep.get("changed_share_per_channel") or []
        share_txt = ", ".join(f"{100 * s:.2f} %" for s in share) or "none"
        notes = "; ".join(rep.get("notes", [])) or "none"
        lines.append(f"- **{v['label']}** (`{v['settings']}`): {rep['evaluations']} evaluations, "
                     f"{rep['pre_decodes']} pre-decode, values changed per channel {share_txt}, "
                     f"Attn maps {rep['attn_maps']}, Lite fallbacks {rep['lite_fallbacks']}, "
                     f"errors {rep['errors']}, {v['seconds']:.2f} s; notes: {notes}.")
    lines += ["", "## Metrics", ""]
    lines += [f"- `{k}`: {v['help']}" for k, v in table["metrics"].items()]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    return f"{x:.4g}" if abs(x) >= 1e-3 else f"{x:.3e}"


def _delta(base: float | None, x: float | None) -> str:
    """Relative change in %, or the absolute change when the base is ~0 (a % of ~0 means nothing)."""
    if base is None or x is None:
        return "–"
    if abs(base) < 1e-4 * max(abs(x), 1.0) and abs(base) < 1e-4:
        return "0" if x == base else f"{x - base:+.2e} abs"
    return f"{100 * (x - base) / abs(base):+.1f} %"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=" else "_" for c in text)
