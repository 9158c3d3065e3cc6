"""QSilk (model) on ComfyUI's sampling path (double of ComfyUI a125cd84): every evaluation once, the
step window from sigmas, fresh state per run, CFG 1, the observing probe, other nodes' attention
patches, Flux-like and video models, inpainting masks, before-decode at the end of a run, errors."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from doubles import comfy as dc  # noqa: E402
from qsilk.hosts import comfy  # noqa: E402
from qsilk.settings import Settings  # noqa: E402
from qsilk.stabilizer import Stabilizer  # noqa: E402

SD = {"samples": torch.zeros(1, 4, 16, 16)}


def quantile_clamp(x, q_lo=0.001, q_hi=0.999):
    """Oracle: each row clamped to its own torch.quantile corridor."""
    flat = x.reshape(x.shape[0], -1).float()
    lo, hi = torch.quantile(flat, q_lo, dim=1), torch.quantile(flat, q_hi, dim=1)
    return torch.maximum(torch.minimum(flat, hi[:, None]), lo[:, None]).reshape(x.shape)


def recorder(model, log):
    """Another node: a clone whose new post-CFG function records each evaluation's x0."""
    clone = model.clone()

    def record(args):
        log.append((args["denoised"].clone(), args))
        return args["denoised"]

    clone.set_model_sampler_post_cfg_function(record)
    return clone


def qsilk(model, preset="Balanced", **overrides):
    return comfy.patch_model(model, Settings.from_preset(preset, **overrides))


def between(model, preset="Gentle", **overrides):
    """(patched model, x0 before QSilk, x0 after QSilk) per evaluation."""
    before, after = [], []
    patched = recorder(qsilk(recorder(model, before), preset, **overrides), after)
    return patched, before, after


@pytest.mark.parametrize("sampler_name, steps, evaluations", [("euler", 4, 4), ("heun", 4, 7)])
def test_every_evaluation_is_stabilised_exactly_once(monkeypatch, sampler_name, steps, evaluations):
    calls = []
    original = Stabilizer.post_cfg

    def counting(self, x0, *args, **kwargs):
        calls.append(x0)
        return original(self, x0, *args, **kwargs)

    monkeypatch.setattr(Stabilizer, "post_cfg", counting)
    patched, before, after = between(dc.sd15_like(), "Gentle")
    dc.ksampler(patched, SD, steps=steps, sampler_name=sampler_name)
    assert len(before) == len(after) == len(calls) == evaluations
    assert comfy.last_report(patched)["evaluations"] == evaluations
    for (x_in, _), (x_out, _) in zip(before, after):
        assert torch.allclose(x_out, quantile_clamp(x_in), atol=1e-5)
        assert not torch.equal(x_out, x_in)


def test_step_window_is_the_position_in_the_run_sigmas():
    patched, before, after = between(dc.sd15_like(), "Gentle", step_start=0.5)
    dc.ksampler(patched, SD, steps=6)
    # evaluation i of 6 is at progress i/5: 0, 0.2, 0.4 are before the window, 0.6, 0.8, 1 inside
    changed = [not torch.equal(b[0], a[0]) for b, a in zip(before, after)]
    assert changed == [False, False, False, True, True, True]


def test_step_window_with_heun_counts_the_extra_evaluation_as_the_next_step():
    patched, before, after = between(dc.sd15_like(), "Gentle", step_end=0.5)
    dc.ksampler(patched, SD, steps=3, sampler_name="heun")
    # sigmas s0 s1 s2 0: evaluations at s0, s1 (Heun), s1, s2 (Heun), s2 -> indices 0 1 1 2 2 of n = 3
    changed = [not torch.equal(b[0], a[0]) for b, a in zip(before, after)]
    assert changed == [True, True, True, False, False]


