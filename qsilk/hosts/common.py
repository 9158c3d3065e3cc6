"""Host-neutral WebUI glue shared by the AUTOMATIC1111 and Forge adapters and `scripts/qsilk.py`.

Everything here is derived from `qsilk.settings.PARAMS`: the script arguments (UI positionals or one
API dict), the per-cell overrides that XYZ axes put on ``p``, the infotext key and its paste
functions, the settings-page options, the XYZ axes and the "Show maps" images. Nothing imports a
WebUI module at import time; the few host objects needed (``shared.opts``, the XYZ module, a
``Processed``) are passed in.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..stabilizer import Stabilizer
from ..settings import (DEFAULT_PRESET, INFOTEXT_KEY, PARAM_BY_NAME, PARAMS, PRESETS, Param, Settings,
                        SettingsError)

log = logging.getLogger("qsilk")

#: k-diffusion sampler functions with one model evaluation per step.
FIRST_ORDER = frozenset({
    "sample_euler", "sample_euler_ancestral", "sample_lms", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde", "sample_lcm", "sample_ddpm",
})
#: k-diffusion samplers with two evaluations per step except the last (a plain Euler step to σ=0):
#: ``2·steps − 1`` evaluations (``second_order`` in the WebUI's sampler table).
SECOND_ORDER_LAST_SINGLE = frozenset({
    "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
})


def _func_name(sampler: Any) -> str:
    func = getattr(sampler, "funcname", None)
    return func if isinstance(func, str) else getattr(func, "__name__", "")


def expected_evaluations(sampler: Any, denoiser: Any, timesteps_count: int | None = None) -> int | None:
    """Number n of denoiser evaluations this pass makes, for the step-window progress i/(n−1).

    ``denoiser.steps`` is what the sampler passed to ``launch_sampling``: the number of sigma
    intervals of a k-diffusion pass (txt2img: steps; img2img and hires: t_enc + 1). First-order
    samplers evaluate once per interval, Heun-type ones ``2·steps − 1`` times. DDIM makes one
    evaluation per timestep gap (``len(timesteps) − 1``), PLMS one more (its first step evaluates
    twice). Others (UniPC, Restart, DPM fast/adaptive) fall back to the WebUI's own estimate
    ``denoiser.total_steps``; progress is then clipped to 1.
    """
    steps = getattr(denoiser, "steps", None)
    name = _func_name(sampler)
    if steps:
        if name in FIRST_ORDER:
            return int(steps)
        if name in SECOND_ORDER_LAST_SINGLE:
            return 2 * int(steps) - 1
        if timesteps_count is not None and name in ("ddim", "ddim_cfgpp"):
            return max(1, timesteps_count - 1)
        if timesteps_count is not None and name == "plms":
            return max(1, timesteps_count)
    total = getattr(denoiser, "total_steps", None)
    return int(total) if total else None

#: Settings-page option keys (``shared.opts``); section ``("qsilk", "QSilk")``.
OPT_ENABLED_BY_DEFAULT = "qsilk_enabled_by_default"
OPT_DEFAULT_PRESET = "qsilk_default_preset"
OPT_CONSOLE_SUMMARY = "qsilk_console_summary"
SETTINGS_SECTION = ("qsilk", "QSilk")

#: Attribute on a processing object ``p`` holding XYZ per-cell overrides (``{param: value}``).
OVERRIDES_ATTR = "qsilk_overrides"
#: Infotext key for user-visible notes of a run (Lite fallback, errors). Never read back.
NOTE_KEY = "QSilk note"


# -- defaults from the settings page ---------------------------------------------------------
def ui_defaults(opts: Any) -> tuple[bool, str]:
    """``(enabled, preset)`` defaults for new UI tabs and API requests that omit QSilk's args.

    Read with ``getattr(opts, key, default)``: on A1111 v1.6–v1.8 the settings page registers its
    options only after the scripts' ``ui()`` ran, so the key may not exist yet (a saved value is
    already in ``opts.data`` and is returned). An unknown saved preset falls back to Balanced.
    """
    enabled = getattr(opts, OPT_ENABLED_BY_DEFAULT, True) if opts is not None else True
    preset = getattr(opts, OPT_DEFAULT_PRESET, DEFAULT_PRESET) if opts is not None else DEFAULT_PRESET
    if preset not in PRESETS:
        log.warning("QSilk: default preset %r is unknown; using %s", preset, DEFAULT_PRESET)
        preset = DEFAULT_PRESET
    return bool(enabled), preset


def default_settings(opts: Any) -> Settings:
    """The settings a fresh UI tab shows: the default preset, enabled per the settings page."""
    enabled, preset = ui_defaults(opts)
    return Settings.from_preset(preset, enabled=enabled)


def register_settings_options(shared: Any, gr: Any = None) -> None:
    """Add QSilk's section to the WebUI settings page (call from ``on_ui_settings``).

    ``shared`` is the WebUI's ``modules.shared`` (``opts``, ``OptionInfo``). The first two options
    only set the *defaults* of the controls, so they take effect after "Reload UI"; the console
    summary is read at the end of every job.
    """
    info_cls = shared.OptionInfo
    preset_kwargs: dict[str, Any] = {}
    if gr is not None:
        preset_kwargs = {"component": gr.Dropdown, "component_args": {"choices": list(PRESETS)}}
    options = [
        (OPT_ENABLED_BY_DEFAULT, info_cls(
            True, "Enable QSilk by default (new tabs, and API requests that do not send QSilk's args)",
            section=SETTINGS_SECTION)),
        (OPT_DEFAULT_PRESET, info_cls(DEFAULT_PRESET, "Default QSilk preset", section=SETTINGS_SECTION,
                                      **preset_kwargs)),
    ]
    for key, info in options:
        method = getattr(info, "needs_reload_ui", None)  # v1.6+ helper; harmless if a fork lacks it
        if callable(method):
            info = method() or info
        shared.opts.add_option(key, info)
    shared.opts.add_option(OPT_CONSOLE_SUMMARY, info_cls(
        True, "Print one summary line per job in the console (otherwise it is logged at INFO, which the "
        "WebUIs show only when started with --loglevel INFO)", section=SETTINGS_SECTION))


# -- script arguments ------------------------------------------------------------------------
def settings_from_script_args(args: Sequence[Any], ui_default_preset: str = DEFAULT_PRESET, *,
                              is_api: bool = True) -> Settings:
    """Settings from a script's ``*args``: the UI's positionals in `PARAMS` order, or one API dict.

    An API request ``{"args": [{"tile": 48}]}`` reaches the script as ``(dict, <ui default>, …)``:
    the WebUI copies only as many values as the request sends and keeps the ``ui()`` defaults for
    the rest, so a dict in the first position wins and the trailing defaults are ignored. Those
    defaults are never dicts, so a second dict (``[{"enabled": true}, {"preset": "Gentle"}]``) is
    the client's and is refused rather than silently dropped.
    Only API requests (`is_api`) get the short positional form ``[true, "Crisp"]``; the UI always
    sends every value, and they are taken as given (see `Settings.from_args`).
    Raises `SettingsError` (message names the field and its allowed range).
    """
    args = list(args)
    dicts = [a for a in args if isinstance(a, Mapping)]
    if len(dicts) > 1:
        import json
        example = json.dumps({k: v for d in dicts for k, v in d.items()}, default=str, skipkeys=True)
        raise SettingsError(f"QSilk: send one argument dict, e.g. [{example}] — got {len(dicts)} dicts")
    if args and isinstance(args[0], Mapping):
        return Settings.from_api(args[0])
    if any(isinstance(a, Mapping) for a in args):
        raise SettingsError("QSilk: an argument dict must be the first (and only) argument")
    return Settings.from_args(args, ui_default_preset=ui_default_preset, short_form=is_api)


def with_ui_defaults(args: Sequence[Any], defaults: Settings) -> list[Any]:
    """An API request's args as the other WebUIs hand them to a script: the values sent, then the
    UI's default values (`defaults`, in `PARAMS` order) for the rest. A dict sent first is kept
    as is (``from_api`` fills in its preset itself); nothing sent means every UI default."""
    args = list(args)
    if args and isinstance(args[0], Mapping):
        return args
    values = [getattr(defaults, p.name) for p in PARAMS]
    return args + values[len(args):]


def apply_overrides(settings: Settings, overrides: Mapping[str, Any] | None) -> Settings:
    """Apply per-cell overrides (XYZ axes). A ``preset`` override loads that whole preset first
    (keeping the on/off switch and debug output), then single-parameter overrides apply."""
    if not overrides:
        return settings
    overrides = dict(overrides)
    if "preset" in overrides:
        keep = {p.name: getattr(settings, p.name) for p in PARAMS if p.group in ("main", "debug")
                and p.name != "preset"}
        settings = Settings.from_preset(overrides.pop("preset"), **keep)
    return settings.replace(**overrides) if overrides else settings


def overrides_of(p: Any) -> dict[str, Any]:
    """The XYZ overrides put on this processing object, or ``{}``."""
    return dict(getattr(p, OVERRIDES_ATTR, None) or {})


def set_override(p: Any, name: str, value: Any) -> None:
    """Record one override on ``p`` as a NEW dict: XYZ cells are shallow copies of one ``p``, so a
    shared dict mutated in place would leak a value into the other cells."""
    setattr(p, OVERRIDES_ATTR, {**overrides_of(p), name: value})


#: Attribute on a processing object ``p`` holding the running job (whatever the adapter returned).
JOB_ATTR = "qsilk_job"


def job_of(p: Any) -> Any | None:
    """The job `start_job` returned for this ``p`` (set by the script), or None."""
    return getattr(p, "__dict__", {}).get(JOB_ATTR)


def set_job(p: Any, job: Any) -> None:
    p.__dict__[JOB_ATTR] = job


def pop_job(p: Any) -> Any | None:
    return getattr(p, "__dict__", {}).pop(JOB_ATTR, None)


def call_arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """The argument of a wrapped host call at position `index`, else keyword `name` (``None`` if absent)."""
    return args[index] if len(args) > index else kwargs.get(name)


def with_call_arg(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    """`args` / `kwargs` with the argument at `index` (or keyword `name`) replaced by `value`."""
    if len(args) > index:
        return (*args[:index], value, *args[index + 1:]), kwargs
    return args, {**kwargs, name: value}


#: Attribute on a function QSilk put on ``p.sample``: ``(had_own, own)`` — whether ``p`` had its
#: own ``sample`` attribute before, and which — so it can be taken off again exactly.
RESTORE_ATTR = "_qsilk_restore"


def put_sample(p: Any, fn: Callable[..., Any]) -> None:
    """Put `fn` on this job's ``p.sample`` (an instance attribute), remembering what to restore."""
    own = p.__dict__.get("sample")
    setattr(fn, RESTORE_ATTR, ("sample" in p.__dict__, own))
    p.sample = fn


