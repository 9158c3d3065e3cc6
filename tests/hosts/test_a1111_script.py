"""The script's WebUI-facing surface on the AUTOMATIC1111 double: loading, infotext paste and
"Send to", the settings page, XYZ axes, API defaults (see tests/doubles/a1111.py)."""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from doubles import a1111 as d  # noqa: E402

from qsilk.hosts import common  # noqa: E402
from qsilk.settings import PARAMS, PRESETS, Settings  # noqa: E402

SMALL = dict(width=64, height=64, steps=2)

# The WebUI's infotext line syntax (modules/infotext_utils.py `re_param_code`): `Key: value`
# pairs separated by commas, values optionally JSON-quoted.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict:
    import json
    last = text.strip().split("\n")[-1]
    out = {}
    for key, value in RE_PARAM.findall(last):
        value = value.strip()
        if value.startswith('"'):
            value = json.loads(value)
        out[key.strip()] = value
    return out


def paste(fields, params: dict) -> list:
    """What the WebUI's paste does per field: call the target, None = leave the control."""
    return [target(params) if callable(target) else params.get(target) for _, target in fields]


@pytest.fixture
def webui():
    w = d.WebUI("1.10.1").install()
    yield w
    w.uninstall()


@pytest.fixture
def harness(webui):
    return d.Harness(str(ROOT), webui)


# -- loading -------------------------------------------------------------------------------------
def test_script_file_loads_like_the_webui_loads_it(harness):
    module = harness.module
    assert module.__name__ == "qsilk.py"
    assert "qsilk.py" not in sys.modules  # the WebUI never registers script modules
    assert hasattr(sys.modules["qsilk"], "__path__")  # `import qsilk` found the package
    scripts = [v for v in vars(module).values() if inspect.isclass(v) and issubclass(v, d.Script)]
    assert scripts == [module.QSilkScript]  # nothing else gets registered as a script
    assert harness.script.title() == "QSilk"
    assert harness.script.show(False) is d.AlwaysVisible and harness.script.show(True) is d.AlwaysVisible


def test_ui_is_reentrant_and_defaults_are_the_api_defaults(harness):
    import gradio as gr
    for _ in range(2):  # the API calls ui() twice more inside a throwaway Blocks
        with gr.Blocks():
            again = harness.script.ui(False)
        assert [c.value for c in again] == harness.defaults
    assert harness.defaults == Settings.from_preset("Balanced").to_args()


# -- infotext ------------------------------------------------------------------------------------
def test_generated_infotext_pastes_back_to_the_same_settings(harness, webui):
    wanted = Settings.from_preset("Crisp", tile=48, step_end=0.85, pre_decode="always")
    processed = harness.txt2img([wanted.to_api()], **SMALL)
    params = parse_infotext(processed.infotexts[0])
    assert params["QSilk"] == wanted.to_infotext()
    values = paste(harness.script.infotext_fields, params)
    assert values == wanted.to_args()


def test_pasting_an_image_made_without_qsilk_turns_it_off(harness, webui):
    processed = harness.txt2img([False], **SMALL)
    params = parse_infotext(processed.infotexts[0])
    assert "QSilk" not in params
    values = paste(harness.script.infotext_fields, params)
    assert values[0] is False
    assert values[1:] == [None] * (len(PARAMS) - 1)  # the other controls stay as they are


def test_panel_summary_shows_pasted_values(harness):
    """Issue #9: after pasting ``tile=48`` the summary line under the preset said "tile 32/16"."""
    from qsilk import ui
    values = paste(harness.script.infotext_fields, {"QSilk": "v=1; preset=Balanced; tile=48"})
    line = ui.describe_values(dict(zip([p.name for p in PARAMS], values)))
    assert "tile 48/16" in line and line.startswith("**Balanced (modified)**")


def test_unreadable_infotext_leaves_controls_alone(harness):
    values = paste(harness.script.infotext_fields, {"QSilk": "v=99; preset=Balanced"})
    assert values[0] is True and values[1:] == [None] * (len(PARAMS) - 1)


def test_send_to_img2img_carries_every_control(harness):
    """"Send to img2img" copies fields whose target name is in the script's paste_field_names."""
    fields = harness.script.infotext_fields
    names = harness.script.paste_field_names
    carried = [component for component, target in fields if target in names]
    assert carried == harness.components
    assert names[0] == "QSilk" and len(set(names)) == len(names)
    # the names are plain strings to the WebUI (dict keys, comparisons) and parsers when called
    assert {str(t): 1 for _, t in fields}.keys() == set(names)


def test_notes_and_settings_in_infotext_never_break_the_line_format(harness, webui):
    processed = harness.txt2img([{"preset": "Paper (literal)"}], **SMALL)
    params = parse_infotext(processed.infotexts[0])
    assert params["QSilk"] == "v=1; preset=Paper (literal)"
    assert set(params) >= {"Steps", "Sampler", "Seed", "QSilk"}


