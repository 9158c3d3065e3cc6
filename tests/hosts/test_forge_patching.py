"""The Forge adapter against the Forge doubles (tests/doubles/forge_backend.py, forge_webui.py).

New Forge (main dfdcbab6), old Forge (tag ``previous`` bfee03d8), reForge (main 3b56b268), Forge
Neo (release 2.26) and Forge Classic (1f95d717) flows. A thin stand-in for the script calls the
adapter exactly where ``scripts/qsilk.py`` does
(``process`` → `start_job`, ``process_before_every_sampling`` → `before_every_sampling`,
``before_hr`` → `before_hr`, ``postprocess`` → `end_job`); whole jobs through the real script are
in test_forge_job.py. A spy subclass of the real `Stabilizer` records what the adapter passed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from doubles import forge_backend as fb  # noqa: E402
from doubles import forge_webui as fw  # noqa: E402
from doubles.forge_backend import (BACKEND_FAMILIES, FORGE_CLASSIC, FORGE_NEO, FORGE_NEW, FORGE_OLD,  # noqa: E402
                                   REFORGE)

from qsilk.hosts import forge  # noqa: E402
from qsilk.hosts import common  # noqa: E402
from qsilk.hosts import patcher  # noqa: E402
from qsilk.probe import entropy_map, find_probe_layer, upsample_to_latent  # noqa: E402
from qsilk.settings import Settings  # noqa: E402
from qsilk.stabilizer import Stabilizer  # noqa: E402

FAMILIES = (FORGE_NEW, FORGE_OLD, REFORGE, FORGE_NEO, FORGE_CLASSIC)


pytestmark = pytest.mark.usefixtures("one_thread")


class SpyStabilizer(Stabilizer):
    """The real Stabilizer, recording the adapter's calls."""

    instances: list["SpyStabilizer"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        SpyStabilizer.instances.append(self)
        self.calls: list[dict] = []
        self.pass_args: list[dict] = []
        self.pre_decode_inputs: list[torch.Tensor] = []
        self.pre_decode_outputs: list[torch.Tensor] = []

    def begin_pass(self, **kwargs):
        self.pass_args.append(kwargs)
        return super().begin_pass(**kwargs)

    def post_cfg(self, x0, step, total_steps, probe_map=None, **kwargs):
        out = super().post_cfg(x0, step, total_steps, probe_map, **kwargs)
        self.calls.append(dict(x0=x0, out=out, step=step, total=total_steps, probe_map=probe_map, **kwargs))
        return out

    def pre_decode(self, latent, nmask=None):
        out = super().pre_decode(latent, nmask)
        self.pre_decode_inputs.append(latent)
        self.pre_decode_outputs.append(out)
        return out


@pytest.fixture(autouse=True)
def spy(monkeypatch):
    SpyStabilizer.instances.clear()
    monkeypatch.setattr(common, "Stabilizer",  # the adapters build it via common.job_stabilizer
                         SpyStabilizer)
    yield SpyStabilizer.instances
    for job in list(forge._LIVE_JOBS):
        job.close()


class QSilkStandIn(fw.Script):
    """Calls the adapter where scripts/qsilk.py does; one arg: the job's `Settings`."""

    def __init__(self):
        self.jobs, self.reports = [], []

    def process(self, p, settings):
        p.qsilk_job = forge.start_job(p, settings)
        self.jobs.append(p.qsilk_job)

    def process_before_every_sampling(self, p, settings, **kwargs):
        forge.before_every_sampling(p, p.qsilk_job, **kwargs)

    def before_hr(self, p, settings):
        forge.before_hr(p, p.qsilk_job)

    def postprocess(self, p, processed, settings):
        self.reports.append(forge.end_job(p, p.qsilk_job, processed))


def run_job(family=FORGE_NEW, kind="sd15", settings=None, before=(), after=(), img2img=False,
            model=None, **p_kwargs):
    """One job with QSilk (unless `settings` is False) between the `before`/`after` scripts."""
    sd = model or fw.make_model(family, kind)
    scripts, args = [], []
    for s in before:
        scripts.append(s), args.append([True])
    qs = None
    if settings is not False:
        qs = QSilkStandIn()
        scripts.append(qs), args.append([settings or Settings.from_preset("Balanced")])
    for s in after:
        scripts.append(s), args.append([True])
    cls = fw.Img2Img if img2img else fw.Txt2Img
    if img2img and "init_latent" not in p_kwargs:
        g = torch.Generator().manual_seed(7)
        p_kwargs["init_latent"] = torch.randn(p_kwargs.get("batch_size", 1), sd.latent_channels, 8, 8, generator=g)
    p = cls(sd, family=family, **p_kwargs)
    p.scripts = fw.ScriptRunner(scripts, args)
    processed = fw.process_images(p)
    return p, processed, qs


def images(processed):
    return torch.stack(processed.samples)


def our_functions(options):
    return [f for f in options.get("sampler_post_cfg_function", []) if f.__name__ == "qsilk_post_cfg"]


def our_observers(options):
    return [f for f in options.get("transformer_options", {}).get("patches", {}).get("attn1_patch", [])
            if f.__name__ == "qsilk_attn1_observer"]


def forward_hooks(sd):
    net = sd.forge_objects_original.unet.model.diffusion_model
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def job_p(family=FORGE_NEW, kind="sd15", settings=None, **kwargs):
    """A `p` inside ``p.sample`` for hook-level tests (sampler made, forge_objects reset)."""
    sd = fw.make_model(family, kind)
    p = fw.Txt2Img(sd, family=family, **kwargs)
    p.scripts = fw.ScriptRunner([], [])
    p.sampler = fw.KDiffusionSampler(p.sampler_name, sd)
    job = forge.start_job(p, settings or Settings.from_preset("Balanced"))
    return p, job


# -- installation ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_goes_on_a_clone_and_the_original_patcher_is_untouched(family):
    p, job = job_p(family)
    original = p.sd_model.forge_objects.unet
    before = repr(original.model_options)
    forge.before_every_sampling(p, job, x=None, noise=torch.zeros(1))
    patched = p.sd_model.forge_objects.unet
    assert patched is not original and patched.model is original.model
    assert repr(original.model_options) == before
    assert our_functions(patched.model_options) == [job.post_cfg_function]
    assert our_observers(patched.model_options) == [job.attn1_observer]
    assert patched.model_options["sampler_post_cfg_function"][0] is job.fence_function


def test_registered_functions_are_closures_not_bound_methods():
    p, job = job_p()
    forge.before_every_sampling(p, job, noise=torch.zeros(1))
    options = p.sd_model.forge_objects.unet.model_options
    for fn in our_functions(options) + our_observers(options):
        assert not hasattr(fn, "__self__")
    clone = p.sd_model.forge_objects.unet.clone()  # another extension cloning after us
    assert our_functions(clone.model_options) == [job.post_cfg_function]  # deepcopy keeps functions


@pytest.mark.parametrize("family", FAMILIES)
def test_repeated_hook_calls_do_not_stack(family):
    p, job = job_p(family)
    noise = torch.zeros(1)
    for _ in range(3):
        forge.before_every_sampling(p, job, x=noise, noise=noise)
    options = p.sd_model.forge_objects.unet.model_options
    assert len(our_functions(options)) == 1 and len(our_observers(options)) == 1
    assert p.sd_model.forge_objects_original.unet.clones == 1
    # new Forge's hires flow: a reset of forge_objects between two identical calls
    p.reset_forge_objects()
    forge.before_every_sampling(p, job, x=noise, noise=noise)
    assert len(our_functions(p.sd_model.forge_objects.unet.model_options)) == 1
    assert getattr(p.sampler.sample, forge.JOB_ATTR) is job
    assert len(job._wrapped) == 2  # sample and sample_img2img, each wrapped once


@pytest.mark.parametrize("family", FAMILIES)
def test_hires_job_begins_each_pass_once(family):
    p, _, qs = run_job(family, enable_hr=True, hr_scale=2.0, steps=3, sampler_name="Euler")
    hooks = p.scripts.hook_calls.count("process_before_every_sampling")
    assert hooks == (3 if family == FORGE_NEW else 2)  # new Forge: 1 + 2; the others: 1 + 1
    spy = SpyStabilizer.instances[-1]
    assert [a["is_hires"] for a in spy.pass_args] == [False, True]
    assert spy.passes == 2
    assert [c["step"] for c in spy.calls] == [0, 1, 2, 0, 1]  # hires img2img: t_enc + 1 = 2 evaluations
    assert [c["total"] for c in spy.calls] == [3, 3, 3, 2, 2]


def test_hires_pass_switched_off_installs_nothing_for_it():
    settings = Settings.from_preset("Balanced", hires=False)
    p, _, qs = run_job(FORGE_NEW, settings=settings, enable_hr=True, steps=3)
    spy = SpyStabilizer.instances[-1]
    assert len(spy.calls) == 3 and all(not c["x0"].shape[-1] > 8 for c in spy.calls)
    assert len(spy.pre_decode_inputs) == 1  # the first pass only; the hires output is decoded as is
    assert p.sd_model.forge_objects.vae.decoded[-1].shape[-1] == 16


# -- other extensions ------------------------------------------------------------------------
OTHERS = {
    "sag": lambda: [fw.SagLike()],
    "pag": lambda: [fw.PagLike()],
    "stylealign": lambda: [fw.StyleAlignLike()],
    # Among themselves they collide, QSilk or not (Forge: one function per replace key, and a
    # 3-tuple key shadows a 2-tuple one): StyleAlign's replace-all and SAG both take
    # ("middle", 0, 0), which hides PAG's ("middle", 0). Their calls must be what they are alone.
    "all": lambda: [fw.StyleAlignLike(), fw.SagLike(), fw.PagLike()],
}
CASES = [(FORGE_NEW, o) for o in ("sag", "pag", "stylealign")] + [(f, "all") for f in FAMILIES]


@pytest.mark.parametrize("family,others", CASES)
@pytest.mark.parametrize("order", ["others_first", "qsilk_first"])
def test_sag_pag_stylealign_keep_working_with_qsilk(family, others, order):
    alone = OTHERS[others]()
    run_job(family, settings=False, before=alone, steps=3)
    together = OTHERS[others]()
    kw = dict(before=together) if order == "others_first" else dict(after=together)
    p, _, qs = run_job(family, **kw, steps=3)
    for a, b in zip(alone, together):
        assert b.replace_calls == a.replace_calls
        assert getattr(b, "post_cfg_calls", 0) == getattr(a, "post_cfg_calls", 0)
        if others != "all":
            assert b.replace_calls > 0 and getattr(b, "post_cfg_calls", 3) == 3
    spy = SpyStabilizer.instances[-1]
    assert len(spy.calls) == 3 and spy.errors == 0 and not p.scripts.errors
    # SAG's / PAG's extra UNet passes run from their post-CFG functions, after QSilk's fence took
    # the map of the evaluation's own UNet call: maps in every evaluation, whatever the order
    assert all(c["probe_map"] is not None for c in spy.calls)


@pytest.mark.parametrize("order", ["others_first", "qsilk_first"])
def test_extra_pass_inside_the_unet_call_makes_the_map_ambiguous(order):
    ref = fw.ReferenceLike()
    kw = dict(before=[ref]) if order == "others_first" else dict(after=[ref])
    p, _, qs = run_job(FORGE_NEW, steps=3, **kw)
    spy = SpyStabilizer.instances[-1]
    assert ref.wrapper_calls == 3 and len(spy.calls) == 3
    assert all(c["probe_map"] is None for c in spy.calls)
    assert qs.jobs[0].ambiguous_evaluations == 3
    assert any("seen twice" in n for n in spy.notes) and "seen twice" in p.extra_generation_params["QSilk note"]


def test_qsilk_keeps_no_replace_key_and_does_not_shadow_others():
    p, job = job_p()
    sag = fw.SagLike()
    sag.process_before_every_sampling(p, True)
    keys_before = dict(p.sd_model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]["attn1"])
    forge.before_every_sampling(p, job, noise=torch.zeros(1))
    after = p.sd_model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert after == keys_before


