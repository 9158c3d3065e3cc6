"""One parameter table (`PARAMS`), presets, infotext, API dict and positional args."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qsilk.settings import (DEFAULT_PRESET, INFOTEXT_KEY, INFOTEXT_VERSION, MODEL_PARAMS, PARAM_BY_NAME, PARAMS,
                            PRESET_PARAMS, PRESETS, PRESETS_FILE, Settings, SettingsError, load_presets)

PRESET_NAMES = list(PRESETS)


# --- strategies: any valid value of any parameter, from the table itself ------------------------

def value_strategy(p):
    if p.kind == "bool":
        return st.booleans()
    if p.kind == "choice":
        return st.sampled_from(p.choices)
    if p.kind == "int":
        return st.integers(int(p.minimum), int(p.maximum))
    if p.kind == "float":
        return st.floats(p.minimum, p.maximum, allow_nan=False, allow_infinity=False)
    if p.pattern:
        return st.one_of(st.just(""), st.from_regex(p.pattern, fullmatch=True).filter(lambda s: ".." not in s))
    return st.text(max_size=10)


TUNABLE = [PARAM_BY_NAME[n] for n in PRESET_PARAMS + MODEL_PARAMS]


@st.composite
def valid_settings(draw):
    preset = draw(st.sampled_from(PRESET_NAMES))
    chosen = draw(st.lists(st.sampled_from(TUNABLE), max_size=8, unique_by=lambda p: p.name))
    overrides = {p.name: draw(value_strategy(p)) for p in chosen}
    try:
        return Settings.from_preset(preset, **overrides)
    except SettingsError:  # a cross-field rule (q_lo < q_hi, …): not a valid combination
        assume(False)


def infotext_fields(value: str) -> dict[str, str]:
    return dict(part.strip().split("=", 1) for part in value.split(";"))


# --- presets ---------------------------------------------------------------------------------------

def test_presets_file_names_every_required_preset():
    assert {"Off", "Gentle", "Balanced", "Crisp", "High-res", "Paper (literal)"} <= set(PRESETS)
    assert DEFAULT_PRESET == "Balanced"
    assert PARAM_BY_NAME["preset"].choices == tuple(PRESETS)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_complete_and_valid(name):
    raw = json.loads(PRESETS_FILE.read_text(encoding="utf-8"))[name]
    assert isinstance(raw["version"], int) and raw["version"] >= 1
    assert set(raw["values"]) == set(PRESET_PARAMS)
    for key, value in raw["values"].items():
        assert PARAM_BY_NAME[key].coerce(value) == value, key
    s = Settings.from_preset(name)
    assert s.preset == name and s.enabled is True
    assert {k: getattr(s, k) for k in PRESET_PARAMS} == PRESETS[name]
    assert s.overrides() == {}


def test_preset_contents_follow_spec_section_6():
    assert not PRESETS["Off"]["qsilk_enabled"] and not PRESETS["Off"]["aqclip_enabled"]
    assert PRESETS["Gentle"]["qsilk_enabled"] and not PRESETS["Gentle"]["aqclip_enabled"]
    b = PRESETS["Balanced"]
    assert (b["qsilk_shape"], b["qsilk_placement"], b["aqclip_variant"], b["aqclip_mode"], b["aqclip_shape"],
            b["sigma_floor"]) == ("hard", "per_step", "qsilk", "attn", "soft", 1.0)
    crisp = PRESETS["Crisp"]
    assert crisp["p_narrow"] >= b["p_narrow"] and crisp["p_wide"] >= b["p_wide"]  # narrower corridors
    assert PRESETS["High-res"]["tile"] > b["tile"]
    p = PRESETS["Paper (literal)"]
    assert (p["aqclip_variant"], p["aqclip_shape"], p["aqclip_alpha"], p["qsilk_per_channel"],
            p["qsilk_placement"], p["aqclip_placement"]) == ("paper", "tanh", 2.0, False, "per_pass", "per_pass")


def test_load_presets_rejects_unknown_and_missing_keys(tmp_path):
    raw = json.loads(PRESETS_FILE.read_text(encoding="utf-8"))
    bad = {"Mine": {"version": 1, "values": {**raw["Balanced"]["values"], "tiel": 32}}}
    (tmp_path / "p.json").write_text(json.dumps(bad))
    with pytest.raises(SettingsError, match="tiel"):
        load_presets(tmp_path / "p.json")
    values = dict(raw["Balanced"]["values"])
    del values["stride"]
    (tmp_path / "p.json").write_text(json.dumps({"Mine": {"version": 1, "values": values}}))
    with pytest.raises(SettingsError, match="stride"):
        load_presets(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps(
        {"Mine": {"version": 1, "values": {**raw["Balanced"]["values"], "tile": 1000}}}))
    with pytest.raises(SettingsError, match=r"tile.*4\.\.256"):
        load_presets(tmp_path / "p.json")


# --- infotext --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRESET_NAMES)
def test_infotext_round_trip_every_preset(name):
    s = Settings.from_preset(name)
    text = s.to_infotext()
    assert text == f"v={INFOTEXT_VERSION}; preset={name}"  # nothing beyond the preset
    assert Settings.from_infotext(text) == s


@given(valid_settings())
@settings(max_examples=150, deadline=None)
def test_infotext_round_trip_random_overrides(s):
    text = s.to_infotext()
    back = Settings.from_infotext(text)
    assert back == s.replace(enabled=True, show_maps=False)


@given(valid_settings())
@settings(max_examples=150, deadline=None)
def test_infotext_writes_only_non_defaults_beyond_the_preset(s):
    fields = infotext_fields(s.to_infotext())
    assert fields.pop("v") == str(INFOTEXT_VERSION) and fields.pop("preset") == s.preset
    base = PRESETS[s.preset]
    expected = {PARAM_BY_NAME[k].infotext for k in PRESET_PARAMS if getattr(s, k) != base[k]}
    expected |= {PARAM_BY_NAME[k].infotext for k in MODEL_PARAMS if getattr(s, k) != PARAM_BY_NAME[k].default}
    assert set(fields) == expected


@given(valid_settings())
@settings(max_examples=150, deadline=None)
def test_infotext_value_never_quoted_by_a1111(s):
    """A1111's infotext writer quotes a value containing ',', ':', '"' or a newline; ours has none."""
    text = s.to_infotext()
    assert not set(text) & {",", ":", '"', "\n"}


