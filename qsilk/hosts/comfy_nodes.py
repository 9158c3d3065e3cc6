"""ComfyUI nodes (classic node API: ``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION`` /
``VALIDATE_INPUTS``), exported by the repository's root ``__init__.py``. The glue is in
`qsilk.hosts.comfy`; every widget comes from `qsilk.settings.PARAMS` (range, step, choices, tooltip =
the parameter's help) with the Balanced preset's value as default, so ComfyUI shows the same ranges
and help as the WebUIs. The node-level texts (the switch, the preset) describe each node.

Where they are: ``model_patches/unet`` (the two MODEL → MODEL nodes, beside FreeU_V2, PAG and SAG)
and ``latent`` (the LATENT node), ComfyUI's own categories for those kinds of node.

Queue-time validation (ComfyUI a125cd84 ``execution.validate_inputs``): ComfyUI checks min/max and
combo values itself, but a NaN (JSON ``NaN`` or the string ``"nan"``) passes its ``val < min`` /
``val > max`` tests and cross-field rules are not its business. The advanced node therefore has a
``VALIDATE_INPUTS`` over its FLOAT widgets and the two shapes (the inputs the rules read): ComfyUI
then leaves those inputs' range checks to it and refuses the prompt with HTTP 400
(``custom_validation_failed``, the message naming the field) when it returns a message. Inputs fed
by a link are not known at queue time and are checked when the node runs. Errors raised when a node
runs are a plain ``ValueError`` with the message (not `SettingsError`, whose qualified name in a
custom-node package is unreadable).

The V3 node schema (``comfy_api.latest``, in ComfyUI since July 2025) is not used: the classic API
is what every ComfyUI the README names loads (model wrappers, December 2024 on, to v0.3.64).

Not offered in ComfyUI: ``hires`` (ComfyUI has no hires pass: a second sampler after a latent
upscale is just another run, stabilised when its model is patched), ``show_maps`` (no gallery to
add to), and the low-bit Q-Sched group (its coefficient files live in the WebUI's models folder).
"""
from __future__ import annotations

from typing import Any

from ..settings import DEFAULT_PRESET, PARAM_BY_NAME, PARAMS, PRESET_HELP, PRESETS, Param, Settings, SettingsError
from . import comfy

#: ComfyUI's categories: MODEL patches (FreeU_V2, PAG, SAG) and LATENT operations.
MODEL_CATEGORY = "model_patches/unet"
LATENT_CATEGORY = "latent"
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


def _switch(tooltip: str) -> tuple:
    return "BOOLEAN", {"default": True, "tooltip": tooltip}


def _preset(tooltip: str) -> tuple:
    kind, spec = widget(PARAM_BY_NAME["preset"], DEFAULT_PRESET)
    return kind, {**spec, "tooltip": tooltip}


def _presets_list() -> str:
    return " ".join(f"{name}: {PRESET_HELP[name]}" for name in PRESETS)


MODEL_SWITCH = ("On: every sampler run of the returned model is stabilised (a QSilk patch from an earlier "
                "QSilk node on the same model is replaced). Off: the model passes through as it came, "
                "an earlier QSilk patch included.")
MODEL_PRESET = ("What QSilk does on each sampler run of this model. " + _presets_list())
ADVANCED_SWITCH = ("On: every sampler run of the returned model is stabilised with the values below (a "
                   "QSilk patch from an earlier QSilk node is replaced). Off: the model passes through as "
                   "it came, an earlier QSilk patch included.")
LATENT_SWITCH = "On: the latent is stabilised once. Off: the latent passes through unchanged."
LATENT_PRESET = ("Which components run, once, on this latent; AQClip always uses Lite confidence here (no "
                 "attention to read) and nothing runs per step. Off: passes through. Gentle: micro-clamp. "
                 "Balanced: micro-clamp + AQClip. Crisp: narrower AQClip corridor. High-res: 64-pixel tiles. "
                 "Paper (literal): paper variant, tanh shape, no sigma floor.")


def node_error(error: SettingsError) -> ValueError:
    """What a node raises for bad values: a plain ``ValueError`` with the message (ComfyUI shows the
    exception's type name, which for `SettingsError` in a custom-node package is the folder path)."""
    return ValueError(str(error))


def advanced_settings(enabled: bool, values: dict[str, Any]) -> Settings:
    """Settings from the advanced node's widgets (the Balanced preset fills anything not given).
    Raises a plain ``ValueError`` naming the field."""
    unknown = [k for k in values if k not in {p.name for p in ADVANCED_PARAMS}]
    if unknown:
        raise ValueError(f"QSilk: {unknown[0]!r} is not an input of the advanced node")
    try:
        return Settings.from_preset(DEFAULT_PRESET, enabled=enabled, **values)
    except SettingsError as error:
        raise node_error(error) from None


