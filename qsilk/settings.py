"""One table of QSilk parameters, and the `Settings` record built from it.

Every knob is declared once, as a `Param`: its API name (also the attribute name), UI label, help
text, default, range or choices, short infotext key and UI group. The UI, the compact infotext
value, the XYZ axes, the HTTP API and the README's parameter table are all derived from `PARAMS`;
nothing else spells a range or a default.

Infotext is one key, ``QSilk``, whose value is compact and versioned::

    QSilk: v=1; preset=Balanced; tile=48; end=0.8

Only values that differ from the named preset are written; the version pins what the preset
meant when the image was made. Keys are added, never renamed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

INFOTEXT_KEY = "QSilk"
INFOTEXT_VERSION = 1
DEFAULT_PRESET = "Balanced"
PRESETS_FILE = Path(__file__).with_name("presets.json")


class SettingsError(ValueError):
    """A parameter was invalid. The message names the field and its allowed range."""


@dataclass(frozen=True)
class Param:
    name: str
    label: str
    default: Any
    kind: str  # "bool" | "int" | "float" | "choice" | "str"
    help: str
    infotext: str
    group: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    since: int = 1  # infotext version that introduced it
    pattern: str | None = None  # "str" only: the value must match (infotext-safe names)

    def allowed(self) -> str:
        """Human-readable allowed range, used in every error message."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind in ("int", "float"):
            return f"{_fmt(self.minimum)}..{_fmt(self.maximum)}"
        if self.pattern:
            return f"empty or a name matching {self.pattern!r} (no , : ; = / \\)"
        return "a string"

    def coerce(self, value: Any) -> Any:
        """Return `value` converted to this parameter's type, or raise `SettingsError`."""
        err = SettingsError(f"QSilk: {self.name} must be {self.allowed()} (got {value!r})")
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "on", "off"):
                return value.strip().lower() in ("true", "1", "on")
            raise err
        if self.kind == "choice":
            if isinstance(value, str):
                for c in self.choices:
                    if c.lower() == value.strip().lower():
                        return c
            raise err
        if self.kind == "str":
            if isinstance(value, str):
                value = value.strip()
                if self.pattern and value and (not re.fullmatch(self.pattern, value) or ".." in value):
                    raise err
                return value
            raise err
        if isinstance(value, bool):
            raise err
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise err from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise err
        if self.kind == "int":
            if value != int(value):
                raise err
            value = int(value)
        else:
            value = float(value)
        if not (self.minimum <= value <= self.maximum):
            raise err
        return value


def _same(param: Param, value: Any, reference: Any) -> bool:
    try:
        return param.coerce(value) == reference
    except SettingsError:
        return False


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, ".6g")
    return str(v)


_SHAPES = ("hard", "soft", "tanh")
_PLACEMENTS = ("per_step", "per_pass")