# -- settings page -------------------------------------------------------------------------------
def test_settings_page_options_and_defaults(webui):
    opts = webui.opts
    assert common.ui_defaults(opts) == (True, "Balanced")  # before the page registered its options
    opts.data[common.OPT_DEFAULT_PRESET] = "Gentle"  # a value saved in config.json
    opts.data[common.OPT_ENABLED_BY_DEFAULT] = False
    assert common.ui_defaults(opts) == (False, "Gentle")
    webui.script_callbacks.ui_settings_callback()  # nothing registered yet: no script loaded
    h = d.Harness(str(ROOT), webui)
    webui.script_callbacks.ui_settings_callback()
    for key in (common.OPT_ENABLED_BY_DEFAULT, common.OPT_DEFAULT_PRESET, common.OPT_CONSOLE_SUMMARY):
        info = opts.data_labels[key]
        assert info.section == ("qsilk", "QSilk")
    assert opts.data_labels[common.OPT_CONSOLE_SUMMARY].default is True
    assert opts.data_labels[common.OPT_DEFAULT_PRESET].component_args == {"choices": list(PRESETS)}
    assert h.defaults[:2] == [False, "Gentle"]
    assert h.defaults == Settings.from_preset("Gentle", enabled=False).to_args()
    # API requests that omit QSilk's args run with those defaults: off, nothing installed
    processed = h.txt2img(**SMALL)
    assert "QSilk" not in processed.infotexts[0]
    # a request naming another preset gets that preset's values (not the default preset's)
    processed = h.txt2img([True, "Crisp"], **SMALL)
    assert parse_infotext(processed.infotexts[0])["QSilk"] == "v=1; preset=Crisp"


def test_unknown_saved_default_preset_falls_back(webui):
    webui.opts.data[common.OPT_DEFAULT_PRESET] = "Removed preset"
    assert common.ui_defaults(webui.opts) == (True, "Balanced")


# -- XYZ plot ------------------------------------------------------------------------------------
def test_xyz_axes_added_once_for_every_parameter(harness, webui):
    xyz = webui.xyz_module
    labels = [o.label for o in xyz.axis_options if o.label.startswith("[QSilk]")]
    expected = [common.axis_label(p) for p in PARAMS if p.group != "debug"]
    assert labels == expected
    webui.script_callbacks.before_ui_callback()  # on_before_ui runs later: no duplicates
    assert [o.label for o in xyz.axis_options if o.label.startswith("[QSilk]")] == expected


def test_xyz_confirm_names_the_field_and_range(harness, webui):
    option = next(o for o in webui.xyz_module.axis_options if o.label == "[QSilk] Tile size")
    p = d.StableDiffusionProcessingTxt2Img()
    option.confirm(p, [16, 64])
    with pytest.raises(ValueError, match=r"QSilk: tile must be 4\.\.256 \(got 300\)"):
        option.confirm(p, [16, 300])
    choice = next(o for o in webui.xyz_module.axis_options if o.label == "[QSilk] Preset")
    assert choice.choices() == list(PRESETS)
    with pytest.raises(ValueError, match="preset must be one of"):
        choice.confirm(p, ["Balanced", "Nope"])


def test_xyz_cells_get_their_own_values_and_off_cells_no_key(harness, webui):
    p = d.StableDiffusionProcessingTxt2Img(scripts=harness.runner, script_args=harness.script_args(), **SMALL)
    cells = d.run_xyz_cells(p, "[QSilk] Tile size", ["16", "48"])
    assert [parse_infotext(c.infotexts[0])["QSilk"] for c in cells] == ["v=1; preset=Balanced; tile=16",
                                                                       "v=1; preset=Balanced; tile=48"]
    assert "qsilk_overrides" not in p.__dict__  # the parent p is untouched
    cells = d.run_xyz_cells(p, "[QSilk] Enabled", ["True", "False"])
    assert "QSilk" in parse_infotext(cells[0].infotexts[0])
    assert "QSilk" not in parse_infotext(cells[1].infotexts[0])  # shared extra_generation_params dict
    cells = d.run_xyz_cells(p, "[QSilk] Preset", ["Gentle", "Crisp"])
    assert [parse_infotext(c.infotexts[0])["QSilk"] for c in cells] == ["v=1; preset=Gentle", "v=1; preset=Crisp"]


def test_two_axes_on_one_cell_combine_without_touching_shared_state(harness, webui):
    p = d.StableDiffusionProcessingTxt2Img()
    tile = next(o for o in webui.xyz_module.axis_options if o.label == "[QSilk] Tile size")
    preset = next(o for o in webui.xyz_module.axis_options if o.label == "[QSilk] Preset")
    import copy
    cell = copy.copy(p)
    preset.apply(cell, "Crisp", ["Crisp"])
    first = cell.qsilk_overrides
    tile.apply(cell, 24, [24])
    assert first == {"preset": "Crisp"} and cell.qsilk_overrides == {"preset": "Crisp", "tile": 24}
    assert "qsilk_overrides" not in p.__dict__
    settings = common.apply_overrides(Settings.from_preset("Balanced"), cell.qsilk_overrides)
    assert settings == Settings.from_preset("Crisp", tile=24)


