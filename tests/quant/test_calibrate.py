"""Calibration: paired least squares (planted and real low-bit storage) and the coarse-to-fine search."""
from __future__ import annotations

import json

import pytest
import torch

from qsilk.quant import calibrate as cal
from qsilk.quant import search as srch
from qsilk.quant.precondition import QSched

from conftest import eps_denoiser, fp8_storage, group4_storage

SIGMAS = [14.6, 7.0, 3.2, 1.4, 0.6, 0.25, 0.1, 0.0]
SHAPE = (4, 12, 12)
CALIB = [cal.Job("", s) for s in range(4)]
HELD_OUT = [cal.Job("", s) for s in range(100, 104)]


def _targets(ref_net, low_net, sampler="euler"):
    ref = cal.Target(eps_denoiser(ref_net), SHAPE, SIGMAS, sampler)
    return ref, cal.Target(eps_denoiser(low_net), SHAPE, SIGMAS, sampler)


def test_fit_step_recovers_planted_pair_exactly():
    g = torch.Generator().manual_seed(0)
    dq, sx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    a, b = 1.0734, -0.0412
    got = cal.fit_step(dq, sx, a * dq.double() + b * sx.double())
    assert got == pytest.approx((a, b), abs=1e-12)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "lcm"])
def test_fit_paired_recovers_planted_per_step_coefficients(tiny_net, sampler):
    """A 'low-bit' model whose error is exactly D16 = a(σ)·Dq + b(σ)·x: the fit finds a, b per step."""
    planted = {s: (1.0 + 0.05 * i, 0.02 * (i % 3) - 0.02) for i, s in enumerate(SIGMAS[:-1])}
    ref_d = eps_denoiser(tiny_net)

    def low_d(x, sigma, prompts=None):
        a, b = planted[sigma]
        return ((ref_d(x, sigma).double() - b * x.double()) / a).float()

    ref = cal.Target(ref_d, SHAPE, SIGMAS, sampler)
    low = cal.Target(low_d, SHAPE, SIGMAS, sampler)
    fit = cal.fit_paired(ref, low, CALIB, ridge=0.0, smooth=0)
    for sigma, a, b in zip(fit.sigmas, fit.a, fit.b):
        assert (a, b) == pytest.approx(planted[sigma], abs=2e-5)
    assert max(fit.error_after) < 1e-5 < min(fit.error_before)


def _held_out(ref, low, **fit_kw):
    fit = cal.fit_paired(ref, low, CALIB, **fit_kw)
    cs = cal.paired_coefficients(fit, {})
    pre = QSched("file", cs.c_x, cs.c_f, knots=cs.sigmas)
    before, after = cal.trajectory_error(ref, low, HELD_OUT), cal.trajectory_error(ref, low, HELD_OUT, pre)
    print(f"held-out final-latent RMS vs 16-bit: {before:.5f} -> {after:.5f} ({1 - after / before:+.2%})")
    return before, after


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "lcm"])
def test_paired_fit_reduces_held_out_error_of_4bit_storage(tiny_net, sampler):
    """Real rounding (4-bit absmax groups, written in conftest): weight-only rounding error is mostly
    uncorrelated with D and x, so the 2-scalar correction can only remove a small part of it."""
    before, after = _held_out(*_targets(tiny_net, group4_storage(tiny_net), sampler), smooth=0)
    assert after < before


def test_paired_fit_removes_most_of_a_systematic_shrink(tiny_net):
    """A quantizer that clips its scale (percentile-style) shrinks the output: a correlated error."""
    before, after = _held_out(*_targets(tiny_net, group4_storage(tiny_net, clip=0.7)), smooth=0)
    assert after < 0.95 * before


def test_paired_fit_on_fp8_storage_does_not_make_things_worse(tiny_net):
    before, after = _held_out(*_targets(tiny_net, fp8_storage(tiny_net)), smooth=1)
    assert after <= before * 1.001


def test_paired_file_carries_sixteen_bit_corridor_per_sigma(tiny_net):
    ref, low = _targets(tiny_net, group4_storage(tiny_net))
    fit = cal.fit_paired(ref, low, CALIB, smooth=0, q_lo=0.01, q_hi=0.99)
    record = []
    cal.run(ref, CALIB, record=record)
    sigma, _, d16 = record[2]
    expected_hi = torch.quantile(d16.flatten(1), 0.99, dim=1).mean()
    assert fit.sigmas[2] == sigma
    torch.testing.assert_close(fit.clamp_hi[2], expected_hi.float())
    cs = cal.paired_coefficients(fit, {"model_hash": "x"})
    assert cs.sigmas.tolist() == sorted(cs.sigmas.tolist()) and cs.clamp_lo is not None
    assert cs.metadata["method"] == "paired" and float(cs.metadata["fit_error_after"]) > 0


