"""The per-job Stabilizer (spec §4): step window, passes, pre-decode, ε↔x0, inpainting, report.

Orchestration tests replace the two core functions with recording stand-ins (so they test *when*
and *how* the Stabilizer calls them); the end-to-end tests at the bottom use the real ones.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qsilk.stabilizer as stab_mod
from qsilk.settings import Settings
from qsilk.stabilizer import (ALPHA_BAR_MIN, Stabilizer, eps_after_x0_change, eps_to_x0, progress,
                              progress_from_sigma, x0_to_eps)


class Recorder:
    """Stand-ins for the core's `clamp_unmasked` / `aqclip_unmasked` (what the Stabilizer calls:
    `micro_clamp` / `aqclip` without their pass-through of non-finite samples, which the Stabilizer
    does once) that make a visible change and record their calls."""

    def __init__(self):
        self.calls: list[tuple[str, torch.Tensor, dict]] = []

    def clamp_unmasked(self, x, q_lo=0.001, q_hi=0.999, shape="hard", alpha=2.0, per_channel=False,
                       out_dtype=None):
        self.calls.append(("qsilk", x, dict(q_lo=q_lo, q_hi=q_hi, shape=shape)))
        return x.clamp(-1.0, 1.0), torch.ones(x.shape[0], dtype=torch.bool)

    def aqclip_unmasked(self, x, confidence=None, finite=None, return_maps=False, out_dtype=None, **kw):
        self.calls.append(("aqclip", x, dict(confidence=confidence, **kw)))
        return x * 0.5, torch.ones(x.shape[0], dtype=torch.bool), None

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def rec(monkeypatch):
    r = Recorder()
    monkeypatch.setattr(stab_mod, "clamp_unmasked", r.clamp_unmasked)
    monkeypatch.setattr(stab_mod, "aqclip_unmasked", r.aqclip_unmasked)
    return r


def lat(seed=0, B=2, C=4, H=8, W=8, scale=2.0, dtype=torch.float32):
    return (torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def make(preset="Balanced", **overrides) -> Stabilizer:
    return Stabilizer(Settings.from_preset(preset, **overrides))


# --- step window -------------------------------------------------------------------------------

def test_progress_is_i_over_n_minus_1():
    assert [progress(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert progress(0, 1) == 1.0 and progress(7, 4) == 1.0


def test_progress_from_sigma_log_scale():
    smax, smin = 14.6, 0.03
    for sigma in (14.6, 3.0, 0.5, 0.03):
        want = (math.log(smax) - math.log(sigma)) / (math.log(smax) - math.log(smin))
        assert progress_from_sigma(sigma, smax, smin) == pytest.approx(want)
    assert progress_from_sigma(100.0, smax, smin) == 0.0 and progress_from_sigma(0.001, smax, smin) == 1.0


def test_step_window_by_progress(rec):
    s = make(step_start=0.25, step_end=0.5, aqclip_enabled=False)
    s.begin_pass()
    applied = []
    for i in range(5):
        x = lat(i)
        applied.append(s.post_cfg(x, i, 5) is not x)
    assert applied == [False, True, True, False, False]
    assert rec.names() == ["qsilk", "qsilk"]


def test_step_window_last_evaluation_reaches_one(rec):
    """A DDIM-style pass of n evaluations: i = n−1 is progress 1 and is inside [0.9, 1]."""
    s = make(step_start=1.0, step_end=1.0, aqclip_enabled=False)
    s.begin_pass()
    xs = [lat(i) for i in range(19)]
    applied = [s.post_cfg(x, i, 19) is not x for i, x in enumerate(xs)]
    assert applied == [False] * 18 + [True] and len(rec.calls) == 1


def test_step_window_sigma_fallback(rec):
    s = make(step_start=0.0, step_end=0.5, aqclip_enabled=False)
    s.begin_pass(sigma_max=14.6, sigma_min=0.03)
    x = lat()
    assert s.post_cfg(x, None, None, sigma=14.6) is not x      # progress 0
    assert s.post_cfg(x, None, None, sigma=0.05) is x          # progress ≈ 0.92
    mid = math.exp((math.log(14.6) + math.log(0.03)) / 2)
    assert s.post_cfg(x, None, None, sigma=mid * 1.01) is not x  # just before the middle
    # unknown position (no step, no sigma range): treated as inside the window
    s.begin_pass()
    assert s.post_cfg(x, None, None, sigma=0.05) is not x


# --- passes ------------------------------------------------------------------------------------

def test_begin_pass_resets_ema_state_even_for_same_shape(rec):
    s = make(qsilk_enabled=False)
    states = []
    for _ in range(2):
        s.begin_pass()
        for i in range(3):
            s.post_cfg(lat(i), i, 3)
        states.append([c[2]["state"] for c in rec.calls])
        rec.calls.clear()
    first, second = states
    assert all(st_ is first[0] for st_ in first) and all(st_ is second[0] for st_ in second)
    assert first[0] is not second[0] and not second[0].has_attn


def test_ema_beta_per_evaluation(rec):
    s = make(qsilk_enabled=False, ema_beta=0.81)
    s.begin_pass(evaluations_per_step=2)
    s.post_cfg(lat(), 0, 10)
    assert rec.calls[0][2]["ema_beta"] == pytest.approx(0.9)


@pytest.mark.parametrize("hires,runs", [(True, True), (False, False)])
def test_hires_toggle(rec, hires, runs):
    s = make(hires=hires, pre_decode="always")
    s.begin_pass()
    x = lat()
    assert s.post_cfg(x, 0, 2) is not x
    s.begin_pass(is_hires=True)
    assert (s.post_cfg(x, 0, 2) is not x) == runs
    y = lat(5)
    assert (s.pre_decode(y) is not y) == runs


def test_before_begin_pass_nothing_runs(rec):
    s = make()
    x = lat()
    assert s.post_cfg(x, 0, 10) is x and s.pre_decode(x) is x and not rec.calls


# --- pre-decode (spec §4.2) ----------------------------------------------------------------------

def run_pass(s, n=4):
    s.begin_pass()
    for i in range(n):
        s.post_cfg(lat(i), i, n)


def test_pre_decode_auto_skips_components_that_ran_on_last_evaluation(rec):
    s = make()
    run_pass(s)
    rec.calls.clear()
    x = lat(9)
    assert s.pre_decode(x) is x and not rec.calls


def test_pre_decode_auto_runs_when_window_ends_before_one(rec):
    s = make(step_end=0.5)
    run_pass(s)
    rec.calls.clear()
    x = lat(9)
    out = s.pre_decode(x)
    assert out is not x and rec.names() == ["qsilk", "aqclip"]
    assert rec.calls[1][2]["state"] is None  # no EMA before decode


def test_pre_decode_auto_runs_per_pass_components_only(rec):
    s = make(qsilk_placement="per_pass")
    run_pass(s)
    assert "qsilk" not in rec.names()  # per_pass: not per step
    rec.calls.clear()
    s.pre_decode(lat(9))
    assert rec.names() == ["qsilk"]


def test_pre_decode_always_runs_every_enabled_component(rec):
    s = make(pre_decode="always", aqclip_enabled=False)
    run_pass(s)
    rec.calls.clear()
    s.pre_decode(lat(9))
    assert rec.names() == ["qsilk"]


def test_pre_decode_off_never_runs(rec):
    s = make(pre_decode="off", qsilk_placement="per_pass", aqclip_placement="per_pass")
    run_pass(s)
    x = lat(9)
    assert s.pre_decode(x) is x and not rec.calls


def test_one_latent_stabilised_at_most_once(rec):
    s = make(pre_decode="always")
    run_pass(s)
    rec.calls.clear()
    x = lat(9)
    first = s.pre_decode(x)
    second = s.pre_decode(x)      # e.g. hires first-pass decode, then latent upscale of the same latent
    assert second is first and rec.names() == ["qsilk", "aqclip"]
    assert s.pre_decode(first) is first  # the host passes the stabilised latent on to the next decode
    assert len(rec.calls) == 2
    assert s.report()["pre_decodes"] == 1
    s.begin_pass()                # a new pass forgets it
    s.pre_decode(x)
    assert len(rec.calls) == 4


# --- ε ↔ x0 (spec §4.1) -------------------------------------------------------------------------

@given(a=st.floats(1e-4, 0.9999), seed=st.integers(0, 100))
@settings(max_examples=50, deadline=None)
def test_eps_x0_round_trip(a, seed):
    x_t, eps = lat(seed).double(), lat(seed + 1).double()
    x0 = eps_to_x0(x_t, eps, torch.tensor(a, dtype=torch.float64))
    torch.testing.assert_close(x0_to_eps(x_t, x0, torch.tensor(a, dtype=torch.float64)).double(), eps,
                               rtol=1e-6, atol=1e-6 / math.sqrt(1 - a))


def test_eps_after_x0_change_exact_where_untouched_and_gives_sampler_x0():
    x_t, eps = lat(0), lat(1)
    a = torch.tensor([0.3, 0.9])
    x0 = eps_to_x0(x_t, eps, a)
    x0_new = x0.clone()
    x0_new[0, 1, 2:5, 3] = 0.0
    x0_new[1, 3] = x0_new[1, 3].clamp(-0.5, 0.5)
    eps_new = eps_after_x0_change(eps, a, x0, x0_new)
    untouched = x0_new == x0
    assert torch.equal(eps_new[untouched], eps[untouched])
    # A1111/ldm DDIM: pred_x0 = (x − √(1−a)·e_t) / √a
    ar = a.view(-1, 1, 1, 1)
    pred_x0 = (x_t - (1 - ar).sqrt() * eps_new) / ar.sqrt()
    torch.testing.assert_close(pred_x0, x0_new, rtol=1e-5, atol=1e-5)


def test_post_cfg_eps_sampler_x0_equals_stabilised_x0(rec):
    s = make(aqclip_enabled=False)
    s.begin_pass()
    x_t, eps = lat(0, scale=1.0), lat(1, scale=1.5)
    a = torch.tensor([0.2, 0.7])
    eps_new = s.post_cfg_eps(x_t, eps, a, 0, 10)
    x0 = eps_to_x0(x_t, eps, a)
    ar = a.view(-1, 1, 1, 1)
    pred_x0 = (x_t - (1 - ar).sqrt() * eps_new) / ar.sqrt()
    torch.testing.assert_close(pred_x0, x0.clamp(-1, 1), rtol=1e-5, atol=2e-5)
    inside = x0.abs() < 1
    assert torch.equal(eps_new[inside], eps[inside])


def test_post_cfg_eps_terminal_snr_rows_pass_through(rec):
    s = make(aqclip_enabled=False)
    s.begin_pass()
    x_t, eps = lat(0), lat(1, scale=3.0)
    a = torch.tensor([0.0, 0.5])    # row 0: zero terminal SNR
    eps_new = s.post_cfg_eps(x_t, eps, a, 0, 10)
    assert torch.equal(eps_new[0], eps[0]) and not torch.equal(eps_new[1], eps[1])
    assert s.report()["terminal_snr_rows"] == 1
    assert ALPHA_BAR_MIN == 1e-6


# --- inpainting, strength -----------------------------------------------------------------------

def test_nmask_blend_only_where_generated_statistics_on_whole_latent(rec):
    s = make(aqclip_enabled=False)
    s.begin_pass()
    x = lat(0)
    nmask = torch.zeros(2, 1, 8, 8)
    nmask[:, :, :, 4:] = 1.0
    nmask[:, :, 0, 4:] = 0.5
    out = s.post_cfg(x, 0, 10, nmask=nmask)
    assert rec.calls[0][1] is x  # the clamp saw the whole latent
    assert torch.equal(out[..., :4], x[..., :4])
    assert torch.equal(out[..., 1:, 4:], x.clamp(-1, 1)[..., 1:, 4:])
    torch.testing.assert_close(out[..., 0, 4:], x[..., 0, 4:] + 0.5 * (x.clamp(-1, 1) - x)[..., 0, 4:])


def test_strength_blends_and_zero_is_identity(rec):
    s = make(aqclip_enabled=False, qsilk_strength=0.25)
    s.begin_pass()
    x = lat(0)
    torch.testing.assert_close(s.post_cfg(x, 0, 10), torch.lerp(x, x.clamp(-1, 1), 0.25))
    s = make(aqclip_enabled=False, qsilk_strength=0.0)
    s.begin_pass()
    assert torch.equal(s.post_cfg(x, 0, 10), x)


# --- report, errors, off ---------------------------------------------------------------------------

def test_report_counts(rec):
    s = make()
    s.begin_pass()
    for i in range(3):
        s.post_cfg(lat(i), i, 3, probe_map=torch.rand(2, 1, 8, 8) if i == 1 else None)
    r = s.report()
    assert (r["passes"], r["evaluations"], r["attn_maps"], r["errors"], r["nan_passthrough"]) == (1, 3, 1, 0, 0)
    assert r["lite_fallbacks"] == 2
    assert len(r["changed_share_per_channel"]) == 4 and all(0 < v <= 1 for v in r["changed_share_per_channel"])
    assert r["seconds"] > 0
    assert [c[2]["confidence"] is not None for c in rec.calls if c[0] == "aqclip"] == [False, True, False]


def test_lite_mode_never_counts_fallbacks(rec):
    s = make(aqclip_mode="lite")
    s.begin_pass()
    s.post_cfg(lat(), 0, 3, probe_map=torch.rand(2, 1, 8, 8))
    assert rec.calls[-1][2]["confidence"] is None and s.report()["lite_fallbacks"] == 0


def test_post_cfg_never_raises(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kaput")
    monkeypatch.setattr(stab_mod, "clamp_unmasked", boom)
    monkeypatch.setattr(stab_mod, "aqclip_unmasked", boom)
    s = make()
    s.begin_pass()
    x = lat()
    assert s.post_cfg(x, 0, 3) is x
    s = make(qsilk_placement="per_pass")
    s.begin_pass()
    assert s.pre_decode(x) is x
    r = s.report()
    assert r["errors"] == 1 and any("kaput" in n for n in r["notes"])


@pytest.mark.parametrize("settings_", [Settings.from_preset("Off"), Settings.from_preset("Balanced", enabled=False),
                                       Settings.from_preset("Gentle", qsilk_enabled=False)])
def test_off_is_not_enabled_and_passes_everything_through(rec, settings_):
    s = Stabilizer(settings_)
    assert s.enabled is False
    s.begin_pass()
    x = lat()
    assert s.post_cfg(x, 0, 3) is x and s.pre_decode(x) is x
    assert s.post_cfg_eps(x, x, torch.tensor(0.5), 0, 3) is x
    assert not rec.calls


def test_on_presets_are_enabled():
    for name in ("Gentle", "Balanced", "Crisp", "High-res", "Paper (literal)"):
        assert Stabilizer(Settings.from_preset(name)).enabled


# --- end to end with the real core functions ----------------------------------------------------------

def test_nan_sample_passes_through_and_is_counted():
    s = make()
    s.begin_pass()
    x = lat(0, B=3, H=16, W=16, scale=3.0)
    x[1, 2, 5, 5] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    out = s.post_cfg(x, 0, 10)
    assert torch.equal(out[1].nan_to_num(7.0), x[1].nan_to_num(7.0)) and torch.equal(out[2], x[2])
    assert not torch.equal(out[0], x[0]) and torch.isfinite(out[0]).all()
    r = s.report()
    assert r["nan_passthrough"] == 2 and r["errors"] == 0
    assert any("non-finite" in n for n in r["notes"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_real_core_dtype_preserved_and_x0_bounded(dtype):
    s = make()
    s.begin_pass()
    x = lat(1, H=20, W=28, scale=2.0, dtype=dtype)
    out = s.post_cfg(x, 0, 10, probe_map=torch.rand(2, 1, 20, 28))
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    assert float(out.float().abs().max()) <= float(x.float().abs().max())
    assert s.report()["attn_maps"] == 1


def test_real_core_eps_sampler_x0_equals_stabilised_x0():
    s = make()
    s.begin_pass()
    x_t, eps = lat(0, H=16, W=16, scale=1.0), lat(1, H=16, W=16, scale=1.2)
    a = torch.tensor([0.05, 0.6])
    eps_new = s.post_cfg_eps(x_t, eps, a, 3, 10)
    x0 = eps_to_x0(x_t, eps, a)
    ref = make()  # a fresh pass: the first AQClip update sets the EMA state, as in `s`
    ref.begin_pass()
    x0_new = ref.post_cfg(x0, 3, 10)
    ar = a.view(-1, 1, 1, 1)
    pred_x0 = (x_t - (1 - ar).sqrt() * eps_new) / ar.sqrt()
    torch.testing.assert_close(pred_x0, x0_new, rtol=1e-4, atol=1e-4)


# --- video latents (B, C, T, H, W): each latent frame is an image ---------------------------------
def video(seed=0, B=2, C=16, T=3, H=12, W=10, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, H, W, generator=g) * scale
    x[:, :, 0] *= 3.0  # frame 0 of a causal video VAE has statistics of its own
    return x


@pytest.mark.parametrize("preset", ["Gentle", "Balanced", "Crisp"])
def test_video_latent_is_stabilised_frame_by_frame(preset):
    """The oracle stabilises every (sample, frame) image on its own, with a fresh stabiliser."""
    x = video()
    s = make(preset, aqclip_mode="lite", tile=8, stride=4)
    s.begin_pass()
    out = s.post_cfg(x, 2, 6)
    assert out.shape == x.shape and not torch.equal(out, x)
    expected = torch.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[2]):
            ref = make(preset, aqclip_mode="lite", tile=8, stride=4)
            ref.begin_pass()
            expected[b, :, t] = ref.post_cfg(x[b:b + 1, :, t].clone(), 2, 6)[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert s.report()["evaluations"] == 1


def test_video_latent_per_sample_arguments_follow_their_frames():
    """A per-sample σ and a 5-D inpainting mask reach the rows of their own frames."""
    x = video(1, B=2, T=2)
    nmask = torch.zeros(2, 1, 2, 12, 10)
    nmask[1, :, 1] = 1.0  # only sample 1, frame 1 may change
    seen = {}

    def preconditioner(d, x_noisy, sigma, c_skip, where):
        seen["sigma"], seen["x_noisy"] = sigma, x_noisy
        return d

    s = Stabilizer(Settings.from_preset("Gentle"), preconditioner=preconditioner)
    s.begin_pass()
    out = s.post_cfg(x, 0, 4, sigma=torch.tensor([3.0, 5.0]), nmask=nmask, x_noisy=x * 2)
    assert seen["sigma"].tolist() == [3.0, 3.0, 5.0, 5.0]  # rows b·T + t
    torch.testing.assert_close(seen["x_noisy"][3], x[1, :, 1] * 2)
    changed = (out != x).flatten(3).any(-1).any(1)  # (B, T)
    assert changed.tolist() == [[False, False], [False, True]]


def test_video_latent_pre_decode_once_and_identity_when_off():
    x = video(2)
    s = make("Gentle", pre_decode="always")
    s.begin_pass()
    out = s.pre_decode(x)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert s.pre_decode(x) is out and s.pre_decode(out) is out  # one latent, stabilised once
    assert s.report()["pre_decodes"] == 1
    off = make("Gentle", step_start=0.5)  # outside the window: the very same object comes back
    off.begin_pass()
    assert off.post_cfg(x, 0, 10) is x
