"""Which storage the loaded diffusion model's weights use, and weight-only storage simulation.

Detection is duck-typed: it reads attributes and parameter classes/dtypes and never imports a
host or quantization package (bitsandbytes, gguf, Forge's backend, A1111's modules).

- Forge (new): ``sd_model.forge_objects.unet.model`` is the KModel; its ``storage_dtype`` is a
  torch dtype or ``'nf4'`` / ``'fp4'`` / ``'gguf'`` (backend/loader.py, Forge dfdcbab). GGUF
  parameters carry ``gguf_cls`` (a class named after the quant type, e.g. ``Q4_K``); bitsandbytes
  4-bit parameters carry ``quant_type`` and ``quant_state``.
- AUTOMATIC1111: "FP8 weight" (``shared.opts.fp8_storage``) stores Linear/Conv weights as
  ``torch.float8_e4m3fn`` (PR 14031); detected from the UNet's parameter dtypes.

`simulate_storage` rounds a *copy* of a torch module's Linear/Conv weights the way those storage
modes do (weights stored low-bit, computed in the original dtype), so the command line can
calibrate and diagnose without a WebUI. It never writes weights anywhere.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: NF4 code book: the 16 levels of QLoRA's NormalFloat4 (Dettmers et al., 2023, appendix E).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
SIMULATED = ("fp8-e4m3fn", "fp8-e5m2", "nf4", "int4", "q8_0")
_FLOAT_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}


@dataclass(frozen=True)
class Storage:
    """A storage mode: `mode` is the coefficient files' ``storage`` string (``fp16``, ``bf16``,
    ``fp8-e4m3fn``, ``fp8-e5m2``, ``nf4``, ``fp4``, ``gguf-Q4_K``, ``gguf``, ``unknown``)."""

    mode: str
    low_bit: bool
    source: str = ""

    def describe(self) -> str:
        """One line for the QSilk panel."""
        if self.mode == "unknown":
            return "Model weights: storage not detected (no model loaded, or an unknown wrapper)."
        if not self.low_bit:
            return f"Model weights: {self.mode} (16-bit or wider); Q-Sched coefficients are not needed."
        return (f"Model weights: {self.mode} (low-bit, weight-only; {self.source}). Q-Sched coefficients "
                f"and per-σ thresholds calibrated for this model and storage can help; see README 'quant'.")


def dtype_name(dtype: Any) -> str:
    """Storage string for a torch dtype or a Forge storage tag.

    >>> dtype_name(torch.float8_e4m3fn), dtype_name("nf4"), dtype_name(torch.float16)
    ('fp8-e4m3fn', 'nf4', 'fp16')
    """
    if isinstance(dtype, str):
        return dtype.lower()
    if dtype in _FLOAT_NAMES:
        return _FLOAT_NAMES[dtype]
    name = str(dtype).replace("torch.", "")
    if name.startswith("float8_"):
        return "fp8-" + name[len("float8_"):]
    return name


def _is_low_bit(mode: str) -> bool:
    return mode not in ("fp16", "bf16", "fp32", "fp64", "unknown")


def parameter_storage(module: Any) -> Storage:
    """Storage from a module's parameters: GGUF / 4-bit classes first, then the commonest dtype
    among weights of two or more dimensions (norms and biases stay 16-bit in every low-bit mode)."""
    kinds: Counter = Counter()
    try:
        params = list(module.parameters())
    except Exception:  # a wrapper without parameters(): nothing to inspect
        return Storage("unknown", False)
    for p in params:
        gguf_cls = getattr(p, "gguf_cls", None)
        if gguf_cls is not None or type(p).__name__.lower().endswith("gguf"):
            kinds["gguf-" + getattr(gguf_cls, "__name__", "") if gguf_cls is not None else "gguf"] += 1
            continue
        qtype = getattr(p, "quant_type", None)
        if qtype is not None and (hasattr(p, "quant_state") or "4bit" in type(p).__name__.lower()):
            kinds[str(qtype).lower()] += 1
            continue
        if getattr(p, "dim", lambda: 0)() >= 2:
            kinds[dtype_name(p.dtype)] += 1
    if not kinds:
        return Storage("unknown", False)
    low = [(n, k) for k, n in kinds.items() if _is_low_bit(k)]
    mode = max(low)[1] if low else kinds.most_common(1)[0][0]
    return Storage(mode, _is_low_bit(mode), "parameter dtypes/classes")


def detect_storage(sd_model: Any, opts: Any = None) -> Storage:
    """The storage of a WebUI's loaded diffusion model (Forge KModel tag, else parameters).

    Args:
        sd_model: ``shared.sd_model`` / ``p.sd_model`` of either host, or any torch module.
        opts: ``shared.opts`` (A1111), only to name the source of an FP8 detection.
    Never raises; ``Storage("unknown", False)`` when nothing can be read.
    """
    if sd_model is None:
        return Storage("unknown", False)
    try:
        unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
        kmodel = getattr(unet, "model", None)
        tag = getattr(kmodel, "storage_dtype", None)
        if tag is not None:
            mode = dtype_name(tag)
            if mode == "gguf":
                found = parameter_storage(getattr(kmodel, "diffusion_model", kmodel))
                mode = found.mode if found.mode.startswith("gguf") else mode
            return Storage(mode, _is_low_bit(mode), "Forge storage_dtype")
        inner = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
        target = inner if inner is not None else sd_model
        found = parameter_storage(target)
        if found.mode.startswith("fp8") and opts is not None:
            return Storage(found.mode, True, f"FP8 weight option: {getattr(opts, 'fp8_storage', '?')}")
        return found
    except Exception:  # detection must never break a generation
        return Storage("unknown", False)


def describe_storage(sd_model: Any, opts: Any = None) -> str:
    """The QSilk panel's read-only line for the loaded model."""
    return detect_storage(sd_model, opts).describe()


# -- simulation (command line) ---------------------------------------------------------------
def round_weight(w: torch.Tensor, mode: str, group_size: int = 64) -> torch.Tensor:
    """`w` stored in `mode` and read back in its own dtype (weight-only storage, like the WebUIs).

    fp8: a cast. nf4/int4: blocks of `group_size` consecutive values (row-major), absmax scale,
    NF4 code book / 15 symmetric integer levels. q8_0: blocks of 32, absmax/127 scale (GGUF Q8_0).
    """
    if mode in ("fp8-e4m3fn", "fp8-e5m2"):
        fp8 = torch.float8_e4m3fn if mode == "fp8-e4m3fn" else torch.float8_e5m2
        return w.to(fp8).to(w.dtype)
    if mode not in ("nf4", "int4", "q8_0"):
        raise ValueError(f"QSilk: storage simulation must be one of {', '.join(SIMULATED)} (got {mode!r})")
    g = 32 if mode == "q8_0" else group_size
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % g
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, g)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    u = blocks / absmax
    if mode == "nf4":
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
        q = levels[(u[..., None] - levels).abs().argmin(dim=-1)]
    elif mode == "int4":
        q = torch.round(u * 7) / 7
    else:
        q = torch.round(u * 127) / 127
    out = (q * absmax).reshape(-1)[: flat.numel()]
    return out.reshape(w.shape).to(w.dtype)


def simulate_storage(module: nn.Module, mode: str, group_size: int = 64) -> nn.Module:
    """A deep copy of `module` whose Linear/Conv weights went through `round_weight`."""
    if mode not in SIMULATED:
        raise ValueError(f"QSilk: storage simulation must be one of {', '.join(SIMULATED)} (got {mode!r})")
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                m.weight.copy_(round_weight(m.weight, mode, group_size))
    return twin
