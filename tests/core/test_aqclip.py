"""AQClip (spec §3) and the identities of spec §0, against direct per-tile implementations."""
from __future__ import annotations

import importlib
import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from paper_reference import paper_aqclip
from qsilk import AQClipState, Settings, aqclip
from qsilk.limiter import limit

aq = importlib.import_module("qsilk.aqclip")  # the module (the package exports the function)
tiles_mod = importlib.import_module("qsilk.tiles")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ODD_PAIRS = [(7, 3), (9, 5), (15, 7), (33, 17), (32, 16)]


def geometry(h, w, tile, stride):
    """Spec §3.1 written out: T_eff, S_eff, tile origins per axis, padded sizes."""
    t = min(tile, h, w)
    s = max(1, min(stride, math.ceil(t / 2)))
    hp, wp = h + (-(h - t) % s), w + (-(w - t) % s)
    return t, s, list(range(0, hp - t + 1, s)), list(range(0, wp - t + 1, s)), hp, wp


def qsilk_reference(x, conf=None, tile=32, stride=16, shape="soft", alpha=2.0, p_wide=0.0005,
                    p_narrow=0.01, rho=1.0):
    """The `qsilk` variant of spec §3 as a direct per-tile loop in float64 (no EMA).

    Returns ``(out, lmin, hmax, kept)``: the result, per pixel the min l / max h of its covering
    tiles, and where every covering tile keeps the value by a clear margin (bit-exact expected).
    """
    b_, c_, h_, w_ = x.shape
    t, s, oh, ow, hp, wp = geometry(h_, w_, tile, stride)
    x64 = x.double()
    xp = F.pad(x64, (0, wp - w_, 0, hp - h_), mode="reflect") if (hp, wp) != (h_, w_) else x64
    if conf is None:
        k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
        kk = torch.stack([k, k.t()]).unsqueeze(1).repeat(c_, 1, 1, 1)
        gxy = F.conv2d(F.pad(x64, (1, 1, 1, 1), mode="replicate"), kk, groups=c_)
        src, tau = (gxy ** 2).sum(1, keepdim=True).div(c_).sqrt(), None
    else:
        src, tau = conf.double(), 0.05
    srcp = F.pad(src, (0, wp - w_, 0, hp - h_), mode="reflect") if (hp, wp) != (h_, w_) else src
    a = torch.zeros(b_, len(oh), len(ow), dtype=torch.float64)
    for ii, i in enumerate(oh):
        for jj, j in enumerate(ow):
            a[:, ii, jj] = srcp[:, 0, i:i + t, j:j + t].mean((1, 2))
    p2, p50, p98 = torch.quantile(a.flatten(1), torch.tensor([0.02, 0.5, 0.98], dtype=torch.float64), dim=1)
    tau = 0.5 * p50 + 1e-12 if tau is None else torch.full_like(p2, tau)
    c = (1 - (p98.view(-1, 1, 1) - a) / torch.maximum(p98 - p2, tau).view(-1, 1, 1)).clamp(0, 1)
    z_n, z_w = -NormalDist().inv_cdf(p_narrow), -NormalDist().inv_cdf(p_wide)
    sigma_s = x64.flatten(2).var(2, unbiased=False).sqrt()
    win = 1 - (torch.arange(t, dtype=torch.float64) - (t - 1) / 2).abs() / (t / 2)
    w2 = win[:, None] * win[None, :]
    acc, den = torch.zeros_like(xp), torch.zeros(hp, wp, dtype=torch.float64)
    lmin, hmax = torch.full_like(xp, math.inf), torch.full_like(xp, -math.inf)
    kept = torch.ones_like(xp, dtype=torch.bool)
    for ii, i in enumerate(oh):
        for jj, j in enumerate(ow):
            tl = xp[:, :, i:i + t, j:j + t]
            mu, sd = tl.mean((2, 3)), tl.flatten(2).var(2, unbiased=False).sqrt()
            z = (z_n + (z_w - z_n) * c[:, ii, jj]).view(-1, 1)
            s_eff = torch.maximum(sd, rho * sigma_s)
            lo, hi = (mu - z * s_eff)[..., None, None], (mu + z * s_eff)[..., None, None]
            y = limit(tl.float(), lo.float(), hi.float(), shape, alpha).double()
            acc[:, :, i:i + t, j:j + t] += w2 * (y - tl)
            den[i:i + t, j:j + t] += w2
            sl = (slice(None), slice(None), slice(i, i + t), slice(j, j + t))
            lmin[sl], hmax[sl] = torch.minimum(lmin[sl], lo), torch.maximum(hmax[sl], hi)
            if shape == "tanh":  # changes every value
                kept[sl] = False
            margin = (hi - lo) * (0.5 * (1 - alpha / (1 + alpha)) if shape == "soft" else 1e-4)
            kept[sl] &= (tl >= lo + margin) & (tl <= hi - margin)
    crop = (Ellipsis, slice(0, h_), slice(0, w_))
    return x64 + (acc / den)[crop], lmin[crop], hmax[crop], kept[crop]


