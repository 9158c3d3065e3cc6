"""QSilk's Gradio controls build under whatever Gradio is installed.

The main venv has Gradio 3.41.2 (AUTOMATIC1111's pin); ``.ci/ui_gradio4.sh`` runs this file again
under Gradio 4.40 (new Forge), with ``QSILK_EXPECT_GRADIO=4`` so a wrong install fails instead of
silently testing the other version.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio") if not os.environ.get("QSILK_EXPECT_GRADIO") else __import__("gradio")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from qsilk import ui  # noqa: E402
from qsilk.settings import PARAM_BY_NAME, PARAMS, PRESET_HELP, PRESET_PARAMS, PRESETS, Settings  # noqa: E402


def test_expected_gradio_major_version():
    expected = os.environ.get("QSILK_EXPECT_GRADIO")
    if expected is None:
        expected = "3"  # the main venv pins A1111's 3.41.2
    assert gr.__version__.split(".")[0] == expected, gr.__version__


def _events(blocks):
    """``(handler, [(target id, event name)], [output ids])`` for every event, Gradio 3 or 4."""
    fns = list(blocks.fns.values()) if isinstance(blocks.fns, dict) else list(blocks.fns)
    deps = getattr(blocks, "dependencies", None)
    events = []
    for i, block_fn in enumerate(fns):
        if deps is not None:  # Gradio 3: parallel list of dicts
            dep = deps[i]
            targets = [(t, dep.get("trigger")) if isinstance(t, int) else tuple(t) for t in dep["targets"]]
            outputs = list(dep["outputs"])
        else:  # Gradio 4: the BlockFunction holds them
            targets = [tuple(t) for t in block_fn.targets]
            outputs = [o._id for o in block_fn.outputs]
        events.append((block_fn.fn, targets, outputs))
    return events


def _outputs(blocks, fn):
    """The output component ids of the event whose handler is `fn`."""
    for handler, _, outputs in _events(blocks):
        if handler is fn:
            return outputs
    raise AssertionError(f"no event with handler {fn}")


def _build(accordion=None, preset="Balanced", enabled=True):
    with gr.Blocks() as blocks:
        controls = ui.build_controls(gr, enabled=enabled, values=Settings.from_preset(preset).as_dict(),
                                     elem_id=lambda name: f"qsilk_test_{name}", accordion=accordion)
    return blocks, controls


def _input_accordion():
    from doubles import a1111 as d
    cls = d._input_accordion_class()
    assert cls is not None
    return cls


@pytest.mark.parametrize("use_accordion", [False, True])
def test_one_control_per_parameter_in_argument_order(use_accordion):
    blocks, controls = _build(accordion=_input_accordion() if use_accordion else None)
    assert len(controls.components) == len(PARAMS)
    assert [controls.by_name[p.name] for p in PARAMS] == controls.components
    for param, component in zip(PARAMS, controls.components):
        # without the header checkbox (SD.Next) the switch is a checkbox saying what it does
        plain_switch = param.name == "enabled" and not use_accordion
        assert component.label == (ui.ENABLE_LABEL if plain_switch else param.label)
        if param.kind in ("int", "float"):
            assert isinstance(component, gr.Slider)
            assert (component.minimum, component.maximum) == (param.minimum, param.maximum)
            assert type(component.value) is (int if param.kind == "int" else float)
        elif param.kind == "bool":
            assert isinstance(component, gr.Checkbox)
        elif param.kind == "choice":
            assert isinstance(component, (gr.Dropdown, gr.Radio))
            choices = [c[0] if isinstance(c, (tuple, list)) else c for c in component.choices]
            assert choices == list(param.choices)
        if param.name == "preset":  # the chosen preset's own help
            assert getattr(component, "info", None) == PRESET_HELP["Balanced"]
        elif param.help and param.name != "enabled":
            assert getattr(component, "info", None) == param.help
    expected = Settings.from_preset("Balanced").as_dict()
    assert [c.value for c in controls.components] == [expected[p.name] for p in PARAMS]
    if use_accordion:
        assert isinstance(controls.enabled, gr.Checkbox) and controls.enabled.elem_id == "qsilk_test_enabled-checkbox"


def test_defaults_follow_the_given_preset_and_switch():
    _, controls = _build(preset="Gentle", enabled=False)
    values = dict(zip([p.name for p in PARAMS], [c.value for c in controls.components]))
    assert values["enabled"] is False and values["preset"] == "Gentle"
    assert all(values[k] == PRESETS["Gentle"][k] for k in PRESET_PARAMS)


def test_preset_choice_fills_every_preset_control():
    blocks, controls = _build()
    filled = [controls.by_name[k]._id for k in PRESET_PARAMS]
    assert _outputs(blocks, ui.preset_values) == filled
    for name, values in PRESETS.items():
        assert ui.preset_values(name) == [values[k] for k in PRESET_PARAMS]
        assert ui.preset_values(name.upper()) == ui.preset_values(name)


def test_preset_is_filled_on_user_input_only():
    """Pasting infotext sets the preset and every control at once; a `.change` handler would then
    overwrite the pasted values with the preset's."""
    blocks, controls = _build()
    preset_id = controls.by_name["preset"]._id
    found = [targets for handler, targets, _ in _events(blocks) if handler is ui.preset_values]
    assert found == [[(preset_id, "input")]]