def test_smoothing_is_a_weighted_average_with_edges_kept():
    v = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0])
    out = cal.smooth_steps(v, 1)
    assert out.tolist() == pytest.approx([1.0, 1.25, 1.5, 1.25, 1.0])
    assert cal.smooth_steps(torch.tensor([3.0, 3.0, 3.0]), 5).tolist() == [3.0, 3.0, 3.0]


# -- search -----------------------------------------------------------------------------------
def _synthetic(optimum, calls=None, noise=0.0):
    """Peaked score per 'sample' with sample-dependent offsets (common random numbers cancel them)."""
    def evaluate(c_x, c_f):
        if calls is not None:
            calls.append((c_x, c_f))
        base = -((c_x - optimum[0]) ** 2 + 2 * (c_f - optimum[1]) ** 2)
        return [base + 0.3 * j + noise * ((j * 7919 + int(c_x * 1e4)) % 13 - 6) / 6 for j in range(6)]
    return evaluate


def test_search_finds_planted_optimum_and_always_evaluates_identity():
    calls = []
    res = srch.search(_synthetic((0.925, 1.05), calls), half_width=0.1, points=5, levels=3)
    assert calls[0] == (1.0, 1.0)
    assert res.best == pytest.approx((0.925, 1.05), abs=1e-9)
    assert res.significant and res.gain > 0 and res.baseline_score < res.best_score


def test_search_is_repeatable_and_resumes_from_its_log(tmp_path):
    log_path = tmp_path / "s.jsonl"
    first = srch.search(_synthetic((1.03, 0.96)), levels=2, log=srch.SearchLog(log_path, {"k": 1}))
    again = srch.search(_synthetic((1.03, 0.96)), levels=2)
    assert (first.best, first.best_score, first.evaluated) == (again.best, again.best_score, again.evaluated)
    calls = []
    resumed = srch.search(_synthetic((1.03, 0.96), calls), levels=2, log=srch.SearchLog(log_path, {"k": 1}))
    assert calls == [] and resumed.best == first.best
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert lines[0]["type"] == "config" and lines[-1]["type"] == "result"
    assert sum(rec["type"] == "candidate" for rec in lines) == len(first.evaluated)
    with pytest.raises(ValueError, match="belongs to another calibration.*k"):
        srch.SearchLog(log_path, {"k": 2})


def test_search_reports_no_gain_when_nothing_beats_identity():
    res = srch.search(lambda c_x, c_f: [0.0, 0.1, 0.2], points=3, levels=1)
    assert res.best == (1.0, 1.0) and not res.significant and res.gain == 0
    noisy = srch.search(_synthetic((1.0, 1.0), noise=1.0), points=3, levels=1)
    assert noisy.best == (1.0, 1.0) or not noisy.significant


def test_search_on_a_real_sampler_uses_common_random_numbers(tiny_net):
    """Same candidate, same seeds → bit-identical latents (euler_a draws fresh noise every step)."""
    ref, low = _targets(tiny_net, group4_storage(tiny_net), "euler_a")
    pre = QSched("ramp", 0.95, 1.02)
    a, b = cal.run(low, CALIB, pre=pre), cal.run(low, CALIB[::-1], pre=pre)
    assert torch.equal(a, b.flip(0))
    assert not torch.equal(a, cal.run(low, CALIB))


def test_ramp_knots_reproduce_the_ramp_at_the_calibration_sigmas():
    cs = srch.ramp_knots(0.9, 1.1, SIGMAS)
    n = len(SIGMAS) - 1
    expected = [0.9 + 0.1 * i / (n - 1) for i in range(n)]
    assert cs.c_x.flip(0).tolist() == pytest.approx(expected)
    assert cs.sigmas.flip(0).tolist() == pytest.approx(SIGMAS[:-1])


def test_progress_bar_reaches_total(capsys):
    import io
    buf = io.StringIO()
    p = srch.Progress(4, "x", stream=buf)
    for _ in range(5):
        p.advance()
    assert "4/4" in buf.getvalue()