@st.composite
def latents(draw, max_side=40, dtypes=(torch.float32,)):
    b, c = draw(st.integers(1, 3)), draw(st.sampled_from([1, 4, 16]))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(b, c, h, w, generator=g) * draw(st.floats(0.2, 5.0)) + draw(st.floats(-2, 2))
    if draw(st.booleans()):  # heavy tails: something to clip
        x = x * (1 + 3 * torch.rand(b, c, h, w, generator=g) ** 8)
    return x.to(draw(st.sampled_from(dtypes)))


tiles = st.sampled_from([(32, 16), (8, 4), (12, 5), (9, 3), (16, 16), (6, 1)])


# -- geometry and coverage -------------------------------------------------------------------
def test_tile_grid_follows_spec_geometry_for_every_size():
    for tile, stride in ODD_PAIRS + [(32, 16), (64, 32), (4, 8)]:
        for h in range(1, 81):
            for w in (h, 81 - h + 1):
                t, s, oh, ow, hp, wp = geometry(h, w, tile, stride)
                g = tiles_mod.tile_grid(h, w, tile, stride)
                assert (g.tile, g.stride, g.n_h, g.n_w, g.pad_h, g.pad_w) == (t, s, len(oh), len(ow), hp - h, wp - w)
                assert g.pad_h < max(h, 2) and g.pad_w < max(w, 2)  # reflect padding is possible


def test_every_pixel_is_covered_for_every_size_in_1_to_80():
    for tile, stride in ODD_PAIRS:
        for h in range(1, 81):
            for w in range(1, 81):
                t, s, oh, ow, hp, wp = geometry(h, w, tile, stride)
                for side, origins in ((h, oh), (w, ow)):
                    covered = set()
                    for o in origins:
                        covered.update(range(o, o + t))
                    assert set(range(side)) <= covered, (h, w, tile, stride)
                    assert len(origins) >= 2 or side == t  # ≥ 2 tiles per axis where the side allows