#: The parameter table. Order = UI order = positional API order (after `enabled`, `preset`).
#: New parameters go at the end of their group's block and get `since=` the new infotext version.
PARAMS: tuple[Param, ...] = (
    Param("enabled", "QSilk", True, "bool", "Turn QSilk on for this generation.", "", "main"),
    Param("preset", "Preset", DEFAULT_PRESET, "choice",
          "A tested set of values for every other setting (see the Presets table); the panel shows "
          "what the chosen one does.",
          "preset", "main", choices=tuple(json.loads(PRESETS_FILE.read_text(encoding="utf-8")))),
    # --- QSilk micro-clamp (spec §2) -------------------------------------------------------
    Param("qsilk_enabled", "Micro-clamp", True, "bool",
          "Per-sample quantile clamp of the denoised prediction: removes rare extreme values "
          "(the 'micrograin' speckle) without touching the rest.", "qs", "qsilk"),
    Param("q_lo", "Lower quantile", 0.001, "float",
          "Values below this quantile of each sample are pulled up. Lower = gentler.",
          "qlo", "qsilk", 0.0, 0.05, 0.0001),
    Param("q_hi", "Upper quantile", 0.999, "float",
          "Values above this quantile of each sample are pulled down. Higher = gentler.",
          "qhi", "qsilk", 0.95, 1.0, 0.0001),
    Param("qsilk_shape", "Micro-clamp shape", "hard", "choice",
          "hard: clamp (the paper's code). soft: knee limiter, identity inside the knee. "
          "tanh: the paper's Eq. 1, reproduction only — slope α > 1 expands the latent.",
          "qshape", "qsilk", choices=_SHAPES),
    Param("qsilk_alpha", "Micro-clamp knee / slope α", 2.0, "float",
          "soft: knee hardness (larger = closer to hard). tanh: slope α (>1 expands; max 4).",
          "qalpha", "qsilk", 0.1, 20.0, 0.1),
    Param("qsilk_per_channel", "Per-channel quantiles", False, "bool",
          "Compute the corridor per latent channel instead of pooled over all channels.",
          "qpc", "qsilk"),
    Param("qsilk_strength", "Micro-clamp strength", 1.0, "float",
          "Blend between the input (0) and the clamped result (1).", "qstr", "qsilk", 0.0, 1.0, 0.05),
    Param("qsilk_placement", "Micro-clamp placement", "per_step", "choice",
          "per_step: every model evaluation (the paper's Algorithm 1). per_pass: once on each "
          "pass's final latent, before it is decoded or upscaled (the paper's Defaults line).",
          "qplace", "qsilk", choices=_PLACEMENTS),
    # --- AQClip (spec §3) ------------------------------------------------------------------
    Param("aqclip_enabled", "AQClip", True, "bool",
          "Adaptive per-tile quantile corridor: narrow where the model is unsure, wide where it "
          "is confident. Can dim isolated highlights (stars, glints): see sigma floor.",
          "aq", "aqclip"),
    Param("aqclip_mode", "Confidence source", "attn", "choice",
          "attn: attention-entropy probe on one self-attention layer (falls back to lite where "
          "no map is possible). lite: local structure (gradient) of the latent itself.",
          "aqmode", "aqclip", choices=("attn", "lite")),
    Param("aqclip_variant", "Variant", "qsilk", "choice",
          "qsilk: symmetric corridor that widens with confidence (recommended). paper: the "
          "paper's literal quantile mapping, which slides the corridor instead of widening it.",
          "aqvar", "aqclip", choices=("qsilk", "paper")),
    Param("tile", "Tile size", 32, "int",
          "Tile side in latent pixels (×8 image pixels). Larger = smoother, less local.",
          "tile", "aqclip", 4, 256, 1),
    Param("stride", "Tile stride", 16, "int",
          "Step between tiles; at most half the tile so that every pixel has two tiles per axis.",
          "stride", "aqclip", 1, 128, 1),
    Param("aqclip_shape", "AQClip shape", "soft", "choice",
          "Limiter applied inside each tile's corridor (see micro-clamp shape).",
          "ashape", "aqclip", choices=_SHAPES),
    Param("aqclip_alpha", "AQClip knee / slope α", 2.0, "float",
          "soft: knee hardness. tanh: slope α (>1 expands; max 4).", "aalpha", "aqclip", 0.1, 20.0, 0.1),
    Param("p_wide", "Tail share, confident", 0.0005, "float",
          "Share of a Gaussian tile beyond each corridor edge (one side) where confidence is 1, as a "
          "fraction (0.0005 = 0.05 %). Lower = wider corridor.",
          "pw", "aqclip", 1e-6, 0.1, 0.0001),
    Param("p_narrow", "Tail share, uncertain", 0.01, "float",
          "Share beyond each corridor edge (one side) where confidence is 0, as a fraction (0.01 = 1 %). "
          "Higher = narrower corridor.",
          "pn", "aqclip", 1e-5, 0.2, 0.0005),
    Param("sigma_floor", "Sigma floor", 1.0, "float",
          "Corridor half-width never drops below this × the sample's std. Protects sparse "
          "legitimate features in flat tiles (stars, catchlights). 0 = no floor.",
          "floor", "aqclip", 0.0, 4.0, 0.05),
    Param("ema_beta", "Temporal smoothing β", 0.8, "float",
          "EMA of the confidence map across steps of one pass (0 = none).", "beta", "aqclip", 0.0, 0.99, 0.01),
    Param("aqclip_strength", "AQClip strength", 1.0, "float",
          "Blend between the input (0) and the clipped result (1).", "astr", "aqclip", 0.0, 1.0, 0.05),
    Param("aqclip_placement", "AQClip placement", "per_step", "choice",
          "per_step: every model evaluation. per_pass: once per pass before decode/upscale.",
          "aplace", "aqclip", choices=_PLACEMENTS),
    # --- Where it runs (spec §4) -----------------------------------------------------------
    Param("step_start", "Start at", 0.0, "float",
          "First evaluation to stabilise, as progress through the pass (0 = first step).",
          "start", "schedule", 0.0, 1.0, 0.01),
    Param("step_end", "End at", 1.0, "float",
          "Last evaluation to stabilise, as progress through the pass (1 = last step).",
          "end", "schedule", 0.0, 1.0, 0.01),
    Param("hires", "Hires pass", True, "bool",
          "Also stabilise the hires-fix second pass.", "hires", "schedule"),
    Param("pre_decode", "Before decode", "auto", "choice",
          "Stabilise each pass's final latent before every VAE decode and latent upscale. auto: "
          "only components that did not already run on the last step. always: the paper's literal "
          "'before each decode'. off: never.", "dec", "schedule", choices=("auto", "always", "off")),
    # --- Attention-entropy probe (spec §5) -------------------------------------------------
    Param("probe_heads", "Probe heads", 2, "int",
          "Attention heads sampled by the entropy probe.", "heads", "probe", 1, 8, 1),
    Param("probe_queries", "Probe queries", 0, "int",
          "Query tokens sampled per map (0 = auto: 1024 on GPU, 256 on CPU). More = finer, slower.",
          "queries", "probe", 0, 4096, 64),
    # --- Diagnostics -----------------------------------------------------------------------
    Param("show_maps", "Show maps", False, "bool",
          "Add the confidence map and where the clip acted as extra gallery images.",
          "", "debug"),
    # --- Low-bit models: Q-Sched pre-conditioning (issue #6; README 'quant') -------------------
    # Model-specific, so never part of a preset; written to infotext when not at their default.
    Param("qsched", "Q-Sched pre-conditioning", "off", "choice",
          "Rescale the denoised estimate per noise level, D' = c_F·D + (c_x − c_F)·s·x, before the "
          "clamp (for low-bit models). off. ramp: the two start values below, ramping to 1 over each "
          "pass. file: knots from a calibrated coefficient file in <models>/QSilk.",
          "qsched", "quant", choices=("off", "ramp", "file"), since=1),
    Param("qsched_cx", "Sample coefficient c_x (start)", 1.0, "float",
          "ramp: c_x at the first step, going linearly to 1 at the last. Scales the latent's "
          "share of the estimate; 1 = unchanged. Q-Sched searched 0.8..1.2.",
          "qcx", "quant", 0.5, 1.5, 0.005, since=1),
    Param("qsched_cf", "Model coefficient c_F (start)", 1.0, "float",
          "ramp: c_F at the first step, going linearly to 1 at the last. Scales the network "
          "output's share (ε / v / velocity); 1 = unchanged.",
          "qcf", "quant", 0.5, 1.5, 0.005, since=1),
    Param("qsched_file", "Coefficient file", "", "str",
          "file: the coefficient file's name in <models>/QSilk (made by `python -m qsilk "
          "calibrate`). Applied only when it matches the loaded model's hash and weight storage.",
          "qfile", "quant", pattern=r"[\w][\w .+()-]{0,99}", since=1),
    Param("qsched_thresholds", "Per-σ clamp targets", False, "bool",
          "file: take the micro-clamp corridor per noise level from the coefficient file (if it "
          "has one) instead of the global quantiles. Needs the micro-clamp on.",
          "qthr", "quant", since=1),
)

