"""`python -m qsilk calibrate` / `diagnose` end to end on the built-in analytic model (tiny sizes)."""
from __future__ import annotations

import json

import pytest
import torch

from qsilk import quant
from qsilk.cli import main
from qsilk.quant import coeffs as cf
from qsilk.settings import Settings

SMALL = ["--size", "64x64", "--steps", "3", "--seeds", "1-2", "--no-progress"]


def test_calibrate_paired_writes_a_file_the_factory_accepts(tmp_path, capsys):
    d = tmp_path / "QSilk"
    assert main(["calibrate", "paired", "--out", "analytic nf4", "--coeff-dir", str(d), "--holdout-seeds", "7",
                 *SMALL]) == 0
    summary = json.loads(capsys.readouterr().out)
    cs = cf.load(d / "analytic nf4.safetensors")
    assert cs.metadata["method"] == "paired" and cs.metadata["storage"] == "nf4" and cs.has_thresholds
    assert len(cs.sigmas) == 3 and summary["holdout_final_rms_before"] > 0
    info = quant.ModelInfo(model_hash=cs.metadata["model_hash"], storage="nf4", coeff_dir=str(d), steps=3,
                           sampler="euler")
    notes = []
    s = Settings(qsched="file", qsched_file="analytic nf4", qsched_thresholds=True)
    pre = quant.make_preconditioner(s, info, notes.append)
    assert pre is not None and pre.thresholds is not None and notes == []


def test_calibrate_search_logs_baseline_and_resumes(tmp_path, capsys):
    d = tmp_path / "QSilk"
    argv = ["calibrate", "search", "--out", "s", "--coeff-dir", str(d), "--points", "2", "--levels", "1",
            "--half-width", "0.05", "--keep-best", "--sampler", "lcm", *SMALL]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the weak-scorer note
    lines = (d / "s.jsonl").read_text().splitlines()
    assert first["candidates"] == 5 and "baseline_score" in first
    assert main(argv) == 0  # resumed: no new candidate lines, same winner
    again = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    new = (d / "s.jsonl").read_text().splitlines()[len(lines):]
    assert again["best"] == first["best"] and all(json.loads(x)["type"] == "result" for x in new)
    if first["file"]:
        meta = cf.load(d / "s.safetensors").metadata
        assert meta["method"] == "search" and "baseline_score" in meta and meta["scorer"] == "heuristic"


def test_diagnose_writes_csv_and_png(tmp_path, capsys):
    assert main(["diagnose", "--out", str(tmp_path), "--lowbit", "fp8-e4m3fn", *SMALL]) == 0
    text = (tmp_path / "diagnose.csv").read_text().splitlines()
    assert text[0].startswith("run,step,sigma") and len(text) == 1 + 2 * 3
    assert (tmp_path / "diagnose.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,msg", [
    (["calibrate", "paired", "--out", "a,b"], "--out"),
    (["calibrate", "search", "--out", "x", "--scorer", "nope"], "unknown scorer"),
    (["diagnose", "--coeffs", "missing"], "not found"),
])
def test_bad_arguments_fail_with_one_line(argv, msg, tmp_path, capsys):
    assert main([*argv, "--coeff-dir", str(tmp_path), *SMALL]) == 2
    assert msg in capsys.readouterr().err