def restore_sample(p: Any) -> None:
    """Take every QSilk function off ``p.sample`` (a job wrapper, or a refusal of an earlier run);
    another extension's wrapper put on top of ours is left alone."""
    while True:
        fn = p.__dict__.get("sample")
        restore = getattr(fn, RESTORE_ATTR, None)
        if restore is None:
            return
        had_own, own = restore
        if had_own:
            p.sample = own
        else:
            del p.__dict__["sample"]


def fail_job(p: Any, error: Exception) -> None:
    """Make this job fail with `error`'s message instead of silently running without QSilk.

    The WebUIs catch and log every exception raised in a script hook and finish the job without
    the script (HTTP 200). Exceptions from ``p.sample`` are not caught: the request then fails
    (A1111: HTTP 500 with the message under ``errors``; verified on v1.10.1 and Forge).
    """
    message = str(error)

    def sample_refused(*_args: Any, **_kwargs: Any):
        raise ValueError(message)

    restore_sample(p)
    put_sample(p, sample_refused)
    log.error("%s", message)


# -- infotext --------------------------------------------------------------------------------
def write_infotext(p: Any, settings: Settings) -> None:
    """Record the settings in the image's infotext (one compact, versioned key)."""
    p.extra_generation_params[INFOTEXT_KEY] = settings.to_infotext()