BLOCK = ("a lighthouse at dusk, highly detailed\n"
         "Negative prompt: blurry, lowres\n"
         "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 832x1216, "
         "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, {qsilk}Version: v1.10.1")


def test_whole_infotext_block_with_qsilk_key():
    block = BLOCK.format(qsilk=f"{INFOTEXT_KEY}: v=1; preset=Crisp; tile=48; end=0.8, ")
    s = Settings.from_infotext(block)
    assert s == Settings.from_preset("Crisp", tile=48, step_end=0.8)
    quoted = BLOCK.format(qsilk=f'{INFOTEXT_KEY}: "v=1; preset=High-res", ')  # a quoting writer
    assert Settings.from_infotext(quoted) == Settings.from_preset("High-res")
    last = BLOCK.replace(", {qsilk}Version: v1.10.1", ", QSilk: v=1; preset=Gentle")
    assert Settings.from_infotext(last) == Settings.from_preset("Gentle")


def test_whole_infotext_block_without_qsilk_key_is_disabled():
    s = Settings.from_infotext(BLOCK.format(qsilk=""))
    assert s.enabled is False
    # the word in the prompt is not the parameter
    prompt_mentions_it = BLOCK.format(qsilk="").replace("a lighthouse", "QSilk: a lighthouse")
    assert Settings.from_infotext(prompt_mentions_it).enabled is False
    assert Settings.from_infotext("").enabled is False


@pytest.mark.parametrize("text,field,allowed", [
    ("v=1; preset=Balanced; tile=999", "tile", "4..256"),
    ("v=1; preset=Balanced; qlo=0.5", "q_lo", "0..0.05"),
    ("v=1; preset=Balanced; aqmode=magic", "aqclip_mode", "'attn', 'lite'"),
    ("v=1; preset=Balanced; qs=maybe", "qsilk_enabled", "true or false"),
    ("v=1; preset=Nope", "preset", "'Balanced'"),
    ("v=1; preset=Balanced; beta=nan", "ema_beta", "0..0.99"),
])
def test_pasted_infotext_bad_value_names_field_and_range(text, field, allowed):
    with pytest.raises(SettingsError) as err:
        Settings.from_infotext(BLOCK.format(qsilk=f"QSilk: {text}, "))
    assert field in str(err.value) and allowed in str(err.value)


def test_pasted_infotext_bad_structure_errors():
    with pytest.raises(SettingsError, match="wat"):
        Settings.from_infotext("v=1; preset=Balanced; wat=1")
    with pytest.raises(SettingsError, match="key=value"):
        Settings.from_infotext("v=1; preset=Balanced; tile")
    with pytest.raises(SettingsError, match="newer"):
        Settings.from_infotext(f"v={INFOTEXT_VERSION + 1}; preset=Balanced")
    with pytest.raises(SettingsError, match=r"\bv\b"):
        Settings.from_infotext("v=one; preset=Balanced")
    with pytest.raises(SettingsError, match="p_wide must be at most p_narrow"):
        Settings.from_infotext("v=1; preset=Balanced; pw=0.05; pn=0.01")


# --- API dict and positional args ------------------------------------------------------------------