# -- off means off ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("off", [Settings.from_preset("Balanced", enabled=False), Settings.from_preset("Off")])
def test_off_registers_nothing_and_output_is_bit_identical(family, off):
    sd = fw.make_model(family)
    ref_p, ref, _ = run_job(family, settings=False, model=sd, enable_hr=True, steps=3, before=[fw.PagLike()])
    p, out, qs = run_job(family, settings=off, model=sd, enable_hr=True, steps=3, before=[fw.PagLike()])
    assert qs.jobs == [None]
    assert torch.equal(images(out), images(ref))
    assert not our_functions(p.sd_model.forge_objects.unet.model_options)
    assert forward_hooks(sd) == 0
    assert "sample" not in p.__dict__ and not SpyStabilizer.instances[-1].calls


def test_observing_probe_changes_no_pixel():
    """The probe's hooks and observing patch do not change the model output (spec §5): AQClip
    at strength 0 with the probe running gives the image of a run without QSilk, bit for bit."""
    sd = fw.make_model(FORGE_NEW)
    _, ref, _ = run_job(FORGE_NEW, model=sd, settings=False, steps=3, batch_size=2)
    observe_only = Settings.from_preset("Balanced", qsilk_enabled=False, aqclip_strength=0.0, pre_decode="off")
    _, out, _ = run_job(FORGE_NEW, model=sd, settings=observe_only, steps=3, batch_size=2)
    spy = SpyStabilizer.instances[-1]
    assert all(c["probe_map"] is not None for c in spy.calls) and len(spy.calls) == 3
    assert torch.equal(images(out), images(ref))


