"""Q-Sched pre-conditioning against plainly written Q-Sched updates (quant.md §1.3, §6)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qsilk.quant.precondition import QSched, exact_c_x, interp_log_sigma, precondition, ramp_value, skip_factor

from conftest import TinyEps

SIGMAS = [14.6, 6.0, 2.5, 0.9, 0.3, 0.0]  # decreasing, final 0 (Euler / LCM)
FLOW_SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.1, 0.0]
COEFFS = [(0.92, 1.07), (1.1, 0.95), (0.85, 0.9)]  # (c_x, c_F) per case


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- reference updates, written the way Q-Sched's patched schedulers do them ------------------
def qsched_euler_step(x, eps, sigma, sigma_next, c_x, c_f):
    """Q-Sched Euler (ε, VE): scale x and ε first, then the stock step from the *scaled* sample."""
    x, eps = c_x * x, c_f * eps
    return x + eps * (sigma_next - sigma)


def qsched_euler_a_step(x, eps, sigma, sigma_next, c_x, c_f, z):
    up = min(sigma_next, math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)) if sigma_next else 0.0
    down = math.sqrt(sigma_next ** 2 - up ** 2)
    x, eps = c_x * x, c_f * eps
    return x + eps * (down - sigma) + up * z, down, up


def qsched_lcm_step(x, eps, sigma, sigma_next, c_x, c_f, z):
    x, eps = c_x * x, c_f * eps
    x0 = x - sigma * eps
    return x0 + sigma_next * z


def qsched_flow_euler_step(x, v, sigma, sigma_next, c_x, c_f):
    x, v = c_x * x, c_f * v
    return x + (sigma_next - sigma) * v


# -- the same updates driven by QSilk's hook (D' replaces D, stock sampler) ---------------------
def stock_euler_step(x, d, sigma, sigma_next):
    return x + (sigma_next - sigma) * (x - d) / sigma


def _net():
    return TinyEps(seed=3).double()


@pytest.mark.parametrize("c_x,c_f", COEFFS)
def test_final_euler_step_is_exact_qsched(c_x, c_f):
    net, x = _net(), torch.randn(2, 4, 6, 6, generator=_gen(0), dtype=torch.float64)
    sigma = 0.3
    with torch.no_grad():
        eps = net(x, sigma)
    ref = qsched_euler_step(x, eps, sigma, 0.0, c_x, c_f)
    ours = stock_euler_step(x, precondition(x - sigma * eps, x, c_f, c_x, 1.0), sigma, 0.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("c_x,c_f", COEFFS)
def test_euler_trajectory_matches_qsched_with_exact_c_x(c_x, c_f):
    """Every intermediate step: D-only replacement with c_x' = exact_c_x(c_x, σ, σ') equals Q-Sched."""
    net = _net()
    x_ref = x_ours = torch.randn(1, 4, 6, 6, generator=_gen(1), dtype=torch.float64) * SIGMAS[0]
    for sigma, sigma_next in zip(SIGMAS, SIGMAS[1:]):
        with torch.no_grad():
            eps_ref, eps_ours = net(x_ref, sigma), net(x_ours, sigma)
        x_ref = qsched_euler_step(x_ref, eps_ref, sigma, sigma_next, c_x, c_f)
        d = precondition(x_ours - sigma * eps_ours, x_ours, c_f, exact_c_x(c_x, sigma, sigma_next), 1.0)
        x_ours = stock_euler_step(x_ours, d, sigma, sigma_next)
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("c_x,c_f", COEFFS)
def test_intermediate_euler_step_shrinks_x_deviation_by_one_minus_ratio(c_x, c_f):
    """Without the correction, the hook's step differs from Q-Sched's only in the x coefficient:
    1 − (1 − c_x)(1 − σ'/σ) instead of c_x (quant.md §1.3)."""
    net, x = _net(), torch.randn(1, 4, 6, 6, generator=_gen(2), dtype=torch.float64)
    sigma, sigma_next = 6.0, 2.5
    with torch.no_grad():
        eps = net(x, sigma)
    ours = stock_euler_step(x, precondition(x - sigma * eps, x, c_f, c_x, 1.0), sigma, sigma_next)
    ref = qsched_euler_step(x, eps, sigma, sigma_next, c_x, c_f)
    shrunk = 1 - (1 - c_x) * (1 - sigma_next / sigma)
    torch.testing.assert_close(ours - ref, (shrunk - c_x) * x, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("c_x,c_f", COEFFS)
def test_euler_ancestral_matches_qsched_final_exact_and_with_exact_c_x(c_x, c_f):
    net = _net()
    x_ref = x_ours = torch.randn(1, 4, 6, 6, generator=_gen(3), dtype=torch.float64) * SIGMAS[0]
    for i, (sigma, sigma_next) in enumerate(zip(SIGMAS, SIGMAS[1:])):
        z = torch.randn(1, 4, 6, 6, generator=_gen(100 + i), dtype=torch.float64)
        with torch.no_grad():
            eps_ref, eps_ours = net(x_ref, sigma), net(x_ours, sigma)
        x_ref, down, up = qsched_euler_a_step(x_ref, eps_ref, sigma, sigma_next, c_x, c_f, z)
        cx_eff = c_x if down == 0 else exact_c_x(c_x, sigma, down)  # final step: plain c_x
        d = precondition(x_ours - sigma * eps_ours, x_ours, c_f, cx_eff, 1.0)
        x_ours = stock_euler_step(x_ours, d, sigma, down) + up * z
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("c_x,c_f", COEFFS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_lcm_every_step_is_exact_qsched(c_x, c_f, prediction):
    """LCM consumes only D: D' is Q-Sched at every step (ε and v parametrisations)."""
    net = _net()
    x_ref = x_ours = torch.randn(2, 4, 5, 7, generator=_gen(4), dtype=torch.float64) * SIGMAS[0]
    for i, (sigma, sigma_next) in enumerate(zip(SIGMAS, SIGMAS[1:])):
        z = torch.randn(2, 4, 5, 7, generator=_gen(200 + i), dtype=torch.float64)
        with torch.no_grad():
            f_ref, f_ours = net(x_ref, sigma), net(x_ours, sigma)
        if prediction == "eps":
            x_ref = qsched_lcm_step(x_ref, f_ref, sigma, sigma_next, c_x, c_f, z)
            d = x_ours - sigma * f_ours
        else:  # v: D = c_skip·x + c_out·v (σ_d = 1); Q-Sched scales x and v before this formula
            c_skip, c_out = 1 / (sigma ** 2 + 1), -sigma / math.sqrt(sigma ** 2 + 1)
            x_ref = c_skip * (c_x * x_ref) + c_out * (c_f * f_ref) + sigma_next * z
            d = c_skip * x_ours + c_out * f_ours
        s = skip_factor(torch.tensor(sigma, dtype=torch.float64), prediction).double()
        x_ours = precondition(d, x_ours, c_f, c_x, s) + sigma_next * z
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("c_x,c_f", COEFFS)
def test_flow_euler_final_step_exact_and_corrected_steps_exact(c_x, c_f):
    net = _net()
    x_ref = x_ours = torch.randn(1, 4, 6, 6, generator=_gen(5), dtype=torch.float64)
    for sigma, sigma_next in zip(FLOW_SIGMAS, FLOW_SIGMAS[1:]):
        with torch.no_grad():
            v_ref, v_ours = net(x_ref, sigma), net(x_ours, sigma)
        x_ref = qsched_flow_euler_step(x_ref, v_ref, sigma, sigma_next, c_x, c_f)
        d = x_ours - sigma * v_ours  # flow denoised estimate: x0 = x − σ·v
        cx_eff = c_x if sigma_next == 0 else exact_c_x(c_x, sigma, sigma_next)
        x_ours = stock_euler_step(x_ours, precondition(d, x_ours, c_f, cx_eff, 1.0), sigma, sigma_next)
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-9, atol=1e-9)


def test_skip_factor_matches_v_wrapper_zero_output():
    """s(σ) is what the v wrapper's denoise formula gives for a zero network output, divided by x."""
    sigma = torch.tensor([0.1, 1.0, 7.0])
    for sd in (1.0, 0.5):
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        x = torch.full((3,), 2.0)
        torch.testing.assert_close(skip_factor(sigma, "v", sd), (c_skip * x + 0.0) / x)
    assert torch.equal(skip_factor(sigma, "eps"), torch.ones(3))
    assert torch.equal(skip_factor(sigma, "flow"), torch.ones(3))
    with pytest.raises(ValueError, match="prediction"):
        skip_factor(sigma, "x0")


# -- identities and properties --------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_identity_coefficients_are_bit_identical(seed, dtype):
    g = _gen(seed)
    d = torch.randn(3, 4, 5, 6, generator=g).to(dtype)
    d[0, 0, 0, 0] = -0.0
    x = torch.randn(3, 4, 5, 6, generator=g).to(dtype)
    x[1, 0, 0, 0] = float("nan")
    ones = torch.ones(3)
    out = precondition(d, x, ones, ones, torch.rand(3, generator=g))
    assert out.dtype == dtype and torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                              d.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert precondition(d, x, 1.0, 1.0, 0.5) is d
    q = QSched("file", torch.ones(4), torch.ones(4), knots=torch.tensor([0.1, 1.0, 5.0, 15.0]))
    assert torch.equal(q(d, x, torch.tensor([3.0, 0.2, 20.0])), d)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.5, 1.5), min_size=2, max_size=6), st.floats(0.01, 20.0))
