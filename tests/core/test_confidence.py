"""AQClip confidence maps (spec §3.3): Lite proxy, resize/pool onto the tile grid, normalisation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qsilk.confidence import (ATTN_TAU, entropy_to_confidence, lite_map, lite_tau, normalise_paper,
                              normalise_qsilk, pool_to_tiles, resize_map)

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_conv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle: per-channel Sobel by ``conv2d`` on the replicate-padded input."""
    c = x.shape[1]
    k = torch.stack([SOBEL_X, SOBEL_X.t()]).unsqueeze(1).repeat(c, 1, 1, 1)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c).double()
    return g[:, 0::2], g[:, 1::2]


@given(st.integers(1, 3), st.sampled_from([1, 4, 16]), st.integers(1, 20), st.integers(1, 20), st.integers(0, 999))
@settings(max_examples=30, deadline=None)
def test_lite_map_equals_conv2d_sobel_oracle(b, c, h, w, seed):
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))
    gx, gy = sobel_conv(x)
    expected = (gx**2 + gy**2).mean(1, keepdim=True).sqrt()
    assert torch.allclose(lite_map(x).double(), expected, rtol=1e-5, atol=1e-5)
    mx, my = sobel_conv(x.mean(1, keepdim=True))
    assert torch.allclose(lite_map(x, "paper").double(), (mx**2 + my**2).sqrt(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["qsilk", "paper"])
def test_lite_map_is_zero_for_a_constant_sample_borders_included(variant):
    x = torch.full((2, 4, 11, 13), 2.5)  # zero padding would light up the borders
    assert torch.equal(lite_map(x, variant), torch.zeros(2, 1, 11, 13))


def test_lite_map_rms_sees_an_edge_the_channel_mean_cancels():
    x = torch.zeros(1, 4, 16, 16)
    x[:, 0, :, 8:] = 1.0
    x[:, 3, :, 8:] = -1.0  # luminance-like edge with opposite signs (SDXL channels 0 and 3)
    assert lite_map(x, "qsilk")[0, 0, :, 7:9].min() > 1.0
    assert lite_map(x, "paper").abs().max() == 0  # the paper's |∇ mean_c x| sees nothing


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 12), st.integers(1, 8), st.integers(0, 999))
@settings(max_examples=80, deadline=None)
def test_pool_to_tiles_equals_mean_over_unfolded_tiles(h, w, tile, stride, seed):
    t = min(tile, h, w)
    s = max(1, min(stride, -(-t // 2)))
    pad_h, pad_w = -(h - t) % s, -(w - t) % s
    m = torch.rand(2, 1, h, w, generator=torch.Generator().manual_seed(seed))
    mp = F.pad(m, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else m
    tiles = F.unfold(mp.double(), t, stride=s).mean(1)
    got = pool_to_tiles(m, pad_h, pad_w, t, s)
    assert torch.allclose(got.flatten(1), tiles, atol=1e-12)


def test_normalise_qsilk_constant_map_gives_exactly_one():
    for value in (0.0, 0.3, 7.0):
        a = torch.full((3, 1, 5, 4), value)
        assert torch.equal(normalise_qsilk(a, lite_tau(a)), torch.ones_like(a))
        assert torch.equal(normalise_qsilk(a, ATTN_TAU), torch.ones_like(a))


@given(st.floats(0.0, 0.04), st.integers(0, 999))
@settings(max_examples=50, deadline=None)
def test_normalise_qsilk_flat_map_stays_near_one(spread, seed):
    a = 0.5 + spread * torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    c = normalise_qsilk(a, ATTN_TAU)
    assert (c >= 1 - spread / ATTN_TAU - 1e-6).all()  # noise below τ is not stretched to [0, 1]


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 999))
@settings(max_examples=80, deadline=None)
def test_normalise_qsilk_of_one_minus_entropy_is_the_spec_attn_formula(b, h, w, seed):
    e = torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(seed)).double()
    flat = e.flatten(1)
    p2 = torch.quantile(flat, 0.02, dim=1).view(-1, 1, 1, 1)
    p98 = torch.quantile(flat, 0.98, dim=1).view(-1, 1, 1, 1)
    expected = (1 - (e - p2) / torch.clamp_min(p98 - p2, ATTN_TAU)).clamp(0, 1)
    got = normalise_qsilk(entropy_to_confidence(e, "qsilk"), ATTN_TAU)
    assert torch.allclose(got, expected, atol=1e-12)


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(0, 999))
@settings(max_examples=80, deadline=None)
def test_normalise_qsilk_is_in_unit_interval_and_monotone(b, h, w, seed):
    g = torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(seed)) * 3
    c = normalise_qsilk(g, lite_tau(g))
    assert ((c >= 0) & (c <= 1)).all()
    order = torch.argsort(g.flatten(1), dim=1)
    cs = torch.gather(c.flatten(1), 1, order)
    assert (cs[:, 1:] >= cs[:, :-1]).all()
    assert (c.flatten(1).amax(1) == 1).all()  # the most confident tiles reach 1


def test_normalise_qsilk_is_per_sample():
    a = torch.rand(3, 1, 5, 5)
    c = normalise_qsilk(a, lite_tau(a))
    for b in range(3):
        assert torch.equal(normalise_qsilk(a[b:b + 1], lite_tau(a[b:b + 1])), c[b:b + 1])


def test_normalise_paper_divides_by_the_max_per_sample():
    a = torch.rand(2, 1, 4, 6) + 0.1
    expected = a / a.flatten(1).amax(1).view(-1, 1, 1, 1)
    assert torch.equal(normalise_paper(a), expected)
    assert torch.equal(normalise_paper(torch.zeros(1, 1, 2, 2)), torch.zeros(1, 1, 2, 2))


def test_resize_map_same_size_is_passed_through_exactly():
    m = torch.rand(2, 1, 9, 7)
    assert torch.equal(resize_map(m, (9, 7), 2), m)


def test_resize_map_resizes_broadcasts_and_sanitises():
    m = torch.rand(1, 1, 4, 6)
    m[0, 0, 0, 0] = float("nan")
    out = resize_map(m, (13, 17), 3)
    assert out.shape == (3, 1, 13, 17) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()
    assert torch.equal(out[0], out[2])
    big = resize_map(torch.rand(2, 40, 50), (8, 10), 2)  # (B, H', W') accepted; shrinking works
    assert big.shape == (2, 1, 8, 10)


@pytest.mark.parametrize("shape", [(3, 1, 4, 4), (2, 2, 4, 4), (2, 1, 1, 0), (4,)])
def test_resize_map_rejects_unmatched_shapes_naming_confidence(shape):
    with pytest.raises(ValueError, match="confidence"):
        resize_map(torch.rand(shape), (8, 8), 2)


def test_entropy_to_confidence_inverts_for_qsilk_only():
    e = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(entropy_to_confidence(e, "qsilk"), torch.tensor([1.0, 0.75, 0.0]))
    assert entropy_to_confidence(e, "paper") is e
