"""ComfyUI nodes (classic node API: ``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION``), exported by
the repository's root ``__init__.py``. The glue is in `qsilk.hosts.comfy`; every widget comes from
`qsilk.settings.PARAMS` (range, step, choices, tooltip = the parameter's help) with the Balanced
preset's value as default, so ComfyUI validates the same ranges and shows the same help as the WebUIs.

Not offered in ComfyUI: ``hires`` (ComfyUI has no hires pass: a second sampler after a latent
upscale is just another run, stabilised when its model is patched), ``show_maps`` (no gallery to
add to), and the low-bit Q-Sched group (its coefficient files live in the WebUI's models folder).
"""
from __future__ import annotations

from typing import Any

from ..settings import DEFAULT_PRESET, PARAM_BY_NAME, PARAMS, PRESETS, Param, Settings, SettingsError
from . import comfy

CATEGORY = "sampling/QSilk"
#: Parameter groups the advanced node offers, in `PARAMS` order.
ADVANCED_GROUPS = ("qsilk", "aqclip", "schedule", "probe")
#: Parameters of those groups without meaning in ComfyUI.
NOT_IN_COMFY = frozenset({"hires"})
ADVANCED_PARAMS: tuple[Param, ...] = tuple(p for p in PARAMS if p.group in ADVANCED_GROUPS
                                           and p.name not in NOT_IN_COMFY)


def widget(param: Param, default: Any = None) -> tuple:
    """One ComfyUI input spec from a parameter: ``("INT" | "FLOAT", {default, min, max, step,
    tooltip})``, ``("BOOLEAN", {default, tooltip})`` or ``([choices], {default, tooltip})``."""
    value = param.default if default is None else default
    if param.kind == "bool":
        return "BOOLEAN", {"default": bool(value), "tooltip": param.help}
    if param.kind == "choice":
        return list(param.choices), {"default": value, "tooltip": param.help}
    if param.kind == "int":
        return "INT", {"default": int(value), "min": int(param.minimum), "max": int(param.maximum),
                       "step": int(param.step), "tooltip": param.help}
    if param.kind == "float":
        return "FLOAT", {"default": float(value), "min": float(param.minimum), "max": float(param.maximum),
                         "step": float(param.step), "tooltip": param.help}
    raise TypeError(f"QSilk: parameter {param.name} of kind {param.kind!r} has no ComfyUI widget")


def _switch() -> tuple:
    return "BOOLEAN", {"default": True, "tooltip": "Turn QSilk on. Off (or the Off preset) passes the input "
                                                   "through unchanged."}


def _preset() -> tuple:
    return widget(PARAM_BY_NAME["preset"], DEFAULT_PRESET)


def advanced_settings(enabled: bool, values: dict[str, Any]) -> Settings:
    """Settings from the advanced node's widgets (the Balanced preset fills anything not given).
    Raises `SettingsError` (a ValueError ComfyUI shows) naming the field."""
    unknown = [k for k in values if k not in {p.name for p in ADVANCED_PARAMS}]
    if unknown:
        raise SettingsError(f"QSilk: {unknown[0]!r} is not an input of the advanced node")
    return Settings.from_preset(DEFAULT_PRESET, enabled=enabled, **values)


class QSilkModel:
    DESCRIPTION = ("QSilk on every sampler run of this model: the micro-clamp and AQClip on each step's "
                   "denoised prediction, the attention-entropy probe on SD1.x/SD2/SDXL UNets, and the "
                   "run's final latent before decode. Wire it between the model loader (and LoRAs) and "
                   "the sampler.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL", {"tooltip": "The model to stabilise."}),
                             "enabled": _switch(), "preset": _preset()}}

    def patch(self, model: Any, enabled: bool, preset: str) -> tuple:
        return (comfy.patch_model(model, Settings.from_preset(preset, enabled=enabled)),)


class QSilkModelAdvanced:
    DESCRIPTION = ("QSilk (model) with every parameter as a widget (defaults: the Balanced preset). "
                   "Hover a widget for its help.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        balanced = PRESETS[DEFAULT_PRESET]
        required = {"model": ("MODEL", {"tooltip": "The model to stabilise."}), "enabled": _switch()}
        required.update({p.name: widget(p, balanced[p.name]) for p in ADVANCED_PARAMS})
        return {"required": required}

    def patch(self, model: Any, enabled: bool, **values: Any) -> tuple:
        return (comfy.patch_model(model, advanced_settings(enabled, values)),)


class QSilkLatent:
    DESCRIPTION = ("The paper's 'before each decode' stage on a latent: every component the preset enables, "
                   "applied once (AQClip with Lite confidence). Wire it right before VAE Decode or a latent "
                   "upscale. With a noise_mask, only the masked (generated) area changes.")
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "stabilize"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT", {"tooltip": "The latent to stabilise."}),
                             "enabled": _switch(), "preset": _preset()}}

    def stabilize(self, samples: Any, enabled: bool, preset: str) -> tuple:
        return (comfy.stabilize_latent(samples, Settings.from_preset(preset, enabled=enabled)),)


NODE_CLASS_MAPPINGS = {
    "QSilkModel": QSilkModel,
    "QSilkModelAdvanced": QSilkModelAdvanced,
    "QSilkLatent": QSilkLatent,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QSilkModel": "QSilk (model)",
    "QSilkModelAdvanced": "QSilk (model, advanced)",
    "QSilkLatent": "QSilk before decode / upscale",
}