def clear_infotext(p: Any) -> None:
    """Off means off: remove our keys. XYZ cells share one ``extra_generation_params`` dict, so a
    key written by an earlier cell with QSilk on must not label a later cell with QSilk off."""
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        params.pop(INFOTEXT_KEY, None)
        params.pop(NOTE_KEY, None)


def add_note(p: Any, message: str) -> None:
    """A user-visible note: the infotext (``QSilk note``) and the generation info comments."""
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        existing = params.get(NOTE_KEY)
        if not existing:
            params[NOTE_KEY] = message
        elif message not in existing:
            params[NOTE_KEY] = f"{existing}; {message}"
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(f"QSilk: {message}")


class InfotextField(str):
    """An infotext paste target that is both a name and a parser.

    The WebUI pastes a field by calling its target when it is callable (PNG Info, "Send to" with
    infotext, the API's ``infotext`` field), and copies a field between tabs when its target, as a
    string, is listed in the script's ``paste_field_names`` ("Send to img2img" from txt2img). A
    ``str`` that is callable serves both. The value comes from the compact ``QSilk`` key, parsed
    by `Settings.from_infotext`; without that key the result is None (control left unchanged),
    except for the on/off switch, which becomes False so an image made without QSilk reproduces.
    """

    param: str

    def __new__(cls, label: str, param: str):
        obj = super().__new__(cls, label)
        obj.param = param
        return obj

    def __call__(self, params: Mapping[str, Any]) -> Any:
        if self.param == "enabled":
            return INFOTEXT_KEY in params
        value = params.get(INFOTEXT_KEY)
        if value is None:
            return None
        parsed = _parse_infotext_value(str(value))
        return None if parsed is None else getattr(parsed, self.param)

    # str.__hash__/__eq__ are kept: the WebUI uses targets as dict keys and compares them to names.


