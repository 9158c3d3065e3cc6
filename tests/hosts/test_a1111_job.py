"""Whole jobs through the AUTOMATIC1111 double (v1.10.1 and v1.6.0 flows; see tests/doubles/a1111.py).

The real ``scripts/qsilk.py`` is loaded the way the WebUI loads it and driven through the double's
processing flow: txt2img with hires fix (latent and pixel upscaler), img2img and inpainting,
batches, AND prompts, Euler/Heun/DDIM/PLMS, a model reload mid-job, an interrupt and a crash.
A spy subclass of the real `Stabilizer` records what the adapter passed it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from doubles import a1111 as d  # noqa: E402

from qsilk.hosts import a1111 as adapter  # noqa: E402
from qsilk.hosts import common  # noqa: E402
from qsilk.settings import PARAMS, Settings  # noqa: E402
from qsilk.stabilizer import Stabilizer  # noqa: E402

SMALL = dict(width=64, height=64, steps=3)
HIRES = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.6)


class SpyStabilizer(Stabilizer):
    """The real Stabilizer, recording every call the adapter makes (top-level calls only)."""

    instances: list["SpyStabilizer"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        SpyStabilizer.instances.append(self)
        self.calls: list[tuple] = []
        self.outputs: list[torch.Tensor] = []
        self.pre_decoded: list[tuple] = []
        self.pass_args: list[dict] = []
        self._depth = 0

    def begin_pass(self, **kwargs):
        self.pass_args.append(kwargs)
        return super().begin_pass(**kwargs)

    def post_cfg(self, x0, step, total_steps, probe_map=None, **kwargs):
        top = self._depth == 0
        self._depth += 1
        try:
            out = super().post_cfg(x0, step, total_steps, probe_map, **kwargs)
        finally:
            self._depth -= 1
        if top:
            self.calls.append(("x0", step, total_steps, probe_map, kwargs, self._pass.active))
            self.outputs.append(out)
        return out

    def post_cfg_eps(self, x_t, eps, alpha_bar, step, total_steps, probe_map=None, **kwargs):
        self._depth += 1
        try:
            out = super().post_cfg_eps(x_t, eps, alpha_bar, step, total_steps, probe_map, **kwargs)
        finally:
            self._depth -= 1
        self.calls.append(("eps", step, total_steps, probe_map, {**kwargs, "alpha_bar": alpha_bar, "x_t": x_t,
                                                                 "eps": eps}, self._pass.active))
        self.outputs.append(out)
        return out

    def pre_decode(self, latent, nmask=None):
        out = super().pre_decode(latent, nmask=nmask)
        self.pre_decoded.append((latent, out, nmask))
        return out


@pytest.fixture
def webui(monkeypatch):
    SpyStabilizer.instances = []
    monkeypatch.setattr(common, "Stabilizer",  # the adapters build it via common.job_stabilizer
                         SpyStabilizer)
    w = d.WebUI("1.10.1").install()
    yield w
    w.uninstall()


@pytest.fixture
def harness(webui):
    return d.Harness(str(ROOT), webui)


def api_args(**values):
    """An ``alwayson_scripts`` request that sends one dict."""
    return [values]


def snapshot(webui):
    """Everything QSilk could leave installed."""
    return (sorted((cat, repr(fn)) for cat, fn in webui.installed_callbacks()),
            webui.sd_samplers.create_sampler, webui.forward_hooks())


def assert_clean(webui, before, p=None):
    assert snapshot(webui) == before
    assert webui.sd_samplers.create_sampler is d.create_sampler
    if p is not None:
        assert "sample" not in p.__dict__, "p.sample must be the class method again"
        assert "qsilk_job" not in p.__dict__


def only_spy():
    assert len(SpyStabilizer.instances) == 1
    return SpyStabilizer.instances[0]


# -- every evaluation, exactly once; every decode and upscale after pre_decode --------------------
@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_job_stabilises_each_evaluation_once_and_every_decode_and_upscale(harness, webui, upscaler):
    before = snapshot(webui)
    processed = harness.txt2img(**SMALL, **HIRES, hr_upscaler=upscaler)
    spy = only_spy()

    evaluations = webui.log["evaluations"]
    # 3 first-pass steps; hires: explicit steps 3 → t_enc = 3 − 1 = 2 → 3 sigma intervals
    assert evaluations == 3 + 3
    assert len(spy.calls) == evaluations
    # what the sampler got back from every evaluation is exactly the stabiliser's output
    assert len(webui.log["after_cfg_outputs"]) == evaluations
    assert all(a is b for a, b in zip(webui.log["after_cfg_outputs"], spy.outputs))
    assert spy.evaluations == evaluations

    assert [a["is_hires"] for a in spy.pass_args] == [False, True]
    stabilised = [out for _, out, _ in spy.pre_decoded]
    assert len(stabilised) == 2  # one per pass
    for latent in webui.log["decoded"] + webui.log["latent_upscaled"]:
        assert any(latent is s for s in stabilised), "a latent was decoded/upscaled without pre_decode"
    if upscaler == "Latent":
        assert len(webui.log["latent_upscaled"]) == 1 and len(webui.log["decoded"]) == 1
    else:
        assert len(webui.log["latent_upscaled"]) == 0 and len(webui.log["decoded"]) == 2

    assert "QSilk: v=1; preset=Balanced" in processed.infotexts[0]
    assert_clean(webui, before, harness.last_p)


def test_batch_count_installs_and_removes_per_batch(harness, webui):
    before = snapshot(webui)
    seen = []
    webui.script_callbacks.on_cfg_after_cfg(lambda params: seen.append(len(webui.installed_callbacks())))
    before = snapshot(webui)
    harness.txt2img(**SMALL, n_iter=2, batch_size=2)
    spy = only_spy()
    assert len(spy.calls) == webui.log["evaluations"] == 6
    assert spy.calls[0][4]["x_noisy"].shape[0] == 2
    assert len(set(seen)) == 1 and seen[0] > len(before[0])  # ours were there while sampling
    assert_clean(webui, before, harness.last_p)


# -- off means off -------------------------------------------------------------------------------
def test_disabled_installs_nothing_and_is_bit_identical(harness, webui):
    reference = harness.without_script(**SMALL, **HIRES)
    ref_pixels = webui.log["pixels"][-1]
    during = []
    webui.script_callbacks.on_cfg_after_cfg(lambda params: during.append(
        (len(webui.installed_callbacks()), webui.sd_samplers.create_sampler, webui.forward_hooks())))
    before = snapshot(webui)
    for args in ([False], api_args(enabled=False), api_args(preset="Off")):
        processed = harness.txt2img(args, **SMALL, **HIRES)
        assert torch.equal(webui.log["pixels"][-1], ref_pixels)
        assert "QSilk" not in processed.infotexts[0]
        assert_clean(webui, before, harness.last_p)
    assert during and all(entry == (len(before[0]), d.create_sampler, 0) for entry in during)
    assert all(not s.pass_args and not s.calls for s in SpyStabilizer.instances)  # Off preset: never used
    assert reference.images[0].tobytes() == processed.images[0].tobytes()


def test_enabled_changes_nothing_outside_its_hooks_when_strength_is_zero(harness, webui):
    """Observing (probe + callbacks + wrappers) with zero strength is bit-identical to off."""
    harness.without_script(**SMALL, **HIRES)
    ref = webui.log["pixels"][-1]
    harness.txt2img(api_args(qsilk_strength=0.0, aqclip_strength=0.0), **SMALL, **HIRES)
    assert torch.equal(webui.log["pixels"][-1], ref)
    assert len(only_spy().calls) == webui.log["evaluations"] - 6  # the reference job's 6 are counted too


def test_enabled_changes_the_image(harness, webui):
    harness.without_script(**SMALL)
    ref = webui.log["pixels"][-1]
    harness.txt2img(api_args(preset="Crisp"), **SMALL, cfg_scale=30.0)
    assert not torch.equal(webui.log["pixels"][-1], ref)


# -- invalid arguments fail the request with the field named -------------------------------------
@pytest.mark.parametrize("args, message", [
    (api_args(tile=3), "QSilk: tile must be 4..256 (got 3)"),
    (api_args(tiles=32), "unknown parameter 'tiles'"),
    (api_args(preset="Loud"), "QSilk: preset must be one of"),
    ([True, "Balanced", True, 0.5], "QSilk: q_lo must be 0..0.05 (got 0.5)"),
    ("positional p_wide=0.05", "p_wide must be at most p_narrow (got 0.05 > 0.01)"),
])
def test_invalid_args_fail_the_job_with_a_clear_message(harness, webui, args, message):
    if args == "positional p_wide=0.05":  # every value in range, but inconsistent with another
        args = Settings.from_preset("Balanced").to_args()
        args[[p.name for p in PARAMS].index("p_wide")] = 0.05
    before = snapshot(webui)
    with pytest.raises(ValueError) as info:
        harness.txt2img(args, **SMALL)
    assert message in str(info.value)
    assert webui.log["evaluations"] == 0  # nothing ran without QSilk either
    assert SpyStabilizer.instances == []
    assert_clean(webui, before)
    # the same runner then serves a valid request normally
    processed = harness.txt2img(**SMALL)
    assert "QSilk: v=1" in processed.infotexts[0]


def test_api_dict_args_are_applied(harness, webui):
    processed = harness.txt2img(api_args(enabled=True, preset="Crisp", tile=48), **SMALL)
    spy = only_spy()
    assert spy.settings.preset == "Crisp" and spy.settings.tile == 48
    assert spy.settings.q_lo == Settings.from_preset("Crisp").q_lo
    assert "QSilk: v=1; preset=Crisp; tile=48" in processed.infotexts[0]


def test_positional_api_args_with_a_preset_use_that_preset(harness, webui):
    harness.txt2img([True, "Gentle"], **SMALL)
    assert only_spy().settings == Settings.from_preset("Gentle")


# -- interrupts and crashes leave nothing behind -------------------------------------------------
def test_interrupt_mid_pass_returns_a_stabilised_latent_and_cleans_up(harness, webui):
    calls = []

    def interrupt_after_second(params):
        calls.append(1)
        if len(calls) == 2:
            webui.state.interrupted = True

    webui.script_callbacks.on_cfg_after_cfg(interrupt_after_second)
    before = snapshot(webui)
    processed = harness.txt2img(**SMALL, **HIRES)
    spy = only_spy()
    assert webui.log["evaluations"] == 3  # the third call raised InterruptedException at once
    assert len(spy.calls) == 2
    assert len(spy.pass_args) == 1  # hires skipped after the interrupt
    assert webui.log["decoded"][0] is spy.pre_decoded[0][1]  # the returned last latent too
    assert len(processed.images) == 1
    assert_clean(webui, before, harness.last_p)


def test_exception_during_sampling_removes_everything(harness, webui):
    model = webui.shared.sd_model
    original = model.apply_model
    state = {"n": 0}

    def failing(*args, **kwargs):
        state["n"] += 1
        if state["n"] == 2:
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kwargs)

    model.apply_model = failing
    before = snapshot(webui)
    with pytest.raises(RuntimeError, match="simulated"):
        harness.txt2img(**SMALL)
    p = harness.last_p
    assert snapshot(webui) == before
    assert webui.sd_samplers.create_sampler is d.create_sampler
    model.apply_model = original
    # the next job on the same runner is clean and counts from zero
    harness.txt2img(**SMALL)
    assert len(SpyStabilizer.instances[-1].calls) == 3
    assert snapshot(webui) == before
    del p


def test_reused_p_after_a_failed_job_is_not_double_wrapped(harness, webui):
    p = d.StableDiffusionProcessingTxt2Img(scripts=harness.runner, script_args=harness.script_args(), **SMALL)
    harness.script.process(p, *harness.defaults)  # process ran, then the job died before postprocess
    harness.script.process(p, *harness.defaults)  # the WebUI reuses p
    p.setup_prompts()
    p.prompts, p.negative_prompts, p.seeds = p.all_prompts, p.all_negative_prompts, p.all_seeds
    p.rng = d.ImageRNG((4, 8, 8), p.seeds)
    p.setup_conds()
    p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=[], subseed_strength=0,
             prompts=p.prompts)
    assert len(SpyStabilizer.instances[-1].calls) == webui.log["evaluations"] == 3
    assert all(len(s.calls) == 0 for s in SpyStabilizer.instances[:-1])


# -- model reloads during the job ----------------------------------------------------------------
def probed_hooks(model):
    layer = model.model.diffusion_model.output_blocks[3][1].transformer_blocks[0].attn1
    return len(layer.to_q._forward_hooks) + len(layer.to_k._forward_hooks)


def test_hires_checkpoint_moves_the_probe_to_the_new_model(harness, webui):
    second = webui.add_model("second", seed=7)
    first = webui.models["tiny"]
    seen = []
    webui.script_callbacks.on_cfg_after_cfg(lambda params: seen.append(
        (webui.shared.sd_model.sd_checkpoint_info.name, probed_hooks(first), probed_hooks(second))))
    before = snapshot(webui)
    harness.txt2img(**SMALL, **HIRES, hr_checkpoint_info=second.sd_checkpoint_info)
    assert webui.log["model_loads"] == ["second"]  # the hires checkpoint (the next batch would load back)
    first_pass = [s for s in seen if s[0] == "tiny"]
    hires_pass = [s for s in seen if s[0] == "second"]
    assert first_pass and all(s[1:] == (2, 0) for s in first_pass)
    assert hires_pass and all(s[1:] == (0, 2) for s in hires_pass)
    spy = only_spy()
    maps = [c[3] for c in spy.calls]
    assert all(m is not None and m.shape == (1, 1, 12, 12) for m in maps[3:])
    assert_clean(webui, before, harness.last_p)
    assert probed_hooks(first) == probed_hooks(second) == 0


def test_refiner_switch_inside_the_denoiser_moves_the_probe(harness, webui):
    refiner = webui.add_model("refiner", seed=3)
    seen = []
    webui.script_callbacks.on_cfg_after_cfg(lambda params: seen.append(
        (webui.shared.sd_model.sd_checkpoint_info.name, probed_hooks(refiner))))
    harness.txt2img(**dict(SMALL, steps=4), refiner_checkpoint_info=refiner.sd_checkpoint_info, refiner_switch_at=0.5)
    assert [s[0] for s in seen] == ["tiny", "tiny", "refiner", "refiner"]
    assert all(h == 2 for name, h in seen if name == "refiner")
    spy = only_spy()
    assert all(c[3] is not None for c in spy.calls)  # a map at every evaluation, before and after
    assert probed_hooks(refiner) == 0


# -- sampler families: what the after-CFG callback sees --------------------------------------------
@pytest.mark.parametrize("sampler, steps, expected", [
    ("Euler", 4, 4),
    ("Heun", 3, 5),   # 2·steps − 1: the last step is a single Euler evaluation
    ("DDIM", 4, 3),   # one per timestep gap
    ("PLMS", 4, 4),   # its first step evaluates twice
])
def test_step_index_and_count_match_the_sampler(harness, webui, sampler, steps, expected):
    harness.txt2img(**dict(SMALL, steps=steps, sampler_name=sampler))
    spy = only_spy()
    assert webui.log["evaluations"] == expected
    assert [c[1] for c in spy.calls] == list(range(expected))
    assert all(c[2] == expected for c in spy.calls)
    assert spy.pass_args[0]["evaluations_per_step"] == (2 if sampler == "Heun" else 1)


def test_img2img_step_count_uses_the_shortened_schedule(webui):
    h = d.Harness(str(ROOT), webui, is_img2img=True)
    image = torch.rand(1, 3, 64, 64)
    h.img2img(init_image=image, denoising_strength=0.5, **dict(SMALL, steps=6))
    spy = only_spy()
    assert webui.log["evaluations"] == 4  # t_enc = 3 → 4 sigma intervals
    assert [c[1] for c in spy.calls] == [0, 1, 2, 3] and spy.calls[0][2] == 4


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_timestep_samplers_get_x0_through_eps(harness, webui, sampler):
    """ε in the callback: the adapter passes the sampler's ᾱ at each evaluation's t, the latent the
    sampler passed in, and DDIM's own x0 (pred_x0) is exactly the x0 of the ε we returned."""
    harness.txt2img(**dict(SMALL, steps=4, sampler_name=sampler))
    spy = only_spy()
    assert len(spy.calls) == webui.log["evaluations"] and all(c[0] == "eps" for c in spy.calls)
    alphas = webui.shared.sd_model.alphas_cumprod
    for call in spy.calls:
        kw = call[4]
        assert torch.equal(kw["alpha_bar"], alphas[kw["sigma"].long()])
    if sampler == "DDIM":
        for call, out_eps, pred in zip(spy.calls, spy.outputs, webui.log["ddim_pred_x0"]):
            kw = call[4]
            a = kw["alpha_bar"].reshape(-1, 1, 1, 1)
            assert torch.allclose(pred, (kw["x_t"] - (1 - a).sqrt() * out_eps) / a.sqrt(), atol=1e-5)