@pytest.mark.parametrize("variant,tile,stride", [("qsilk", t, s) for t, s in ODD_PAIRS] + [("paper", 32, 16), ("paper", 7, 3)])
def test_aqclip_no_pixel_zeroed_or_left_untouched_by_tiling(variant, tile, stride):
    # A 5±1 checkerboard: the qsilk corridor μ ± 0.13σ (hard) and the paper's tanh both move every
    # value of every tile, so a pixel that no tile covered would come back unchanged (or zeroed).
    shape = "hard" if variant == "qsilk" else "tanh"
    for n in range(2, 81):
        h, w = n, 82 - n
        x = (5 + (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 2 - 1).float().expand(1, 2, h, w)
        y = aqclip(x, tile=tile, stride=stride, shape=shape, variant=variant, p_wide=0.45, p_narrow=0.45,
                   sigma_floor=0.0)
        assert (y != x).all() and (y != 0).all(), (h, w)


# -- equality with direct implementations ----------------------------------------------------
@given(latents(max_side=28), tiles, st.sampled_from(["hard", "soft", "tanh"]), st.floats(0.0, 2.0),
       st.booleans())
@settings(max_examples=40, deadline=None)
def test_qsilk_variant_equals_direct_per_tile_implementation(x, ts, shape, rho, with_map):
    conf = torch.rand(x.shape[0], 1, *x.shape[2:], generator=torch.Generator().manual_seed(1)) if with_map else None
    y = aqclip(x, conf, tile=ts[0], stride=ts[1], shape=shape, sigma_floor=rho)
    ref, lmin, hmax, kept = qsilk_reference(x, conf, ts[0], ts[1], shape, 2.0, rho=rho)
    scale = 1 + x.double().abs().amax()
    assert torch.allclose(y.double(), ref, atol=2e-5 * scale, rtol=0)
    assert torch.equal(y[kept], x[kept])  # untouched by every covering tile: bit-exact
    if shape != "tanh":  # at strength 1, within [min l, max h] of the covering tiles
        tol = 4e-6 * scale
        assert (y.double() >= lmin - tol).all() and (y.double() <= hmax + tol).all()


@pytest.mark.parametrize("size,tile,stride,c", [((2, 64, 64), 32, 16, 4), ((1, 37, 53), 32, 16, 4),
                                                ((2, 20, 9), 32, 16, 16), ((1, 50, 70), 24, 8, 4),
                                                ((1, 45, 45), 33, 16, 4), ((2, 8, 8), 32, 16, 3)])
def test_paper_variant_equals_literal_algorithm_1(size, tile, stride, c):
    b, h, w = size
    g = torch.Generator().manual_seed(h * w)
    state, ref_state = AQClipState(), {}
    for step in range(3):  # EMA on the bounds across steps (Algorithm 1, line 6)
        x = torch.randn(b, c, h, w, generator=g) * (1 + step) + 0.3
        y = aqclip(x, tile=tile, stride=stride, variant="paper", state=state, ema_beta=0.8)
        ref = paper_aqclip(x, tile, stride, alpha=2.0, beta=0.8, state=ref_state)
        assert torch.allclose(y.double(), ref.double(), atol=3e-6 * (1 + x.abs().max().item()), rtol=0)
    emap = torch.rand(b, 1, h, w, generator=g)  # Attn: normalised entropy used as Ĥ
    x = torch.randn(b, c, h, w, generator=g)
    ref = paper_aqclip(x, tile, stride, h_hat_map=emap)
    assert torch.allclose(aqclip(x, emap, tile=tile, stride=stride, variant="paper").double(), ref.double(), atol=1e-5)


@pytest.mark.parametrize("variant,shape", [("qsilk", "soft"), ("paper", "tanh"), ("qsilk", "hard")])
@pytest.mark.parametrize("size", [(70, 90), (64, 64), (33, 17)])
def test_batched_phases_equal_the_phase_by_phase_loop(monkeypatch, variant, shape, size):
    """All ⌈T/S⌉² phases in one strided view + fold == one phase at a time (issue #14)."""
    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(8)) * 2
    whole = aqclip(x, tile=16, stride=8, variant=variant, shape=shape)
    monkeypatch.setattr(tiles_mod, "PHASES_AT_ONCE", 1)  # force the loop
    looped = aqclip(x, tile=16, stride=8, variant=variant, shape=shape)
    assert torch.allclose(whole, looped, atol=2e-6 * (1 + x.abs().max().item()), rtol=0)
    kept = looped == x  # untouched values are bit-exact on both paths
    assert torch.equal(whole[kept], x[kept])


# -- identities of spec §0 --------------------------------------------------------------------
@given(latents(dtypes=DTYPES), tiles, st.sampled_from(["qsilk", "paper"]), st.sampled_from(["hard", "soft", "tanh"]))
@settings(max_examples=30, deadline=None)
def test_aqclip_strength_zero_is_bit_identical(x, ts, variant, shape):
    y = aqclip(x, tile=ts[0], stride=ts[1], variant=variant, shape=shape, strength=0.0)
    bits = torch.int16 if x.element_size() == 2 else torch.int32
    assert y.dtype == x.dtype and torch.equal(y.view(bits), x.view(bits))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant,shape", [("qsilk", "soft"), ("qsilk", "hard"), ("qsilk", "tanh"), ("paper", "tanh")])
def test_aqclip_constant_sample_is_unchanged(dtype, variant, shape):
    x = torch.full((2, 4, 37, 29), -1.37).to(dtype)
    x[1] = 0.1
    assert torch.equal(aqclip(x, variant=variant, shape=shape), x)


@pytest.mark.parametrize("variant,shape,rho", [("qsilk", "soft", 1.0), ("qsilk", "tanh", 0.0), ("paper", "tanh", 0.0),
                                               ("qsilk", "hard", 0.0), ("paper", "soft", 0.0)])
