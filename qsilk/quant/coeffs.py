"""Coefficient files: small safetensors holding Q-Sched knots and per-σ clamp targets (quant.md §5.2).

A file is a plain safetensors (no pickle anywhere) with float32 tensors

- ``sigmas``  ``(K,)`` strictly monotone positive noise levels (k-diffusion frame; the sampler's
  order, decreasing, is what the calibrators write),
- ``c_x``, ``c_f``  ``(K,)`` Q-Sched coefficients, each inside `BAND`,
- optional per-σ micro-clamp targets: ``q_lo``/``q_hi`` ``(K,)`` quantile levels and/or
  ``clamp_lo``/``clamp_hi`` ``(K,)`` or ``(K, C)`` absolute bounds in model latent units,

and string metadata (`REQUIRED_METADATA` must be present; `format` ≤ `FORMAT_VERSION`). Files
live in ``<models>/QSilk/`` (A1111/Forge: ``modules.paths.models_path``; command line:
``--coeff-dir``) and are referred to by file name only, so the name can go into infotext.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .precondition import BAND, PREDICTIONS

FORMAT_VERSION = 1
SUFFIX = ".safetensors"
FOLDER = "QSilk"
MAX_BYTES = 1 << 20  # "small": a few hundred knots at most
#: File names that can travel in the compact infotext (no ``, : ; = / \``), 100 characters at most.
NAME_PATTERN = r"[\w][\w .+()-]{0,99}"
REQUIRED_METADATA = ("format", "model_hash", "storage", "prediction", "sampler", "steps", "method",
                     "created_by")
#: Descriptive keys written when known (quant.md §5.2); any other string keys are kept as well.
OPTIONAL_METADATA = ("model_name", "arch", "scheduler", "cfg_scale", "resolution", "scorer", "k",
                     "prompts", "seeds", "grid", "best_score", "baseline_score", "significant",
                     "fit_error_before", "fit_error_after", "thresholds_from")
TENSORS = ("sigmas", "c_x", "c_f", "q_lo", "q_hi", "clamp_lo", "clamp_hi")
ANY = "*"  # metadata value meaning "any model" / "any storage" (hand-written generic files)


class CoefficientFileError(ValueError):
    """A coefficient file is unusable. The message names the file and what is wrong."""


@dataclass
class CoefficientSet:
    """Validated contents of one coefficient file; `sigmas` and every tensor in increasing σ."""

    sigmas: torch.Tensor
    c_x: torch.Tensor
    c_f: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    q_lo: torch.Tensor | None = None
    q_hi: torch.Tensor | None = None
    clamp_lo: torch.Tensor | None = None
    clamp_hi: torch.Tensor | None = None

    @property
    def has_thresholds(self) -> bool:
        return self.q_lo is not None or self.clamp_lo is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as written to disk: float32, contiguous, in the sampler's (decreasing) order."""
        out = {}
        for name in TENSORS:
            t = getattr(self, name)
            if t is not None:
                out[name] = t.detach().to("cpu", torch.float32).flip(0).contiguous()
        return out