def test_eps_conversion_is_exact_with_a_known_clamp(harness, webui, monkeypatch):
    """With the micro-clamp replaced by a plain clamp to ±0.5, DDIM's pred_x0 is that clamp of the
    unclamped x0 — the adapter's ε→x0→ε round trip loses nothing."""
    import qsilk.stabilizer as stab
    monkeypatch.setattr(stab, "clamp_unmasked", lambda x, *a, **k: (x.clamp(-0.5, 0.5),
                                                                   torch.ones(x.shape[0], dtype=torch.bool)))
    harness.txt2img(api_args(preset="Gentle"), **dict(SMALL, steps=4, sampler_name="DDIM"))
    spy = only_spy()
    for call, pred in zip(spy.calls, webui.log["ddim_pred_x0"]):
        kw = call[4]
        a = kw["alpha_bar"].reshape(-1, 1, 1, 1)
        x0 = (kw["x_t"] - (1 - a).sqrt() * kw["eps"]) / a.sqrt()
        assert torch.allclose(pred, x0.clamp(-0.5, 0.5), atol=1e-4)
        assert pred.abs().max() <= 0.5 + 1e-4


def test_k_diffusion_c_skip_and_noisy_input(harness, webui):
    harness.txt2img(**SMALL)
    for call in only_spy().calls:
        assert call[0] == "x0" and call[4]["c_skip"] == 1.0
        assert call[4]["x_noisy"].shape == (1, 4, 8, 8)


