"""Diagnostics (CSV, PNG, statistics) and scorers (heuristic, paired, specs, optional adapters)."""
from __future__ import annotations

import csv
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qsilk.quant import calibrate as cal
from qsilk.quant import scorers as sc
from qsilk.quant.diagnose import COLUMNS, diagnose, latent_stats, plot_png, write_csv

from conftest import eps_denoiser, group4_storage

SIGMAS = [14.6, 3.2, 0.6, 0.1, 0.0]


def test_latent_stats_against_known_distributions():
    g = torch.Generator().manual_seed(0)
    lap = torch.distributions.Laplace(0.0, 1.0).sample((1, 4, 128, 128))
    s = latent_stats(lap)
    assert s["d_kurtosis"] == pytest.approx(3.0, abs=0.4)  # Laplace: excess kurtosis 3
    gauss = latent_stats(2 * torch.randn(1, 4, 128, 128, generator=g))
    assert gauss["d_std"] == pytest.approx(2.0, rel=0.02) and gauss["d_kurtosis"] == pytest.approx(0, abs=0.1)
    assert s["d_q999_q50"] > gauss["d_q999_q50"]


def test_diagnose_rows_csv_and_png(tiny_net, tmp_path):
    ref = cal.Target(eps_denoiser(tiny_net), (4, 8, 8), SIGMAS)
    low = cal.Target(eps_denoiser(group4_storage(tiny_net)), (4, 8, 8), SIGMAS)
    jobs = [cal.Job("", s) for s in (1, 2)]
    parts = {"16-bit": lambda x, s, p: (ref.denoise(x, s), 0.5 * ref.denoise(x, s))}
    rows = diagnose([("16-bit", ref, None), ("low", low, None)], jobs, cond_uncond=parts)
    assert len(rows) == 2 * (len(SIGMAS) - 1)
    ref_rows, low_rows = rows[:4], rows[4:]
    assert all(r["d_rms_vs_16bit"] == 0 for r in ref_rows) and all(r["d_rms_vs_16bit"] > 0 for r in low_rows)
    assert all(0 < r["clamped_share"] < 0.01 for r in ref_rows)  # ~q_lo + q_hi tails of itself
    assert all(r["cond_uncond"] == pytest.approx(1.0) for r in ref_rows) and low_rows[0]["cond_uncond"] == ""
    path = write_csv(rows, tmp_path / "d.csv")
    with path.open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == len(rows)
    png = plot_png(rows, tmp_path / "d.png")
    with Image.open(png) as im:
        assert im.size[0] > 600 and len(set(im.convert("RGB").getdata())) > 5


def _images(seed=0, blur=False):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(2, 3, 32, 32, generator=g) * 0.5 + 0.25
    if blur:
        img = F.avg_pool2d(F.pad(img, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    return img


def test_heuristic_prefers_detail_and_punishes_clipping():
    h = sc.get_scorer("heuristic")
    assert h.weak and h.needs_images
    sharp, blurred = _images(), _images(blur=True)
    s_sharp = h(sc.Batch(torch.zeros(2, 4, 4, 4), sharp, ["", ""]))
    s_blur = h(sc.Batch(torch.zeros(2, 4, 4, 4), blurred, ["", ""]))
    assert (s_sharp > s_blur).all()
    clipped = sharp.clone()
    clipped[:, :, :16] = 1.0
    assert (h(sc.Batch(torch.zeros(2, 4, 4, 4), clipped, ["", ""])) < s_sharp).all()


def test_paired_scorer_and_linear_specs():
    lat = torch.zeros(2, 4, 4, 4)
    ref = torch.ones(2, 4, 4, 4)
    ref[1] *= 2
    p = sc.get_scorer("paired")
    assert p(sc.Batch(lat, None, ["", ""], ref)).tolist() == [-1.0, -2.0]
    with pytest.raises(ValueError, match="needs a 16-bit reference"):
        p(sc.Batch(lat, None, ["", ""]))
    combo = sc.get_scorer("paired+2*heuristic")
    images = _images()
    expected = p(sc.Batch(lat, images, ["", ""], ref)) + 2 * sc.get_scorer("heuristic")(sc.Batch(lat, images, ["", ""]))
    torch.testing.assert_close(combo(sc.Batch(lat, images, ["", ""], ref)), expected)
    assert combo.needs_reference and combo.needs_images and not combo.weak
    assert sc.parse_spec("jaq") == [(1.0, "clip"), (2.0, "hpsv2")]
    for bad in ("nope", "2*", "clip-hpsv2"):
        with pytest.raises(ValueError):
            sc.get_scorer(bad)


@pytest.mark.skipif(importlib.util.find_spec("hpsv2") is not None, reason="hpsv2 installed here")
def test_adapters_without_packages_or_weights_say_what_is_missing(monkeypatch):
    monkeypatch.delenv("QSILK_HPS_CHECKPOINT", raising=False)
    with pytest.raises(sc.ScorerUnavailable, match="hpsv2"):
        sc.get_scorer("hpsv2")
    monkeypatch.setenv("QSILK_CLIP_MODEL", "/nonexistent/clip")
    with pytest.raises(sc.ScorerUnavailable, match="transformers|no local CLIP weights"):
        sc.get_scorer("clip")
    with pytest.raises(sc.ScorerUnavailable):
        sc.get_scorer("jaq")


def test_register_a_custom_scorer():
    sc.register("mean_luma", lambda: sc.Scorer("mean_luma", lambda b: b.images.mean(dim=(1, 2, 3))))
    try:
        s = sc.get_scorer("mean_luma")
        assert s(sc.Batch(torch.zeros(1, 4, 2, 2), torch.full((1, 3, 2, 2), 0.25), [""])).tolist() == [0.25]
    finally:
        sc.BUILTIN.pop("mean_luma")
    with pytest.raises(ValueError, match="scorer name"):
        sc.register("Bad Name", lambda: None)
