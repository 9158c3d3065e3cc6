"""The diffusers adapter on real diffusers pipelines with tiny random components (`diffusers_pipes`):
SD1.5 and SDXL layouts (UNet, CFG ``[uncond; cond]``), SD3-like and Flux-like (transformer; Flux
with packed tokens), img2img and inpainting, a refiner hand-over. Each image is 32×32 in 4 steps.
"""
from __future__ import annotations

import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffusers_pipes as dp  # noqa: E402
import qsilk  # noqa: E402
from qsilk.hosts import diffusers as qd  # noqa: E402
from qsilk.hosts import diffusers_x0 as x0t  # noqa: E402
from qsilk.probe import entropy_map, find_probe_layer, upsample_to_latent  # noqa: E402
from qsilk.settings import Settings, SettingsError  # noqa: E402
from qsilk.stabilizer import Stabilizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return dp.sd15(tmp_path_factory.mktemp("sd15"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return dp.sdxl(tmp_path_factory.mktemp("sdxl"))


def installed_nothing(pipe) -> bool:
    """No QSilk hook or wrapper left on the pipeline (denoiser, probed layer, scheduler)."""
    den = getattr(pipe, "unet", None) or pipe.transformer
    modules = [den] + [m for n, m in den.named_modules() if n.endswith(("to_q", "to_k"))]
    return ("step" not in pipe.scheduler.__dict__ and not den._forward_pre_hooks
            and all(not m._forward_hooks for m in modules))


# -- off -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [Settings.from_preset("Balanced", enabled=False), Settings.from_preset("Off")],
                         ids=["disabled", "preset-Off"])
def test_off_installs_nothing_and_is_bit_identical(sd15, settings, capsys):
    reference = sd15(**dp.sd15_call()).images
    run = qd.attach(sd15, settings=settings)
    assert not run.active and installed_nothing(sd15)
    with run:
        got = sd15(**dp.sd15_call()).images
    assert torch.equal(got, reference)
    assert run.detach() is None and capsys.readouterr().out == ""


# -- Balanced on every pipeline family --------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_balanced_changes_the_image_and_reports(family, sd15, sdxl, capsys):
    pipe, call = {"sd15": (sd15, dp.sd15_call), "sdxl": (sdxl, dp.sd15_call),
                  "sd3": (dp.sd3(), dp.sd3_call), "flux": (dp.flux(), dp.flux_call)}[family]
    reference = pipe(**call()).images
    with qsilk.diffusers(pipe, preset="Balanced") as run:
        got = pipe(**call()).images
    assert installed_nothing(pipe)
    assert torch.isfinite(got).all() and not torch.equal(got, reference)
    report = run.last_report
    assert report["passes"] == 1 and report["evaluations"] == 4 and report["errors"] == 0
    line = capsys.readouterr().out
    assert line.startswith("QSilk (diffusers): 1 pass(es), 4 evaluation(s) stabilised") and report["summary"] in line
    if family in ("sd15", "sdxl"):
        assert report["attn_maps"] == 4 and report["lite_fallbacks"] == 0
    else:  # DiT: Lite, with a note naming the model
        assert report["attn_maps"] == 0 and report["lite_fallbacks"] == 4
        assert any("no UNet self-attention" in n and "Transformer" in n for n in report["notes"])


def test_same_settings_reproduce(sd15):
    with qd.attach(sd15, echo=False):
        a = sd15(**dp.sd15_call()).images
    with qd.attach(sd15, echo=False):
        b = sd15(**dp.sd15_call()).images
    assert torch.equal(a, b)


# -- pass-through identity and the signature, on the pipeline ----------------------------------------
SCHEDULERS = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DDIMScheduler", "LCMScheduler"]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_pass_through_pipeline_is_bit_identical(sd15, name):
    """With a stabiliser that returns equal tensors the image is bit-identical — ancestral noise
    included: Euler a and LCM get the pipeline's generator only if ``step`` keeps its signature."""
    original = sd15.scheduler
    try:
        sd15.scheduler = getattr(diffusers, name).from_config(original.config)
        reference = sd15(**dp.sd15_call()).images
        with qd.attach(sd15, echo=False) as run:
            seen = []
            run.stabilizer.post_cfg = lambda x0, *a, **k: seen.append(x0.shape) or x0.clone()
            run.stabilizer.pre_decode = lambda x, *a, **k: x.clone()
            got = sd15(**dp.sd15_call()).images
        assert len(seen) == len(sd15.scheduler.timesteps) and torch.equal(got, reference)
    finally:
        sd15.scheduler = original


def test_euler_a_with_a_generator_reproduces_and_keeps_its_signature(sd15):
    original = sd15.scheduler
    try:
        sd15.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(original.config)
        before = inspect.signature(sd15.scheduler.step)
        with qd.attach(sd15, echo=False):
            assert inspect.signature(sd15.scheduler.step) == before and "generator" in before.parameters
            a = sd15(**dp.sd15_call(seed=7)).images
            b = sd15(**dp.sd15_call(seed=7)).images
            c = sd15(**dp.sd15_call(seed=8)).images
        assert torch.equal(a, b) and not torch.equal(a, c)
    finally:
        sd15.scheduler = original


# -- passes: a scheduler replaced per pass, hires labels, refiner, img2img ------------------------------
def test_a_scheduler_replaced_for_every_pass_is_wrapped_lazily(sd15):
    """SD.Next sets ``model.scheduler = new`` for every pass, after QSilk attached."""
    original = sd15.scheduler
    kinds = iter(["base", "hires"])
    try:
        with qd.attach(sd15, pass_kind=lambda pipe: next(kinds), echo=False,
                       settings=Settings.from_preset("Balanced", hires=False)) as run:
            sd15.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(original.config)
            first = sd15.scheduler
            sd15(**dp.sd15_call())
            sd15.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(original.config)
            sd15(**dp.sd15_call())
            assert "step" in first.__dict__ and "step" in sd15.scheduler.__dict__
        assert "step" not in first.__dict__ and installed_nothing(sd15)
        assert run.last_report["pass_kinds"] == ["base", "hires"]
        assert run.last_report["passes"] == 2 and run.last_report["evaluations"] == 4  # hires off
    finally:
        sd15.scheduler = original


def test_skip_passes_are_left_alone(sd15):
    reference = sd15(**dp.sd15_call()).images
    with qd.attach(sd15, pass_kind=lambda pipe: "skip", echo=False) as run:
        got = sd15(**dp.sd15_call()).images
    assert torch.equal(got, reference) and run.last_report["passes"] == 0


def test_sdxl_base_and_refiner_hand_over(sdxl, tmp_path):
    """Base stops at 60 % (``denoising_end``, output latent with noise left), the refiner (its own
    UNet) finishes: two passes; only the refiner's output is stabilised before decode."""
    refiner = dp.sdxl(tmp_path, seed=3, img2img=True)
    settings = Settings.from_preset("Balanced", pre_decode="always")
    with qd.attach(sdxl, refiner, settings=settings, echo=False) as run:
        latent = sdxl(prompt="a dog", num_inference_steps=5, height=32, width=32, denoising_end=0.6,
                      output_type="latent").images
        assert run.ended_at_zero is False  # the base pass stopped before the end of its schedule
        assert any("leftover noise" in n for n in run.notes)
        image = refiner(prompt="a dog", image=latent, num_inference_steps=5, denoising_start=0.6,
                        output_type="pt").images
        assert run.ended_at_zero is True
    report = run.last_report
    assert report["pass_kinds"] == ["base", "refiner"] and report["pre_decodes"] == 1
    assert report["evaluations"] == 3 + 2 and torch.isfinite(image).all()
    assert installed_nothing(sdxl) and installed_nothing(refiner)


def test_img2img_counts_only_its_steps_and_ends_at_zero(sd15):
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**sd15.components)
    pipe.set_progress_bar_config(disable=True)
    init = torch.rand(1, 3, 32, 32)
    with qd.attach(pipe, settings=Settings.from_preset("Balanced", pre_decode="always"), echo=False) as run:
        pipe(prompt="a dog", image=init, strength=0.5, num_inference_steps=8,
             generator=torch.Generator().manual_seed(0), output_type="pt")
    assert run.last_report["evaluations"] == 4 and run.last_report["pre_decodes"] == 1


