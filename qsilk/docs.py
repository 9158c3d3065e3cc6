"""The README's parameter and preset tables, generated from `PARAMS` and the presets file.

``python -m qsilk.docs`` rewrites the README's ``controls`` and ``presets`` sections; a test fails
when they are stale, so the README never disagrees with `qsilk/settings.py`.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from .settings import INFOTEXT_KEY, PARAMS, PRESET_PARAMS, PRESETS, Param, _fmt

README = Path(__file__).resolve().parent.parent / "README.md"

_GROUP_TITLES = {
    "main": "Main", "qsilk": "Micro-clamp (QSilk)", "aqclip": "AQClip", "schedule": "Where it runs",
    "probe": "Attention-entropy probe", "quant": "Low-bit models (model-specific, never in a preset)",
    "debug": "Diagnostics",
}


def _cell(text: str) -> str:
    """Markdown table cell: pipes escaped, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _value(v) -> str:
    """A default or preset value as the API takes it: ``true``, ``32``, ``0.001``, ``"soft"``.

    >>> _value(True), _value(32), _value(0.0005), _value("soft"), _value("")
    ('`true`', '`32`', '`0.0005`', '`"soft"`', '`""`')
    """
    if isinstance(v, str):
        return f'`"{v}"`'
    return f"`{_fmt(v)}`"


def _allowed(p: Param) -> str:
    """The range or choices of a parameter, as in its error messages.

    >>> from qsilk.settings import PARAM_BY_NAME
    >>> _allowed(PARAM_BY_NAME["tile"]), _allowed(PARAM_BY_NAME["qsilk_shape"])
    ('4 … 256, step 1', '`hard`, `soft`, `tanh`')
    """
    if p.kind == "choice":
        return ", ".join(f"`{c}`" for c in p.choices)
    if p.kind in ("int", "float"):
        return f"{_fmt(p.minimum)} … {_fmt(p.maximum)}, step {_fmt(p.step)}"
    return p.allowed()


def parameter_table_markdown() -> str:
    """Every parameter, grouped as in the UI: API key, label, default, range, infotext key, help."""
    out = []
    for group in dict.fromkeys(p.group for p in PARAMS):
        out += [f"#### {_GROUP_TITLES.get(group, group)}", "",
                "| API key | UI label | default | allowed | infotext | what it does |",
                "| --- | --- | --- | --- | --- | --- |"]
        for p in (p for p in PARAMS if p.group == group):
            infotext = f"`{p.infotext}`" if p.infotext else "—"
            out.append(f"| `{p.name}` | {_cell(p.label)} | {_value(p.default)} | {_cell(_allowed(p))} "
                       f"| {infotext} | {_cell(p.help)} |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def presets_table_markdown() -> str:
    """Every preset side by side: the parameters on which presets differ, then the shared values."""
    names = list(PRESETS)
    differ = [k for k in PRESET_PARAMS if len({repr(PRESETS[n][k]) for n in names}) > 1]
    same = [k for k in PRESET_PARAMS if k not in differ]
    out = ["| API key | " + " | ".join(_cell(n) for n in names) + " |",
           "| --- |" + " --- |" * len(names)]
    for k in differ:
        out.append(f"| `{k}` | " + " | ".join(_value(PRESETS[n][k]) for n in names) + " |")
    out += ["", "Same in every preset: " + ", ".join(f"`{k}` = {_value(PRESETS[names[0]][k])}" for k in same) + "."]
    return "\n".join(out)


def section_markdown(name: str) -> str:
    """The full body of the README section `name` (``controls`` or ``presets``)."""
    if name == "controls":
        return "\n".join([
            "## Controls", "",
            "*Generated from `qsilk/settings.py` by `python -m qsilk.docs`; do not edit by hand.* "
            "The UI shows the controls in this order; the HTTP API takes the API keys (or the values "
            f"positionally in this order); infotext writes `{INFOTEXT_KEY}: v=1; preset=…` plus the "
            "short keys of values that differ from the preset.", "",
            parameter_table_markdown()])
    if name == "presets":
        return "\n".join([
            "## Presets", "",
            "*Generated from `qsilk/presets.json` by `python -m qsilk.docs`.* Every preset is a complete, "
            "versioned parameter set; choosing one fills every control, and infotext records the preset "
            "name plus any value changed after choosing it.", "",
            presets_table_markdown()])
    raise KeyError(f"no generated README section {name!r}")


GENERATED_SECTIONS = ("controls", "presets")


def _section_re(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- section:{name} -->\n)(.*?)(\n<!-- /section:{name} -->)", re.S)


def readme_section(text: str, name: str) -> str | None:
    """The current body of section `name` in README `text`, or None if the markers are missing."""
    m = _section_re(name).search(text)
    return m.group(2) if m else None


def update_readme(path: Path = README) -> bool:
    """Rewrite the generated sections of the README at `path`; True if anything changed."""
    text = original = path.read_text(encoding="utf-8")
    for name in GENERATED_SECTIONS:
        body = section_markdown(name)
        text = _section_re(name).sub(lambda m: m.group(1) + body + m.group(3), text)
    if text != original:
        path.write_text(text, encoding="utf-8")
    return text != original


if __name__ == "__main__":  # python -m qsilk.docs [README path]
    changed = update_readme(Path(sys.argv[1]) if len(sys.argv) > 1 else README)
    print("README updated" if changed else "README already up to date")