def test_v_prediction_model_gets_its_c_skip(webui, monkeypatch):
    webui.models["tiny"].parameterization = "v"
    h = d.Harness(str(ROOT), webui)
    h.txt2img(**SMALL)
    for call in only_spy().calls:
        sigma = call[4]["sigma"]
        assert torch.allclose(call[4]["c_skip"], 1 / (sigma ** 2 + 1))


# -- batch layout: AND prompts, chunked UNet calls, different token lengths ----------------------
@pytest.mark.parametrize("prompt, chunked", [
    (["a cat AND a hat", "a dog"], False),
    (["a cat AND a hat", "a dog"], True),
    (["a cat BREAK long", "a dog BREAK long"], False),  # cond 16 tokens, uncond 8: separate calls
])
def test_probe_map_per_image_from_its_own_cond_rows(webui, prompt, chunked):
    webui.opts.batch_cond_uncond = not chunked
    h = d.Harness(str(ROOT), webui)
    layer = webui.shared.sd_model.model.diffusion_model.output_blocks[3][1].transformer_blocks[0].attn1
    captured = []
    handles = [layer.to_q.register_forward_hook(lambda m, a, o: captured.append(("q", o.detach().clone()))),
               layer.to_k.register_forward_hook(lambda m, a, o: captured.append(("k", o.detach().clone())))]
    try:
        h.txt2img(api_args(probe_queries=4096), **dict(SMALL, steps=2, batch_size=2), prompt=prompt)
    finally:
        for handle in handles:
            handle.remove()
    spy = only_spy()
    from qsilk.probe import entropy_map
    n_cond = 3 if "AND" in prompt[0] else 2
    image_of_row = [0, 0, 1] if n_cond == 3 else [0, 1]
    qs = [o for k, o in captured if k == "q"]
    ks = [o for k, o in captured if k == "k"]
    per_eval = len(qs) // len(spy.calls)
    for e, call in enumerate(spy.calls):
        q = torch.cat(qs[e * per_eval:(e + 1) * per_eval])[:n_cond]
        k = torch.cat(ks[e * per_eval:(e + 1) * per_eval])[:n_cond]
        maps = entropy_map(q, k, (8, 8), num_heads=layer.heads, heads=2, max_queries=4096)
        expected = torch.stack([maps[[r for r, i in enumerate(image_of_row) if i == img]].mean(0) for img in (0, 1)])
        got = call[3]
        assert got is not None and got.shape == (2, 1, 8, 8)
        assert torch.allclose(got, expected, atol=1e-5)


