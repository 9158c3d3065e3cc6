"""``qsilk compare`` end to end on the built-in model, and the command dispatcher."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from PIL import Image

from qsilk import cli
from qsilk.demo import render
from qsilk.demo.progress import Progress


def run_compare(tmp_path: Path, *args: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    code = cli.main(["compare", "--out", str(out), "--no-progress", *args])
    return code, out


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default comparison (Off vs Balanced, default sampler/steps/CFG) at 256×256 on 4 seeds."""
    tmp = tmp_path_factory.mktemp("default")
    code, out = run_compare(tmp, "--size", "256x256", "--seeds", "1-4")
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def test_compare_writes_grid_maps_and_metrics(default_run):
    out, table = default_run
    for name in ("grid.png", "maps.png", "metrics.json", "metrics.md"):
        assert (out / name).stat().st_size > 0
    assert [v["label"] for v in table["variants"]] == ["Off", "Balanced"]
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG" and grid.mode == "RGB"
        assert grid.width > 4 * 256 and grid.height > 4 * 256  # 4 columns (2 images + 2 crops), 4 seed rows
    md = (out / "metrics.md").read_text(encoding="utf-8")
    assert "| latent_tail_share_3 |" in md and "Balanced" in md and "Lite fallbacks" in md


def test_with_qsilk_differs_from_without_and_reduces_latent_tails(default_run):
    _, table = default_run
    off, bal = (v["mean"] for v in table["variants"])
    per_seed_off, per_seed_bal = (v["per_seed"] for v in table["variants"])
    assert per_seed_off["latent_max_abs_z"] != per_seed_bal["latent_max_abs_z"]
    # the direction, not a number: QSilk shrinks the final latent's tails on the default model
    assert bal["latent_tail_share_3"] < off["latent_tail_share_3"]
    assert bal["latent_max_abs_z"] < off["latent_max_abs_z"]
    assert bal["latent_kurtosis"] < off["latent_kurtosis"]
    report = table["variants"][1]["report"]
    assert report["evaluations"] == table["config"]["steps"] and report["lite_fallbacks"] > 0
    assert table["variants"][0]["report"] == {"enabled": False}


def test_sweep_over_a_parameter_adds_an_off_column_and_one_per_value(tmp_path):
    code, out = run_compare(tmp_path, "--size", "128x128", "--seeds", "1", "--steps", "3",
                            "--set", "tile=8,16", "--sampler", "DPM++ 2M", "--save-images")
    assert code == 0
    table = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [v["label"] for v in table["variants"]] == ["Off", "Balanced tile=8", "Balanced tile=16"]
    assert table["variants"][1]["settings"] == "v=1; preset=Balanced; tile=8"
    assert table["config"]["sampler"] == "dpmpp_2m"
    assert len(list((out / "images").glob("*.png"))) == 3


@pytest.mark.parametrize("sampler", ["euler_a", "ddim"])
def test_presets_columns_and_other_samplers(tmp_path, sampler):
    code, out = run_compare(tmp_path, "--size", "64x64", "--seeds", "2", "--steps", "3",
                            "--presets", "Off,Gentle,Balanced", "--sampler", sampler, "--cfg", "5")
    assert code == 0
    table = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [v["label"] for v in table["variants"]] == ["Off", "Gentle", "Balanced"]
    assert table["variants"][1]["report"]["evaluations"] == 3


def test_bad_arguments_give_a_one_line_error_naming_the_option(tmp_path, capsys):
    assert run_compare(tmp_path, "--presets", "Off,Nope")[0] == 2
    assert "preset must be one of" in capsys.readouterr().err
    assert run_compare(tmp_path, "--size", "100x64")[0] == 2
    assert "--size" in capsys.readouterr().err
    assert run_compare(tmp_path, "--set", "tile=2")[0] == 2
    assert "tile must be 4..256" in capsys.readouterr().err
    assert run_compare(tmp_path, "--sampler", "heun")[0] == 2
    assert "--sampler" in capsys.readouterr().err
    assert run_compare(tmp_path, "--model", str(tmp_path / "missing.safetensors"))[0] == 2
    assert "no such file" in capsys.readouterr().err


def test_top_level_help_lists_commands_and_unknown_commands_fail(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "compare" in text and "bench" in text
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["nope"])
    assert exc.value.code == 2


