"""Weight-free metrics against independent oracles on synthetic images (NumPy, closed forms)."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qsilk.cli import CommandError
from qsilk.demo import metrics as M
from qsilk.settings import SettingsError

LUMA = np.array([0.299, 0.587, 0.114])


def grey(values: np.ndarray) -> torch.Tensor:
    """(B, H, W) luma values → (B, 3, H, W) grey RGB (luma = value exactly)."""
    return torch.from_numpy(np.repeat(values[:, None], 3, axis=1))


def np_luma(img: torch.Tensor) -> np.ndarray:
    return np.einsum("c,bchw->bhw", LUMA, img.numpy().astype(np.float64))


def test_flat_image_scores_zero_everywhere():
    img = torch.full((2, 3, 32, 32), 0.5)
    assert M.hf_energy(img).tolist() == [0.0, 0.0]
    assert M.laplacian_variance(img).tolist() == [0.0, 0.0]
    assert M.periodic_index(img).tolist() == [0.0, 0.0]
    assert M.saturation_share(img).tolist() == [0.0, 0.0]


def test_checkerboard_laplacian_variance_is_64_a_squared():
    # f = 0.5 + a·(−1)^(i+j): every neighbour is −(f−0.5), so L = −8·a·(−1)^(i+j), Var(L) = 64a².
    a = 0.2
    i, j = np.meshgrid(np.arange(16), np.arange(20), indexing="ij")
    img = grey((0.5 + a * (-1.0) ** (i + j))[None])
    assert M.laplacian_variance(img).item() == pytest.approx(64 * a * a, rel=1e-12)
    assert M.hf_energy(img).item() == pytest.approx(1.0)  # all energy at (½, ½) cycles/px


@pytest.mark.parametrize("cycles_per_px,expected", [(2 / 64, 0.0), (26 / 64, 1.0)])  # whole cycles: no leakage
def test_sinusoid_hf_energy_is_zero_below_and_one_above_the_cutoff(cycles_per_px, expected):
    x = np.arange(64)
    row = 0.5 + 0.3 * np.cos(2 * math.pi * cycles_per_px * x)
    img = grey(np.tile(row, (64, 1))[None])
    assert M.hf_energy(img).item() == pytest.approx(expected, abs=1e-9)


def test_hf_energy_matches_numpy_fft_oracle():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.random((3, 3, 24, 40)))
    y = np_luma(img)
    y = y - y.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(y)) ** 2
    fy, fx = np.fft.fftfreq(24), np.fft.fftfreq(40)
    high = np.hypot(fy[:, None], fx[None, :]) > 0.25
    expected = (power * high).sum(axis=(1, 2)) / power.sum(axis=(1, 2))
    np.testing.assert_allclose(M.hf_energy(img).numpy(), expected, rtol=1e-10)


def test_periodic_index_high_for_a_grid_low_for_noise_and_smooth_images():
    i, j = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    grid = 0.5 + 0.2 * np.cos(2 * math.pi * i / 8) + 0.2 * np.cos(2 * math.pi * j / 8)  # an 8-px grid
    rng = np.random.default_rng(1)
    noise = 0.5 + 0.1 * rng.standard_normal((96, 96))
    smooth = 0.5 + 0.3 * np.exp(-((i - 40) ** 2 + (j - 50) ** 2) / (2 * 15 ** 2))
    scores = M.periodic_index(grey(np.stack([grid, noise, smooth]))).tolist()
    assert scores[0] > 0.9
    assert scores[1] < 0.02 and scores[2] < 0.02


def test_periodic_index_rises_when_tile_seams_are_added_to_noise():
    rng = np.random.default_rng(2)
    i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    noise = 0.5 + 0.1 * rng.standard_normal((64, 64))
    seams = noise + 0.15 * ((i % 16 == 0) | (j % 16 == 0))  # visible 1-px tile seams every 16 px
    clean, seamed = M.periodic_index(grey(np.stack([noise, seams]))).tolist()
    # the seams carry ~20 % of the energy, spread over many harmonics; noise alone has no peak
    assert clean < 1e-3 and seamed > 0.01


def test_saturation_share_counts_pixels_with_any_clipped_channel():
    img = torch.full((1, 3, 10, 10), 0.5)
    img[0, 0, 0, :4] = 1.0  # 4 pixels clipped high in red
    img[0, 2, 5, :3] = 0.0  # 3 pixels clipped low in blue
    img[0, 1, 5, 0] = 1.0  # same pixel as one above: still one pixel
    img[0, 1, 9, 9] = 0.99  # not clipped
    assert M.saturation_share(img).item() == pytest.approx(7 / 100)


def test_robust_z_matches_numpy_median_and_iqr():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 9, 7)) * np.array([1.0, 3.0])[:, None, None, None] + 2.0
    got = M.robust_z(torch.from_numpy(x)).numpy()
    flat = x.reshape(2, -1)
    q1, q3 = np.percentile(flat, [25, 75], axis=1)
    expected = (flat - np.median(flat, axis=1, keepdims=True)) / ((q3 - q1) / 1.349)[:, None]
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    np.testing.assert_allclose(M.max_abs_z(torch.from_numpy(x)).numpy(), np.abs(expected).max(1), rtol=1e-10)


def test_tail_share_and_kurtosis_on_gaussian_and_planted_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 256, 256, generator=g, dtype=torch.float64)
    assert M.tail_share(x, 3.0).item() == pytest.approx(0.0027, abs=0.0004)
    assert M.kurtosis(x).item() == pytest.approx(3.0, abs=0.05)
    spiked = x.clone().flatten()
    spiked[:1000] = 50.0  # 1000 planted outliers: tail share rises by their share, kurtosis explodes
    spiked = spiked.view_as(x)
    assert M.tail_share(spiked, 3.0).item() == pytest.approx(M.tail_share(x, 3.0).item() + 1000 / x.numel(), abs=2e-4)
    assert M.kurtosis(spiked).item() > 20


@settings(max_examples=30, deadline=None)
@given(st.floats(0.1, 10.0), st.floats(-5.0, 5.0))
def test_latent_tail_metrics_are_invariant_to_affine_rescaling(scale, shift):
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = x * scale + shift
    # a value within rounding of |z| = 3 may flip: allow one value either way
    assert M.tail_share(y, 3.0).item() == pytest.approx(M.tail_share(x, 3.0).item(), abs=1.5 / x.numel())
    assert M.kurtosis(y).item() == pytest.approx(M.kurtosis(x).item(), rel=1e-9)
    assert M.max_abs_z(y).item() == pytest.approx(M.max_abs_z(x).item(), rel=1e-9)


def test_evaluate_returns_one_float_per_sample_per_metric():
    img = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    lat = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    table = M.evaluate(M.builtin_metrics(3.0), img, lat)
    assert set(table) == {m.name for m in M.builtin_metrics(3.0)}
    assert all(len(v) == 3 and all(isinstance(f, float) for f in v) for v in table.values())


def test_registered_learned_metric_is_loaded_by_name(monkeypatch):
    monkeypatch.setitem(M.LEARNED, "mean_red", lambda options: M.Metric(
        "mean_red", lambda i, l, c: i[:, 0].flatten(1).mean(1).double(), "mean red", "higher"))
    metric = M.load_learned_metric("mean_red")
    img = torch.zeros(2, 3, 4, 4)
    img[1, 0] = 1.0
    assert M.evaluate([metric], img, torch.zeros(2, 4, 1, 1)) == {"mean_red": [0.0, 1.0]}


def test_unknown_metric_and_missing_package_fail_with_clear_messages(monkeypatch):
    with pytest.raises(SettingsError, match="unknown metric 'nope'"):
        M.load_learned_metric("nope")
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips → ImportError
    with pytest.raises(CommandError, match="pip install lpips"):
        M.load_learned_metric("lpips")
    with pytest.raises(CommandError, match="--clip-model"):
        M.load_learned_metric("clip_score")


def test_ring_medians_match_numpy_median_per_ring():
    rng = np.random.default_rng(4)
    values = rng.random((3, 50))
    ring = rng.integers(0, 7, 50)
    ring[ring == 5] = 4  # ring 5 empty → 0
    got = M._ring_medians(torch.from_numpy(values), torch.from_numpy(ring)).numpy()
    for k in range(7):
        expected = np.median(values[:, ring == k], axis=1) if (ring == k).any() else np.zeros(3)
        np.testing.assert_allclose(got[:, k], expected, rtol=1e-12)