def test_sdxl_layout_probes_the_half_resolution_level_at_odd_sizes(webui):
    model = webui.add_model("xl", seed=5, sgm=True)
    webui.shared.sd_model = model
    webui.models["tiny"] = model
    h = d.Harness(str(ROOT), webui)
    h.txt2img(**dict(SMALL, width=72, height=56, steps=2))  # latent 7×9 → grid 4×5 at latent/2
    spy = only_spy()
    for call in spy.calls:
        assert call[3] is not None and call[3].shape == (1, 1, 7, 9)
        # each of the 4×5 tokens fills its 2×2 latent block (nearest), cropped at the odd edge
        m = call[3][0, 0]
        grid = m[::2, ::2]
        assert grid.shape == (4, 5)
        assert torch.equal(m, grid.repeat_interleave(2, 0).repeat_interleave(2, 1)[:7, :9])
        assert not torch.equal(grid, grid.flatten()[0].expand_as(grid))  # a real map, not a constant


def test_no_attention_layer_falls_back_to_lite_with_a_note(webui):
    model = webui.shared.sd_model
    unet = model.model.diffusion_model
    for block in list(unet.output_blocks) + list(unet.input_blocks) + [unet.middle_block]:
        for i, layer in enumerate(block):
            if isinstance(layer, d.SpatialTransformer):
                block[i] = torch.nn.Identity()
    h = d.Harness(str(ROOT), webui)
    processed = h.txt2img(**SMALL)
    spy = only_spy()
    assert all(c[3] is None for c in spy.calls)
    assert "QSilk note: no self-attention layer to probe" in processed.infotexts[0]
    assert "AQClip used Lite" in processed.comments