def test_aqclip_constant_tiles_are_unchanged(variant, shape, rho):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 64, 64, generator=g) * 2
    # constant per channel (qsilk: per-channel stats) / over all channels (paper: pooled stats)
    level = torch.arange(1, 5.0).view(1, 4, 1, 1) if variant == "qsilk" else torch.ones(1, 4, 1, 1)
    x[:, :, :, :40] = 0.7071 * level
    y = aqclip(x, tile=16, stride=8, variant=variant, shape=shape, sigma_floor=rho)
    # columns 0..31 lie only in tiles inside the constant block (tiles starting at 0, 8, 16, 24)
    assert torch.equal(y[..., :32], x[..., :32])
    assert not torch.equal(y, x)


@given(latents(max_side=30), tiles, st.sampled_from(["qsilk", "paper"]), st.sampled_from(["hard", "soft", "tanh"]))
@settings(max_examples=25, deadline=None)
def test_aqclip_is_per_sample(x, ts, variant, shape):
    conf = torch.rand(x.shape[0], 1, 7, 5, generator=torch.Generator().manual_seed(2))
    for cmap in (None, conf):
        y = aqclip(x, cmap, tile=ts[0], stride=ts[1], variant=variant, shape=shape)
        for b in range(x.shape[0]):
            single = aqclip(x[b:b + 1], None if cmap is None else cmap[b:b + 1], tile=ts[0], stride=ts[1],
                            variant=variant, shape=shape)
            assert torch.equal(single, y[b:b + 1])


@pytest.mark.parametrize("variant", ["qsilk", "paper"])
def test_aqclip_nonfinite_samples_pass_through_and_leave_the_ema_alone(variant):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 4, 40, 40, generator=g) * 2
    bad = x.clone()
    bad[1, 0, 5, 5], bad[2, 3, 0, 0], bad[3, 1, 39, 39] = float("nan"), float("inf"), float("-inf")
    state = AQClipState()
    y = aqclip(bad, variant=variant, state=state)
    for b in (1, 2, 3):
        assert torch.equal(y[b].view(torch.int32), bad[b].view(torch.int32))
    assert torch.equal(y[0], aqclip(x[:1], variant=variant)[0]) and not torch.equal(y[0], x[0])
    # the next (finite) evaluation of samples 1–3 starts their EMA afresh: as if never seen
    x2 = torch.randn(4, 4, 40, 40, generator=g)
    y2 = aqclip(x2, variant=variant, state=state)
    assert torch.equal(y2[1:], aqclip(x2, variant=variant, state=AQClipState())[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_aqclip_half_precision_in_same_dtype_out(dtype):
    x = (torch.randn(2, 4, 48, 40) * 2).to(dtype)
    y = aqclip(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, aqclip(x.float()).to(dtype))  # float32 statistics, rounded once at the end


def test_aqclip_does_not_modify_its_input():
    x = torch.randn(2, 4, 40, 40) * 3
    before = x.clone()
    aqclip(x, torch.rand(2, 1, 5, 5), state=AQClipState(), return_maps=True)
    assert torch.equal(x, before)


# -- corridor ----------------------------------------------------------------------------------
@given(st.floats(0, 1), st.floats(0, 1), st.floats(-5, 5), st.floats(0, 3), st.floats(0, 3), st.floats(0, 2),
       st.floats(1e-5, 0.1), st.floats(0.0, 0.3))
@settings(max_examples=200, deadline=None)
def test_qsilk_corridor_is_symmetric_and_widens_with_confidence(c1, c2, mu, sigma, sigma_s, rho, p_wide, extra):
    p_narrow = min(0.49, p_wide + extra)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    lo1, hi1 = aq.corridor_qsilk(t(mu), t(sigma), t(min(c1, c2)), t(sigma_s), rho, p_wide, p_narrow)
    lo2, hi2 = aq.corridor_qsilk(t(mu), t(sigma), t(max(c1, c2)), t(sigma_s), rho, p_wide, p_narrow)
    assert abs((hi1 - mu) - (mu - lo1)) <= 1e-9 * (1 + abs(mu)) and hi1 >= lo1
    assert hi2 - lo2 >= hi1 - lo1  # more confident → at least as wide
    half = -NormalDist().inv_cdf(p_narrow) * max(sigma, rho * sigma_s)  # the floor holds
    assert hi1 - mu >= half * (1 - 1e-9) - 1e-12 * (1 + abs(mu))


def test_qsilk_aqclip_clips_less_where_confident():
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(5)) * (1 + torch.rand(1, 4, 64, 64) ** 6 * 3)
    ones = torch.ones(1, 1, 64, 64)
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 1, 64, 64)
    _, maps = aqclip(x, ramp, sigma_floor=0.0, return_maps=True)
    act = maps["activity"][0, 0]
    assert act[:, :16].mean() > act[:, -16:].mean()  # left: c≈0 (narrow), right: c≈1 (wide)
    assert maps["confidence"][0, 0, :, :8].mean() < 0.2 < 0.8 < maps["confidence"][0, 0, :, -8:].mean()
    assert torch.equal(aqclip(x, ones), aqclip(x, ones * 0.3))  # constant maps: c = 1 either way