def test_step_window_with_dpm_2_counts_the_midpoint_evaluation_as_its_own_step():
    patched, before, after = between(dc.sd15_like(), "Gentle", step_end=0.5)
    dc.ksampler(patched, SD, steps=3, sampler_name="dpm_2")
    # sigmas s0 s1 s2 0: evaluations at s0, mid(s0, s1), s1, mid(s1, s2), s2 -> step_of_sigma's
    # indices 0 0 1 1 2 of n = 3 (the midpoint comes after the sampler's report of its step)
    changed = [not torch.equal(b[0], a[0]) for b, a in zip(before, after)]
    assert changed == [True, True, True, True, False]


def test_step_window_from_the_samplers_callback_never_reads_sigma(monkeypatch):
    """The evaluation's step comes from the sampler's own step callback (issue #14): σ, a device
    tensor on a GPU, is never read back per evaluation; the node's own callback still runs."""
    reads, seen = [], []
    monkeypatch.setattr(comfy, "step_of_sigma", lambda *a: reads.append(a) or (None, None))
    patched, before, after = between(dc.sd15_like(), "Gentle", step_start=0.5)
    original = dc.CFGGuider.sample

    def with_callback(self, *args, **kwargs):
        kwargs["callback"] = lambda step, x0, x, total: seen.append((step, total))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(dc.CFGGuider, "sample", with_callback)
    dc.ksampler(patched, SD, steps=6)
    assert [not torch.equal(b[0], a[0]) for b, a in zip(before, after)] == [False] * 3 + [True] * 3
    assert reads == [] and seen == [(i, 6) for i in range(6)]


def test_a_sampler_reporting_no_steps_falls_back_to_sigma_and_says_so(monkeypatch):
    def silent_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return dc.sample_euler(model, x, sigmas, extra_args=extra_args, callback=None, disable=disable)

    monkeypatch.setitem(dc.SAMPLERS, "silent", silent_euler)
    patched, before, after = between(dc.sd15_like(), "Gentle", step_start=0.5)
    dc.ksampler(patched, SD, steps=6, sampler_name="silent")
    assert [not torch.equal(b[0], a[0]) for b, a in zip(before, after)] == [False] * 3 + [True] * 3
    assert any("reports no steps" in n for n in comfy.last_report(patched)["notes"])


def test_step_of_sigma():
    schedule = [14.6, 7.0, 2.0, 0.5, 0.0]
    assert [comfy.step_of_sigma(s, schedule) for s in schedule[:4]] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert comfy.step_of_sigma(3.0, schedule) == (1, 4)
    assert comfy.step_of_sigma(20.0, schedule) == (0, 4)
    assert comfy.step_of_sigma(1.0, [0.5, 2.0, 0.0]) == (None, None)
    assert comfy.step_of_sigma(1.0, [1.0]) == (None, None)


def test_each_run_starts_fresh():
    model = dc.sd15_like()
    patched = qsilk(model, "Balanced")
    first = dc.ksampler(patched, SD, seed=3)["samples"]
    report = comfy.last_report(patched)
    dc.ksampler(patched, SD, seed=9)
    second = dc.ksampler(patched, SD, seed=3)["samples"]
    assert torch.equal(first, second)
    assert report["passes"] == comfy.last_report(patched)["passes"] == 1
    assert not torch.equal(first, dc.ksampler(model, SD, seed=3)["samples"])


def test_cfg_one_reads_no_uncond():
    model = dc.sd15_like()
    patched, before, after = between(model, "Balanced")
    out = dc.ksampler(patched, SD, cfg=1.0, steps=4)["samples"]
    assert torch.isfinite(out).all()
    assert model.model.unet_calls == 4  # one call per evaluation: no uncond pass
    assert all(args["uncond"] is None for _, args in before)
    report = comfy.last_report(patched)
    assert report["evaluations"] == 4 and report["attn_maps"] == 4 and report["errors"] == 0


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.model.modules())