@pytest.mark.parametrize("data,field,allowed", [
    ({"tile": 1000}, "tile", "4..256"),
    ({"tile": 32.5}, "tile", "4..256"),
    ({"p_wide": 0.5}, "p_wide", "1e-06..0.1"),
    ({"aqclip_variant": "literal"}, "aqclip_variant", "'qsilk', 'paper'"),
    ({"enabled": "yes please"}, "enabled", "true or false"),
    ({"step_end": float("inf")}, "step_end", "0..1"),
    ({"preset": "Ultra"}, "preset", "'Paper (literal)'"),
    ({"qsched_file": "../etc/passwd"}, "qsched_file", "no , : ; = /"),
])
def test_api_out_of_range_names_field_and_range(data, field, allowed):
    with pytest.raises(SettingsError) as err:
        Settings.from_api(data)
    assert field in str(err.value) and allowed in str(err.value)


def test_api_unknown_key_names_it_and_the_known_fields():
    with pytest.raises(SettingsError) as err:
        Settings.from_api({"enabled": True, "tiles": 48})
    msg = str(err.value)
    assert "'tiles'" in msg and "tile" in msg.split("known:")[1]
    with pytest.raises(SettingsError, match="dict or a list"):
        Settings.from_api(["tile", 48])


def test_api_dict_fills_from_named_preset():
    assert Settings.from_api({"preset": "Crisp", "tile": 48}) == Settings.from_preset("Crisp", tile=48)
    assert Settings.from_api({}) == Settings.from_preset(DEFAULT_PRESET)
    assert Settings.from_args([{"enabled": False}]) == Settings.from_preset(DEFAULT_PRESET, enabled=False)


def _reads_as_short_api_list(s) -> bool:
    """With ``short_form=True`` (API requests), `from_args` reads a full positional list naming
    preset X ≠ Balanced whose values all equal Balanced's as the short form ``[true, "X"]`` (A1111
    fills the missing args with the UI defaults), so such a list means X's values."""
    base = PRESETS[DEFAULT_PRESET]
    return s.preset != DEFAULT_PRESET and all(getattr(s, k) == base[k] for k in PRESET_PARAMS)


@given(valid_settings())
@settings(max_examples=100, deadline=None)
def test_api_and_positional_round_trip(s):
    assert Settings.from_api(s.to_api()) == s
    assert s.to_args() == [getattr(s, p.name) for p in PARAMS]  # positional order = PARAMS order
    if not _reads_as_short_api_list(s):
        assert Settings.from_args(s.to_args()) == s
    assert Settings.from_args(s.to_args(), short_form=False) == s  # UI lists: always as given


def test_ui_list_naming_a_preset_with_balanced_values_is_taken_as_given():
    """Gentle chosen in the UI, then AQClip switched on: every value equals Balanced's, but the
    user's list must win (the short API form must not turn AQClip back off)."""
    s = Settings.from_preset("Gentle", aqclip_enabled=True)
    assert s.overrides() and all(getattr(s, k) == PRESETS[DEFAULT_PRESET][k] for k in PRESET_PARAMS)
    assert Settings.from_args(s.to_args(), short_form=False).aqclip_enabled is True
    assert Settings.from_args(s.to_args(), short_form=True).aqclip_enabled is False  # the API short form


def test_positional_args_follow_params_order():
    args = Settings.from_preset("Balanced").to_args()
    names = [p.name for p in PARAMS]
    args[names.index("tile")] = 48
    args[names.index("stride")] = 24
    s = Settings.from_args(args)
    assert (s.tile, s.stride, s.preset) == (48, 24, "Balanced")


def test_from_args_short_list_gives_named_preset():
    assert Settings.from_args([True, "Crisp"]) == Settings.from_preset("Crisp")
    assert Settings.from_args([False, "High-res"]) == Settings.from_preset("High-res", enabled=False)
    assert Settings.from_args([True]) == Settings.from_preset(DEFAULT_PRESET)


def test_settings_frozen_and_validated_on_construction():
    s = Settings.from_preset()
    with pytest.raises(Exception):
        s.tile = 48  # frozen
    with pytest.raises(SettingsError, match="tile"):
        s.replace(tile=3)
    with pytest.raises(SettingsError, match="p_wide must be at most p_narrow"):
        s.replace(p_wide=0.05, p_narrow=0.01)
    with pytest.raises(SettingsError, match="aqclip_alpha must be in 0.1..4"):
        s.replace(aqclip_shape="tanh", aqclip_alpha=8.0)


def test_param_table_is_complete():
    names = [p.name for p in PARAMS]
    assert len(names) == len(set(names))
    keys = [p.infotext for p in PARAMS if p.infotext]
    assert len(keys) == len(set(keys)) and "v" not in keys and "preset" in keys
    for p in PARAMS:
        assert p.label and p.help and p.group
        assert re.fullmatch(r"[a-z][a-z0-9_]*", p.name)
        assert not p.infotext or re.fullmatch(r"[a-z][a-z0-9]*", p.infotext)
        assert p.coerce(p.default) == p.default
        if p.kind in ("int", "float"):
            assert p.minimum <= p.default <= p.maximum and p.step and p.step > 0
        if p.kind == "choice":
            assert p.default in p.choices
