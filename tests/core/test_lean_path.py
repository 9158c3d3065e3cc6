"""The lean per-evaluation path (issue #14) against straightforward reference implementations
written here: exact percentiles, the whole `Stabilizer.post_cfg` sequence (QSilk, Lite/Attn
confidence, EMA, AQClip) as plain per-tile loops in float64, bounded memory, NaN rows, dtypes."""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qsilk import aqclip
from qsilk.confidence import row_quantiles
from qsilk.limiter import limit
from qsilk.settings import Settings
from qsilk.stabilizer import Stabilizer


# -- exact percentiles -----------------------------------------------------------------------------
@given(st.integers(1, 3), st.integers(1, 300), st.sampled_from([torch.float32, torch.float64]),
       st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4), st.integers(0, 2 ** 31 - 1), st.booleans())
@settings(max_examples=80, deadline=None)
def test_row_quantiles_equal_torch_quantile(rows, n, dtype, levels, seed, ties):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    if ties:
        a = a.round()
    expected = torch.quantile(a, torch.tensor(levels, dtype=dtype), dim=1).t()
    assert torch.equal(row_quantiles(a, tuple(levels)), expected)


# -- reference: the per-evaluation path as plain loops ---------------------------------------------
def tiles_of(h, w, tile, stride):
    t = min(tile, h, w)
    s = max(1, min(stride, math.ceil(t / 2)))
    hp, wp = h + (-(h - t) % s), w + (-(w - t) % s)
    return t, s, list(range(0, hp - t + 1, s)), list(range(0, wp - t + 1, s)), hp, wp


def ref_confidence(x, emap, tile, stride):
    """``c_now`` per tile, ``(B, n_h, n_w)`` float64: Sobel by conv2d, torch.quantile percentiles."""
    b, c, h, w = x.shape
    t, s, oh, ow, hp, wp = tiles_of(h, w, tile, stride)
    x64 = x.double()
    if emap is None:
        k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
        kk = torch.stack([k, k.t()]).unsqueeze(1).repeat(c, 1, 1, 1)
        gxy = F.conv2d(F.pad(x64, (1, 1, 1, 1), mode="replicate"), kk, groups=c)
        src = (gxy ** 2).sum(1, keepdim=True).div(c).sqrt()
    else:
        src = 1.0 - emap.double()  # the Stabilizer's qsilk confidence from entropy
    srcp = F.pad(src, (0, wp - w, 0, hp - h), mode="reflect") if (hp, wp) != (h, w) else src
    a = torch.stack([torch.stack([srcp[:, 0, i:i + t, j:j + t].mean((1, 2)) for j in ow], 1) for i in oh], 1)
    p2, p50, p98 = torch.quantile(a.flatten(1), torch.tensor([0.02, 0.5, 0.98], dtype=torch.float64), dim=1)
    tau = 0.5 * p50 + 1e-12 if emap is None else torch.full_like(p2, 0.05)
    r = torch.maximum(p98 - p2, tau).view(-1, 1, 1)
    return (1 - (p98.view(-1, 1, 1) - a) / r).clamp(0, 1)


def ref_aqclip_with(x, c, tile, stride, shape="soft", alpha=2.0, rho=1.0, p_wide=0.0005, p_narrow=0.01):
    b, ch, h, w = x.shape
    t, s, oh, ow, hp, wp = tiles_of(h, w, tile, stride)
    x64 = x.double()
    xp = F.pad(x64, (0, wp - w, 0, hp - h), mode="reflect") if (hp, wp) != (h, w) else x64
    z_n, z_w = -NormalDist().inv_cdf(p_narrow), -NormalDist().inv_cdf(p_wide)
    sigma_s = x64.flatten(2).var(2, unbiased=False).sqrt()
    win = 1 - (torch.arange(t, dtype=torch.float64) - (t - 1) / 2).abs() / (t / 2)
    w2 = win[:, None] * win[None, :]
    acc, den = torch.zeros_like(xp), torch.zeros(hp, wp, dtype=torch.float64)
    for ii, i in enumerate(oh):
        for jj, j in enumerate(ow):
            tl = xp[:, :, i:i + t, j:j + t]
            mu, sd = tl.mean((2, 3)), tl.flatten(2).var(2, unbiased=False).sqrt()
            z = (z_n + (z_w - z_n) * c[:, ii, jj]).view(-1, 1)
            s_eff = torch.maximum(sd, rho * sigma_s)
            lo, hi = (mu - z * s_eff)[..., None, None], (mu + z * s_eff)[..., None, None]
            acc[:, :, i:i + t, j:j + t] += w2 * (limit(tl.float(), lo.float(), hi.float(), shape, alpha).double() - tl)
            den[i:i + t, j:j + t] += w2
    return x64 + (acc / den)[..., :h, :w]


def ref_quantile_clamp(x, q_lo=0.001, q_hi=0.999):
    rows = x.double().flatten(1)
    lo, hi = torch.quantile(rows, q_lo, dim=1), torch.quantile(rows, q_hi, dim=1)
    return torch.maximum(torch.minimum(rows, hi[:, None]), lo[:, None]).view_as(x)


def ref_post_cfg_sequence(xs, maps, s):
    """QSilk (hard, pooled) then AQClip with the confidence EMA of spec §3.5, evaluation by evaluation."""
    assert s.qsilk_shape == "hard" and not s.qsilk_per_channel
    outs, c = [], None
    for x, emap in zip(xs, maps):
        x1 = ref_quantile_clamp(x, s.q_lo, s.q_hi).float()
        c_now = ref_confidence(x1, emap, s.tile, s.stride)
        c = c_now if c is None else s.ema_beta * c + (1 - s.ema_beta) * c_now
        outs.append(ref_aqclip_with(x1, c, s.tile, s.stride, s.aqclip_shape, s.aqclip_alpha, s.sigma_floor,
                                    s.p_wide, s.p_narrow))
    return outs


