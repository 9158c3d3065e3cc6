"""Smoke test of the benchmark's code paths at tiny sizes (no timing assertions: timings belong
in `bench/`, never in unit tests)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_core  # noqa: E402
from bench.paper_alg1 import aqclip_lite_literal, qsilk_literal  # noqa: E402
from bench.sd_unet import SD15, SDXL, TINY, UNetModel, dummy_inputs  # noqa: E402
from qsilk import find_probe_layer  # noqa: E402
from qsilk.probe import probe_layer_factor  # noqa: E402


def test_unet_ratios_tiny_runs_and_probe_makes_maps():
    r = bench_core.measure_unet_ratios(TINY, latent_hw=(12, 20), reps=1, warmup=0, unet_kind="local")
    assert r["probe_failures"] == [] and r["attn_report"]["attn_maps"] == 1 and r["attn_report"]["lite_fallbacks"] == 0
    assert r["probe_layer"] == "output_blocks.3.1.transformer_blocks.0.attn1" and r["probe_factor"] == 1
    assert r["lite_report"] == {"evaluations": 1, "errors": 0, "nan_passthrough": 0}
    assert all(v > 0 for v in r["wall"]["median_s"].values())
    assert r["wall"]["post_cfg_ratio"] > 0 and r["wall"]["probe_ratio"] > r["wall"]["probe_only_ratio"] > 0
    assert set(r["cpu"]) >= {"median_s", "min_s", "post_cfg_ratio", "post_cfg_ratio_best"}


def test_core_vs_literal_tiny_runs():
    (r,) = bench_core.measure_core_vs_literal((32,), reps=1, warmup=0)
    assert r["latent"] == [32, 32] and r["wall"]["speedup_qsilk"] > 0 and r["cpu"]["speedup_paper_best"] > 0


def test_run_quick_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "core.json"
    assert bench_core.run(["--quick", "--reps", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"machine", "a", "b", "c"} <= set(data) and data["quick"] is True
    text = capsys.readouterr().out
    assert "(a)" in text and "(b)" in text and "(c)" in text
    if not torch.cuda.is_available():
        assert "skipped" in data["c"] and "skipped" in text


def test_local_unet_has_sd_sizes_and_probe_layers():
    for cfg, params, layer, factor in ((SD15, 859_520_964, "output_blocks.11.1.transformer_blocks.0.attn1", 1),
                                       (SDXL, 2_567_463_684, "output_blocks.5.1.transformer_blocks.1.attn1", 2)):
        with torch.device("meta"):
            unet = UNetModel(cfg)
        assert sum(p.numel() for p in unet.parameters()) == params  # the published SD1.5 / SDXL UNet sizes
        name, _ = find_probe_layer(unet)
        assert name == layer and probe_layer_factor(unet, name) == factor


def test_local_unet_odd_latent_forward():
    unet = UNetModel(TINY).eval()
    x, t, c, y = dummy_inputs(TINY, 2, (15, 9))
    with torch.no_grad():
        assert unet(x, t, c, y).shape == (2, 4, 15, 9)


def test_literal_reference_behaves_like_algorithm_1():
    x = torch.randn(2, 4, 64, 64) * 2
    x[0, 0, 10, 10] = 40.0
    q = qsilk_literal(x)
    lo, hi = torch.quantile(x[1].flatten(), 0.001), torch.quantile(x[1].flatten(), 0.999)
    assert torch.equal(q[1], x[1].clamp(lo, hi)) and q[0, 0, 10, 10] < 40.0
    y = aqclip_lite_literal(q)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # a constant sample: every tile has σ = 0, so U' = m = the constant
    const = torch.full((1, 4, 64, 64), 0.25)
    torch.testing.assert_close(aqclip_lite_literal(const), const)

