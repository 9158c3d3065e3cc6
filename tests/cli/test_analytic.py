"""The built-in model's denoisers against brute-force posterior means (numerical integration)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qsilk.demo.analytic import DECODER_MATRIX, AnalyticModel
from qsilk.settings import SettingsError


def one_dim_model(uncond: str) -> AnalyticModel:
    """Scalar data: components at −1.5, 0.2 (class 0) and 1.0, 2.5, 3.0 (class 1), grain s = 0.4."""
    means = torch.tensor([-1.5, 0.2, 1.0, 2.5, 3.0], dtype=torch.float64).view(5, 1, 1, 1)
    return AnalyticModel(means=means, labels=torch.tensor([0, 0, 1, 1, 1]), s=0.4, uncond=uncond)


def brute_force_mean(prior_pdf, x: float, sigma: float) -> float:
    """E[x0 | x] = ∫ x0 p(x0) N(x; x0, σ²) dx0 / ∫ p(x0) N(x; x0, σ²) dx0 on a fine grid."""
    grid = np.linspace(-30, 30, 600001)
    w = prior_pdf(grid) * np.exp(-0.5 * ((x - grid) / sigma) ** 2)
    return float((grid * w).sum() / w.sum())


def normal_pdf(z, mu, sd):
    return np.exp(-0.5 * ((z - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0, 8.0])
@pytest.mark.parametrize("x", [-2.0, 0.6, 2.7])
def test_conditional_rows_equal_brute_force_posterior_mean(sigma, x):
    model = one_dim_model("mixture")
    mus = model.means.flatten().numpy()
    for cls, idx in ((0, [0, 1]), (1, [2, 3, 4])):
        prior = lambda z: sum(normal_pdf(z, mus[k], model.s) for k in idx) / len(idx)  # noqa: E731
        got = model.denoise(torch.tensor([[[[x]]]], dtype=torch.float64), sigma, torch.tensor([cls]))
        assert got.item() == pytest.approx(brute_force_mean(prior, x, sigma), abs=1e-6)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0, 8.0])
@pytest.mark.parametrize("x", [-2.0, 0.6, 2.7])
def test_unconditional_rows_equal_brute_force_posterior_mean(sigma, x):
    mixture, gaussian = one_dim_model("mixture"), one_dim_model("gaussian")
    mus = mixture.means.flatten().numpy()
    xt = torch.tensor([[[[x]]]], dtype=torch.float64)
    union = lambda z: sum(normal_pdf(z, m, 0.4) for m in mus) / len(mus)  # noqa: E731
    assert mixture.denoise(xt, sigma, torch.tensor([-1])).item() == pytest.approx(
        brute_force_mean(union, x, sigma), abs=1e-6)
    # the Gaussian with the data's mean and variance (between-component variance + s²)
    mean, var = mus.mean(), mus.var() + 0.4 ** 2
    moment_matched = lambda z: normal_pdf(z, mean, math.sqrt(var))  # noqa: E731
    assert gaussian.denoise(xt, sigma, torch.tensor([-1])).item() == pytest.approx(
        brute_force_mean(moment_matched, x, sigma), abs=1e-6)


def test_multidimensional_denoiser_equals_explicit_bayes_sum():
    model = AnalyticModel.procedural((4, 4), per_class=3, s=0.3)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    sigma = 1.3
    got = model.denoise(x, sigma, torch.tensor([1, 0]))
    var = 0.3 ** 2 + sigma ** 2
    for b, cls in enumerate((1, 0)):
        comps = [k for k in range(6) if int(model.labels[k]) == cls]
        logp = torch.stack([-((x[b] - model.means[k]) ** 2).sum() / (2 * var) for k in comps])
        w = torch.softmax(logp, 0)
        expected = sum(w[i] * (model.means[k] + 0.3 ** 2 / var * (x[b] - model.means[k])) for i, k in enumerate(comps))
        torch.testing.assert_close(got[b], expected, rtol=1e-10, atol=1e-10)


def test_denoiser_limits_identity_at_zero_noise_and_prior_mean_at_high_noise():
    model = AnalyticModel.procedural((8, 8), per_class=2)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(model.denoise(x, 1e-6, torch.tensor([0])), x, rtol=0, atol=1e-9)
    far = model.denoise(x * 1e-3, 1e4, torch.tensor([-1]))  # uncond Gaussian → its mean
    torch.testing.assert_close(far.flatten(), model.means.flatten(1).mean(0), rtol=0, atol=1e-4)


def test_procedural_data_set_is_deterministic_and_two_class():
    a = AnalyticModel.procedural((16, 16), per_class=4, data_seed=7)
    b = AnalyticModel.procedural((16, 16), per_class=4, data_seed=7)
    c = AnalyticModel.procedural((16, 16), per_class=4, data_seed=8)
    assert torch.equal(a.means, b.means) and not torch.equal(a.means, c.means)
    assert a.labels.tolist() == [0] * 4 + [1] * 4
    assert a.means.shape == (8, 4, 16, 16)


def test_decoder_is_the_documented_linear_map_then_8x_upsample():
    model = AnalyticModel.procedural((4, 6), per_class=1)
    z = torch.tensor([0.3, -0.2, 0.5, 1.0])
    latent = z.view(1, 4, 1, 1).expand(1, 4, 4, 6)
    rgb = model.decode(latent)
    assert rgb.shape == (1, 3, 32, 48)
    expected = (0.5 + DECODER_MATRIX @ z).clamp(0, 1)
    torch.testing.assert_close(rgb[0, :, 10, 20], expected, rtol=0, atol=1e-5)  # constant field: bicubic is exact


def test_prompts_are_class_names_or_indices_and_bad_ones_are_named():
    model = AnalyticModel.procedural((4, 4), per_class=1)
    cond, uncond = model.encode_prompts(["Discs", "stripes", "1"])
    assert cond.tolist() == [0, 1, 1] and uncond.tolist() == [-1, -1, -1]
    with pytest.raises(SettingsError, match="--prompt.*discs, stripes.*'cats'"):
        model.encode_prompts(["cats"])


def test_high_cfg_produces_overshoot_tails_that_cfg_1_does_not():
    """The reason the default model exists: at high CFG its post-CFG x0 leaves the data's range."""
    model = AnalyticModel.procedural((16, 16), per_class=3)
    cond, uncond = model.encode_prompts(["discs"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * 3.0
    d_u = model.denoise(x, 3.0, uncond)
    d_c = model.denoise(x, 3.0, cond)
    data_max = float(model.means.abs().max())
    assert float((d_u + 1.0 * (d_c - d_u)).abs().max()) < data_max + 1
    assert float((d_u + 10.0 * (d_c - d_u)).abs().max()) > 2 * data_max
