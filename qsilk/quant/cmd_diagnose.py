"""``python -m qsilk diagnose``: per-step latent statistics, 16-bit vs low-bit on the same seeds.

Writes ``diagnose.csv`` (columns in `qsilk.quant.diagnose.COLUMNS`) and ``diagnose.png`` to --out.
With ``--coeffs NAME`` a third run applies that coefficient file to the low-bit model.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..settings import SettingsError
from .coeffs import CoefficientFileError, load, resolve
from .diagnose import diagnose, plot_png, write_csv
from .precondition import QSched
from .targets import add_model_arguments, build


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="qsilk-diagnose", help="output folder (default qsilk-diagnose)")
    p.add_argument("--coeffs", default=None, help="also run the low-bit model with this coefficient file")
    p.add_argument("--coeff-dir", default="models/QSilk", help="folder of --coeffs (default models/QSilk)")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    ctx = build(args)
    ref, low = ctx["ref"], ctx["low"]
    name = f"low-bit ({ctx['meta']['storage']})"
    runs = [("16-bit", ref, None), (name, low, None)]
    if args.coeffs:
        try:
            cs = load(resolve(args.coeffs, args.coeff_dir))
        except CoefficientFileError as exc:
            raise SettingsError(str(exc)) from None
        runs.append((f"{name} + {args.coeffs}", low, QSched("file", cs.c_x, cs.c_f, knots=cs.sigmas,
                                                            prediction=low.prediction)))
    parts = {r[0]: getattr(r[1].denoise, "parts", None) for r in runs}
    rows = diagnose(runs, ctx["jobs"], cond_uncond={k: v for k, v in parts.items() if v is not None})
    out = Path(args.out)
    csv_path, png_path = write_csv(rows, out / "diagnose.csv"), plot_png(rows, out / "diagnose.png")
    last = {r["run"]: r for r in rows}
    for run_name, row in last.items():
        print(f"{run_name}: final-step d_rms_vs_16bit={row['d_rms_vs_16bit']:.4g} kurtosis={row['d_kurtosis']:.3g} "
              f"q99.9/q50={row['d_q999_q50']:.3g}")
    print(f"wrote {csv_path} and {png_path}")
    return 0
