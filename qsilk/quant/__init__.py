"""Quantization-aware sampling for low-bit models (issue #6; research/quant.md).

- `precondition`: Q-Sched's pre-conditioning on the denoised estimate, knots over log σ, ramps.
- `coeffs`: the coefficient file (small safetensors), its validation and the ``<models>/QSilk`` folder.
- `thresholds`: per-σ micro-clamp targets from the same file.
- `lowbit`: storage detection on both hosts (duck-typed) and weight-storage simulation.
- `search`, `scorers`: the reference-free search and its scorers; `calibrate`: sampling runs and the
  paired least-squares fit; `targets`, `cmd_*`: the `calibrate` and `diagnose` commands.
- `diagnose`: per-step latent statistics, 16-bit vs low-bit, CSV and PNG.

Hosts call `make_preconditioner` once per job and pass the result to the Stabilizer::

    pre = quant.make_preconditioner(settings, quant.model_info(p.sd_model, models_dir=models_path,
                                                                sampler=p.sampler_name, steps=p.steps),
                                    note=notes.append)
    stabilizer = Stabilizer(settings, preconditioner=pre)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .coeffs import CoefficientFileError, CoefficientSet, folder, list_files, load, match, resolve, save
from .lowbit import Storage, describe_storage, detect_storage, simulate_storage
from .precondition import BAND, QSched, exact_c_x, interp_log_sigma, precondition, skip_factor
from .thresholds import SigmaCorridor

log = logging.getLogger("qsilk")

__all__ = [
    "BAND", "CoefficientFileError", "CoefficientSet", "ModelInfo", "QSched", "SigmaCorridor", "Storage",
    "describe_storage", "detect_storage", "exact_c_x", "folder", "interp_log_sigma", "list_files", "load",
    "make_preconditioner", "match", "model_info", "panel_status", "precondition", "resolve", "save", "simulate_storage",
    "skip_factor",
]


@dataclass(frozen=True)
class ModelInfo:
    """What the pre-conditioner needs to know about the loaded model and the job.

    `prediction`: ``eps`` | ``v`` | ``flow`` (gives s(σ) when the host passes no ``c_skip``);
    `model_hash`/`storage` select and check coefficient files; `sampler`/`steps` only warn;
    `coeff_dir`: the folder holding coefficient files (``<models>/QSilk`` on the WebUIs).
    """

    model_hash: str = ""
    storage: str = ""
    prediction: str = "eps"
    sigma_data: float = 1.0
    sampler: str = ""
    steps: int = 0
    coeff_dir: str = ""
    model_name: str = ""


def model_info(sd_model: Any, *, models_dir: str | None = None, opts: Any = None, sampler: str = "",
               steps: int = 0) -> ModelInfo:
    """`ModelInfo` from either host's ``sd_model`` (duck-typed; unknown fields stay empty).

    A1111: hash ``sd_model.sd_model_hash`` / ``sd_checkpoint_info.shorthash``; v-prediction from
    ``sd_model.parameterization == "v"``; flow for SD3 (``is_sd3``). Forge: the KModel's
    ``predictor.prediction_type`` (``epsilon`` / ``v_prediction`` / ``edm`` / ``const`` = flow) and
    ``predictor.sigma_data``.
    """
    info = getattr(sd_model, "sd_checkpoint_info", None)
    model_hash = (getattr(sd_model, "sd_model_hash", None) or getattr(info, "shorthash", None) or "")
    name = getattr(info, "name_for_extra", None) or getattr(info, "name", None) or ""
    prediction, sigma_data = "eps", 1.0
    kmodel = getattr(getattr(getattr(sd_model, "forge_objects", None), "unet", None), "model", None)
    predictor = getattr(kmodel, "predictor", None)
    if predictor is not None:
        ptype = str(getattr(predictor, "prediction_type", "eps"))
        # 'edm' shares v's skip factor σ_d²/(σ²+σ_d²) (Forge backend/modules/k_prediction.py)
        prediction = {"v_prediction": "v", "v": "v", "edm": "v", "const": "flow", "flow": "flow"}.get(ptype, "eps")
        sigma_data = float(getattr(predictor, "sigma_data", 1.0) or 1.0)
    elif getattr(sd_model, "parameterization", None) == "v":
        prediction = "v"
    elif getattr(sd_model, "is_sd3", False):
        prediction = "flow"
    storage = detect_storage(sd_model, opts)
    return ModelInfo(model_hash=str(model_hash), storage=storage.mode if storage.mode != "unknown" else "",
                     prediction=prediction, sigma_data=sigma_data, sampler=str(sampler or ""),
                     steps=int(steps or 0), coeff_dir=str(folder(models_dir)) if models_dir else "",
                     model_name=str(name))


def panel_status(sd_model: Any, opts: Any = None, models_dir: str | None = None) -> str:
    """The QSilk panel's read-only low-bit line: detected storage and the coefficient files found."""
    storage = detect_storage(sd_model, opts)
    line = storage.describe()
    chosen = getattr(opts, "forge_unet_storage_dtype", None)  # Forge "Diffusion in Low Bits"
    if storage.mode == "unknown" and chosen:
        line += f" 'Diffusion in Low Bits' is set to {chosen}."
    if models_dir:
        d = folder(models_dir)
        names = list_files(d)
        shown = ", ".join(n[: -len(".safetensors")] for n in names[:5]) + (" …" if len(names) > 5 else "")
        line += f" Coefficient files in {d}: {len(names)}" + (f" ({shown})." if names else ".")
    return line


