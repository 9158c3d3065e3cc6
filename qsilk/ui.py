"""Gradio controls for QSilk, built from the parameter table (`qsilk.settings.PARAMS`).

Works with Gradio 3.41 (AUTOMATIC1111, old Forge, reForge) and Gradio 4.x (new Forge): only
components, arguments and events present in both are used (``Checkbox``, ``Slider``, ``Dropdown``,
``Radio``, ``Accordion``, ``Row``, ``Markdown``; ``info=``; ``.input``/``.change``; no ``.style``,
no ``_js``/``js``). ``gradio`` is passed in, never imported here, so importing this module costs
nothing and the core stays free of UI dependencies.

Layout: one accordion whose header checkbox is the on/off switch (the WebUI's ``InputAccordion``,
passed in as `accordion`), then the preset, the two placement switches users ask about most
("Hires pass", "Before decode"), a one-line summary of what the values set do (`describe_values`),
and one closed sub-accordion per group. The preset's help text is the chosen preset's
(`preset_help`); the low-bit group's status line is filled at each page load and, where the host
connects it (`follow_model_changes`), after a checkpoint change. The returned components are in `PARAMS` order whatever
the layout, because that order is the script's argument order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .settings import (DEFAULT_PRESET, PARAM_BY_NAME, PARAMS, PRESET_HELP, PRESET_PARAMS, PRESETS, Param,
                       Settings, SettingsError)

#: Sub-accordion titles by parameter group (group "main" and the two top-row switches sit above).
GROUP_TITLES = {
    "qsilk": "Micro-clamp",
    "aqclip": "AQClip (adaptive tile corridor)",
    "schedule": "Where it runs",
    "probe": "Attention-entropy probe",
    "quant": "Low-bit models (Q-Sched)",
}
#: Shown in the top row, next to the preset (not repeated in their group).
TOP_ROW = ("preset", "hires", "pre_decode")

EXPANDING_WARNING = (
    "⚠ The `tanh` shape with α > 1 and the `paper` AQClip variant expand or shift the latent each "
    "time they are applied; applied at every step this compounds. Use `per_pass` placement for "
    "them, or the `hard`/`soft` shapes and the `qsilk` variant for everyday use."
)


@dataclass
class Controls:
    """What `build_controls` made. `components` is in `PARAMS` order (the script's args)."""

    components: list[Any]
    by_name: dict[str, Any]
    preset_hint: Any
    warning: Any
    quant_line: Any = None  # the low-bit group's status line (when the host gave a status function)

    @property
    def enabled(self) -> Any:
        return self.by_name["enabled"]


def preset_values(name: str) -> list[Any]:
    """The preset's values in `PRESET_PARAMS` order (what the preset dropdown fills in)."""
    preset = PRESETS[PARAM_BY_NAME["preset"].coerce(name)]
    return [preset[k] for k in PRESET_PARAMS]


#: Every control the summary line reads: all parameters but the on/off switch and debug output.
SUMMARY_PARAMS: tuple[str, ...] = tuple(p.name for p in PARAMS if p.name != "enabled" and p.group != "debug")
_PLACEMENT_WORDS = {"per_step": "every step", "per_pass": "once per pass"}
_MAX_CHANGES = 3  # listed by name in the summary line; the rest are counted


def describe_values(values: Mapping[str, Any]) -> str:
    """One line saying what the set values do: what runs, and what differs from the named preset.

    Pure function of the control values (`values`: parameter name → value; missing ones are the
    named preset's). "Changed from the preset" lists exactly what infotext would record besides
    the preset name (`Settings.overrides`); values the job would refuse give the job's message.
    """
    name = values.get("preset", DEFAULT_PRESET)
    try:
        given = {k: v for k, v in values.items() if k in PARAM_BY_NAME and k != "preset"}
        s = Settings.from_preset(name, **given)
    except SettingsError as error:
        return f"**{name}**: ⚠ {str(error).removeprefix('QSilk: ')}"
    changed = {k: v for k, v in s.overrides().items() if k in PRESET_PARAMS}
    parts = _running_parts(s)
    line = f"**{s.preset} (modified)**: " if changed else f"**{s.preset}**: "
    line += "; ".join(parts) if parts else "does nothing (no hook is installed)"
    if changed:
        base = PRESETS[s.preset]
        shown = [f"*{PARAM_BY_NAME[k].label}* {_word(base[k])} → {_word(v)}" for k, v in changed.items()]
        if len(shown) > _MAX_CHANGES:
            shown = shown[:_MAX_CHANGES] + [f"+{len(shown) - _MAX_CHANGES} more"]
        line += " — changed from the preset: " + ", ".join(shown)
        same = [n for n, v in PRESETS.items() if all(getattr(s, k) == v[k] for k in PRESET_PARAMS)]
        if same:
            line += f" (the same as {same[0]})"
    return line + "."


def describe_preset(name: str) -> str:
    """The summary line of a preset's own values (what choosing it shows)."""
    return describe_values({"preset": name})


def preset_help(name: str) -> str:
    """The preset dropdown's help for the chosen preset (`PRESET_HELP`; the generic help otherwise)."""
    return PRESET_HELP.get(name) or PARAM_BY_NAME["preset"].help


def _running_parts(s: Settings) -> list[str]:
    """What the settings turn on, one short phrase per component."""
    parts = []
    if s.qsilk_enabled:
        parts.append(f"micro-clamp {s.qsilk_shape} {_word(s.q_lo)}–{_word(s.q_hi)} ({_when(s.qsilk_placement)})")
    if s.aqclip_enabled:
        shape = s.aqclip_shape if s.aqclip_shape == "hard" else f"{s.aqclip_shape} α {_word(s.aqclip_alpha)}"
        floor = f"floor {_word(s.sigma_floor)}σ" if s.sigma_floor > 0 else "no sigma floor"
        parts.append(f"AQClip {s.aqclip_variant}, {s.aqclip_mode} confidence, {shape}, tile {s.tile}/{s.stride}, "
                     f"tail shares {_word(s.p_wide)}–{_word(s.p_narrow)}, {floor} ({_when(s.aqclip_placement)})")
    if s.qsched == "ramp":
        parts.append(f"Q-Sched ramp c_x {_word(s.qsched_cx)}, c_F {_word(s.qsched_cf)}")
    elif s.qsched != "off":
        parts.append(f"Q-Sched {s.qsched} {s.qsched_file}" + (", per-σ targets" if s.qsched_thresholds else ""))
    return parts


def _when(placement: str) -> str:
    return _PLACEMENT_WORDS.get(placement, placement)


def _word(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


def is_expanding(values: dict[str, Any]) -> bool:
    """Whether the settings use a shape that expands or shifts the latent (spec §6 warning)."""
    tanh_expands = any(values.get(f"{c}_shape") == "tanh" and float(values.get(f"{c}_alpha", 0)) > 1
                       for c in ("qsilk", "aqclip"))
    return tanh_expands or values.get("aqclip_variant") == "paper"


def _component(gr: Any, param: Param, value: Any, elem_id: Callable[[str], str]) -> Any:
    info = preset_help(value) if param.name == "preset" else param.help
    common = {"label": param.label, "info": info, "elem_id": elem_id(param.name)}
    if param.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if param.kind in ("int", "float"):
        cast = int if param.kind == "int" else float
        return gr.Slider(minimum=cast(param.minimum), maximum=cast(param.maximum), step=param.step,
                         value=cast(value), **common)
    if param.kind == "choice":
        if len(param.choices) <= 3 and param.name != "preset":
            return gr.Radio(choices=list(param.choices), value=value, **common)
        return gr.Dropdown(choices=list(param.choices), value=value, **common)
    return gr.Textbox(value=str(value), **common)


def build_controls(gr: Any, *, enabled: bool, values: dict[str, Any],
                   elem_id: Callable[[str], str] = lambda name: f"qsilk_{name}",
                   accordion: Callable[..., Any] | None = None,
                   quant_status: Callable[[], str] | None = None,
                   coefficient_files: Callable[[], list[str]] | None = None) -> Controls:
    """Create the controls inside the current Gradio Blocks context.

    Args:
        gr: the ``gradio`` module (3.41 or 4.x).
        enabled: initial state of the on/off switch (settings page: "enabled by default").
        values: initial value of every other parameter (e.g. `Settings.as_dict()` of the default
            preset).
        elem_id: maps a parameter name to an HTML id (the WebUI's ``Script.elem_id``).
        accordion: the WebUI's ``InputAccordion`` (``accordion(value, label=…, elem_id=…)``, a
            checkbox that is also an accordion context manager). Without it — outside a WebUI — a
            plain accordion holding an "Enable QSilk" checkbox is built instead.
        quant_status, coefficient_files: the host's low-bit line (`qsilk.quant.panel_status`) and
            coefficient file names; with them the low-bit group shows the line, a file dropdown and
            a refresh button.
    Returns: `Controls`; ``components`` are in `PARAMS` order.
    """
    by_name: dict[str, Any] = {}
    enabled_param = PARAM_BY_NAME["enabled"]
    if accordion is not None:
        outer = accordion(bool(enabled), label=enabled_param.label, elem_id=elem_id("enabled"))
        by_name["enabled"] = outer
    else:
        outer = gr.Accordion(label=enabled_param.label, open=bool(enabled), elem_id=elem_id("accordion"))

    with outer:
        if accordion is None:  # the switch is a visible checkbox, first in the accordion
            by_name["enabled"] = gr.Checkbox(value=bool(enabled), label=ENABLE_LABEL, info=enabled_param.help,
                                             elem_id=elem_id("enabled"))
        with gr.Row():
            for name in TOP_ROW:
                by_name[name] = _component(gr, PARAM_BY_NAME[name], values[name], elem_id)
        preset_hint = gr.Markdown(describe_values(values), elem_id=elem_id("preset_hint"),
                                  elem_classes=["qsilk-hint"])
        warning = gr.Markdown(EXPANDING_WARNING, visible=is_expanding(values), elem_id=elem_id("warning"),
                              elem_classes=["qsilk-warning"])
        quant_line = None
        for group, title in GROUP_TITLES.items():
            params = [p for p in PARAMS if p.group == group and p.name not in TOP_ROW]
            if not params:
                continue
            with gr.Accordion(label=title, open=False, elem_id=elem_id(f"group_{group}")):
                for param in params:
                    if param.name == "qsched_file" and coefficient_files is not None:
                        by_name[param.name] = _file_dropdown(gr, param, values[param.name], elem_id, coefficient_files)
                        continue
                    by_name[param.name] = _component(gr, param, values[param.name], elem_id)
                if group == "quant" and quant_status is not None:
                    quant_line = _quant_status(gr, quant_status, coefficient_files, by_name.get("qsched_file"),
                                               elem_id)
        for param in PARAMS:
            if param.name not in by_name:  # debug output and anything without a group title
                by_name[param.name] = _component(gr, param, values[param.name], elem_id)

    components = [by_name[p.name] for p in PARAMS]
    _wire_events(gr, by_name, preset_hint, warning)
    return Controls(components=components, by_name=by_name, preset_hint=preset_hint, warning=warning,
                    quant_line=quant_line)


def _wire_events(gr: Any, by_name: dict[str, Any], preset_hint: Any, warning: Any) -> None:
    preset = by_name["preset"]
    filled = [by_name[k] for k in PRESET_PARAMS]
    # `.input` fires on user choice only: pasting infotext sets the preset AND every control, and
    # a `.change` handler would then overwrite the pasted values with the preset's.
    preset.input(fn=preset_values, inputs=[preset], outputs=filled, show_progress=False)

    # The preset's help describes the chosen preset: `.change`, so a pasted preset updates it too.
    def help_update(name: Any) -> Any:
        return gr.update(info=preset_help(str(name)))

    preset.change(fn=help_update, inputs=[preset], outputs=[preset], show_progress=False)

    # The summary line describes the values set, so it follows every control it reads: `.change`
    # also fires when the preset fills the controls and when infotext is pasted.
    described = [by_name[n] for n in SUMMARY_PARAMS]

    def summary_update(*vals: Any) -> str:
        return describe_values(dict(zip(SUMMARY_PARAMS, vals)))

    for component in described:
        component.change(fn=summary_update, inputs=described, outputs=[preset_hint], show_progress=False)

    watched_names = ("qsilk_shape", "qsilk_alpha", "aqclip_shape", "aqclip_alpha", "aqclip_variant")
    watched = [by_name[n] for n in watched_names]

    def warning_update(*vals: Any) -> Any:
        return gr.update(visible=is_expanding(dict(zip(watched_names, vals))))

    for component in watched:
        component.change(fn=warning_update, inputs=watched, outputs=[warning], show_progress=False)


def _file_dropdown(gr: Any, param: Param, value: Any, elem_id: Callable[[str], str],
                   files: Callable[[], list[str]]) -> Any:
    """Coefficient file chooser; a typed or pasted name that is not (yet) in the folder is kept."""
    return gr.Dropdown(choices=[""] + list(files()), value=value, allow_custom_value=True,
                       label=param.label, info=param.help, elem_id=elem_id(param.name))


def _quant_status(gr: Any, status: Callable[[], str], files: Callable[[], list[str]] | None,
                  file_box: Any, elem_id: Callable[[str], str]) -> Any:
    """Read-only low-bit line (detected storage, files found) with a refresh button. The line's
    value is the `status` function itself: Gradio calls it each time the page loads, so the line
    describes the model loaded then, not the one (or none) loaded when the UI was built."""
    line = gr.Markdown(status, elem_id=elem_id("quant_status"))
    refresh = gr.Button(QUANT_REFRESH, elem_id=elem_id("quant_refresh"))

    if files is None or file_box is None:
        refresh.click(fn=status, inputs=[], outputs=[line], show_progress=False)
        return line
    refresh.click(fn=lambda: (status(), gr.update(choices=[""] + list(files()))), inputs=[],
                  outputs=[line, file_box], show_progress=False)
    return line


def follow_model_changes(trigger: Any, controls: Controls, status: Callable[[Any], str]) -> None:
    """Refresh the low-bit line after the host's checkpoint selector changes: ``status(new
    value)`` (the host waits there for the load to finish) goes to the line. No-op without it."""
    if controls.quant_line is None or trigger is None or not callable(getattr(trigger, "change", None)):
        return
    trigger.change(fn=status, inputs=[trigger], outputs=[controls.quant_line], show_progress=False)


QUANT_REFRESH = "Refresh model storage and coefficient files"
#: The on/off checkbox's label where there is no accordion header checkbox (SD.Next, no WebUI).
ENABLE_LABEL = "Enable QSilk"


def labels() -> list[str]:
    """Every user-visible English string of the controls (for ``localizations/*.json``)."""
    strings: list[str] = []
    for p in PARAMS:
        strings += [p.label, p.help]
    strings += list(GROUP_TITLES.values()) + [ENABLE_LABEL, EXPANDING_WARNING, QUANT_REFRESH]
    strings += [h for h in PRESET_HELP.values() if h]
    strings += [describe_preset(name) for name in PRESETS]  # other summary lines are composed
    return list(dict.fromkeys(strings))


def control_names() -> Sequence[str]:
    """Parameter names in argument order (for the API documentation)."""
    return [p.name for p in PARAMS]
