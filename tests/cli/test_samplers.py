"""Samplers against closed-form answers, and the DDIM ε path against the x0 path."""
from __future__ import annotations

import math

import pytest
import torch

from qsilk.demo.analytic import AnalyticModel
from qsilk.demo.run import GuidedDenoiser, JobSpec, initial_noise, run_job
from qsilk.demo.samplers import (ancestral_split, ddim_timesteps, karras_sigmas, sample_ddim, sample_dpmpp_2m,
                                 sample_euler, sample_euler_ancestral, scaled_linear_alphas_cumprod,
                                 sigmas_from_alphas_cumprod)
from qsilk.settings import Settings
from qsilk.stabilizer import Stabilizer

MU, S = 0.7, 0.5  # one Gaussian data set N(μ, s²) per value


def gaussian_denoiser(x, sigma, i):
    """Exact E[x0 | x] for x0 ~ N(μ, s²), x = x0 + σε: μ + s²/(s²+σ²)·(x − μ)."""
    return MU + S * S / (S * S + sigma * sigma) * (x - MU)


def ode_solution(x_start, sigma_start):
    """The probability-flow ODE keeps (x − μ)/√(s²+σ²) constant: x(0) = μ + (x_T − μ)·s/√(s²+σ_T²)."""
    return MU + (x_start - MU) * S / math.sqrt(S * S + sigma_start ** 2)


def test_karras_sigmas_follow_eq5_and_end_at_zero():
    sig = karras_sigmas(10, 0.03, 14.6, rho=7.0)
    assert len(sig) == 11 and sig[-1] == 0.0
    assert sig[0] == pytest.approx(14.6) and sig[-2] == pytest.approx(0.03)
    assert all(a > b for a, b in zip(sig, sig[1:]))
    ramp = 4 / 9  # i = 4 of n = 10
    expected = (14.6 ** (1 / 7) + ramp * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7
    assert sig[4] == pytest.approx(expected, rel=1e-12)


def test_scaled_linear_schedule_matches_stable_diffusion_sigma_range():
    sig = sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod())
    assert float(sig[0]) == pytest.approx(0.0292, abs=1e-4)  # SD's σ_min and σ_max (k-diffusion's values)
    assert float(sig[-1]) == pytest.approx(14.6146, abs=1e-3)


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_ddim_timesteps_descend_from_999_to_0(steps):
    ts = ddim_timesteps(steps)
    assert len(ts) == steps and ts[0] == 999 and (steps == 1 or ts[-1] == 0)
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_euler_converges_to_the_exact_ode_solution_at_first_order():
    x_t = torch.linspace(-3, 3, 7, dtype=torch.float64) * 10.0
    errors = []
    for n in (10, 40, 160):
        sig = karras_sigmas(n, 0.002, 10.0)
        out = sample_euler(gaussian_denoiser, x_t, sig)
        errors.append(float((out - ode_solution(x_t, 10.0)).abs().max()))
    assert errors[2] < 0.02 * 1.5  # |x_T − μ| up to 31: 1.2 % of the final offset
    assert errors[1] < errors[0] / 3.5 and errors[2] < errors[1] / 3.5  # 4× the steps, ¼ the error


def test_dpmpp_2m_converges_at_second_order():
    x_t = torch.linspace(-3, 3, 7, dtype=torch.float64) * 10.0
    exact = ode_solution(x_t, 10.0)
    errors = []
    for n in (40, 160):
        sig = karras_sigmas(n, 0.002, 10.0)
        errors.append(float((sample_dpmpp_2m(gaussian_denoiser, x_t, sig) - exact).abs().max()))
        err_euler = float((sample_euler(gaussian_denoiser, x_t, sig) - exact).abs().max())
        assert errors[-1] < err_euler / 5
    assert errors[1] < errors[0] / 12  # 4× the steps, ~1/16 the error


def test_ancestral_split_lands_on_the_next_noise_level():
    for sigma, nxt in [(14.6, 9.0), (1.0, 0.5), (0.1, 0.09)]:
        down, up = ancestral_split(sigma, nxt)
        assert down * down + up * up == pytest.approx(nxt * nxt)
        assert 0 <= down <= nxt
    assert ancestral_split(1.0, 0.0) == (0.0, 0.0)


def test_euler_ancestral_samples_the_data_distribution_with_first_order_bias():
    g = torch.Generator().manual_seed(0)
    n = 20000  # std of the std estimate ≈ s/√(2n) = 0.0025
    bias = []
    for steps in (40, 160):
        sig = karras_sigmas(steps, 0.01, 20.0)
        x = torch.randn(n, generator=g, dtype=torch.float64) * sig[0]
        out = sample_euler_ancestral(gaussian_denoiser, x, sig,
                                     noise=lambda i: torch.randn(n, generator=g, dtype=torch.float64))
        assert float(out.mean()) == pytest.approx(MU, abs=0.02)
        bias.append(S - float(out.std()))
    assert abs(bias[1]) < 0.02 and abs(bias[1]) < abs(bias[0]) / 2  # the discretisation's under-dispersion shrinks