@pytest.mark.parametrize("make", [dc.sd15_like, dc.sdxl_like])
def test_probe_maps_every_evaluation_and_hooks_live_only_during_the_run(make):
    model = make()
    seen = []

    def hooks_now(args):
        seen.append(_hooks(model))
        return args["denoised"]

    patched = qsilk(model, "Balanced").clone()
    patched.set_model_sampler_post_cfg_function(hooks_now)
    dc.ksampler(patched, {"samples": torch.zeros(2, 4, 16, 16)}, steps=3)
    report = comfy.last_report(patched)
    assert report["attn_maps"] == 3 and report["lite_fallbacks"] == 0 and report["notes"] == []
    assert seen == [2, 2, 2]  # to_q and to_k of the probed attn1, while sampling
    assert _hooks(model) == 0
    # the same modules sampled through the un-patched model: no hooks
    plain = model.clone()
    plain.set_model_sampler_post_cfg_function(hooks_now)
    seen.clear()
    dc.ksampler(plain, SD, steps=2)
    assert seen == [0, 0]


def _attention(q, k, v, heads, temperature):
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / (d ** 0.5 * temperature), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, inner)


def other_node(model, calls):
    """SAG/PAG/IPAdapter-style: an attn1 patch that changes the hidden states, and an attn1 replace
    on the very block QSilk probes (``output_blocks.3``, transformer 0)."""
    clone = model.clone()

    def patch(n, context, value, extra_options):
        calls["patch"] += 1
        return n * 1.05, context, value

    def replace(q, k, v, extra_options):
        calls["replace"] += 1
        return _attention(q, k, v, extra_options["n_heads"], 0.7)

    clone.set_model_attn1_patch(patch)
    clone.set_model_attn1_replace(replace, "output", 3, 0)
    return clone


@pytest.mark.parametrize("qsilk_first", [False, True])
def test_other_attention_patches_work_and_the_probe_only_observes(qsilk_first):
    model = dc.sd15_like()
    ref_calls, calls = {"patch": 0, "replace": 0}, {"patch": 0, "replace": 0}
    reference = dc.ksampler(other_node(model, ref_calls), SD, steps=3)["samples"]
    # probe on, every component's effect off: the output must be the other node's alone
    observe_only = dict(qsilk_enabled=False, aqclip_strength=0.0)
    if qsilk_first:
        patched = other_node(qsilk(model, "Balanced", **observe_only), calls)
    else:
        patched = qsilk(other_node(model, calls), "Balanced", **observe_only)
    out = dc.ksampler(patched, SD, steps=3)["samples"]
    assert torch.equal(out, reference)
    assert calls == ref_calls and calls["replace"] == 3  # cond and uncond rows batched: one UNet call per evaluation
    assert comfy.last_report(patched)["attn_maps"] == 3
    assert not any(key[0] != "output" for key in patched.model_options["transformer_options"]
                   .get("patches_replace", {}).get("attn1", {})), "QSilk took a replace key"


def test_flux_like_model_uses_lite_with_a_note(caplog):
    model = dc.flux_like()
    patched = qsilk(model, "Balanced")
    assert "patches" not in patched.model_options["transformer_options"]
    with caplog.at_level(logging.INFO, logger="qsilk"):
        out = dc.ksampler(patched, {"samples": torch.zeros(1, 16, 16, 16)}, steps=3)["samples"]
    report = comfy.last_report(patched)
    assert torch.isfinite(out).all()
    assert report["evaluations"] == 3 and report["lite_fallbacks"] == 3 and report["attn_maps"] == 0
    assert any("no UNet self-attention" in n and "TinyFlux" in n for n in report["notes"])
    assert any(r.levelno == logging.WARNING and "Lite" in r.getMessage() for r in caplog.records)


def test_video_latent_is_stabilised_per_frame():
    patched, before, after = between(dc.video_like(), "Gentle")
    out = dc.ksampler(patched, {"samples": torch.zeros(1, 16, 3, 8, 8)}, steps=3, cfg=1.0)["samples"]
    assert out.shape == (1, 16, 3, 8, 8) and len(before) == 3
    for (x_in, _), (x_out, _) in zip(before, after):
        per_frame = torch.stack([quantile_clamp(x_in[:, :, t]) for t in range(3)], dim=2)
        assert torch.allclose(x_out, per_frame, atol=1e-5)
    report = comfy.last_report(patched)
    assert report["evaluations"] == 3 and report["errors"] == 0