def test_extra_unet_pass_by_another_extension_drops_the_map(webui):
    """A row computed twice in one evaluation (SAG/PAG-style extra pass) → no map, noted."""
    h = d.Harness(str(ROOT), webui)

    def extra_pass(params):
        model = webui.shared.sd_model
        context = torch.zeros(1, d.TOKENS, d.CONTEXT_DIM)
        model.apply_model(params.x[-1:], torch.zeros(1), {"c_crossattn": [context], "c_concat": [None]})

    webui.script_callbacks.on_cfg_denoised(extra_pass)
    processed = h.txt2img(**SMALL)
    assert webui.log["callback_errors"] == []
    spy = only_spy()
    assert all(c[3] is None for c in spy.calls)
    assert "attention map unavailable" in processed.infotexts[0]


# -- img2img and inpainting ----------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_inpainting_passes_the_mask_and_keeps_the_rest(webui, sampler):
    h = d.Harness(str(ROOT), webui, is_img2img=True)
    image = torch.rand(1, 3, 64, 64)
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1
    h.img2img(init_image=image, mask=mask, denoising_strength=0.8, **dict(SMALL, steps=4, sampler_name=sampler))
    spy = only_spy()
    p = h.last_p
    assert all(c[4]["nmask"] is p.nmask for c in spy.calls)
    assert spy.pre_decoded[0][2] is p.nmask
    assert torch.equal(p.nmask[0, :, 4:], torch.ones(8, 4))