def test_bench_dispatches_to_the_benchmark_script_with_its_arguments(tmp_path, monkeypatch):
    script = tmp_path / "bench" / "bench_core.py"
    script.parent.mkdir()
    script.write_text("import json, pathlib\n"
                      "def run(argv):\n"
                      f"    pathlib.Path({str(tmp_path / 'argv.json')!r}).write_text(json.dumps(argv))\n"
                      "    return 3\n", encoding="utf-8")
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)
    assert cli.main(["bench", "--quick", "--reps", "1"]) == 3
    assert json.loads((tmp_path / "argv.json").read_text()) == ["--quick", "--reps", "1"]


@pytest.mark.parametrize("command", cli.COMMANDS, ids=lambda c: c.name)
def test_every_registered_command_loads_and_has_an_entry(command):
    module = cli.load_command(command)
    assert callable(cli._run_function(module)) or (callable(module.add_arguments) and callable(module.run))


def test_bench_outside_a_checkout_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)
    assert cli.main(["bench"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_a_registered_command_runs_with_its_own_parser(tmp_path, monkeypatch, capsys):
    (tmp_path / "hello_cmd.py").write_text(
        "def add_arguments(p):\n    p.add_argument('--name', default='x')\n"
        "def run(args):\n    print('hello', args.name)\n    return 0\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMANDS", list(cli.COMMANDS))
    cli.register(cli.Command("hello", "hello_cmd", "say hello"))
    assert cli.main(["hello", "--name", "qsilk"]) == 0
    assert capsys.readouterr().out.strip() == "hello qsilk"


def test_console_script_and_python_m_entry_points():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("qsilk") == "qsilk.cli:main"
    done = subprocess.run([sys.executable, "-m", "qsilk", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "compare" in done.stdout


def test_png_encoder_round_trips_through_pillow():
    rgb = torch.randint(0, 256, (13, 17, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO(render.encode_png(rgb))
    with Image.open(buf) as img:
        assert img.size == (17, 13)
        assert torch.equal(torch.tensor(list(img.getdata()), dtype=torch.uint8).view(13, 17, 3), rgb)


def test_png_filters_are_chosen_per_row_and_decode_exactly():
    # rows built to favour different filters: constant rows (Up), ramps (Sub), smooth 2-D fields (Paeth/Average)
    y, x = torch.meshgrid(torch.arange(24), torch.arange(30), indexing="ij")
    ramp = (x * 7 % 256).to(torch.uint8)
    smooth = ((x * x + 3 * y * y) // 5 % 256).to(torch.uint8)
    img = torch.stack([ramp, smooth, (ramp // 2 + smooth // 2)], dim=-1)
    img[10:14] = img[9]  # repeated rows
    filters = set(render._filter_rows(img.reshape(24, 90))[:, 0].tolist())
    assert len(filters) >= 3 and filters <= {0, 1, 2, 3, 4}
    with Image.open(io.BytesIO(render.encode_png(img))) as decoded:
        assert torch.equal(torch.tensor(list(decoded.getdata()), dtype=torch.uint8).view(24, 30, 3), img)


def test_text_is_drawn_inside_the_canvas_only():
    canvas = torch.full((20, 40, 3), 255, dtype=torch.uint8)
    render.draw_text(canvas, "QSILK 1.0", 2, 2, scale=1)
    inked = (canvas != 255).any(-1)
    assert inked.any() and not inked[:, 2 + 9 * render.GLYPH_W:].any()
    render.draw_text(canvas, "ZZZZZZZZZZZZ", 15, 30, scale=2)  # runs off the edge: clipped, no error


def test_progress_bar_redraws_on_a_terminal_and_prints_deciles_elsewhere():
    log = io.StringIO()
    bar = Progress(20, "run", stream=log)
    for _ in range(20):
        bar.update()
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("run |") and "20/20" in lines[-1]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = Progress(5, "tty", stream=tty)
    for _ in range(5):
        bar.update()
    bar.close()
    assert tty.getvalue().startswith("\r") and tty.getvalue().endswith("5/5 00:00<00:00\n")
    silent = io.StringIO()
    Progress(3, stream=silent, enabled=False).update(3)
    assert silent.getvalue() == ""