PARAM_BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
PARAM_BY_INFOTEXT: dict[str, Param] = {p.infotext: p for p in PARAMS if p.infotext}
#: Parameters a preset sets (everything but the on/off switch, the preset name and debug output).
PRESET_PARAMS: tuple[str, ...] = tuple(p.name for p in PARAMS if p.group not in ("main", "debug", "quant"))
#: Model-specific parameters: outside every preset, written to infotext when not at their default.
MODEL_PARAMS: tuple[str, ...] = tuple(p.name for p in PARAMS if p.group == "quant")


def _check_consistency(v: Mapping[str, Any], where: str = "") -> None:
    """Checks that involve more than one field."""
    suffix = f" ({where})" if where else ""
    if v["q_lo"] >= v["q_hi"]:
        raise SettingsError(f"QSilk: q_lo must be below q_hi (got {v['q_lo']} >= {v['q_hi']}){suffix}")
    if v["p_wide"] > v["p_narrow"]:
        raise SettingsError(
            f"QSilk: p_wide must be at most p_narrow (got {v['p_wide']} > {v['p_narrow']}){suffix}")
    if v["step_start"] > v["step_end"]:
        raise SettingsError(
            f"QSilk: step_start must be at most step_end (got {v['step_start']} > {v['step_end']}){suffix}")
    if v.get("qsched") == "file" and not v.get("qsched_file"):
        raise SettingsError(f"QSilk: qsched_file must name a coefficient file when qsched is 'file'{suffix}")
    for shape_key, alpha_key in (("qsilk_shape", "qsilk_alpha"), ("aqclip_shape", "aqclip_alpha")):
        if v[shape_key] == "tanh" and v[alpha_key] > 4.0:
            raise SettingsError(
                f"QSilk: {alpha_key} must be in 0.1..4 when {shape_key} is 'tanh' (got {v[alpha_key]}){suffix}")