def test_paper_corridor_slides_with_confidence():
    mu, sigma = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    lo, hi = aq.corridor_paper(mu, sigma, torch.tensor(1.0, dtype=torch.float64))
    assert lo == 0 and abs(hi - 4.89) < 1e-12  # magicnodes.md §2.3: [μ, μ+4.89σ] at Ĥ = 1
    lo, hi = aq.corridor_paper(mu, sigma, torch.tensor(0.0, dtype=torch.float64))
    assert abs(lo + 4.89) < 1e-12 and hi == 0


# -- EMA (spec §3.5) ---------------------------------------------------------------------------
def _maps(seed, shape=(2, 1, 9, 9)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_ema_first_update_sets_value_then_blends_with_beta():
    x = torch.randn(2, 4, 64, 64)
    s1, s2, state = AQClipState(), AQClipState(), AQClipState()
    aqclip(x, _maps(1), state=s1)
    aqclip(x, _maps(2), state=s2)
    aqclip(x, _maps(1), state=state, ema_beta=0.7)
    assert torch.equal(state.value, s1.value)  # no zero start
    aqclip(x, _maps(2), state=state, ema_beta=0.7)
    assert torch.allclose(state.value, 0.7 * s1.value + 0.3 * s2.value, atol=1e-12)
    assert state.updates == 2 and state.has_attn


def test_ema_is_never_reused_across_shapes():
    a, b = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 48, 80)
    state = AQClipState()
    aqclip(a, state=state)
    yb = aqclip(b, state=state)
    assert state.shape_resets == 1 and torch.equal(yb, aqclip(b, state=AQClipState()))
    ya = aqclip(a, state=state)
    assert state.shape_resets == 2 and torch.equal(ya, aqclip(a, state=AQClipState()))
    for variant in ("qsilk", "paper"):  # also across batch sizes and variants
        st2 = AQClipState()
        aqclip(torch.randn(2, 4, 64, 64), variant=variant, state=st2)
        assert torch.equal(aqclip(a, variant=variant, state=st2), aqclip(a, variant=variant))


@pytest.mark.parametrize("variant", ["qsilk", "paper"])
def test_ema_reused_without_update_once_an_attn_map_was_seen(variant):
    g = torch.Generator().manual_seed(6)
    x1, x2 = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 4, 64, 64, generator=g) * 2
    emap = torch.rand(2, 1, 64, 64, generator=g)
    state = AQClipState()
    aqclip(x1, emap, variant=variant, state=state)
    value = state.value
    y2 = aqclip(x2, None, variant=variant, state=state)  # no map this evaluation: reuse, no update
    assert state.value is value and state.updates == 1 and state.has_attn
    if variant == "qsilk":  # the stored confidence is the map's: same output as using the map
        assert torch.equal(y2, aqclip(x2, emap, variant=variant))
    else:  # the stored bounds: the literal reference replays them with β = 1
        ref_state: dict = {}
        paper_aqclip(x1, 32, 16, state=ref_state, h_hat_map=emap)
        ref = paper_aqclip(x2, 32, 16, beta=1.0, state=ref_state)
        assert torch.allclose(y2.double(), ref.double(), atol=1e-5)


def test_lite_is_used_until_the_first_attn_map_which_restarts_the_ema():
    x = torch.randn(2, 4, 64, 64)
    state = AQClipState()
    aqclip(x, None, state=state)
    assert not state.has_attn and state.updates == 1
    aqclip(x, _maps(4), state=state)
    fresh = AQClipState()
    aqclip(x, _maps(4), state=fresh)
    assert state.has_attn and torch.equal(state.value, fresh.value)  # Lite history not mixed in


# -- arguments and maps ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    ({"tile": 0}, "tile"), ({"stride": 2.5}, "stride"), ({"variant": "fast"}, "variant"),
    ({"shape": "cubic"}, "shape"), ({"shape": "tanh", "alpha": 6.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"p_wide": 0.0}, "p_wide"), ({"p_narrow": 0.7}, "p_narrow"), ({"strength": 1.5}, "strength"),
    ({"sigma_floor": -1.0}, "sigma_floor"), ({"ema_beta": 1.0}, "ema_beta")])