# -- v1.6 and v1.9.0 callback plumbing -----------------------------------------------------------
@pytest.mark.parametrize("version, remover", [("1.6.0", True), ("1.6.0", False), ("1.9.0", True)])
def test_older_webui_versions(monkeypatch, version, remover):
    SpyStabilizer.instances = []
    monkeypatch.setattr(common, "Stabilizer",  # the adapters build it via common.job_stabilizer
                         SpyStabilizer)
    with d.WebUI(version, remover=remover) as webui:
        h = d.Harness(str(ROOT), webui)
        before = snapshot(webui)
        h.txt2img(**dict(SMALL, steps=4), **HIRES)
        spy = only_spy()
        assert len(spy.calls) == webui.log["evaluations"] == 4 + 4
        # step index from the sampler's own denoiser (v1.6–v1.7 have no params.denoiser)
        assert [c[1] for c in spy.calls] == [0, 1, 2, 3, 0, 1, 2, 3]
        assert [c[2] for c in spy.calls] == [4] * 8
        assert_clean(webui, before, h.last_p)
        if version == "1.9.0":
            cbs = webui.script_callbacks
            for category in ("cfg_denoiser", "cfg_after_cfg", "model_loaded"):
                assert all(not isinstance(getattr(e.callback, "__self__", None), adapter.Job)
                           for e in cbs.ordered_callbacks(category))
        # a second job after the first works the same
        h.txt2img(**SMALL)
        assert len(SpyStabilizer.instances[-1].calls) == 3