def test_video_latent_balanced_skips_the_probe_with_a_note():
    patched = qsilk(dc.video_like(), "Balanced")
    dc.ksampler(patched, {"samples": torch.zeros(1, 16, 2, 8, 8)}, steps=2, cfg=1.0)
    report = comfy.last_report(patched)
    assert report["lite_fallbacks"] == 2 and report["attn_maps"] == 0
    assert any("video latent" in n for n in report["notes"])


def test_inpainting_mask_limits_the_change():
    patched, before, after = between(dc.sd15_like(), "Gentle")
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., :, 64:] = 1.0
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)), "noise_mask": mask}
    out = dc.ksampler(patched, latent, steps=3, denoise=0.6)
    assert out["noise_mask"] is mask
    for (x_in, _), (x_out, _) in zip(before, after):
        assert torch.equal(x_out[..., :8], x_in[..., :8])
        assert torch.allclose(x_out[..., 8:], quantile_clamp(x_in)[..., 8:], atol=1e-5)


def test_per_pass_components_run_on_the_run_output_when_it_ends_clean():
    model = dc.sd15_like()
    plain = dc.ksampler(model, SD, steps=3)["samples"]
    patched = qsilk(model, "Gentle", qsilk_placement="per_pass")
    assert "sampler_post_cfg_function" not in patched.model_options  # nothing per step
    out = dc.ksampler(patched, SD, steps=3)["samples"]
    assert torch.allclose(out, quantile_clamp(plain), atol=1e-5) and not torch.equal(out, plain)
    assert comfy.last_report(patched)["pre_decodes"] == 1
    off = qsilk(model, "Gentle", qsilk_placement="per_pass", pre_decode="off")
    assert torch.equal(dc.ksampler(off, SD, steps=3)["samples"], plain)


def test_a_run_ending_with_leftover_noise_is_not_stabilised_before_decode():
    model = dc.sd15_like()
    sigmas = dc.simple_sigmas(model, 6)[:4]  # KSamplerAdvanced end_at_step=3, leftover noise
    plain = dc.ksampler(model, SD, sigmas=sigmas)["samples"]
    patched = qsilk(model, "Paper (literal)")
    out = dc.ksampler(patched, SD, sigmas=sigmas)["samples"]
    assert torch.equal(out, plain)
    report = comfy.last_report(patched)
    assert report["pre_decodes"] == 0 and any("leftover noise" in n for n in report["notes"])


@pytest.mark.parametrize("sampler_name", dc.SAMPLER_NAMES)
def test_every_comfyui_sampler_ending_at_zero_is_stabilised_before_decode(sampler_name):
    """ComfyUI's whole sampler list; uni_pc and uni_pc_bh2 set the run's last σ to 0.001 in place,
    so "ends at σ = 0" must come from the sigmas as they were before sampling."""
    model = dc.sd15_like()
    sigmas = dc.simple_sigmas(model, 3)
    plain = dc.ksampler(model, SD, sampler_name=sampler_name, sigmas=sigmas.clone())["samples"]
    patched = qsilk(model, "Paper (literal)")  # before-decode only: nothing per step
    given = sigmas.clone()
    out = dc.ksampler(patched, SD, sampler_name=sampler_name, sigmas=given)["samples"]
    report = comfy.last_report(patched)
    assert report["pre_decodes"] == 1 and report["evaluations"] == 0
    assert not any("leftover noise" in n for n in report["notes"])
    assert not torch.equal(out, plain)
    mutates = sampler_name in ("uni_pc", "uni_pc_bh2")
    assert float(given[-1]) == pytest.approx(0.001 if mutates else 0.0)  # the double mirrors the host