def test_aqclip_rejects_bad_arguments_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        aqclip(torch.randn(1, 4, 16, 16), **kwargs)


def test_aqclip_rejects_bad_shapes_naming_them():
    with pytest.raises(ValueError, match="x must"):
        aqclip(torch.randn(4, 16, 16))
    with pytest.raises(ValueError, match="confidence"):
        aqclip(torch.randn(2, 4, 16, 16), torch.rand(3, 1, 4, 4))


def test_aqclip_return_maps_are_latent_sized_float32():
    x = (torch.randn(2, 4, 37, 45) * 2).half()
    y, maps = aqclip(x, return_maps=True)
    assert set(maps) == {"confidence", "activity"}
    for m in maps.values():
        assert m.shape == (2, 1, 37, 45) and m.dtype == torch.float32
    assert torch.equal(maps["activity"], (y.float() - x.float()).abs().sum(1, keepdim=True))
    assert ((maps["confidence"] >= 0) & (maps["confidence"] <= 1 + 1e-6)).all()


# -- sparse features (spec §3.4, research/spec-review.md §2) ------------------------------------
def night_sky(seed):
    """Top half N(0, 0.05²) with 80 one-pixel stars of amplitude 1; bottom half a textured landscape."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 4, 128, 128)
    x[:, :, :64] = torch.randn(1, 4, 64, 128, generator=g) * 0.05
    yy, xx = torch.meshgrid(torch.arange(64, 128.0), torch.arange(128.0), indexing="ij")
    x[:, :, 64:] = torch.randn(1, 4, 64, 128, generator=g) * 0.5 + 0.3 * torch.sin(xx / 7 + yy / 11)
    idx = torch.randperm(62 * 126, generator=g)[:80]
    rows, cols = 1 + idx // 126, 1 + idx % 126
    x[:, :, rows, cols] += 1.0
    return x, rows, cols


@pytest.mark.parametrize("preset,min_kept", [("Balanced", 0.85), ("Crisp", 0.78), ("High-res", 0.85)])
def test_sparse_features_keep_contrast_and_spikes_are_still_cut(preset, min_kept):
    s = Settings.from_preset(preset)
    kw = dict(tile=s.tile, stride=s.stride, shape=s.aqclip_shape, alpha=s.aqclip_alpha, p_wide=s.p_wide,
              p_narrow=s.p_narrow)
    kept, kept_unfloored, residual = [], [], []
    for seed in range(2):
        x, r, c = night_sky(seed)
        kept.append((aqclip(x, sigma_floor=s.sigma_floor, **kw)[:, :, r, c].mean() / x[:, :, r, c].mean()).item())
        kept_unfloored.append((aqclip(x, sigma_floor=0.0, **kw)[:, :, r, c].mean() / x[:, :, r, c].mean()).item())
        x[:, :, 30, 40] = 4.0  # a real spike in the sky
        residual.append(aqclip(x, sigma_floor=s.sigma_floor, **kw)[:, :, 30, 40].mean().item())
    assert s.sigma_floor == 1.0 and min(kept) >= min_kept
    assert max(kept_unfloored) < 0.5  # without the floor stars lose most of their contrast
    assert max(residual) < 1.0  # the spike is still cut by more than 75 %


# -- no host synchronisation (spec §0) ---------------------------------------------------------
@pytest.fixture
def forbid_host_sync(monkeypatch):
    """Make every Tensor → Python value conversion raise: ``.item()``, ``bool()``, ``float()``…"""
    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation on the per-step path")
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def test_per_step_path_never_syncs_with_the_host(forbid_host_sync):
    from qsilk.clamp import micro_clamp
    x = torch.randn(2, 4, 40, 56)
    x[1, 0, 0, 0] = float("nan")
    micro_clamp(x)
    micro_clamp(x, shape="soft", per_channel=True)
    for variant in ("qsilk", "paper"):
        state = AQClipState()
        aqclip(x, None, variant=variant, state=state)
        aqclip(x, torch.rand(2, 1, 10, 14), variant=variant, state=state, return_maps=True)
        aqclip(x, None, variant=variant, state=state)
        aqclip(x, tile=33, stride=17, variant=variant)
