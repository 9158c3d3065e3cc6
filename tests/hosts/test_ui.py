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
from qsilk.settings import PARAM_BY_NAME, PARAMS, PRESET_PARAMS, PRESETS, Settings  # noqa: E402


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
        assert component.label == param.label
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
        if param.help and param.name != "enabled":
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


def test_preset_descriptions_follow_the_values():
    assert "does nothing" in ui.describe_preset("Off")
    gentle = ui.describe_preset("Gentle")
    assert "micro-clamp" in gentle and "AQClip" not in gentle
    assert f"tile {PRESETS['High-res']['tile']}" in ui.describe_preset("High-res")


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