def load_presets(path: Path = PRESETS_FILE) -> dict[str, dict[str, Any]]:
    """Read the presets file: ``{name: {"version": int, "values": {param: value}}}``.

    Every preset must be complete and valid; an unknown key fails loudly, naming it.
    """
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    presets: dict[str, dict[str, Any]] = {}
    for name, entry in raw.items():
        values = entry["values"]
        unknown = set(values) - set(PRESET_PARAMS)
        if unknown:
            raise SettingsError(f"QSilk: preset {name!r} has unknown parameter(s) {sorted(unknown)}")
        missing = set(PRESET_PARAMS) - set(values)
        if missing:
            raise SettingsError(f"QSilk: preset {name!r} lacks parameter(s) {sorted(missing)}")
        presets[name] = {k: PARAM_BY_NAME[k].coerce(v) for k, v in values.items()}
        _check_consistency(presets[name], where=f"preset {name!r}")
    return presets


PRESETS: dict[str, dict[str, Any]] = load_presets()
#: One line per preset saying what it does (the presets file's ``help``; shown for the chosen preset).
PRESET_HELP: dict[str, str] = {name: str(entry.get("help", ""))
                               for name, entry in json.loads(PRESETS_FILE.read_text(encoding="utf-8")).items()}


class _SettingsMethods:
    """Methods of `Settings`; the fields come from `PARAMS`."""

    def __post_init__(self) -> None:
        for p in PARAMS:
            object.__setattr__(self, p.name, p.coerce(getattr(self, p.name)))
        _check_consistency(self.as_dict())

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = DEFAULT_PRESET, **overrides: Any) -> "Settings":
        preset = PARAM_BY_NAME["preset"].coerce(name)
        values = {**PRESETS[preset], "preset": preset}
        values.update(overrides)
        return cls._from_mapping(values)

    @classmethod
    def _from_mapping(cls, values: Mapping[str, Any]) -> "Settings":
        unknown = [k for k in values if k not in PARAM_BY_NAME]
        if unknown:
            raise SettingsError(
                f"QSilk: unknown parameter {unknown[0]!r}; known: {', '.join(PARAM_BY_NAME)}")
        full = {p.name: p.default for p in PARAMS}
        full.update(values)
        return cls(**full)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> "Settings":
        """From an API dict: ``{"enabled": true, "preset": "Crisp", "tile": 48}``.

        The preset (default Balanced) supplies every value not given; an unknown key or an
        out-of-range value raises `SettingsError` naming the field and its allowed range.
        """
        if not isinstance(data, Mapping):
            raise SettingsError(f"QSilk: arguments must be a dict or a list (got {type(data).__name__})")
        unknown = [k for k in data if k not in PARAM_BY_NAME]
        if unknown:
            raise SettingsError(
                f"QSilk: unknown parameter {unknown[0]!r}; known: {', '.join(PARAM_BY_NAME)}")
        base = cls.from_preset(data.get("preset", DEFAULT_PRESET))
        return base.replace(**{k: v for k, v in data.items() if k != "preset"})

    @classmethod
    def from_args(cls, args: Iterable[Any], ui_default_preset: str = DEFAULT_PRESET, *,
                  short_form: bool = True) -> "Settings":
        """From a script's arguments: the UI's positional values, or one API dict.

        Positional values come in `PARAMS` order. An API client that sends only the first few
        (``[true, "Crisp"]``) gets the UI defaults — the `ui_default_preset` values — for the
        rest; when every remaining value equals them and the named preset differs, the named
        preset's values are used, because that is what such a request means.

        That reading is ambiguous for a complete list (choosing Gentle in the UI and then switching
        AQClip on gives exactly Balanced's values under the name Gentle), so hosts pass
        ``short_form=False`` for UI requests, which always take every value as given.
        """
        args = list(args)
        if len(args) == 1 and isinstance(args[0], Mapping):
            return cls.from_api(args[0])
        if len(args) > len(PARAMS):
            args = args[: len(PARAMS)]
        names = [p.name for p in PARAMS][: len(args)]
        given = dict(zip(names, args))
        if "preset" not in given:
            return cls._from_mapping(given)
        preset = PARAM_BY_NAME["preset"].coerce(given["preset"])
        ui_default = PRESETS[PARAM_BY_NAME["preset"].coerce(ui_default_preset)]
        tail = [k for k in given if k in ui_default]
        if short_form and preset != ui_default_preset and tail and all(
                _same(PARAM_BY_NAME[k], given[k], ui_default[k]) for k in tail):
            given = {k: v for k, v in given.items() if k not in tail}
        return cls.from_preset(preset, **given)

    @classmethod
    def from_infotext(cls, text: str) -> "Settings":
        """From the compact value (``v=1; preset=Crisp; tile=48``) or a whole infotext block.

        A whole block without a ``QSilk:`` entry gives disabled settings, so that pasting the
        infotext of an image made without QSilk reproduces it.
        """
        value = _find_infotext_value(text)
        if value is None:
            return cls.from_preset(DEFAULT_PRESET, enabled=False)
        fields: dict[str, str] = {}
        for part in value.split(";"):
            part = part.strip()
            if not part:
                continue
            key, sep, val = part.partition("=")
            if not sep:
                raise SettingsError(f"QSilk: infotext entry {part!r} is not key=value")
            fields[key.strip()] = val.strip()
        try:
            version = int(fields.pop("v", INFOTEXT_VERSION))
        except ValueError:
            raise SettingsError(f"QSilk: infotext v must be a version number (got {value!r})") from None
        if version > INFOTEXT_VERSION:
            raise SettingsError(
                f"QSilk: infotext version {version} is newer than this extension ({INFOTEXT_VERSION}); update QSilk")
        preset = fields.pop("preset", DEFAULT_PRESET)
        overrides: dict[str, Any] = {}
        for key, val in fields.items():
            p = PARAM_BY_INFOTEXT.get(key)
            if p is None:
                raise SettingsError(f"QSilk: unknown infotext key {key!r} in {value!r}")
            overrides[p.name] = val
        return cls.from_preset(preset, enabled=True, **overrides)

    # -- output ---------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.name) for p in PARAMS}

    def to_api(self) -> dict[str, Any]:
        """The dict form accepted by `from_api` (every value)."""
        return self.as_dict()

    def to_args(self) -> list[Any]:
        """Positional values in UI order (what `from_args` takes)."""
        return [getattr(self, p.name) for p in PARAMS]

    def overrides(self) -> dict[str, Any]:
        """Values that differ from the named preset (model-specific ones: from their default)."""
        base = PRESETS[self.preset]
        out = {k: getattr(self, k) for k in PRESET_PARAMS if getattr(self, k) != base[k]}
        out.update({k: getattr(self, k) for k in MODEL_PARAMS if getattr(self, k) != PARAM_BY_NAME[k].default})
        return out

    def to_infotext(self) -> str:
        """The compact value of the ``QSilk`` infotext key (no commas or colons, never quoted)."""
        parts = [f"v={INFOTEXT_VERSION}", f"preset={self.preset}"]
        # floats as repr (shortest exact round-trip): `_fmt`'s 6 digits would change API-set values
        parts += [f"{PARAM_BY_NAME[k].infotext}={repr(v) if isinstance(v, float) else _fmt(v)}"
                  for k, v in self.overrides().items()]
        return "; ".join(parts)

    def replace(self, **changes: Any) -> "Settings":
        unknown = [k for k in changes if k not in PARAM_BY_NAME]
        if unknown:
            raise SettingsError(
                f"QSilk: unknown parameter {unknown[0]!r}; known: {', '.join(PARAM_BY_NAME)}")
        return dataclasses.replace(self, **changes)


def _find_infotext_value(text: str) -> str | None:
    """The ``QSilk`` value in a whole infotext block, or `text` itself if it is a bare value."""
    text = text.strip()
    if text.startswith("v=") or text.startswith("preset="):
        return text
    # A1111 writes the parameters on the last line; earlier lines are the prompts (which may say "QSilk:")
    m = re.search(r'(?:^|[,\n])\s*' + INFOTEXT_KEY + r':\s*("(?:\\.|[^\\"])*"|[^,\n]*)',
                  (text.splitlines() or [""])[-1])
    if not m:
        return None
    value = m.group(1).strip()
    if value.startswith('"'):
        value = json.loads(value)
    return value


Settings = dataclasses.make_dataclass(
    "Settings",
    [(p.name, Any, dataclasses.field(default=p.default)) for p in PARAMS],
    bases=(_SettingsMethods,),
    frozen=True,
)
Settings.__module__ = __name__
Settings.__doc__ = (
    "Every QSilk parameter for one job (frozen, validated on construction).\n\n"
    "Fields: " + ", ".join(p.name for p in PARAMS) + ". See `PARAMS` for ranges and help."
)