def test_inpainting_with_a_four_channel_unet(sd15):
    pipe = diffusers.StableDiffusionInpaintPipeline(**sd15.components)
    pipe.set_progress_bar_config(disable=True)
    image, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    with qd.attach(pipe, echo=False) as run:
        out = pipe(prompt="a dog", image=image, mask_image=mask, num_inference_steps=4, strength=1.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(out).all() and run.last_report["evaluations"] == 4


# -- pre-decode --------------------------------------------------------------------------------------
def test_pre_decode_stabilises_the_latent_the_pipeline_returns(sd15):
    """Oracle: the run without pre-decode, then `Stabilizer.pre_decode` on its final latent."""
    always = Settings.from_preset("Balanced", pre_decode="always")
    with qd.attach(sd15, settings=always, echo=False) as run:
        got = sd15(**dp.sd15_call(output_type="latent")).images
    with qd.attach(sd15, settings=always.replace(pre_decode="off"), echo=False):
        plain = sd15(**dp.sd15_call(output_type="latent")).images
    oracle = Stabilizer(always)
    oracle.begin_pass()
    expected = oracle.pre_decode(plain)
    assert run.last_report["pre_decodes"] == 1 and run.ended_at_zero is True
    assert not torch.equal(expected, plain) and torch.equal(got, expected)


def test_flux_pre_decode_on_packed_tokens():
    pipe = dp.flux()
    always = Settings.from_preset("Balanced", pre_decode="always")
    with qd.attach(pipe, settings=always, echo=False):
        got = pipe(**dp.flux_call(output_type="latent")).images
    with qd.attach(pipe, settings=always.replace(pre_decode="off"), echo=False):
        plain = pipe(**dp.flux_call(output_type="latent")).images
    assert got.shape == plain.shape == (1, 16 * 24, 4)  # packed (B, N, 4·C): a 32×48 latent in 2×2 patches
    oracle = Stabilizer(always)
    oracle.begin_pass()
    expected = diffusers.FluxPipeline._pack_latents(
        oracle.pre_decode(diffusers.FluxPipeline._unpack_latents(plain, 32, 48, 1)), 1, 1, 32, 48)
    assert torch.equal(got, expected)


# -- the entropy probe ----------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_probe_maps_come_from_the_cond_rows(sd15, guidance):
    """The map handed to the stabiliser equals the entropy of the probed attn1's cond rows,
    computed here from to_q/to_k outputs captured by the test's own hooks."""
    name, attn = find_probe_layer(sd15.unet)
    captured, maps = {}, []
    handles = [attn.to_q.register_forward_hook(lambda m, a, o: captured.setdefault("q", []).append(o.detach())),
               attn.to_k.register_forward_hook(lambda m, a, o: captured.setdefault("k", []).append(o.detach()))]
    try:
        with qd.attach(sd15, echo=False) as run:
            post_cfg = run.stabilizer.post_cfg
            run.stabilizer.post_cfg = lambda x0, i, n, probe_map=None, **k: (
                maps.append(probe_map), post_cfg(x0, i, n, probe_map, **k))[1]
            sd15(**dp.sd15_call(prompt=["a dog", "a red cat"], guidance_scale=guidance))
    finally:
        for h in handles:
            h.remove()
    assert len(maps) == 4 and all(m is not None for m in maps)
    q, k = captured["q"][0], captured["k"][0]
    rows = slice(2, 4) if guidance > 1 else slice(0, 2)
    assert q.shape[0] == (4 if guidance > 1 else 2)
    side = int(q.shape[1] ** 0.5)
    expected = entropy_map(q[rows], k[rows], (side, side), num_heads=attn.heads, heads=2,
                           max_queries=run.settings.probe_queries)
    expected = upsample_to_latent(expected, (16, 16), 16 // side)
    assert maps[0].shape == (2, 1, 16, 16) and torch.equal(maps[0], expected)
    if guidance > 1:
        other = upsample_to_latent(entropy_map(q[0:2], k[0:2], (side, side), num_heads=attn.heads, heads=2,
                                               max_queries=run.settings.probe_queries), (16, 16), 16 // side)
        assert not torch.equal(maps[0], other)


def test_probe_leaves_attention_processors_alone(sd15):
    processors = dict(sd15.unet.attn_processors)
    with qd.attach(sd15, echo=False):
        assert sd15.unet.attn_processors == processors
        sd15(**dp.sd15_call())
    assert sd15.unet.attn_processors == processors


def test_fused_qkv_falls_back_to_lite_with_a_note(tmp_path):
    pipe = dp.sd15(tmp_path)
    pipe.unet.fuse_qkv_projections()
    with qd.attach(pipe, echo=False) as run:
        pipe(**dp.sd15_call())
    report = run.last_report
    assert report["attn_maps"] == 0 and report["lite_fallbacks"] == 4
    assert any("fused QKV" in n for n in report["notes"])


# -- detach, errors ---------------------------------------------------------------------------------------
class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_detach_restores_everything_when_the_pipeline_raises(sd15, exc):
    reference = sd15(**dp.sd15_call()).images

    def fail(pipe, i, t, kwargs):
        if i == 1:
            raise exc("stop")
        return kwargs

    with pytest.raises(exc):
        with qd.attach(sd15, echo=False) as run:
            sd15(**dp.sd15_call(callback_on_step_end=fail))
    assert run.detached and installed_nothing(sd15)
    assert run.last_report["evaluations"] == 2
    assert run.detach() is run.last_report  # a second detach is harmless
    assert torch.equal(sd15(**dp.sd15_call()).images, reference)


def test_interrupt_flag_then_a_clean_next_run(sd15):
    def interrupt(pipe, i, t, kwargs):
        pipe._interrupt = True
        return kwargs

    with qd.attach(sd15, echo=False) as run:
        sd15(**dp.sd15_call(callback_on_step_end=interrupt))
        assert run.report()["evaluations"] == 1
        sd15(**dp.sd15_call())
    assert run.last_report["passes"] == 2 and run.last_report["evaluations"] == 5


@pytest.mark.parametrize("where", ["coefficients", "stabilizer", "on_note", "pass_kind"])
def test_errors_never_reach_the_pipeline(sd15, monkeypatch, where):
    reference = sd15(**dp.sd15_call()).images
    kwargs = {}
    if where == "coefficients":
        monkeypatch.setattr(x0t, "coefficients", lambda *a, **k: 1 / 0)
    elif where == "stabilizer":
        monkeypatch.setattr(Stabilizer, "_apply", lambda *a, **k: 1 / 0)
    elif where == "on_note":
        kwargs["on_note"] = lambda message: 1 / 0
        monkeypatch.setattr(x0t, "coefficients", lambda *a, **k: 1 / 0)
    else:
        kwargs["pass_kind"] = lambda pipe: 1 / 0
        monkeypatch.setattr(x0t, "coefficients", lambda *a, **k: 1 / 0)
    with qd.attach(sd15, echo=False, **kwargs) as run:
        got = sd15(**dp.sd15_call()).images
    assert torch.equal(got, reference)
    assert any("passed through" in n and "division by zero" in n for n in run.last_report["notes"])


def test_nan_passes_through_and_is_reported(sd15):
    def poison(module, args, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        out[0] = float("nan")  # the first image's rows (uncond) in every UNet call
        return output

    handle = sd15.unet.register_forward_hook(poison)
    try:
        with qd.attach(sd15, echo=False) as run:
            images = sd15(**dp.sd15_call(prompt=["a dog", "a cat"])).images
    finally:
        handle.remove()
    assert run.last_report["nan_passthrough"] >= 1
    assert torch.isfinite(images[1]).all()


def test_bad_settings_are_refused_at_attach_naming_the_field(sd15):
    with pytest.raises(SettingsError, match="tile"):
        qd.attach(sd15, tile=-3)
    with pytest.raises(TypeError, match="unet"):
        qd.attach(object())
    assert installed_nothing(sd15)


def test_importing_qsilk_does_not_import_diffusers():
    import subprocess
    import sys
    code = "import sys, qsilk; qsilk.diffusers; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_second_attachment_replaces_a_stale_one(sd15):
    reference_run = qd.attach(sd15, echo=False)
    with qd.attach(sd15, echo=False) as run:
        assert reference_run.detached
        sd15(**dp.sd15_call())
    assert run.last_report["evaluations"] == 4 and installed_nothing(sd15)


def test_a_pipeline_sharing_the_unet_but_not_attached_is_reported(sd15):
    """``from_pipe``-style pipelines share the UNet; one with its own scheduler that QSilk was not
    attached to runs unstabilised — and the report says so instead of staying silent."""
    other = diffusers.StableDiffusionPipeline(**{**sd15.components, "scheduler": diffusers.EulerDiscreteScheduler.from_config(
        sd15.scheduler.config)})
    other.set_progress_bar_config(disable=True)
    reference = other(**dp.sd15_call(num_inference_steps=10)).images
    with qd.attach(sd15, echo=False) as run:
        got = other(**dp.sd15_call(num_inference_steps=10)).images
    assert torch.equal(got, reference)
    assert any("without a scheduler step QSilk sees" in n for n in run.last_report["notes"])


def test_a_compiled_unet_gets_a_note_and_the_probe_on_its_module(tmp_path):
    """``torch.compile(unet)`` wraps the module; the probe hooks go on the original's layer and a
    note says the compiled graph may not call them (not compiled here: that takes minutes on CPU)."""
    pipe = dp.sd15(tmp_path)
    original = pipe.unet
    pipe.unet = torch.compile(original)
    with qd.attach(pipe, echo=False) as run:
        name, attn = find_probe_layer(original)
        assert attn.to_q._forward_hooks and attn.to_k._forward_hooks
        assert any("torch.compile" in n for n in run.notes)
    assert not attn.to_q._forward_hooks and not pipe.unet._forward_pre_hooks


@pytest.mark.parametrize("variant", ["v_prediction", "bfloat16"])
def test_v_prediction_and_bfloat16_pipelines(tmp_path, variant):
    """An SD 2.x-style v-prediction scheduler, and the whole pipeline in bfloat16: pass-through
    stays bit-identical, Balanced changes the image and stays finite."""
    pipe = dp.sd15(tmp_path)
    if variant == "v_prediction":
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                      prediction_type="v_prediction")
    else:
        pipe.to(torch.bfloat16)
    reference = pipe(**dp.sd15_call()).images
    with qd.attach(pipe, echo=False) as run:
        run.stabilizer.post_cfg = lambda x0, *a, **k: x0.clone()
        run.stabilizer.pre_decode = lambda x, *a, **k: x.clone()
        same = pipe(**dp.sd15_call()).images
    with qd.attach(pipe, echo=False) as run:
        changed = pipe(**dp.sd15_call()).images
    assert torch.equal(same, reference)
    assert torch.isfinite(changed.float()).all() and not torch.equal(changed, reference)
    assert run.last_report["evaluations"] == 4 and run.last_report["errors"] == 0



@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_img2img_pipelines(family):
    """SD3 / Flux img2img (the scheduler's begin index set by the pipeline): only the remaining
    steps are counted, the pass runs to σ = 0 and is stabilised before decode."""
    base = dp.sd3() if family == "sd3" else dp.flux()
    cls = diffusers.StableDiffusion3Img2ImgPipeline if family == "sd3" else diffusers.FluxImg2ImgPipeline
    pipe = cls(**base.components)
    pipe.set_progress_bar_config(disable=True)
    call = dp.sd3_call if family == "sd3" else dp.flux_call
    kwargs = call(image=torch.rand(1, 3, 32, 48 if family == "flux" else 32), strength=0.5)
    with qd.attach(pipe, settings=Settings.from_preset("Balanced", pre_decode="always"), echo=False) as run:
        out = pipe(**kwargs).images
    report = run.last_report
    assert torch.isfinite(out).all() and report["errors"] == 0
    assert report["evaluations"] == 2 and report["pre_decodes"] == 1 and run.ended_at_zero is True