def test_stale_callbacks_of_a_dead_job_are_removed_at_the_next_job(harness, webui):
    settings = Settings.from_preset("Balanced")
    ghost = adapter.Job(d.StableDiffusionProcessingTxt2Img(), settings)
    webui.script_callbacks.on_cfg_after_cfg(ghost._cb_after_cfg)  # as if a cleanup had been skipped
    harness.txt2img(**SMALL)
    assert all(getattr(fn, "__self__", None) is not ghost for _, fn in webui.installed_callbacks())


# -- debug maps, notes, reports ------------------------------------------------------------------
def test_show_maps_adds_gallery_images_not_saved(harness, webui):
    processed = harness.txt2img(api_args(show_maps=True), **SMALL)
    assert len(processed.images) > 1
    assert all(t.startswith("QSilk map:") for t in processed.infotexts[1:])
    assert processed.images[1].size == processed.images[0].size


def test_every_parameter_reaches_the_stabiliser(harness, webui):
    values = {"tile": 24, "stride": 8, "q_lo": 0.002, "step_end": 0.9, "hires": False, "pre_decode": "always",
              "probe_heads": 3, "aqclip_variant": "paper", "qsilk_shape": "soft"}
    harness.txt2img(api_args(**values), **SMALL)
    settings = only_spy().settings
    assert {k: getattr(settings, k) for k in values} == values
    assert len(PARAMS) == len(harness.components)