# -- CFG 1 and skipped uncond ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cfg1_and_hires_cfg1_stabilise_every_evaluation_with_cond_rows(family):
    seen = []

    class Recorder(fw.Script):
        def process_before_every_sampling(self, p, enabled, **kwargs):
            unet = p.sd_model.forge_objects.unet.clone()
            unet.set_model_sampler_post_cfg_function(lambda args: seen.append(args["uncond_denoised"]) or args["denoised"])
            p.sd_model.forge_objects.unet = unet

    p, _, qs = run_job(family, cfg_scale=1.0, hr_cfg=1.0, enable_hr=True, steps=3, after=[Recorder()])
    spy = SpyStabilizer.instances[-1]
    assert len(spy.calls) == 5 and spy.errors == 0
    assert all(c["probe_map"] is not None for c in spy.calls)
    if family == REFORGE:
        assert all(u is None for u in seen)
    else:
        assert all(torch.count_nonzero(u) == 0 for u in seen)
    if family in BACKEND_FAMILIES:
        assert p.uc is None and p.hr_uc is None


def test_skip_early_cfg_steps_are_stabilised_once_with_a_map():
    sd = fw.make_model(REFORGE)
    p = fw.Txt2Img(sd, family=REFORGE, steps=4)
    p.env.opts.skip_early_cond = 0.5
    p.scripts = fw.ScriptRunner([QSilkStandIn()], [[Settings.from_preset("Balanced")]])
    fw.process_images(p)
    spy = SpyStabilizer.instances[-1]
    assert [c["step"] for c in spy.calls] == [0, 1, 2, 3]
    assert all(c["probe_map"] is not None for c in spy.calls)