@pytest.mark.parametrize("sampler_name", ["uni_pc", "uni_pc_bh2", "euler"])
def test_a_leftover_noise_run_is_still_left_alone_whatever_the_sampler(sampler_name):
    model = dc.sd15_like()
    sigmas = dc.simple_sigmas(model, 6)[:4]  # KSamplerAdvanced end_at_step=3
    plain = dc.ksampler(model, SD, sampler_name=sampler_name, sigmas=sigmas.clone())["samples"]
    patched = qsilk(model, "Paper (literal)")
    out = dc.ksampler(patched, SD, sampler_name=sampler_name, sigmas=sigmas.clone())["samples"]
    assert torch.equal(out, plain)
    report = comfy.last_report(patched)
    assert report["pre_decodes"] == 0 and sum("leftover noise" in n for n in report["notes"]) == 1


def test_uni_pc_keeps_the_step_window_of_the_schedule_it_was_given():
    """The window is placed on the schedule read before sampling (uni_pc's in-place 0.001 is not a
    step): with step_end 0.5 of 4 steps, evaluations 0 and 1 change, 2 and 3 do not."""
    model = dc.sd15_like()
    windows = {}
    for name in ("euler", "uni_pc"):
        patched, before, after = between(model, "Gentle", step_end=0.5)
        dc.ksampler(patched, SD, sampler_name=name, steps=4)
        windows[name] = [not torch.equal(a[0], b[0]) for (a, b) in zip(after, before)]
    assert windows["uni_pc"] == windows["euler"] == [True, True, False, False]


def test_a_second_qsilk_node_replaces_the_first():
    model = dc.sd15_like()
    once = qsilk(model, "Balanced")
    twice = qsilk(qsilk(model, "Crisp"), "Balanced")
    assert len(twice.model_options["sampler_post_cfg_function"]) == 2  # fence + QSilk
    assert len(twice.model_options["transformer_options"]["patches"]["attn1_patch"]) == 1
    assert len(twice.get_wrappers("sampler_sample", "qsilk")) == 1
    assert torch.equal(dc.ksampler(once, SD)["samples"], dc.ksampler(twice, SD)["samples"])
    assert comfy.last_report(twice)["evaluations"] == 4


def test_a_downstream_qsilk_node_set_to_off_leaves_the_upstream_one_active():
    """The README's rule: an active QSilk node replaces an earlier QSilk patch on the same model; one
    set to Off (switch or preset) passes its input through, so the earlier patch still runs."""
    from qsilk.hosts import comfy_nodes as nodes

    model = dc.sd15_like()
    upstream = nodes.QSilkModel().patch(model, True, "Crisp")[0]
    for downstream in (nodes.QSilkModel().patch(upstream, False, "Balanced")[0],
                       nodes.QSilkModel().patch(upstream, True, "Off")[0],
                       nodes.QSilkModelAdvanced().patch(upstream, False)[0]):
        assert downstream is upstream
    crisp = dc.ksampler(qsilk(model, "Crisp"), SD)["samples"]
    assert torch.equal(dc.ksampler(nodes.QSilkModel().patch(upstream, False, "Balanced")[0], SD)["samples"], crisp)
    assert not torch.equal(dc.ksampler(model, SD)["samples"], crisp)


def test_glue_errors_pass_through(monkeypatch, caplog):
    model = dc.sd15_like()
    plain = dc.ksampler(model, SD, steps=3)["samples"]

    def broken(self, args):
        raise RuntimeError("boom")

    monkeypatch.setattr(comfy.ComfyRun, "post_cfg", broken)
    patched = qsilk(model, "Balanced", pre_decode="off")
    with caplog.at_level(logging.INFO, logger="qsilk"):
        out = dc.ksampler(patched, SD, steps=3)["samples"]
    assert torch.equal(out, plain)
    assert any("boom" in n for n in comfy.last_report(patched)["notes"])
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert _hooks(model) == 0
    # "auto": the components that did not run on the last evaluation run before decode instead
    auto = dc.ksampler(qsilk(model, "Gentle"), SD, steps=3)["samples"]
    assert torch.allclose(auto, quantile_clamp(plain), atol=1e-5)