def test_interp_exact_at_knots_bounded_between_and_flat_outside(vals, sigma):
    k = len(vals)
    knots = torch.logspace(-1.5, 1.2, k)
    v = torch.tensor(vals)
    torch.testing.assert_close(interp_log_sigma(knots, knots, v), v)
    out = float(interp_log_sigma(torch.tensor(sigma), knots, v))
    assert float(v.min()) - 1e-6 <= out <= float(v.max()) + 1e-6
    assert float(interp_log_sigma(torch.tensor(1e3), knots, v)) == pytest.approx(vals[-1])
    assert float(interp_log_sigma(torch.tensor(0.0), knots, v)) == pytest.approx(vals[0])


def test_interp_is_linear_in_log_sigma_and_per_channel():
    knots = torch.tensor([0.1, 10.0])
    vals = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    out = interp_log_sigma(torch.tensor([1.0, 0.1]), knots, vals)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [0.0, 1.0]]))


def test_ramp_mode_reproduces_qsched_linear_ramp_over_steps():
    """Released search space: c[i] = start + (1 − start)·i/(N−1); the hook gets progress i/(N−1)."""
    n, start = 4, 0.9
    expected = [start + (1 - start) * i / (n - 1) for i in range(n)]
    q = QSched("ramp", start, 1.0)
    d = torch.zeros(1, 1, 1, 1)
    x = torch.ones(1, 1, 1, 1)
    got = [float(q(d, x, None, None, i / (n - 1))) for i in range(n)]  # D' = (c_x − 1)·x here
    assert got == pytest.approx([e - 1 for e in expected], abs=1e-7)
    assert ramp_value(start, 1.0) == 1.0