_PARSE_CACHE: dict[str, Settings | None] = {}


def _parse_infotext_value(value: str) -> Settings | None:
    """Parse a ``QSilk`` value once per paste (every control parses the same string)."""
    if value not in _PARSE_CACHE:
        try:
            _PARSE_CACHE[value] = Settings.from_infotext(value)
        except (SettingsError, ValueError) as exc:
            log.warning("QSilk: cannot read infotext %r: %s; controls left unchanged", value, exc)
            _PARSE_CACHE[value] = None
        if len(_PARSE_CACHE) > 64:
            _PARSE_CACHE.pop(next(iter(_PARSE_CACHE)))
    return _PARSE_CACHE[value]


def infotext_target(param: Param) -> InfotextField:
    """The paste target of one control; the enable switch's name is the infotext key itself."""
    label = INFOTEXT_KEY if param.name == "enabled" else f"{INFOTEXT_KEY} {param.name}"
    return InfotextField(label, param.name)


def infotext_fields(components: Sequence[Any]) -> list[tuple[Any, InfotextField]]:
    """``(component, target)`` pairs for ``Script.infotext_fields``; `components` in PARAMS order."""
    if len(components) != len(PARAMS):
        raise ValueError(f"expected {len(PARAMS)} components (one per parameter), got {len(components)}")
    return [(c, infotext_target(p)) for c, p in zip(components, PARAMS)]