def test_a_webui_the_adapter_cannot_hook_runs_the_batch_without_qsilk_and_says_so(harness, webui, monkeypatch):
    def broken(callback, *args, **kwargs):
        raise RuntimeError("no such callback list")

    monkeypatch.setattr(webui.script_callbacks, "add_callback", broken)
    monkeypatch.setattr(webui.script_callbacks, "on_model_loaded", broken)
    harness.without_script(**SMALL)
    reference = webui.log["pixels"][-1]
    before = snapshot(webui)
    processed = harness.txt2img(**SMALL)
    assert torch.equal(webui.log["pixels"][-1], reference)
    assert "could not hook into this WebUI" in processed.infotexts[0]
    assert_clean(webui, before, harness.last_p)


def test_nan_latent_passes_through_and_is_recorded_in_the_images_infotext(harness, webui):
    """Another extension's after-CFG edit (registered at start-up, so it runs before QSilk's job-time
    callback) puts a NaN into image 1's denoised latent on every evaluation: image 1 passes through
    QSilk unchanged, image 0 is still stabilised, and the batch's infotext says so (the count is read
    once after sampling, before the WebUI writes the infotext)."""
    def poison(params):
        params.x = params.x.clone()
        params.x[1, 0, 0, 0] = float("nan")

    seen = []

    def record_inputs(params):  # runs right before QSilk's callback: what QSilk is handed
        seen.append(params.x.clone())

    webui.script_callbacks.on_cfg_after_cfg(poison)
    webui.script_callbacks.on_cfg_after_cfg(record_inputs)
    webui.shared.cmd_opts.disable_nan_check = True  # --disable-nan-check, else the WebUI stops at decode
    processed = harness.txt2img(**SMALL, batch_size=2)
    spy = only_spy()
    assert seen and len(spy.outputs) == len(seen)
    for x0, out in zip(seen, spy.outputs):
        assert torch.equal(out[1].nan_to_num(7.0), x0[1].nan_to_num(7.0))  # untouched, NaN included
    assert any(not torch.equal(out[0], x0[0]) for x0, out in zip(seen, spy.outputs))
    assert "non-finite values (NaN/Inf)" in processed.infotexts[0]
    assert spy.report()["nan_passthrough"] == len(seen)


# -- samplers that rewrite their sigmas -----------------------------------------------------------
def test_a_sampler_rewriting_its_sigmas_in_place_still_gets_the_before_decode_stage(harness, webui, monkeypatch):
    """ComfyUI's uni_pc sets the last σ of the tensor it is given to 0.001 in place. No sampler of
    A1111 1.10.1 does (k-diffusion ab527a9, ``sd_samplers_kdiffusion`` / ``_timesteps`` / ``_extra``
    only read or clone it), and the adapter decides nothing from σ after a pass: a sampler that did
    would still get the before-decode stage."""
    seen = []

    def rewriting_euler(model, x, sigmas, *args, **kwargs):
        sigmas[-1] = 0.001
        seen.append(sigmas)
        return original(model, x, sigmas, *args, **kwargs)

    original = d.sample_euler
    harness.without_script(**SMALL)
    ref = webui.log["pixels"][-1]
    monkeypatch.setattr(d, "sample_euler", rewriting_euler)
    harness.txt2img(api_args(preset="Paper (literal)"), **SMALL)
    spy = only_spy()
    assert seen and float(seen[-1][-1]) == pytest.approx(0.001)
    assert len(spy.pre_decoded) == 1 and spy.report()["pre_decodes"] == 1
    assert not any("leftover" in n for n in spy.report()["notes"])
    assert not torch.equal(webui.log["pixels"][-1], ref)