def test_ddim_eta0_equals_euler_in_the_ve_frame():
    # DDIM (η = 0) is Euler on the probability-flow ODE in x/√ᾱ and σ = √((1−ᾱ)/ᾱ) (Song et al. 2021 §4.3)
    ac = scaled_linear_alphas_cumprod()
    ts = ddim_timesteps(12)
    x_vp = torch.linspace(-2, 2, 9, dtype=torch.float64)

    def eps_fn(x_t, t, a, i):
        sigma = math.sqrt((1 - a) / a)
        x_ve = x_t / math.sqrt(a)
        return (x_ve - gaussian_denoiser(x_ve, sigma, i)) / sigma

    ddim = sample_ddim(eps_fn, x_vp, ac, ts)
    sig = [float(sigmas_from_alphas_cumprod(ac)[t]) for t in ts] + [0.0]
    euler = sample_euler(gaussian_denoiser, x_vp / math.sqrt(float(ac[ts[0]])), sig)
    torch.testing.assert_close(ddim, euler, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("preset", ["Gentle", "Balanced"])
def test_ddim_through_post_cfg_eps_equals_euler_through_post_cfg(preset):
    """The stabilizer's ε path (Stabilizer.post_cfg_eps) gives DDIM exactly the x0 that post_cfg gives Euler."""
    model = AnalyticModel.procedural((16, 16), per_class=3)
    cond, uncond = model.encode_prompts(["discs", "stripes"])
    ac = model.alphas_cumprod
    ts = ddim_timesteps(8)
    sig = [float(sigmas_from_alphas_cumprod(ac)[t]) for t in ts] + [0.0]
    noise = initial_noise([3, 4], (4, 16, 16))
    runs = {}
    for kind in ("eps", "x0"):
        stab = Stabilizer(Settings.from_preset(preset))
        stab.begin_pass()
        guided = GuidedDenoiser(model, cond, uncond, 8.0, len(ts), stab)
        if kind == "eps":
            runs[kind] = sample_ddim(guided.eps, noise * math.sqrt(1 - float(ac[ts[0]])), ac, ts)
        else:
            runs[kind] = sample_euler(guided.x0, noise * sig[0], sig)
        assert stab.report()["evaluations"] == len(ts)
    torch.testing.assert_close(runs["eps"], runs["x0"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_every_sampler_calls_the_stabilizer_once_per_evaluation_and_pre_decode(sampler):
    model = AnalyticModel.procedural((16, 16), per_class=2)
    spec = JobSpec(sampler=sampler, steps=5, cfg=6.0, seeds=(1, 2, 3), batch_size=2, latent_hw=(16, 16))
    res = run_job(model, Settings.from_preset("Balanced", pre_decode="always"), spec)
    rep = res.report
    assert rep["passes"] == 2  # one sampler invocation per batch chunk (2 + 1 seeds)
    assert rep["evaluations"] == 2 * 5  # post-CFG: every evaluation of every pass
    assert rep["pre_decodes"] == 2  # before each decode
    assert res.latents.shape == (3, 4, 16, 16) and res.images.shape == (3, 3, 128, 128)
    assert torch.isfinite(res.latents).all()


def test_seed_results_do_not_depend_on_batch_composition():
    model = AnalyticModel.procedural((16, 16), per_class=2)
    together = run_job(model, None, JobSpec(sampler="euler_a", steps=4, seeds=(5, 6), batch_size=2, latent_hw=(16, 16)))
    alone = run_job(model, None, JobSpec(sampler="euler_a", steps=4, seeds=(6,), prompts=("stripes",),
                                         batch_size=1, latent_hw=(16, 16)))
    torch.testing.assert_close(together.latents[1:], alone.latents, rtol=1e-5, atol=1e-5)


def test_off_means_off_no_hook_and_identical_output():
    model = AnalyticModel.procedural((16, 16), per_class=2)
    spec = JobSpec(sampler="dpmpp_2m", steps=4, seeds=(1, 2), latent_hw=(16, 16))
    none = run_job(model, None, spec)
    off = run_job(model, Settings.from_preset("Off"), spec)
    disabled = run_job(model, Settings.from_preset("Balanced", enabled=False), spec)
    assert torch.equal(none.latents, off.latents) and torch.equal(none.latents, disabled.latents)
    assert off.report == {"enabled": False} and float(off.activity.abs().max()) == 0.0