# -- API argument shapes -------------------------------------------------------------------------
def test_api_dict_in_first_position_wins_over_trailing_defaults():
    defaults = Settings.from_preset("Balanced").to_args()
    s = common.settings_from_script_args([{"preset": "Gentle", "tile": 40}] + defaults[1:], "Balanced")
    assert s == Settings.from_preset("Gentle", tile=40)


def test_ui_values_win_over_the_api_short_form(harness, webui):
    """In the UI, Gentle chosen and then AQClip switched on gives Balanced's values under the name
    Gentle. A UI request (``p.is_api`` False) must run with AQClip; only an API request reads such a
    list as the short form ``[true, "Gentle"]`` (the trailing values are the UI defaults)."""
    values = Settings.from_preset("Gentle", aqclip_enabled=True).to_args()
    ui = d.StableDiffusionProcessingTxt2Img(scripts=harness.runner, script_args=harness.script_args(values), **SMALL)
    ui.is_api = False
    ran = Settings.from_infotext(parse_infotext(d.process_images(ui).infotexts[0])["QSilk"])
    assert (ran.preset, ran.aqclip_enabled) == ("Gentle", True)
    api = d.StableDiffusionProcessingTxt2Img(scripts=harness.runner, script_args=harness.script_args(values), **SMALL)
    ran = Settings.from_infotext(parse_infotext(d.process_images(api).infotexts[0])["QSilk"])
    assert ran == Settings.from_preset("Gentle")


def test_api_dict_elsewhere_is_an_error():
    with pytest.raises(ValueError, match="argument dict must be the first"):
        common.settings_from_script_args([True, {"tile": 40}], "Balanced")


def test_two_api_dicts_fail_the_job_saying_how_to_send_one(harness, webui):
    """The WebUI pads the request's args with the ui() defaults, never dicts: a second dict is the
    client's, and dropping it silently would run without the preset it names."""
    with pytest.raises(ValueError) as info:
        harness.txt2img([{"enabled": True}, {"preset": "Gentle"}], **SMALL)
    assert ('QSilk: send one argument dict, e.g. [{"enabled": true, "preset": "Gentle"}] — got 2 dicts'
            in str(info.value))
    assert webui.log["evaluations"] == 0  # nothing ran without QSilk either
    assert common.job_of(harness.last_p) is None
    # the one dict it asks for, padded with the ui() defaults like every API request, runs
    processed = harness.txt2img([{"enabled": True, "preset": "Gentle"}], **SMALL)
    assert parse_infotext(processed.infotexts[0])["QSilk"] == "v=1; preset=Gentle"


# -- show maps -----------------------------------------------------------------------------------
def test_map_images_are_greyscale_at_output_size():
    maps = {"confidence": torch.linspace(0, 1, 16).reshape(1, 1, 4, 4), "bad": "not a tensor"}
    images = common.map_images(maps, (64, 32))
    assert [name for name, _ in images] == ["confidence"]
    img = images[0][1]
    assert img.size == (64, 32) and img.mode == "RGB"
    px = img.getpixel((0, 0)), img.getpixel((63, 31))
    assert px[0] == (0, 0, 0) and px[1] == (255, 255, 255)


def test_each_job_prints_its_summary_line_unless_the_settings_page_says_not(harness, webui, capsys):
    harness.txt2img([{"preset": "Balanced"}], **SMALL)
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("QSilk (")]
    assert len(printed) == 1 and printed[0].startswith("QSilk (a1111): 1 pass(es), 2 evaluation(s) stabilised: "
                                                       "2 attention map(s), 0 Lite fallback(s); ")
    webui.opts.data[common.OPT_CONSOLE_SUMMARY] = False
    harness.txt2img([{"preset": "Balanced"}], **SMALL)
    assert not [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("QSilk (")]


def test_the_low_bit_line_follows_the_checkpoint_selector_created_after_the_panel(webui, monkeypatch):
    """A1111 1.10 builds the txt2img/img2img tabs, then the settings (with the checkpoint selector,
    ``setting_sd_model_checkpoint``): the script connects its low-bit line when that selector is
    created; panels built later (the API's throwaway builds) are not connected."""
    import gradio as gr
    with gr.Blocks() as blocks:
        harness = d.Harness(str(ROOT), webui)  # builds the panel (ui()) like the WebUI does
        line = harness.module._MODEL_FOLLOW.pending[-1][0].quant_line
        selector = gr.Dropdown(choices=["a.safetensors", "b.safetensors"], value="a.safetensors",
                               elem_id="setting_sd_model_checkpoint")
        webui.script_callbacks.after_component_callback(selector, elem_id=selector.elem_id)
    follow = harness.module._MODEL_FOLLOW
    assert follow.done and follow.pending == []
    fns = list(blocks.fns.values()) if isinstance(blocks.fns, dict) else list(blocks.fns)
    wired = [(fn, dep) for fn, dep in zip(fns, blocks.dependencies)
             if dep["outputs"] == [line._id] and selector._id in [t if isinstance(t, int) else t[0]
                                                                   for t in dep["targets"]]]
    assert len(wired) == 1
    handler = wired[0][0].fn
    text = handler("b.safetensors", wait_s=0.0)  # no model of that name loads here: answers at once
    assert isinstance(text, str) and text