def paste_field_names() -> list[str]:
    """Names for ``Script.paste_field_names`` ("Send to img2img" carries every control)."""
    return [str(infotext_target(p)) for p in PARAMS]


# -- XYZ grid --------------------------------------------------------------------------------
def find_xyz_module(scripts_data: Iterable[Any]) -> Any | None:
    """The built-in XYZ plot module, loaded by the WebUI under the module name ``xyz_grid.py``."""
    for data in scripts_data:
        if getattr(getattr(data, "script_class", None), "__module__", None) == "xyz_grid.py":
            return data.module
    return None


def axis_label(param: Param) -> str:
    return "[QSilk] " + ("Enabled" if param.name == "enabled" else param.label)


def xyz_axis_options(xyz: Any) -> list[Any]:
    """One XYZ axis per parameter except debug output: enable, preset, every number and choice.

    ``apply`` records an override on the cell's ``p`` (a new dict, see `set_override`) that
    ``process()`` applies; ``confirm`` checks every value against the parameter table before the
    grid starts, with the same message as the API.
    """
    options = []
    for param in PARAMS:
        if param.group == "debug":
            continue
        options.append(_axis_option(xyz, param))
    return options


def _axis_option(xyz: Any, param: Param) -> Any:
    def apply(p: Any, x: Any, xs: Any, name: str = param.name) -> None:
        set_override(p, name, PARAM_BY_NAME[name].coerce(x))

    def confirm(p: Any, xs: Iterable[Any], param: Param = param) -> None:
        for x in xs:
            param.coerce(x)  # raises SettingsError (a ValueError) naming the field and its range

    kwargs: dict[str, Any] = {"confirm": confirm}
    if param.kind == "bool":
        kwargs["choices"] = lambda: ["True", "False"]
        value_type: Callable[[Any], Any] = str
    elif param.kind == "choice":
        kwargs["choices"] = lambda choices=param.choices: list(choices)
        value_type = str
    elif param.kind == "int":
        value_type = int
    elif param.kind == "float":
        value_type = float
    else:
        value_type = str
    return xyz.AxisOption(axis_label(param), value_type, apply, **kwargs)


def add_xyz_axes(scripts_data: Iterable[Any]) -> bool:
    """Append QSilk's axes to the XYZ plot (call from ``on_before_ui``). False if XYZ is absent."""
    xyz = find_xyz_module(scripts_data)
    if xyz is None:
        log.info("QSilk: XYZ plot script not found; no QSilk axes added")
        return False
    existing = {getattr(o, "label", None) for o in xyz.axis_options}
    xyz.axis_options.extend(o for o in xyz_axis_options(xyz) if o.label not in existing)
    return True


# -- "Show maps" -----------------------------------------------------------------------------
def map_images(maps: Mapping[str, Any], size: tuple[int, int]) -> list[tuple[str, Any]]:
    """``[(name, PIL.Image)]`` greyscale images of the stabiliser's last maps, nearest-upscaled
    to the output ``size`` (width, height). Each map is ``(B, 1, H, W)`` or ``(1, H, W)`` or
    ``(H, W)``; image 0 of the batch is shown, scaled from its own min..max to 0..255."""
    import torch
    from PIL import Image

    images = []
    for name, value in maps.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        m = value.detach().float().cpu()
        while m.dim() > 2:
            m = m[0]
        lo, hi = torch.nan_to_num(m).min(), torch.nan_to_num(m).max()
        span = (hi - lo).clamp_min(1e-12)
        pixels = ((torch.nan_to_num(m) - lo) / span * 255).round().to(torch.uint8).numpy()
        img = Image.fromarray(pixels, mode="L").resize(size, Image.NEAREST).convert("RGB")
        images.append((name, img))
    return images


