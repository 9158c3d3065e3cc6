"""QSilk: micrograin stabilization and adaptive quantile clipping for latent diffusion.

The core is framework-agnostic torch (no WebUI import). Host glue lives in `qsilk.hosts`.
"""
from .aqclip import AQClipState, aqclip
from .clamp import limit, micro_clamp, tail_quantiles
from .probe import EntropyProbe, entropy_map, find_probe_layer
from .settings import DEFAULT_PRESET, PARAMS, PRESETS, Param, Settings, SettingsError
from .stabilizer import Stabilizer, eps_after_x0_change, eps_to_x0, x0_to_eps

__version__ = "0.1.0"


def __getattr__(name: str):
    """``qsilk.diffusers`` (the diffusers adapter's `attach`), imported on first use: importing
    qsilk never imports diffusers, and the adapter itself imports no diffusers module either."""
    if name == "diffusers":
        from .hosts.diffusers import attach
        return attach
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AQClipState", "DEFAULT_PRESET", "PARAMS", "PRESETS", "Param", "Settings", "SettingsError",
    "EntropyProbe", "Stabilizer", "aqclip", "entropy_map", "find_probe_layer", "eps_after_x0_change", "eps_to_x0", "limit",
    "micro_clamp", "tail_quantiles", "x0_to_eps",
]