def test_warning_shows_for_expanding_shapes():
    assert ui.is_expanding({"qsilk_shape": "tanh", "qsilk_alpha": 2.0})
    assert ui.is_expanding({"aqclip_variant": "paper"})
    assert not ui.is_expanding({"qsilk_shape": "tanh", "qsilk_alpha": 1.0, "aqclip_variant": "qsilk"})
    assert not ui.is_expanding(Settings.from_preset("Balanced").as_dict())
    _, controls = _build(preset="Paper (literal)")
    assert controls.warning.visible is True
    _, controls = _build(preset="Balanced")
    assert controls.warning.visible is False


def _inputs(blocks, fn):
    """The input component ids of the events whose handler is `fn` (one list per event)."""
    fns = list(blocks.fns.values()) if isinstance(blocks.fns, dict) else list(blocks.fns)
    deps = getattr(blocks, "dependencies", None)
    return [list(deps[i]["inputs"]) if deps is not None else [c._id for c in block_fn.inputs]
            for i, block_fn in enumerate(fns) if block_fn.fn is fn]


def _summary_handler(blocks, controls):
    """The handler that writes the summary line; asserts it follows every control it reads."""
    hint = controls.preset_hint._id
    events = [(handler, targets) for handler, targets, outputs in _events(blocks) if outputs == [hint]]
    handlers = {handler for handler, _ in events}
    assert len(handlers) == 1
    handler = handlers.pop()
    described = [controls.by_name[n]._id for n in ui.SUMMARY_PARAMS]
    assert sorted(t for _, targets in events for t in targets) == sorted((i, "change") for i in described)
    assert all(inputs == described for inputs in _inputs(blocks, handler))
    return handler


def _body(line):
    return line.split(":", 1)[1]


def test_summary_follows_a_pasted_value():
    """Pasting ``tile=48`` sets the controls, not the preset: the line must show the values set."""
    blocks, controls = _build()
    handler = _summary_handler(blocks, controls)
    pasted = Settings.from_infotext("Steps: 20, QSilk: v=1; preset=Balanced; tile=48").as_dict()
    line = handler(*[pasted[n] for n in ui.SUMMARY_PARAMS])
    assert line == ui.describe_values(pasted)
    assert "tile 48/16" in line and "tile 32" not in line
    assert line.startswith("**Balanced (modified)**") and f"*{PARAM_BY_NAME['tile'].label}* 32 → 48" in line
    # the preset filling the controls again gives the preset's own line
    assert handler(*[Settings.from_preset("Balanced").as_dict()[n] for n in ui.SUMMARY_PARAMS]) == \
        ui.describe_preset("Balanced") == controls.preset_hint.value


def test_every_preset_reads_differently():
    lines = {name: ui.describe_preset(name) for name in PRESETS}
    for name, line in lines.items():
        assert line.startswith(f"**{name}**: ") and "modified" not in line and "changed" not in line
    bodies = [_body(line) for line in lines.values()]
    assert len(set(bodies)) == len(bodies), lines
    assert "tail shares 0.001–0.02" in lines["Crisp"] and "tail shares 0.0005–0.01" in lines["Balanced"]


def _another_value(preset, name):
    """A valid value of `name` that differs from the preset's."""
    param = PARAM_BY_NAME[name]
    if param.kind == "bool":
        candidates = [not PRESETS[preset][name]]
    elif param.kind == "choice":
        candidates = list(param.choices)
    else:
        candidates = [param.minimum, param.maximum, PRESETS[preset][name] + param.step,
                      PRESETS[preset][name] - param.step]
    for value in candidates:
        value = param.coerce(round(value, 6)) if param.kind in ("int", "float") else value
        if value == PRESETS[preset][name]:
            continue
        try:
            Settings.from_preset(preset, **{name: value})
        except ValueError:
            continue
        return value
    raise AssertionError(f"no other valid value for {name}")


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_a_value_changed_from_the_preset_is_named(name):
    value = _another_value("Balanced", name)
    line = ui.describe_values({"preset": "Balanced", name: value})
    assert line.startswith("**Balanced (modified)**: ")
    assert f"*{PARAM_BY_NAME[name].label}* " in line.split(" — changed from the preset: ")[1]