def append_map_images(processed: Any, maps: Mapping[str, Any], size: tuple[int, int]) -> int:
    """Append the maps to a ``Processed``'s gallery (not saved: the WebUI saves before this).
    Returns how many images were added."""
    added = 0
    for name, img in map_images(maps, size):
        processed.images.append(img)
        infotexts = getattr(processed, "infotexts", None)
        if isinstance(infotexts, list):
            infotexts.append(f"QSilk map: {name}")
        added += 1
    return added


# -- the job's stabilizer ----------------------------------------------------------------------
def job_stabilizer(p: Any, settings: Settings) -> Stabilizer | None:
    """The job's `Stabilizer`, with its Q-Sched pre-conditioner when one is set, or None when the
    settings do nothing (then nothing may be installed; set-up notes go to ``p``'s infotext)."""
    notes: list[str] = []
    stabilizer = Stabilizer(settings, preconditioner=_preconditioner(p, settings, notes))
    for note in notes:
        stabilizer.note(note)
    if stabilizer.enabled:
        return stabilizer
    for note in notes:
        add_note(p, note)
    return None


def _preconditioner(p: Any, settings: Settings, notes: list[str]) -> Any:
    """The job's Q-Sched pre-conditioner for low-bit models (`qsilk.quant`), or None.

    Reads the host's ``modules.paths`` / ``modules.shared`` only if the WebUI has loaded them."""
    if getattr(settings, "qsched", "off") == "off":
        return None
    try:
        from .. import quant
        paths, shared = sys.modules.get("modules.paths"), sys.modules.get("modules.shared")
        model = getattr(p, "sd_model", None) or getattr(shared, "sd_model", None)
        info = quant.model_info(model, models_dir=getattr(paths, "models_path", None),
                                opts=getattr(shared, "opts", None), sampler=getattr(p, "sampler_name", ""),
                                steps=getattr(p, "steps", 0))
        return quant.make_preconditioner(settings, info, note=notes.append)
    except Exception as exc:
        log.exception("QSilk: Q-Sched set-up failed")
        notes.append(f"Q-Sched not applied ({exc})")
        return None


def summary_line(report: dict, host: str) -> str:
    """The one-line summary of a job (or a ComfyUI sampler run)."""
    return (f"QSilk ({host}): {report['passes']} pass(es), {report['evaluations']} evaluation(s) stabilised: "
            f"{report['attn_maps']} attention map(s), {report['lite_fallbacks']} Lite fallback(s); "
            f"{report['pre_decodes']} pre-decode(s), {report['seconds']:.3f} s"
            + "".join(f"; {n}" for n in report["notes"]))


def console_summary_wanted() -> bool:
    """The settings page's "summary line in the console" option (on by default; on outside a WebUI)."""
    opts = getattr(sys.modules.get("modules.shared"), "opts", None)
    return bool(getattr(opts, OPT_CONSOLE_SUMMARY, True))


def present_report(report: dict, stabilizer: Stabilizer, processed: Any, host: str, *,
                   echo: bool | None = None) -> dict:
    """End of a job: the one-line summary, and on ``processed`` the Show-maps images and the run's
    notes (in the comments the UI shows under the gallery). Returns `report`.

    The WebUIs show INFO only when started with ``--loglevel INFO``, so by default (`echo`, from
    the settings page when None) the line is printed to the console, as WebUI extensions do;
    otherwise it is logged at INFO (ComfyUI shows INFO: it passes ``echo=False``)."""
    line = summary_line(report, host)
    if console_summary_wanted() if echo is None else echo:
        print(line, flush=True)
    else:
        log.info("%s", line)
    if processed is None:
        return report
    if stabilizer.settings.show_maps and stabilizer.last_maps and getattr(processed, "images", None):
        append_map_images(processed, stabilizer.last_maps, processed.images[0].size)
    if isinstance(getattr(processed, "comments", None), str):
        for note in report["notes"]:
            if f"QSilk: {note}" not in processed.comments:
                processed.comments += f"QSilk: {note}\n"
    return report