def test_summary_line_is_logged_at_info(caplog):
    patched = qsilk(dc.sd15_like(), "Balanced")
    with caplog.at_level(logging.INFO):  # ComfyUI's root logger level (app/logger.py)
        dc.ksampler(patched, SD, steps=3)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name == "qsilk"]
    assert lines == ["QSilk (comfyui): 1 pass(es), 3 evaluation(s) stabilised: 3 attention map(s), "
                     "0 Lite fallback(s); 0 pre-decode(s), " + lines[0].split("pre-decode(s), ")[1]]
    assert logging.getLogger("qsilk").propagate


def test_an_interrupted_run_leaves_no_hooks_and_the_next_run_works():
    model = dc.sd15_like()
    patched = qsilk(model, "Balanced")
    interrupting = patched.clone()

    def interrupt(args):  # ComfyUI's interrupt raises from inside the sampler
        raise KeyboardInterrupt("interrupted")

    interrupting.set_model_sampler_post_cfg_function(interrupt)
    with pytest.raises(KeyboardInterrupt):
        dc.ksampler(interrupting, SD, steps=3)
    assert _hooks(model) == 0
    state = patched.get_wrappers("sampler_sample", "qsilk")[0].qsilk_state
    assert state.run is None
    dc.ksampler(patched, SD, steps=3)
    assert comfy.last_report(patched)["attn_maps"] == 3


#: Evaluation σ and step reports ("cb", i) in the order the real samplers make them
#: (ComfyUI a125cd84 ``comfy/k_diffusion/sampling.py``, recorded with a stand-in model on this schedule).
RECORDED_SCHEDULE = [14.6, 7.0, 3.5, 1.5, 0.6, 0.0]
RECORDED = {
    "sample_heunpp2": [14.6, 0, 7.0, 3.5, 7.0, 1, 3.5, 1.5, 3.5, 2, 1.5, 0.6, 1.5, 3, 0.6, 0.6, 4],
    "sample_sa_solver_pece": [14.6, 0, 7.0, 1, 7.0, 3.5, 2, 3.5, 1.5, 3, 1.5, 0.6, 4, 0.6],
    "sample_dpm_2": [14.6, 0, 10.109, 7.0, 1, 4.95, 3.5, 2, 2.291, 1.5, 3, 0.949, 0.6, 4],
    "sample_seeds_3": [14.6, 0, 11.427, 8.944, 7.0, 1, 5.556, 4.41, 3.5, 2, 2.639, 1.99, 1.5, 3, 1.105, 0.814,
                       0.6, 4],
    "sample_heun": [14.6, 0, 7.0, 7.0, 1, 3.5, 3.5, 2, 1.5, 1.5, 3, 0.6, 4],
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_step_window_index_from_reports_matches_step_of_sigma_on_real_sequences(name):
    """Each evaluation's step, from the sampler's reports and the evaluations since (no σ read),
    is `step_of_sigma`'s index of its σ."""
    import types
    run = comfy.ComfyRun(Settings.from_preset("Gentle", step_start=0.3),
                         types.SimpleNamespace(sampler_function=types.SimpleNamespace(__name__=name)),
                         torch.tensor(RECORDED_SCHEDULE), None)
    report, got, expected = run.step_callback(None), [], []
    run.stabilizer.post_cfg = lambda x0, step, total, *a, **k: got.append(step) or x0
    for event in RECORDED[name]:
        if isinstance(event, int):
            report(event, None, None, len(RECORDED_SCHEDULE) - 1)
            continue
        run.post_cfg({"denoised": torch.zeros(1, 4, 8, 8), "sigma": torch.tensor([event])})
        expected.append(comfy.step_of_sigma(event, RECORDED_SCHEDULE)[0])
    assert got == expected and len(got) == sum(isinstance(e, float) for e in RECORDED[name])