# -- exactly one application per evaluation ------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_whole_job_applies_once_per_evaluation(family):
    sd = fw.make_model(family)
    p, _, qs = run_job(family, model=sd, enable_hr=True, sampler_name="Heun", steps=3, n_iter=2, batch_size=2,
                       before=[fw.PagLike()])
    spy = SpyStabilizer.instances[-1]
    # Heun: 2·3 − 1 = 5 evaluations; hires img2img (t_enc + 1 = 2 sigma steps): 2·2 − 1 = 3
    per_batch = [0, 1, 2, 3, 4, 0, 1, 2]
    assert [c["step"] for c in spy.calls] == per_batch * 2
    assert [c["total"] for c in spy.calls] == ([5] * 5 + [3] * 3) * 2
    assert [a["evaluations_per_step"] for a in spy.pass_args] == [2, 2, 2, 2]
    assert spy.evaluations == len(spy.calls)
    assert not p.env.callbacks.cfg_after_cfg and not p.env.callbacks.cfg_denoiser  # no A1111 path


@pytest.mark.parametrize("family", FAMILIES)
def test_ddim_post_cfg_sees_x0_and_counts_its_evaluations(family):
    """Forge's timestep samplers run the denoiser with classic_ddim_eps_estimation: post-CFG
    functions see x0 in the k-diffusion frame (no ε conversion), DDIM evaluates steps − 1 times."""
    inputs = []

    class Inputs(fw.Script):
        def process_before_every_sampling(self, p, enabled, **kwargs):
            unet = p.sd_model.forge_objects.unet.clone()
            unet.set_model_sampler_post_cfg_function(
                lambda a: inputs.append((a["input"], a["sigma"], a["cond_denoised"])) or a["denoised"])
            p.sd_model.forge_objects.unet = unet

    p, _, qs = run_job(family, sampler_name="DDIM", steps=5, cfg_scale=1.0, before=[Inputs()])
    spy = SpyStabilizer.instances[-1]
    assert [c["step"] for c in spy.calls] == [0, 1, 2, 3]
    assert [c["total"] for c in spy.calls] == [4] * 4
    for c, (x, sigma, cond_x0) in zip(spy.calls, inputs):
        assert torch.equal(c["x0"], cond_x0)  # CFG 1: the post-CFG value is the cond x0 itself
        assert c["sigma"] is sigma and float(sigma[0]) > 0
    assert all(c["probe_map"] is not None for c in spy.calls)


