"""Per-step latent statistics, 16-bit vs low-bit on the same seeds (quant.md §5.6).

Each run samples the same jobs (prompts × seeds, common random numbers) and logs, per step:

- ``x_std``, ``d_std``: std of the noisy input x and of the guided denoised estimate D;
- ``d_kurtosis``: excess kurtosis of D (0 for a Gaussian; heavy tails → large);
- ``d_q999_q50``: 99.9th / 50th percentile of |D − mean| (tail reach relative to the bulk);
- ``clamped_share``: share of D outside the *16-bit* run's corridor at that step (its q_lo/q_hi
  quantiles, averaged over samples) — what per-σ clamp targets would act on;
- ``cond_uncond``: ‖D_cond − D_uncond‖ / ‖D_uncond‖ (when the model exposes both);
- ``d_rms_vs_16bit``: RMS(D − D_16bit) at the same step (how far the trajectory has drifted).

`write_csv` and `plot_png` (Pillow only; no matplotlib) turn the rows into files.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .calibrate import Job, Target, run

COLUMNS = ("run", "step", "sigma", "x_std", "d_std", "d_kurtosis", "d_q999_q50", "clamped_share",
           "cond_uncond", "d_rms_vs_16bit")
PLOTTED = ("d_std", "d_kurtosis", "d_q999_q50", "clamped_share", "cond_uncond", "d_rms_vs_16bit")


def latent_stats(d: torch.Tensor) -> dict[str, float]:
    """std, excess kurtosis and the q99.9/q50 ratio of |d − mean|, pooled over the batch.

    >>> s = latent_stats(torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0)))
    >>> abs(s["d_kurtosis"]) < 0.1, 4.7 < s["d_q999_q50"] < 5.1  # Gaussian: 3.29 / 0.674 = 4.88
    (True, True)
    """
    v = d.double().reshape(-1)
    c = v - v.mean()
    var = c.pow(2).mean()
    kurt = c.pow(4).mean() / var.clamp_min(1e-300) ** 2 - 3
    a = c.abs().float()
    if a.numel() > 1 << 24:
        a = a[torch.linspace(0, a.numel() - 1, 1 << 24).long()]
    q = torch.quantile(a, torch.tensor([0.5, 0.999]))
    return {"d_std": float(var.sqrt()), "d_kurtosis": float(kurt), "d_q999_q50": float(q[1] / q[0].clamp_min(1e-12))}


def diagnose(runs: Sequence[tuple[str, Target, Any]], jobs: Sequence[Job], *, q_lo: float = 0.001,
             q_hi: float = 0.999,
             cond_uncond: dict[str, Callable[[torch.Tensor, float, list], tuple[torch.Tensor, torch.Tensor]]] | None = None,
             ) -> list[dict[str, Any]]:
    """Rows of per-step statistics for each ``(name, target, preconditioner)``; the first run is the
    16-bit reference. `cond_uncond[name](x, σ, prompts) -> (D_cond, D_uncond)` where available."""
    prompts = [j.prompt for j in jobs]
    rows: list[dict[str, Any]] = []
    ref_d: list[torch.Tensor] = []
    corridor: list[tuple[torch.Tensor, torch.Tensor]] = []
    for r, (name, target, pre) in enumerate(runs):
        record: list = []
        run(target, jobs, pre=pre, record=record)
        for i, (sigma, x, d) in enumerate(record):
            if pre is not None:  # log what the sampler consumed: the pre-conditioned estimate
                n = len(record)
                d = pre(d, x, torch.full((x.shape[0],), sigma), None, i / (n - 1) if n > 1 else 1.0)
            flat = d.float().flatten(1)
            if r == 0:
                ref_d.append(d)
                corridor.append((torch.quantile(flat, q_lo, dim=1).mean(), torch.quantile(flat, q_hi, dim=1).mean()))
            lo, hi = corridor[i] if i < len(corridor) else (None, None)
            row = {"run": name, "step": i, "sigma": sigma, "x_std": float(x.double().std()), **latent_stats(d)}
            row["clamped_share"] = float(((flat < lo) | (flat > hi)).double().mean()) if lo is not None else ""
            row["d_rms_vs_16bit"] = (float((d.double() - ref_d[i].double()).pow(2).mean().sqrt())
                                     if i < len(ref_d) else "")
            parts = (cond_uncond or {}).get(name)
            if parts is not None:
                with torch.no_grad():
                    dc, du = parts(x, sigma, prompts)
                row["cond_uncond"] = float((dc - du).double().norm() / du.double().norm().clamp_min(1e-12))
            else:
                row["cond_uncond"] = ""
            rows.append(row)
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in COLUMNS})
    return path


_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def plot_png(rows: Sequence[dict[str, Any]], path: str | Path, columns: Sequence[str] = PLOTTED,
             panel: tuple[int, int] = (320, 200)) -> Path:
    """Small multiples (one panel per column, x = step, one line per run), drawn with Pillow."""
    from PIL import Image, ImageDraw

    names = list(dict.fromkeys(r["run"] for r in rows))
    cols = 3
    nrow = (len(columns) + cols - 1) // cols
    pw, ph = panel
    img = Image.new("RGB", (cols * pw, nrow * ph + 24), "white")
    draw = ImageDraw.Draw(img)
    for k, name in enumerate(names):  # legend
        x0 = 8 + k * 150
        draw.line([(x0, 12), (x0 + 20, 12)], fill=_COLOURS[k % len(_COLOURS)], width=3)
        draw.text((x0 + 26, 6), name, fill="black")
    for idx, col in enumerate(columns):
        ox, oy = (idx % cols) * pw, 24 + (idx // cols) * ph
        _panel(draw, rows, names, col, ox, oy, pw, ph)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _panel(draw, rows, names, col, ox, oy, pw, ph) -> None:
    left, top, right, bottom = ox + 48, oy + 18, ox + pw - 10, oy + ph - 22
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    draw.text((ox + 50, oy + 3), col, fill="black")
    series = {n: [(r["step"], r[col]) for r in rows if r["run"] == n and isinstance(r.get(col), (int, float))]
              for n in names}
    pts = [p for s in series.values() for p in s]
    if not pts:
        draw.text((left + 6, top + 6), "n/a", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    draw.text((ox + 2, top - 4), f"{y_hi:.3g}", fill=(90, 90, 90))
    draw.text((ox + 2, bottom - 10), f"{y_lo:.3g}", fill=(90, 90, 90))
    draw.text((left, bottom + 4), f"step {x_lo}", fill=(90, 90, 90))
    draw.text((right - 40, bottom + 4), f"{x_hi}", fill=(90, 90, 90))

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    for k, n in enumerate(names):
        line = [to_px(x, y) for x, y in series[n]]
        if len(line) > 1:
            draw.line(line, fill=_COLOURS[k % len(_COLOURS)], width=2)
        for px, py in line:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=_COLOURS[k % len(_COLOURS)])