@pytest.mark.parametrize("mode", ["lite", "attn"])
@pytest.mark.parametrize("size,preset", [((1, 4, 64, 64), "Balanced"), ((2, 4, 37, 53), "Balanced"),
                                         ((1, 4, 70, 66), "High-res"), ((1, 16, 24, 40), "Crisp")])
def test_post_cfg_sequence_equals_the_plain_reference(mode, size, preset):
    g = torch.Generator().manual_seed(sum(size))
    xs = [torch.randn(*size, generator=g) * (1.5 + k) * (1 + 3 * torch.rand(*size, generator=g) ** 8) + 0.2
          for k in range(3)]
    maps = [torch.rand(size[0], 1, *size[2:], generator=g) if mode == "attn" else None for _ in xs]
    s = Settings.from_preset(preset, aqclip_mode=mode)
    stab = Stabilizer(s)
    stab.begin_pass()
    got = [stab.post_cfg(x, k, 3, m) for k, (x, m) in enumerate(zip(xs, maps))]
    ref = ref_post_cfg_sequence(xs, maps, s)
    for y, r, x in zip(got, ref, xs):
        scale = 1 + x.abs().amax().item()
        assert torch.allclose(y.double(), r, atol=3e-5 * scale, rtol=0)
        assert not torch.equal(y, x)
    assert stab.report()["errors"] == 0


def test_aqclip_strength_reaches_the_last_op_unchanged_result():
    """Strength goes into AQClip's last op (no separate blend): the same as blending afterwards."""
    x = torch.randn(2, 4, 48, 40, generator=torch.Generator().manual_seed(5)) * 3
    for strength in (0.25, 0.5):
        stab = Stabilizer(Settings.from_preset("Balanced", aqclip_mode="lite", qsilk_enabled=False,
                                               aqclip_strength=strength))
        stab.begin_pass()
        full = aqclip(x)
        assert torch.allclose(stab.post_cfg(x, 0, 3), torch.lerp(x, full, strength), atol=1e-5)


# -- identities through the Stabilizer in every dtype ----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_rows_bit_identical_finite_rows_equal_single_sample(dtype):
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(3, 4, 40, 40, generator=g) * 2).to(dtype)
    x[1, 2, 3, 4], x[2, 0, 0, 0] = float("nan"), float("-inf")
    stab = Stabilizer(Settings.from_preset("Balanced", aqclip_mode="lite"))
    stab.begin_pass()
    y = stab.post_cfg(x, 0, 3)
    bits = torch.int16 if x.element_size() == 2 else torch.int32
    assert y.dtype == dtype and torch.equal(y[1:].view(bits), x[1:].view(bits))
    single = Stabilizer(Settings.from_preset("Balanced", aqclip_mode="lite"))
    single.begin_pass()
    assert torch.equal(single.post_cfg(x[:1], 0, 3), y[:1]) and not torch.equal(y[0], x[0])
    assert stab.report()["nan_passthrough"] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_is_the_float32_path_rounded_once(dtype):
    """Both components run in float32 on one conversion; only the result is rounded."""
    x = (torch.randn(2, 4, 48, 40, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    outs = []
    for v in (x, x.float()):
        stab = Stabilizer(Settings.from_preset("Balanced", aqclip_mode="lite"))
        stab.begin_pass()
        outs.append(stab.post_cfg(v, 0, 3))
    assert outs[0].dtype == dtype and torch.equal(outs[0], outs[1].to(dtype))


# -- memory stays O(C·H·W) whatever the tile/stride ------------------------------------------------
@pytest.mark.parametrize("tile,stride", [(32, 16), (16, 8), (32, 4), (12, 5), (9, 3), (64, 32)])
@pytest.mark.parametrize("size", [(96, 80), (200, 152)])
def test_no_op_allocates_more_than_a_few_latents(tile, stride, size):
    """Spec §0: never all overlapping tiles at once. The batched path (⌈T/S⌉² ≤ 4) holds at most
    4× the padded latent (plus at most one tile per side) per temporary; larger ratios go phase by
    phase; the float64 ``[d, d², source]`` buffer is (2C+1)/C× the latent in float64. Checked as
    the largest single allocation of any op — independent of (T/S)²."""
    from torch.profiler import ProfilerActivity, profile
    c, (h, w) = 4, size
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(1))
    t = min(tile, h, w)
    bound = max(4 * c * (h + 2 * t) * (w + 2 * t) * 4, (2 * c + 1) * (h + t) * (w + t) * 8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        aqclip(x, tile=tile, stride=stride)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest <= bound, (biggest, bound)
    assert biggest <= 40 * x.numel() * 4  # never anything like (T/S)² copies of the latent (up to 64 here)


def test_buffers_made_under_inference_mode_do_not_break_a_later_plain_run():
    """ComfyUI samples under torch.inference_mode, the WebUIs under no_grad; cached buffers made
    in one mode must not be written in the other (an inference tensor cannot be)."""
    x = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(4))
    outs = []
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        stab = Stabilizer(Settings.from_preset("Balanced", aqclip_mode="lite"))
        stab.begin_pass()
        with mode():
            outs.append(stab.post_cfg(x, 0, 3))
        assert stab.report()["errors"] == 0
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