def test_summary_says_when_nothing_runs_or_values_are_refused():
    assert _body(ui.describe_preset("Off")).strip() == "does nothing (no hook is installed)."
    gentle = ui.describe_preset("Gentle")
    assert "micro-clamp" in gentle and "AQClip" not in gentle
    assert f"tile {PRESETS['High-res']['tile']}" in ui.describe_preset("High-res")
    off = ui.describe_values({"preset": "Gentle", "qsilk_enabled": False})
    assert "does nothing" in off and "(the same as Off)" in off
    assert "Q-Sched ramp" in ui.describe_values({"preset": "Off", "qsched": "ramp", "qsched_cx": 1.05})
    bad = ui.describe_values({"preset": "Balanced", "p_wide": 0.05})
    assert bad == "**Balanced**: ⚠ p_wide must be at most p_narrow (got 0.05 > 0.01)"
    assert "tile must be 4..256" in ui.describe_values({"preset": "Balanced", "tile": None})


def test_build_is_reentrant():
    """The WebUI's API calls ``ui()`` twice more to read default values."""
    runs = [_build()[1] for _ in range(3)]
    values = [[c.value for c in r.components] for r in runs]
    assert values[0] == values[1] == values[2]
    assert runs[0].components[0] is not runs[1].components[0]


def test_labels_cover_every_visible_string():
    strings = ui.labels()
    for p in PARAMS:
        assert p.label in strings and p.help in strings
    assert len(strings) == len(set(strings))
    assert PARAM_BY_NAME["tile"].label in strings
    for static in [*ui.GROUP_TITLES.values(), ui.EXPANDING_WARNING, ui.QUANT_REFRESH]:
        assert static in strings
    assert all(ui.describe_preset(name) in strings for name in PRESETS)


# -- panel polish (issue 15) ---------------------------------------------------------------------
def _update_value(update, key):
    return update.get(key) if isinstance(update, dict) else getattr(update, key, None)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_preset_help_describes_the_chosen_preset(preset):
    blocks, controls = _build(preset=preset)
    assert controls.by_name["preset"].info == PRESET_HELP[preset] != ""
    help_events = [(fn, targets) for fn, targets, outputs in _events(blocks)
                   if outputs == [controls.by_name["preset"]._id]]
    assert len(help_events) == 1
    fn, targets = help_events[0]
    assert (controls.by_name["preset"]._id, "change") in targets  # pasted presets too
    for other in PRESETS:
        assert _update_value(fn(other), "info") == PRESET_HELP[other]
    assert len(set(PRESET_HELP.values())) == len(PRESETS)


def test_the_summary_names_what_each_preset_sets():
    """Every value on which presets differ shows in the preset's own summary line."""
    paper, balanced = ui.describe_preset("Paper (literal)"), ui.describe_preset("Balanced")
    assert "tanh α 2" in paper and "no sigma floor" in paper and "lite confidence" in paper
    assert "soft α 2" in balanced and "floor 1σ" in balanced
    assert "tile 64/32" in ui.describe_preset("High-res")
    assert "once per pass" in paper and "every step" in balanced


def test_tail_shares_use_the_sliders_unit_in_the_summary():
    line = ui.describe_preset("Crisp")
    assert "tail shares 0.001–0.02" in line and "%" not in line
    for name in ("p_wide", "p_narrow"):
        assert "as a fraction" in PARAM_BY_NAME[name].help


def test_the_low_bit_line_is_filled_when_the_page_loads_and_after_a_model_change():
    calls = []

    def status():
        calls.append("load")
        return f"storage: model {len(calls)}"

    with gr.Blocks() as blocks:
        selector = gr.Dropdown(choices=["a", "b"], value="a", elem_id="setting_sd_model_checkpoint")
        controls = ui.build_controls(gr, enabled=True, values=Settings.from_preset("Balanced").as_dict(),
                                     elem_id=lambda name: f"qsilk_test_{name}", quant_status=status,
                                     coefficient_files=lambda: [])
        ui.follow_model_changes(selector, controls, lambda selected: f"loaded {selected}")
    line = controls.quant_line
    assert line is not None and line.elem_id == "qsilk_test_quant_status"
    # the page-load event (no target) runs `status` itself; Refresh runs a lambda that also lists files
    loads = [fn for fn, targets, outputs in _events(blocks) if fn is status]
    assert loads and _outputs(blocks, status) == [line._id]
    assert loads[0]() == f"storage: model {len(calls)}"
    changes = [fn for fn, targets, outputs in _events(blocks)
               if outputs == [line._id] and (selector._id, "change") in targets]
    assert len(changes) == 1 and changes[0]("b") == "loaded b"
