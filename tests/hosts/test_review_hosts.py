"""Adversarial review probes of the diffusers adapter on real (tiny) diffusers pipelines: repeated
calls in one ``with`` block, pipelines sharing one scheduler, one-step and few-step schedules,
guidance switching between calls, a user's instance ``step``."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import diffusers_pipes as dp  # noqa: E402
from qsilk.hosts import diffusers as qd  # noqa: E402
from qsilk.probe import entropy_map, find_probe_layer, upsample_to_latent  # noqa: E402
from qsilk.settings import Settings  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ALWAYS = Settings.from_preset("Balanced", pre_decode="always")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return dp.sd15(tmp_path_factory.mktemp("sd15"))


def test_two_calls_in_one_block_are_two_passes(sd15):
    with qd.attach(sd15, settings=ALWAYS, echo=False) as run:
        sd15(**dp.sd15_call(num_inference_steps=3))
        sd15(**dp.sd15_call(num_inference_steps=5))
    rep = run.last_report
    assert rep["pass_kinds"] == ["base", "base"]
    assert rep["evaluations"] == 3 + 5 and rep["pre_decodes"] == 2


def test_one_step_schedule_is_stabilised_and_ends_at_zero(sd15):
    with qd.attach(sd15, settings=ALWAYS, echo=False) as run:
        sd15(**dp.sd15_call(num_inference_steps=1))
    assert run.last_report["evaluations"] == 1 and run.last_report["pre_decodes"] == 1
    assert run.ended_at_zero is True


@pytest.mark.parametrize("attach_img2img", [True, False], ids=["both attached", "only txt2img attached"])
def test_img2img_sharing_the_scheduler_after_a_longer_txt2img(sd15, attach_img2img):
    """`StableDiffusionImg2ImgPipeline(**pipe.components)` shares the scheduler object and the UNet:
    its pass must count its own steps (not the txt2img call's stale loop length) and reach pre-decode,
    whether or not the img2img pipeline itself was attached."""
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**sd15.components)
    img2img.set_progress_bar_config(disable=True)
    assert img2img.scheduler is sd15.scheduler
    pipes = (sd15, img2img) if attach_img2img else (sd15,)
    with qd.attach(*pipes, settings=ALWAYS, echo=False) as run:
        sd15(**dp.sd15_call(num_inference_steps=8))
        img2img(prompt="a dog", image=torch.rand(1, 3, 32, 32), strength=0.25, num_inference_steps=8,
                generator=torch.Generator().manual_seed(0), output_type="pt")
    rep = run.last_report
    assert rep["evaluations"] == 8 + 2 and rep["pre_decodes"] == 2, rep


def test_guidance_switch_between_calls_follows_the_cond_rows(sd15):
    """CFG on, then off, in one block: the probe must read the batch layout of each call (no note
    about an unavailable map, one map per evaluation)."""
    maps = []
    with qd.attach(sd15, echo=False) as run:
        post_cfg = run.stabilizer.post_cfg
        run.stabilizer.post_cfg = lambda x0, i, n, probe_map=None, **k: (
            maps.append(probe_map), post_cfg(x0, i, n, probe_map, **k))[1]
        sd15(**dp.sd15_call(guidance_scale=5.0, num_inference_steps=2))
        sd15(**dp.sd15_call(guidance_scale=1.0, num_inference_steps=2))
        sd15(**dp.sd15_call(guidance_scale=5.0, num_inference_steps=2))
    assert len(maps) == 6 and all(m is not None and m.shape[0] == 1 for m in maps), run.notes
    assert not any("unavailable" in n for n in run.notes)


def test_batch_with_num_images_per_prompt(sd15):
    maps = []
    with qd.attach(sd15, settings=ALWAYS, echo=False) as run:
        post_cfg = run.stabilizer.post_cfg
        run.stabilizer.post_cfg = lambda x0, i, n, probe_map=None, **k: (
            maps.append(probe_map), post_cfg(x0, i, n, probe_map, **k))[1]
        out = sd15(**dp.sd15_call(prompt=["a dog", "a cat"], num_images_per_prompt=2)).images
    assert out.shape[0] == 4 and torch.isfinite(out).all()
    assert all(m is not None and m.shape[0] == 4 for m in maps) and run.last_report["pre_decodes"] == 1


def test_callback_on_step_end_changing_latents(sd15):
    def cb(pipe, i, t, kw):
        return {"latents": kw["latents"] * 0.5}
    with qd.attach(sd15, settings=ALWAYS, echo=False) as run:
        out = sd15(**dp.sd15_call(callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])).images
    assert torch.isfinite(out).all() and run.last_report["evaluations"] == 4


def test_detach_twice_and_a_users_own_step_restored(sd15):
    sched = sd15.scheduler
    calls = []
    original = type(sched).step.__get__(sched)

    def mine(*a, **k):
        calls.append(1)
        return original(*a, **k)
    sched.step = mine
    try:
        run = qd.attach(sd15, echo=False)
        with run:
            sd15(**dp.sd15_call(num_inference_steps=2))
        assert run.detach() is run.last_report and sched.__dict__["step"] is mine and len(calls) == 2
    finally:
        del sched.__dict__["step"]


@pytest.mark.parametrize("cls,config", [
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "zero"}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"solver_order": 3}),
    ("HeunDiscreteScheduler", {}),
    ("DDIMScheduler", {}),
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                       "prediction_type": "v_prediction"}),
    ("LCMScheduler", {}),
    ("TCDScheduler", {}),
    ("DEISMultistepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("DDPMScheduler", {}),
])
@pytest.mark.parametrize("steps", [1, 3])
def test_schedulers_run_to_pre_decode(sd15, cls, config, steps):
    old = sd15.scheduler
    sd15.scheduler = getattr(diffusers, cls).from_config(old.config, **config)
    try:
        with qd.attach(sd15, settings=ALWAYS, echo=False) as run:
            out = sd15(**dp.sd15_call(num_inference_steps=steps)).images
    finally:
        sd15.scheduler = old
    assert torch.isfinite(out).all()
    rep = run.last_report
    assert rep["pre_decodes"] == 1, (rep, run.notes)


def _spy_maps(run, maps):
    post_cfg = run.stabilizer.post_cfg
    run.stabilizer.post_cfg = lambda x0, i, n, probe_map=None, **k: (
        maps.append(probe_map), post_cfg(x0, i, n, probe_map, **k))[1]


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("layers", [["mid"], ["down", "mid", "up"]], ids=["pag-mid", "pag-everywhere"])
def test_pag_pipeline_probe_reads_the_cond_rows(sd15, guidance, layers):
    pipe = diffusers.StableDiffusionPAGPipeline(**sd15.components, pag_applied_layers=layers)
    pipe.set_progress_bar_config(disable=True)
    maps = []
    try:
        with qd.attach(pipe, echo=False) as run:
            _spy_maps(run, maps)
            out = pipe(**dp.sd15_call(guidance_scale=guidance, pag_scale=2.0)).images
    finally:
        sd15.unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    assert torch.isfinite(out).all() and len(maps) == 4
    assert all(m is not None and m.shape[0] == 1 for m in maps), run.notes



def test_pag_on_the_probed_layer_with_a_batch_of_three_reads_the_cond_rows(sd15):
    """PAG's processor on the probed layer runs to_q on ``[uncond; cond]`` only (6 rows for 3
    images): the map must come from rows 3..5 (a 3-chunk split would take rows 2..3: one uncond, one cond)."""
    pipe = diffusers.StableDiffusionPAGPipeline(**sd15.components, pag_applied_layers=["down", "mid", "up"])
    pipe.set_progress_bar_config(disable=True)
    name, attn = find_probe_layer(sd15.unet)
    captured, maps = {}, []
    handles = [attn.to_q.register_forward_hook(lambda m, a, o: captured.setdefault("q", []).append(o.detach())),
               attn.to_k.register_forward_hook(lambda m, a, o: captured.setdefault("k", []).append(o.detach()))]
    try:
        with qd.attach(pipe, echo=False) as run:
            _spy_maps(run, maps)
            pipe(**dp.sd15_call(num_images_per_prompt=3, pag_scale=2.0, num_inference_steps=2))
    finally:
        for h in handles:
            h.remove()
        sd15.unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    q, k = captured["q"][0], captured["k"][0]
    assert q.shape[0] == 6 and len(maps) == 2
    side = int(q.shape[1] ** 0.5)
    expected = upsample_to_latent(entropy_map(q[3:6], k[3:6], (side, side), num_heads=attn.heads, heads=2,
                                              max_queries=run.settings.probe_queries), (16, 16), 16 // side)
    assert maps[0] is not None and maps[0].shape == (3, 1, 16, 16) and torch.equal(maps[0], expected)