def validate(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
             where: str = "coefficient file") -> CoefficientSet:
    """Check tensors and metadata; return the set in increasing σ or raise `CoefficientFileError`."""
    def fail(msg: str) -> CoefficientFileError:
        return CoefficientFileError(f"QSilk: {where}: {msg}")

    meta = dict(metadata or {})
    missing = [k for k in REQUIRED_METADATA if not meta.get(k)]
    if missing:
        raise fail(f"missing metadata {', '.join(missing)} (required: {', '.join(REQUIRED_METADATA)})")
    try:
        version = int(meta["format"])
    except ValueError:
        raise fail(f"metadata format must be an integer (got {meta['format']!r})") from None
    if version > FORMAT_VERSION:
        raise fail(f"format {version} is newer than this QSilk reads ({FORMAT_VERSION}); update QSilk")
    if version < 1:
        raise fail(f"format must be 1..{FORMAT_VERSION} (got {version})")
    if meta["prediction"] not in PREDICTIONS:
        raise fail(f"metadata prediction must be one of {', '.join(PREDICTIONS)} (got {meta['prediction']!r})")
    unknown = sorted(set(tensors) - set(TENSORS))
    if unknown:
        raise fail(f"unknown tensor(s) {', '.join(unknown)} (known: {', '.join(TENSORS)})")
    for name in ("sigmas", "c_x", "c_f"):
        if name not in tensors:
            raise fail(f"missing tensor {name!r}")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise fail(f"tensor {name!r} must be float32 (got {getattr(t, 'dtype', type(t).__name__)})")
        if not bool(torch.isfinite(t).all()):
            raise fail(f"tensor {name!r} has non-finite values")
    sig = tensors["sigmas"]
    if sig.dim() != 1 or sig.numel() < 1:
        raise fail(f"sigmas must have shape (K,) with K ≥ 1 (got {tuple(sig.shape)})")
    k = sig.numel()
    if bool((sig <= 0).any()):
        raise fail("sigmas must be positive")
    d = sig.diff()
    decreasing = bool((d < 0).all())
    if k > 1 and not (decreasing or bool((d > 0).all())):
        raise fail("sigmas must be strictly monotone (no repeats, one direction)")
    for name in ("c_x", "c_f", "q_lo", "q_hi"):
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != (k,):
            raise fail(f"tensor {name!r} must have shape ({k},) like sigmas (got {tuple(t.shape)})")
    for name in ("c_x", "c_f"):
        t = tensors[name]
        if bool(((t < BAND[0]) | (t > BAND[1])).any()):
            raise fail(f"{name} must stay in {BAND[0]}..{BAND[1]} (got {float(t.min()):.4g}..{float(t.max()):.4g})")
    _check_pair(tensors, "q_lo", "q_hi", k, fail, quantiles=True)
    _check_pair(tensors, "clamp_lo", "clamp_hi", k, fail, quantiles=False)

    def ordered(name: str) -> torch.Tensor | None:
        t = tensors.get(name)
        if t is None:
            return None
        t = t.detach().to("cpu", torch.float32).clone()
        return t.flip(0) if decreasing else t

    return CoefficientSet(sigmas=ordered("sigmas"), c_x=ordered("c_x"), c_f=ordered("c_f"),
                          metadata=meta, q_lo=ordered("q_lo"), q_hi=ordered("q_hi"),
                          clamp_lo=ordered("clamp_lo"), clamp_hi=ordered("clamp_hi"))


def _check_pair(tensors, lo_name, hi_name, k, fail, *, quantiles: bool) -> None:
    lo, hi = tensors.get(lo_name), tensors.get(hi_name)
    if (lo is None) != (hi is None):
        raise fail(f"{lo_name} and {hi_name} must be given together")
    if lo is None:
        return
    if lo.shape != hi.shape or lo.dim() not in (1, 2) or lo.shape[0] != k:
        raise fail(f"{lo_name}/{hi_name} must both have shape ({k},) or ({k}, C) "
                   f"(got {tuple(lo.shape)} and {tuple(hi.shape)})")
    if quantiles and bool(((lo < 0) | (lo > 0.05) | (hi < 0.95) | (hi > 1)).any()):
        raise fail("q_lo must stay in 0..0.05 and q_hi in 0.95..1")
    if bool((lo >= hi).any()):
        raise fail(f"{lo_name} must be below {hi_name} at every knot")


