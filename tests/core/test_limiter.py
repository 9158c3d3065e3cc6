"""The corridor limiter (spec §1): hard / soft knee / the paper's tanh, and its change form."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qsilk.limiter import limit, limit_change

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@st.composite
def corridor_case(draw, n=64):
    """Values, a corridor ``l ≤ h`` (sometimes degenerate) and a seed-driven batch of values."""
    a, b = draw(finite), draw(finite)
    if draw(st.booleans()):
        b = a  # degenerate corridor
    l, h = min(a, b), max(a, b)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    span = max(h - l, 1.0)
    x = (torch.rand(n, generator=g) * 4 - 1.5) * span + l
    x = torch.cat([x, torch.tensor([l, h, (l + h) / 2, -0.0, 0.0])])
    return x.float(), torch.tensor(l), torch.tensor(h)


alphas = st.floats(0.1, 20.0)


@given(corridor_case())
@settings(max_examples=200, deadline=None)
def test_limiter_hard_never_leaves_corridor(case):
    x, l, h = case
    y = limit(x, l, h, "hard")
    assert ((y >= l) & (y <= h)).all()


@given(corridor_case(), alphas)
@settings(max_examples=200, deadline=None)
def test_limiter_soft_never_leaves_corridor(case, alpha):
    x, l, h = case
    y = limit(x, l, h, "soft", alpha)
    assert ((y >= l) & (y <= h)).all()


@given(corridor_case())
@settings(max_examples=200, deadline=None)
def test_limiter_hard_leaves_in_corridor_values_bit_identical(case):
    x, l, h = case
    y = limit(x, l, h, "hard")
    inside = (x >= l) & (x <= h)
    assert torch.equal(y[inside].view(torch.int32), x[inside].view(torch.int32))  # -0.0 kept too


@given(corridor_case(), alphas)
@settings(max_examples=200, deadline=None)
def test_limiter_soft_leaves_in_knee_values_bit_identical(case, alpha):
    x, l, h = case
    y = limit(x, l, h, "soft", alpha)
    m, d = (l.double() + h.double()) / 2, (h.double() - l.double()) / 2
    k = alpha / (1 + alpha)
    if d <= 1e-12 * (1 + abs(m)):
        return  # degenerate: covered by test_limiter_degenerate_corridor_clamps_every_shape
    u = ((x.double() - m) / d).abs()
    inside = u <= k * (1 - 1e-6)  # strictly inside the knee, away from float32 rounding of u
    assert torch.equal(y[inside].view(torch.int32), x[inside].view(torch.int32))


@given(corridor_case(), alphas)
@settings(max_examples=100, deadline=None)
def test_limiter_soft_is_monotone_and_never_expands(case, alpha):
    x, l, h = case
    xs = torch.sort(x).values
    y = limit(xs, l, h, "soft", alpha).double()
    assert (y[1:] >= y[:-1]).all()
    m = (l.double() + h.double()) / 2
    tol = 4 * torch.finfo(torch.float32).eps * (xs.double().abs() + m.abs() + 1)
    assert ((y - m).abs() <= (xs.double() - m).abs() + tol).all()


def test_limiter_soft_matches_spec_formula_in_float64():
    x = torch.linspace(-6, 6, 2001)
    l, h, alpha = torch.tensor(-1.5), torch.tensor(2.5), 2.0
    m, d, k = 0.5, 2.0, alpha / (1 + alpha)
    u = (x.double() - m) / d
    expected = torch.where(u.abs() <= k, x.double(),
                           m + d * torch.sign(u) * (k + (1 - k) * torch.tanh((u.abs() - k) / (1 - k))))
    assert torch.allclose(limit(x, l, h, "soft", alpha).double(), expected.clamp(-1.5, 2.5), atol=2e-6)


def test_limiter_soft_is_continuous_across_the_knee():
    l, h, alpha = torch.tensor(-1.0), torch.tensor(1.0), 3.0
    k = alpha / (1 + alpha)
    x = torch.tensor([k - 1e-4, k, k + 1e-4])
    y = limit(x, l, h, "soft", alpha)
    assert torch.allclose(y, x, atol=1e-7)  # slope 1 at the knee: C¹


def test_limiter_soft_approaches_hard_for_large_alpha():
    x = torch.linspace(-3, 3, 601)
    l, h = torch.tensor(-1.0), torch.tensor(1.0)
    gap = (limit(x, l, h, "soft", 20.0) - limit(x, l, h, "hard")).abs().max()
    assert gap < 1 / 21 + 1e-6  # the tanh part spans at most 1−k = 1/(1+α) of δ


def test_limiter_tanh_is_the_papers_eq1():
    x = torch.randn(10_000)
    l, h, alpha = torch.tensor(-2.0), torch.tensor(3.0), 2.0
    m, d = 0.5, 2.5
    expected = m + d * torch.tanh(alpha * (x.double() - m) / d)
    assert torch.allclose(limit(x, l, h, "tanh", alpha).double(), expected, atol=2e-6)


@pytest.mark.parametrize("shape", ["hard", "soft", "tanh"])
def test_limiter_degenerate_corridor_clamps_every_shape(shape):
    x = torch.tensor([-5.0, 0.75, 0.7500001, 9.0])
    c = torch.tensor(0.75)
    y = limit(x, c, c, shape, 2.0)
    assert torch.equal(y, torch.full_like(x, 0.75))
    const = torch.full((7,), 0.75)
    assert torch.equal(limit(const, c, c, shape, 2.0), const)  # a constant input is unchanged


@pytest.mark.parametrize("shape,alpha", [("soft", 0.05), ("soft", 25.0), ("soft", math.nan), ("soft", math.inf),
                                         ("tanh", 4.5), ("tanh", 0.0), ("tanh", "2")])
def test_limiter_rejects_alpha_out_of_range_naming_it(shape, alpha):
    with pytest.raises(ValueError, match="alpha"):
        limit(torch.zeros(3), torch.tensor(-1.0), torch.tensor(1.0), shape, alpha)


def test_limiter_rejects_unknown_shape_naming_it():
    with pytest.raises(ValueError, match="shape"):
        limit(torch.zeros(3), torch.tensor(-1.0), torch.tensor(1.0), "cubic")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", ["hard", "soft", "tanh"])
def test_limiter_keeps_dtype_and_in_corridor_values(dtype, shape):
    x = (torch.randn(1000) * 2).to(dtype)
    y = limit(x, torch.tensor(-1.0), torch.tensor(1.0), shape, 2.0)
    assert y.dtype == dtype and y.shape == x.shape
    if shape == "hard":
        inside = (x >= -1) & (x <= 1)
        assert torch.equal(y[inside], x[inside])


@given(corridor_case(), st.sampled_from(["hard", "soft", "tanh"]), st.floats(0.1, 4.0))
@settings(max_examples=200, deadline=None)
def test_limit_change_is_x_minus_limit_and_exactly_zero_where_kept(case, shape, alpha):
    x, l, h = case
    y = limit(x, l, h, shape, alpha)
    change = limit_change(x, l, h, shape, alpha)
    scale = x.double().abs() + l.double().abs() + h.double().abs() + 1
    assert ((change.double() - (x.double() - y.double())).abs() <= 8e-7 * scale).all()
    m, d = (l.double() + h.double()) / 2, (h.double() - l.double()) / 2
    if shape == "hard":
        assert (change[(x >= l) & (x <= h)] == 0).all()
    elif shape == "soft" and d > 1e-12 * (1 + abs(m)):
        inside = ((x.double() - m) / d).abs() <= alpha / (1 + alpha) * (1 - 1e-6)  # clear of the knee
        assert (change[inside] == 0).all()


def test_limit_change_degenerate_corridor_is_x_minus_clamp():
    x = torch.tensor([-2.0, 0.5, 3.0])
    c = torch.tensor(0.5)
    for shape in ("hard", "soft", "tanh"):
        assert torch.equal(limit_change(x, c, c, shape), x - 0.5)
