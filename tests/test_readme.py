"""The README's generated sections match what `qsilk.docs` generates from the parameter table."""
from __future__ import annotations

import pytest

from qsilk.docs import GENERATED_SECTIONS, README, readme_section, section_markdown, update_readme
from qsilk.settings import PARAMS, PRESETS


@pytest.mark.parametrize("name", GENERATED_SECTIONS)
def test_readme_generated_section_up_to_date(name):
    current = readme_section(README.read_text(encoding="utf-8"), name)
    assert current is not None, f"README lacks the <!-- section:{name} --> markers"
    assert current == section_markdown(name), (
        f"README section {name!r} is stale: run `python -m qsilk.docs` and commit README.md")


def test_parameter_table_lists_every_parameter_and_preset():
    controls = section_markdown("controls")
    for p in PARAMS:
        assert f"| `{p.name}` |" in controls
    presets = section_markdown("presets")
    for name in PRESETS:
        assert f" {name} |" in presets


def test_update_readme_touches_only_generated_sections(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- section:controls -->\nold\n<!-- /section:controls -->\n"
                      "<!-- section:cost -->\nkeep me\n<!-- /section:cost -->\n"
                      "<!-- section:presets -->\nold\n<!-- /section:presets -->\nend\n", encoding="utf-8")
    assert update_readme(readme) is True
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("end\n") and "keep me" in text and "\nold\n" not in text
    assert readme_section(text, "controls") == section_markdown("controls")
    assert update_readme(readme) is False