def save(path: str | Path, coeffs: CoefficientSet) -> Path:
    """Write `coeffs` (validated first) as safetensors with string metadata; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {str(k): str(v) for k, v in coeffs.metadata.items()}
    meta.setdefault("format", str(FORMAT_VERSION))
    tensors = coeffs.tensors()
    validate(tensors, meta, where=path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load(path: str | Path) -> CoefficientSet:
    """Read and validate a coefficient file; `CoefficientFileError` names the file and the fault."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CoefficientFileError(f"QSilk: coefficient file {str(path)!r} not found")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise CoefficientFileError(f"QSilk: {path.name}: {size} bytes is too large for a coefficient file "
                                   f"(at most {MAX_BYTES})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for broken headers
        raise CoefficientFileError(f"QSilk: {path.name} is not a readable safetensors file ({exc})") from None
    return validate(tensors, metadata, where=path.name)


# -- the QSilk folder ------------------------------------------------------------------------
def folder(models_dir: str | Path) -> Path:
    """``<models>/QSilk`` (not created here)."""
    return Path(models_dir) / FOLDER


def check_name(name: str) -> str:
    """`name` if it is a bare file name that infotext can carry, else `CoefficientFileError`."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name) or ".." in name:
        raise CoefficientFileError(
            f"QSilk: qsched_file must be a file name matching {NAME_PATTERN!r} (no path, no , : ; =); got {name!r}")
    return name


def resolve(name: str, directory: str | Path) -> Path:
    """The path of coefficient file `name` in `directory` (``.safetensors`` added if missing)."""
    check_name(name)
    if not name.endswith(SUFFIX):
        name += SUFFIX
    return Path(directory) / name


def list_files(directory: str | Path | None) -> list[str]:
    """Coefficient file names in `directory` whose names infotext can carry, sorted; [] if absent."""
    if not directory:
        return []
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.glob("*" + SUFFIX)
                  if p.is_file() and re.fullmatch(NAME_PATTERN, p.name) and ".." not in p.name)


def match(coeffs: CoefficientSet, *, model_hash: str = "", storage: str = "", sampler: str = "",
          steps: int = 0) -> tuple[list[str], list[str]]:
    """Compare a file with the loaded model: ``(errors, warnings)``.

    Errors (the file is not applied): another model hash or storage dtype. Warnings: another
    sampler or step count (knots over σ still apply, but were fitted elsewhere). Unknown values
    on the host side ("") are not held against the file; ``*`` in the file matches anything.
    """
    m = coeffs.metadata
    errors, warnings = [], []
    fh, fs = m.get("model_hash", ""), m.get("storage", "")
    if model_hash and fh != ANY and not _same_hash(fh, model_hash):
        errors.append(f"made for model hash {fh}, loaded model is {model_hash}")
    if storage and fs != ANY and fs.lower() != storage.lower():
        errors.append(f"made for {fs} weights, loaded model stores {storage}")
    fsam = m.get("sampler", "")
    if sampler and fsam not in (ANY, "") and _sampler_key(fsam) != _sampler_key(sampler):
        warnings.append(f"calibrated with sampler {fsam}, this job uses {sampler}")
    fst = m.get("steps", "")
    if steps and fst not in (ANY, "") and fst != str(steps):
        warnings.append(f"calibrated for {fst} steps, this job uses {steps}")
    return errors, warnings


def _sampler_key(name: str) -> str:
    """``"Euler a"``, ``"euler_a"`` and ``"k_euler_ancestral"`` name one sampler."""
    key = re.sub(r"[\s_]+", "_", name.strip().lower()).removeprefix("k_")
    return {"euler_ancestral": "euler_a", "dpm++_2m": "dpmpp_2m"}.get(key, key)


def _same_hash(a: str, b: str) -> bool:
    """Short and long forms of one hash match by prefix (A1111 shows 10 hex digits of the sha256)."""
    a, b = a.lower().strip(), b.lower().strip()
    n = min(len(a), len(b))
    return n >= 8 and a[:n] == b[:n]


def metadata_value(v: Any) -> str:
    """Metadata values are strings (safetensors requires it); floats keep 6 significant digits."""
    if isinstance(v, float):
        return format(v, ".6g") if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return " ".join(metadata_value(x) for x in v)
    return str(v)
