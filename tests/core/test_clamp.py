"""Exact tail quantiles and the QSilk micro-clamp (spec §2, identities of §0)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paper_reference import paper_micro_clamp
from qsilk.clamp import micro_clamp, tail_quantiles

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def rows(draw):
    """A random ``(R, N)`` tensor (sometimes with many ties), a dtype and two quantile levels."""
    r, n = draw(st.integers(1, 4)), draw(st.integers(1, 5000))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(r, n, generator=g) * draw(st.floats(0.01, 100.0)) + draw(st.floats(-10, 10))
    if draw(st.booleans()):
        x = x.round()  # ties
    q_lo = draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.001, 0.01, 0.5])))
    q_hi = draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([1.0, 0.999, 0.99])))
    return x.to(dtype), q_lo, q_hi


@given(rows())
@settings(max_examples=200, deadline=None)
def test_fast_quantile_matches_torch_quantile(case):
    x, q_lo, q_hi = case
    l, h = tail_quantiles(x, q_lo, q_hi)
    assert l.dtype == h.dtype == torch.float32 and l.shape == (x.shape[0],)
    assert torch.equal(l, torch.quantile(x.float(), q_lo, dim=1))
    assert torch.equal(h, torch.quantile(x.float(), q_hi, dim=1))


def test_fast_quantile_works_above_torch_quantiles_16M_limit():
    # torch.quantile raises "input tensor is too large" above 2**24 values (a 5K image's latent
    # has 640·640·4 = 1.6M, a batch of them more); this row has 2**24 + 5.
    n = 2**24 + 5
    perm = torch.arange(n, dtype=torch.int64).mul_(7919).remainder_(n)  # 7919 is prime: a permutation
    x = perm.float().unsqueeze(0)
    l, h = tail_quantiles(x, 0.001, 0.999)
    # Order statistic j is fl32(j); torch.quantile's rank is fl32(fl32(q)·fl32(n−1)).
    for q, got in ((0.001, l), (0.999, h)):
        r = torch.tensor(q, dtype=torch.float32) * torch.tensor(float(n - 1), dtype=torch.float32)
        lo = torch.floor(r)
        expected = torch.lerp(lo.float(), (lo + 1).float(), (r - lo).float())
        assert torch.equal(got, expected.view(1))


@pytest.mark.parametrize("name,q", [("q_lo", -0.1), ("q_hi", 1.5), ("q_lo", float("nan"))])
def test_fast_quantile_rejects_bad_levels_naming_them(name, q):
    kwargs = {"q_lo": 0.1, "q_hi": 0.9, name: q}
    with pytest.raises(ValueError, match=name):
        tail_quantiles(torch.zeros(1, 4), **kwargs)


@st.composite
def latents(draw, max_side=24):
    b, c = draw(st.integers(1, 3)), draw(st.sampled_from([1, 4, 16]))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(b, c, h, w, generator=g) * draw(st.floats(0.1, 10.0))
    return x.to(draw(st.sampled_from(DTYPES)))


@given(latents(), st.booleans())
@settings(max_examples=120, deadline=None)
def test_micro_clamp_hard_equals_per_sample_quantile_clamp(x, per_channel):
    y = micro_clamp(x, 0.001, 0.999, per_channel=per_channel)
    if per_channel:
        expected = torch.stack([paper_micro_clamp(xb.unsqueeze(1)).squeeze(1) for xb in x])
    else:
        expected = paper_micro_clamp(x)
    assert y.dtype == x.dtype and torch.equal(y, expected)


@given(latents(), st.sampled_from(["hard", "soft", "tanh"]))
@settings(max_examples=80, deadline=None)
def test_micro_clamp_is_per_sample(x, shape):
    y = micro_clamp(x, shape=shape)
    for b in range(x.shape[0]):
        assert torch.equal(micro_clamp(x[b:b + 1], shape=shape), y[b:b + 1])


@pytest.mark.parametrize("shape", ["hard", "soft", "tanh"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_micro_clamp_nonfinite_samples_pass_through_finite_processed(shape, per_channel):
    x = torch.randn(4, 4, 16, 16) * 3
    x[1, 2, 3, 4] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    x[3, 1, 5, 5] = float("-inf")
    y = micro_clamp(x, shape=shape, per_channel=per_channel)
    for b in (1, 2, 3):
        assert torch.equal(y[b].view(torch.int32), x[b].view(torch.int32))  # NaN bits too
    assert torch.equal(y[0], micro_clamp(x[:1], shape=shape, per_channel=per_channel)[0])
    assert not torch.equal(y[0], x[0])  # the finite sample was processed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["hard", "soft"])
def test_micro_clamp_constant_sample_unchanged(dtype, shape):
    x = torch.full((2, 4, 9, 7), -0.3).to(dtype)
    assert torch.equal(micro_clamp(x, shape=shape), x)


@given(latents(), st.floats(0.1, 20.0))
@settings(max_examples=80, deadline=None)
def test_micro_clamp_hard_and_soft_never_leave_quantile_corridor(x, alpha):
    flat = x.float().flatten(1)
    l = torch.quantile(flat, 0.001, dim=1).view(-1, 1, 1, 1)
    h = torch.quantile(flat, 0.999, dim=1).view(-1, 1, 1, 1)
    # fp16/bf16 outputs are rounded to the dtype, and so are the bounds they can reach.
    lo = torch.minimum(l, l.to(x.dtype).float())
    hi = torch.maximum(h, h.to(x.dtype).float())
    for shape in ("hard", "soft"):
        y = micro_clamp(x, shape=shape, alpha=alpha).float()
        assert ((y >= lo) & (y <= hi)).all()


def test_micro_clamp_moves_about_two_per_mille_of_a_gaussian():
    x = torch.randn(2, 4, 128, 128, generator=torch.Generator().manual_seed(1))
    share = (micro_clamp(x) != x).float().mean().item()
    assert 0.0015 < share < 0.0025  # research/magicnodes.md §2.1: exactly 0.2 % move per evaluation


@pytest.mark.parametrize("alpha,ratio", [(0.5, 0.49), (1.0, 0.92), (2.0, 1.53)])
def test_micro_clamp_tanh_spread_matches_spec_numbers(alpha, ratio):
    x = torch.randn(1, 4, 256, 256, generator=torch.Generator().manual_seed(2))
    y = micro_clamp(x, shape="tanh", alpha=alpha)
    assert abs((y.std() / x.std()).item() - ratio) < 0.02  # spec §1: ×0.49 / 0.92 / 1.53


def test_micro_clamp_does_not_modify_input():
    x = torch.randn(2, 4, 32, 32) * 4
    before = x.clone()
    micro_clamp(x, shape="soft")
    assert torch.equal(x, before)


@pytest.mark.parametrize("kwargs,name", [({"q_lo": 0.9, "q_hi": 0.1}, "q_lo"), ({"q_hi": 2.0}, "q_hi"),
                                          ({"shape": "soft", "alpha": 50.0}, "alpha"), ({"shape": "x"}, "shape")])
def test_micro_clamp_rejects_bad_arguments_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        micro_clamp(torch.randn(1, 4, 8, 8), **kwargs)