def make_preconditioner(settings: Any, info: ModelInfo | None,
                        note: Callable[[str], None] | None = None) -> QSched | None:
    """The job's Q-Sched pre-conditioner, or None (off, identity, or a file that does not apply).

    Never raises for a bad or mismatched file: it reports through `note` (the job's visible
    messages; default the log) and returns None, so the generation goes on without it.
    """
    say = note or log.warning
    info = info or ModelInfo()
    if not getattr(settings, "enabled", False) or settings.qsched == "off":
        return None
    if settings.qsched == "ramp":
        if settings.qsched_cx == 1.0 and settings.qsched_cf == 1.0:
            return None  # identity: install nothing, output bit-identical
        return QSched("ramp", float(settings.qsched_cx), float(settings.qsched_cf),
                      prediction=info.prediction, sigma_data=info.sigma_data, note=say,
                      label=f"ramp c_x={settings.qsched_cx:g} c_F={settings.qsched_cf:g}")
    name = settings.qsched_file
    if not info.coeff_dir:
        say(f"Q-Sched file {name!r} not applied: no coefficient folder known on this host")
        return None
    try:
        coeffs = load(resolve(name, info.coeff_dir))
    except CoefficientFileError as exc:
        say(f"{exc}; Q-Sched not applied")
        return None
    errors, warnings = match(coeffs, model_hash=info.model_hash, storage=info.storage,
                             sampler=info.sampler, steps=info.steps)
    if errors:
        say(f"Q-Sched file {name!r} not applied: " + "; ".join(errors))
        return None
    for w in warnings:
        say(f"Q-Sched file {name!r}: {w}")
    fp = coeffs.metadata.get("prediction", info.prediction)
    if fp != info.prediction:
        say(f"Q-Sched file {name!r} not applied: made for {fp} prediction, the model is {info.prediction}")
        return None
    corridor = SigmaCorridor.from_coefficients(coeffs) if settings.qsched_thresholds else None
    if settings.qsched_thresholds and corridor is None:
        say(f"Q-Sched file {name!r} has no per-σ clamp targets; the global quantiles apply")
    if corridor is not None and not settings.qsilk_enabled:
        say("per-σ clamp targets need the micro-clamp on; they are not used")
        corridor = None
    identity = bool((coeffs.c_x == 1).all() and (coeffs.c_f == 1).all())
    if identity and corridor is None:
        return None
    return QSched("file", coeffs.c_x, coeffs.c_f, knots=coeffs.sigmas, prediction=info.prediction,
                  sigma_data=info.sigma_data, note=say, label=name, thresholds=corridor,
                  identity=identity)