def test_file_mode_per_row_sigma_and_host_c_skip():
    knots = torch.tensor([0.5, 5.0])
    q = QSched("file", torch.tensor([0.8, 1.2]), torch.tensor([1.0, 1.0]), knots=knots, prediction="v")
    d, x = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    out = q(d, x, torch.tensor([0.5, 5.0]))  # c_skip from v: 1/(σ²+1)
    torch.testing.assert_close(out.flatten(), torch.tensor([-0.2 / 1.25, 0.2 / 26.0]))
    out = q(d, x, torch.tensor([0.5, 5.0]), c_skip=1.0)  # the host's c_skip wins
    torch.testing.assert_close(out.flatten(), torch.tensor([-0.2, 0.2]))


def test_missing_inputs_pass_through_with_a_note():
    notes = []
    q = QSched("file", torch.tensor([0.9]), torch.tensor([1.0]), knots=torch.tensor([1.0]), note=notes.append)
    d = torch.randn(1, 4, 2, 2)
    assert q(d, None, torch.tensor([1.0])) is d
    assert q(d, torch.randn(1, 4, 2, 2), None) is d
    r = QSched("ramp", 0.9, 1.0, note=notes.append)
    assert r(d, torch.randn(1, 4, 2, 2), torch.tensor([1.0]), None, None) is d
    assert len(notes) == 3 and all("not applied" in n for n in notes)