# -- probe rows ------------------------------------------------------------------------------
def reference_map(sd, p, x, sigma, batch):
    """The entropy map computed directly from the probed layer's cond rows (oracle)."""
    net = sd.forge_objects_original.unet.model.diffusion_model
    name, attn = find_probe_layer(net)
    captured = {}
    hq = attn.to_q.register_forward_hook(lambda m, a, o: captured.setdefault("q", o))
    hk = attn.to_k.register_forward_hook(lambda m, a, o: captured.setdefault("k", o))
    cond = fw.text_embedding(p.prompt, batch)
    try:
        sd.forge_objects_original.unet.model.apply_model(x, sigma, c_crossattn=cond, transformer_options={})
    finally:
        hq.remove(), hk.remove()
    n = captured["q"].shape[1]
    side = int(round(n ** 0.5))
    emap = entropy_map(captured["q"], captured["k"], (side, side), num_heads=attn.heads, heads=2, max_queries=256)
    return upsample_to_latent(emap, tuple(x.shape[-2:]), x.shape[-1] // side)


@pytest.mark.parametrize("max_chunks", [8, 1])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_probe_map_is_the_cond_rows_whatever_the_chunk_order(max_chunks, kind):
    """cond_or_uncond is [1, 0] (uncond first) in one call, or one chunk per call: the map is
    the cond rows' entropy either way, equal to a direct computation on a cond-only run."""
    sd = fw.make_model(FORGE_NEW, kind)
    sd.forge_objects_original.unet.model.max_chunks_per_call = max_chunks
    settings = Settings.from_preset("Balanced", probe_queries=256)
    x_seen = []

    class Inputs(fw.Script):  # records the first evaluation's x and sigma
        def process_before_every_sampling(self, p, enabled, **kwargs):
            unet = p.sd_model.forge_objects.unet.clone()
            unet.set_model_sampler_post_cfg_function(lambda a: x_seen.append((a["input"], a["sigma"])) or a["denoised"])
            p.sd_model.forge_objects.unet = unet

    p, _, qs = run_job(FORGE_NEW, kind, model=sd, settings=settings, batch_size=2, steps=2, before=[Inputs()])
    spy = SpyStabilizer.instances[-1]
    x, sigma = x_seen[0]
    want = reference_map(sd, p, x, sigma, 2)
    got = spy.calls[0]["probe_map"]
    assert got is not None and got.shape == (2, 1, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_and_prompt_two_cond_chunks_are_not_ambiguous():
    p, _, qs = run_job(FORGE_NEW, prompt="a cat AND a hat", steps=2)
    spy = SpyStabilizer.instances[-1]
    assert all(c["probe_map"] is not None for c in spy.calls)


def test_probe_only_inside_the_step_window():
    settings = Settings.from_preset("Balanced", step_start=0.5, step_end=1.0)
    run_job(FORGE_NEW, settings=settings, steps=5)
    spy = SpyStabilizer.instances[-1]
    assert [c["probe_map"] is not None for c in spy.calls] == [False, False, True, True, True]


# -- Flux-like 16-channel model --------------------------------------------------------------
@pytest.mark.parametrize("with_hires", [False, True])
def test_flux_like_model_gets_lite_and_a_note_never_a_crash(with_hires):
    p, out, qs = run_job(FORGE_NEW, "flux", cfg_scale=1.0, hr_cfg=1.0, enable_hr=with_hires, steps=3)
    spy = SpyStabilizer.instances[-1]
    assert spy.calls and all(c["probe_map"] is None for c in spy.calls)
    assert all(c["x0"].shape[1] == 16 for c in spy.calls)
    assert spy.errors == 0 and not p.scripts.errors
    assert spy.lite_fallbacks == len(spy.calls)
    note = [n for n in spy.notes if "Lite" in n]
    assert note and "QSilk note" in p.extra_generation_params
    assert any(not torch.equal(c["out"], c["x0"]) for c in spy.calls)  # QSilk itself ran


# -- hooks live for the job only ---------------------------------------------------------------
def test_hooks_are_removed_after_the_job_and_when_it_raises():
    sd = fw.make_model(FORGE_NEW)
    run_job(FORGE_NEW, model=sd, steps=2)
    assert forward_hooks(sd) == 0 and not forge._LIVE_JOBS

    class Boom(fw.Script):  # Forge does not catch exceptions raised in post-CFG functions
        def process_before_every_sampling(self, p, enabled, **kwargs):
            unet = p.sd_model.forge_objects.unet.clone()

            def explode(args):
                raise RuntimeError("boom")

            unet.set_model_sampler_post_cfg_function(explode)
            p.sd_model.forge_objects.unet = unet

    with pytest.raises(RuntimeError, match="boom"):
        run_job(FORGE_NEW, model=sd, steps=2, after=[Boom()])
    assert forward_hooks(sd) == 0
    # postprocess never ran: the job is still "live" until the next job starts
    run_job(FORGE_NEW, model=sd, steps=2)
    assert forward_hooks(sd) == 0


def test_hires_checkpoint_moves_the_probe_to_the_new_model():
    first, second = fw.make_model(FORGE_NEW, "sd15", seed=0), fw.make_model(FORGE_NEW, "sdxl", seed=1)
    p, _, qs = run_job(FORGE_NEW, model=first, enable_hr=True, hr_checkpoint=second, steps=3)
    spy = SpyStabilizer.instances[-1]
    assert [c["probe_map"] is not None for c in spy.calls] == [True] * 5
    assert spy.calls[-1]["probe_map"].shape == (1, 1, 16, 16)
    assert forward_hooks(first) == 0 and forward_hooks(second) == 0
    assert our_functions(p.sd_model.forge_objects.unet.model_options)  # the hires model was patched


def test_interrupt_mid_pass_finishes_and_cleans_up():
    sd = fw.make_model(FORGE_NEW)

    class Interrupt(fw.Script):
        def process_before_every_sampling(self, p, enabled, **kwargs):
            def cb(params):
                if params.denoiser.step == 0:
                    p.env.state.interrupted = True
            p.env.callbacks.cfg_denoiser.append(cb)

    p, out, qs = run_job(FORGE_NEW, model=sd, steps=4, after=[Interrupt()])
    spy = SpyStabilizer.instances[-1]
    assert len(spy.calls) == 1 and len(spy.pre_decode_inputs) == 1
    assert forward_hooks(sd) == 0 and qs.reports[0]["evaluations"] == 1


def test_glue_errors_pass_through_and_never_abort(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("no such thing")

    monkeypatch.setattr(forge, "expected_evaluations", broken)
    p, out, qs = run_job(FORGE_NEW, steps=2)
    job = qs.jobs[0]
    assert job.glue_errors == 4 and not p.scripts.errors  # observer + post-CFG, 2 evaluations
    assert any("error while stabilising an evaluation" in n for n in qs.reports[0]["notes"])


# -- before decode ---------------------------------------------------------------------------
@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_each_pass_output_is_stabilised_once_before_decode_or_upscale(upscaler):
    settings = Settings.from_preset("Balanced", pre_decode="always")
    sd = fw.make_model(FORGE_NEW)
    p, _, qs = run_job(FORGE_NEW, model=sd, settings=settings, enable_hr=True, hr_upscaler=upscaler, steps=2)
    spy = SpyStabilizer.instances[-1]
    assert len(spy.pre_decode_inputs) == 2  # first-pass output, hires output
    first_out, hires_out = spy.pre_decode_outputs
    assert not torch.equal(first_out, spy.pre_decode_inputs[0])
    decoded = sd.forge_objects_original.vae.decoded
    if upscaler == "Latent":
        assert len(decoded) == 1  # only the hires output is decoded; the first pass is interpolated
    else:
        assert torch.equal(decoded[0], first_out)  # the image upscaler gets the stabilised latent
    assert torch.equal(decoded[-1], hires_out)


def test_auto_pre_decode_skips_what_ran_on_the_last_step():
    settings = Settings.from_preset("Balanced", qsilk_placement="per_pass")
    run_job(FORGE_NEW, settings=settings, steps=2)
    spy = SpyStabilizer.instances[-1]
    assert len(spy.pre_decode_inputs) == 1 and spy.pre_decodes == 1  # the micro-clamp ran there


def test_img2img_inpaint_passes_the_latent_mask():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0  # keep the left half
    p, _, qs = run_job(FORGE_NEW, img2img=True, mask=mask, steps=3)
    spy = SpyStabilizer.instances[-1]
    assert spy.calls and all(torch.equal(c["nmask"], 1.0 - mask) for c in spy.calls)


# -- what the pre-conditioner gets -------------------------------------------------------------
@pytest.mark.parametrize("family", [FORGE_NEW, FORGE_OLD])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "const"])
def test_skip_factor_and_noisy_input_reach_the_preconditioner(family, prediction, monkeypatch):
    seen = []

    def preconditioner(denoised, x_noisy, sigma, c_skip, progress):
        seen.append((x_noisy, sigma, c_skip))
        return denoised

    monkeypatch.setattr(common, "_preconditioner", lambda p, s, notes: preconditioner)
    sd = fw.SdModel(fb.UnetPatcher(fb.KModel(fb.TinyUNet().eval().requires_grad_(False),
                                             fb.Prediction(prediction), family=family)), fw.TinyVAE(4))
    inputs = []

    class Inputs(fw.Script):
        def process_before_every_sampling(self, p, enabled, **kwargs):
            unet = p.sd_model.forge_objects.unet.clone()
            unet.set_model_sampler_post_cfg_function(lambda a: inputs.append(a["input"]) or a["denoised"])
            p.sd_model.forge_objects.unet = unet

    run_job(family, model=sd, steps=2, before=[Inputs()])
    assert len(seen) == 2
    for (x_noisy, sigma, c_skip), x_in in zip(seen, inputs):
        assert x_noisy is x_in
        want = 1.0 / (sigma ** 2 + 1.0) if prediction == "v_prediction" else torch.ones_like(sigma)
        torch.testing.assert_close(c_skip, want.float())


def test_transformer_block_names():
    assert patcher.transformer_block_of("diffusion_model.output_blocks.3.1.transformer_blocks.1.attn1") == (("output", 3), 1)
    assert patcher.transformer_block_of("up_blocks.3.attentions.2.transformer_blocks.0.attn1") is None