#: The advanced node's inputs ComfyUI passes to `QSilkModelAdvanced.VALIDATE_INPUTS`: every FLOAT
#: widget (NaN passes ComfyUI's own range test) and the shapes (the tanh rule reads them).
VALIDATED_INPUTS: tuple[str, ...] = tuple(p.name for p in ADVANCED_PARAMS
                                          if p.kind == "float" or p.name in ("qsilk_shape", "aqclip_shape"))


def validate_advanced(values: dict[str, Any]) -> bool | str:
    """``VALIDATE_INPUTS``'s answer for the given widget values: True, or the message naming the
    field. Values ComfyUI could not give (None: an input fed by a link) are left to run time; the
    cross-field rules are checked only when every value they read is given."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        for name, value in given.items():
            PARAM_BY_NAME[name].coerce(value)
        if len(given) == len(values):
            Settings.from_preset(DEFAULT_PRESET, **given)
    except SettingsError as error:
        return str(error)
    return True


class QSilkModel:
    DESCRIPTION = ("QSilk on every sampler run of this model: the micro-clamp and AQClip on each step's "
                   "denoised prediction, the attention-entropy probe on SD1.x/SD2/SDXL UNets, and the "
                   "run's final latent before decode. Wire it between the model loader (and LoRAs) and "
                   "the sampler.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = MODEL_CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL", {"tooltip": "The model to stabilise."}),
                             "enabled": _switch(MODEL_SWITCH), "preset": _preset(MODEL_PRESET)}}

    def patch(self, model: Any, enabled: bool, preset: str) -> tuple:
        try:
            settings = Settings.from_preset(preset, enabled=enabled)
        except SettingsError as error:
            raise node_error(error) from None
        return (comfy.patch_model(model, settings),)


class QSilkModelAdvanced:
    DESCRIPTION = ("QSilk (model) with every parameter as a widget (defaults: the Balanced preset). "
                   "Hover a widget for its help.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = MODEL_CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        balanced = PRESETS[DEFAULT_PRESET]
        required = {"model": ("MODEL", {"tooltip": "The model to stabilise."}), "enabled": _switch(ADVANCED_SWITCH)}
        required.update({p.name: widget(p, balanced[p.name]) for p in ADVANCED_PARAMS})
        return {"required": required}

    @classmethod
    def VALIDATE_INPUTS(cls, q_lo=None, q_hi=None, qsilk_shape=None, qsilk_alpha=None, qsilk_strength=None,
                        aqclip_shape=None, aqclip_alpha=None, p_wide=None, p_narrow=None, sigma_floor=None,
                        ema_beta=None, aqclip_strength=None, step_start=None, step_end=None):
        """ComfyUI passes the inputs named here (`VALIDATED_INPUTS`; a test keeps them equal)."""
        return validate_advanced(dict(
            q_lo=q_lo, q_hi=q_hi, qsilk_shape=qsilk_shape, qsilk_alpha=qsilk_alpha, qsilk_strength=qsilk_strength,
            aqclip_shape=aqclip_shape, aqclip_alpha=aqclip_alpha, p_wide=p_wide, p_narrow=p_narrow,
            sigma_floor=sigma_floor, ema_beta=ema_beta, aqclip_strength=aqclip_strength, step_start=step_start,
            step_end=step_end))

    def patch(self, model: Any, enabled: bool, **values: Any) -> tuple:
        return (comfy.patch_model(model, advanced_settings(enabled, values)),)


class QSilkLatent:
    DESCRIPTION = ("The paper's 'before each decode' stage on a latent: every component the preset enables, "
                   "applied once (AQClip with Lite confidence). Wire it right before VAE Decode or a latent "
                   "upscale. With a noise_mask, only the masked (generated) area changes.")
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "stabilize"
    CATEGORY = LATENT_CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"samples": ("LATENT", {"tooltip": "The latent to stabilise."}),
                             "enabled": _switch(LATENT_SWITCH), "preset": _preset(LATENT_PRESET)}}

    def stabilize(self, samples: Any, enabled: bool, preset: str) -> tuple:
        try:
            settings = Settings.from_preset(preset, enabled=enabled)
        except SettingsError as error:
            raise node_error(error) from None
        return (comfy.stabilize_latent(samples, settings),)


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
