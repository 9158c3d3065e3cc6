"""Whole jobs through the real ``scripts/qsilk.py`` on the Forge doubles.

The script is loaded the way Forge loads it, with the family's modules in ``sys.modules``
(tests/doubles/forge_webui.py `ForgeHost`: new Forge main dfdcbab6, old Forge tag ``previous``
bfee03d8, reForge main 3b56b268, Forge Neo release 2.26, Forge Classic 1f95d717), and driven
through the double's processing flow with API-style arguments (one dict). Other Forge extensions (SAG/PAG-like) run in the same job.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from doubles import forge_webui as fw  # noqa: E402
from doubles.forge_backend import (BACKEND_FAMILIES, FORGE_CLASSIC, FORGE_NEO, FORGE_NEW, FORGE_OLD,  # noqa: E402
                                   REFORGE)

from qsilk.hosts import forge  # noqa: E402
from qsilk.hosts import common  # noqa: E402
from qsilk.settings import INFOTEXT_KEY, Settings  # noqa: E402
from qsilk.stabilizer import Stabilizer  # noqa: E402

FAMILIES = (FORGE_NEW, FORGE_OLD, REFORGE, FORGE_NEO, FORGE_CLASSIC)


pytestmark = pytest.mark.usefixtures("one_thread")


class CountingStabilizer(Stabilizer):
    instances: list["CountingStabilizer"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        CountingStabilizer.instances.append(self)
        self.applied: list[tuple[int, int]] = []  # (denoiser id, denoiser call number)
        self.denoisers: dict[int, object] = {}

    def post_cfg(self, x0, step, total_steps, probe_map=None, **kwargs):
        self.applied.append((step, total_steps, probe_map is not None))
        return super().post_cfg(x0, step, total_steps, probe_map, **kwargs)


@pytest.fixture
def host(request, monkeypatch):
    """(ForgeHost, loaded script module) for the family in ``request.param``."""
    CountingStabilizer.instances.clear()
    monkeypatch.setattr(common, "Stabilizer",  # the adapters build it via common.job_stabilizer
                         CountingStabilizer)
    h = fw.ForgeHost(request.param).install()
    try:
        mod = fw.load_script(str(ROOT))
        yield h, mod
    finally:
        h.uninstall()
        for job in list(forge._LIVE_JOBS):
            job.close()


def run(host, args, *, others=(), model=None, img2img=False, kind="sd15", **p_kwargs):
    h, mod = host
    sd = model or fw.make_model(h.family, kind)
    script = mod.QSilkScript()
    scripts = [*others, script]
    script_args = [[True]] * len(others) + ([args] if args is not None else [[]])
    if args is None:
        scripts.pop()
    cls = fw.Img2Img if img2img else fw.Txt2Img
    if img2img and "init_latent" not in p_kwargs:
        p_kwargs["init_latent"] = torch.randn(p_kwargs.get("batch_size", 1), sd.latent_channels, 8, 8,
                                              generator=torch.Generator().manual_seed(3))
    p = cls(sd, family=h.family, env=h.env, **p_kwargs)
    p.scripts = fw.ScriptRunner(scripts, script_args)
    return p, fw.process_images(p)


def denoiser_calls(p):
    return [c for c in p.scripts.hook_calls]


@pytest.mark.parametrize("host", FAMILIES, indirect=True)
@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_job_through_the_real_script(host, upscaler):
    h, mod = host
    assert mod.adapter is forge
    evaluations = []

    class CountEvaluations(fw.Script):  # a cfg_denoiser callback: one call per evaluation
        def process(self, p, enabled):
            p.env.callbacks.cfg_denoiser.append(lambda params: evaluations.append(params.denoiser.step))

    pag = fw.PagLike()
    p, out = run(host, [{"preset": "Balanced"}], others=[CountEvaluations(), pag], enable_hr=True,
                 hr_upscaler=upscaler, sampler_name="Heun", steps=3, batch_size=2)
    stab = CountingStabilizer.instances[-1]
    assert len(stab.applied) == len(evaluations) == 5 + 3  # once per evaluation, first pass + hires
    assert pag.post_cfg_calls == len(evaluations)  # PAG ran in every evaluation too
    assert p.extra_generation_params[INFOTEXT_KEY] == "v=1; preset=Balanced"
    assert stab.passes == 2 and not p.scripts.errors
    # no A1111 after-CFG path on Forge; the refiner guard lived only while p.sample ran
    assert [k for k, _ in h.registered] == ["ui_settings", "before_ui", "script_unloaded"]
    assert h.env.callbacks.cfg_after_cfg == [] and len(h.env.callbacks.cfg_denoiser) == 1
    net = p.sd_model.forge_objects_original.unet.model.diffusion_model
    assert all(not m._forward_hooks for m in net.modules()) and "sample" not in p.__dict__


@pytest.mark.parametrize("host", FAMILIES, indirect=True)
def test_off_is_bit_identical_and_writes_nothing(host):
    sd = fw.make_model(host[0].family)
    p0, ref = run(host, None, model=sd, enable_hr=True, steps=3)
    p1, off = run(host, [{"enabled": False}], model=sd, enable_hr=True, steps=3)
    assert torch.equal(torch.stack(off.samples), torch.stack(ref.samples))
    assert INFOTEXT_KEY not in p1.extra_generation_params
    assert not CountingStabilizer.instances or not CountingStabilizer.instances[-1].applied
    assert all(f.__name__ != "qsilk_post_cfg"
               for f in p1.sd_model.forge_objects.unet.model_options.get("sampler_post_cfg_function", []))


@pytest.mark.parametrize("host", [FORGE_NEW, FORGE_NEO, FORGE_CLASSIC], indirect=True)
def test_bad_argument_fails_the_request_with_the_field_named(host):
    with pytest.raises(ValueError, match=r"tile must be 4\.\.256"):
        run(host, [{"tile": 999}], steps=2)


@pytest.mark.parametrize("host", [FORGE_NEW], indirect=True)
def test_flux_like_model_runs_with_lite_and_says_so(host):
    p, out = run(host, [{"preset": "Balanced"}], kind="flux", cfg_scale=1.0, steps=3)
    stab = CountingStabilizer.instances[-1]
    assert len(stab.applied) == 3 and not any(m for _, _, m in stab.applied)
    assert "Lite" in p.extra_generation_params["QSilk note"]
    assert torch.isfinite(torch.stack(out.samples)).all()


@pytest.mark.parametrize("host", [FORGE_NEW, REFORGE, FORGE_NEO, FORGE_CLASSIC], indirect=True)
def test_img2img_and_inpaint_batch_count(host):
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    p, out = run(host, [{"preset": "Balanced"}], img2img=True, mask=mask, n_iter=2, steps=4)
    stab = CountingStabilizer.instances[-1]
    assert stab.passes == 2 and len(stab.applied) == 2 * 3  # t_enc + 1 = 3 evaluations per batch
    assert all(m for _, _, m in stab.applied)


@pytest.mark.parametrize("host", FAMILIES, indirect=True)
def test_ui_builds_with_the_familys_input_accordion(host):
    """New Forge's and Neo's InputAccordion is a factory function, old Forge's / Classic's / reForge's
    a class; the controls build under the installed Gradio (3.41 here; CI also runs this under 4.40)."""
    import gradio as gr
    expected = os.environ.get("QSILK_EXPECT_GRADIO")  # set by .ci/ui_gradio4.sh
    if expected:
        assert gr.__version__.split(".")[0] == expected, gr.__version__
    h, mod = host
    script = mod.QSilkScript()
    with gr.Blocks():
        components = script.ui(False)
    assert len(components) == len(Settings.from_preset("Balanced").to_args())
    assert components[0].value is True  # the header checkbox is the on/off switch
    accordion = mod._InputAccordion
    assert (accordion.__class__.__name__ == "function") == (h.family in BACKEND_FAMILIES)  # factory vs class
    assert "sorting_priority" in vars(mod.QSilkScript)  # Forge's accordion order; A1111 ignores it


@pytest.mark.parametrize("host", FAMILIES, indirect=True)
def test_refiner_switch_reinstalls_on_the_refiner(host):
    """The refiner switch reloads the model inside the denoiser and LoRA activation resets the
    patcher, without a sampling hook: QSilk's cfg_denoiser guard installs on the refiner's
    patcher before its first evaluation, and the probe moves to the refiner's UNet."""
    h, _ = host
    base, refiner = fw.make_model(h.family, "sd15", seed=0), fw.make_model(h.family, "sdxl", seed=4)
    p, out = run(host, [{"preset": "Balanced"}], model=base, refiner=refiner, refiner_switch_at=0.5, steps=4)
    stab = CountingStabilizer.instances[-1]
    assert p.sd_model is refiner
    assert [(s, m) for s, _, m in stab.applied] == [(0, True), (1, True), (2, True), (3, True)]
    for sd in (base, refiner):
        net = sd.forge_objects_original.unet.model.diffusion_model
        assert all(not m._forward_hooks for m in net.modules())
    assert h.env.callbacks.cfg_denoiser == []


@pytest.mark.parametrize("host", [FORGE_NEW], indirect=True)
def test_show_maps_adds_gallery_images_and_notes_reach_the_comments(host):
    p, out = run(host, [{"preset": "Balanced", "show_maps": True}], kind="flux", steps=2)
    assert len(out.images) == 1 + 2  # the image, then the confidence and activity maps
    assert out.infotexts[1].startswith("QSilk map:")
    assert "QSilk: no UNet self-attention" in out.comments


class _PoisonLike(fw.Script):
    """Another extension's post-CFG function (registered before QSilk's) that puts a NaN into image
    1's denoised latent on every evaluation."""

    def process_before_every_sampling(self, p, enabled=True, **kwargs):
        unet = p.sd_model.forge_objects.unet.clone()

        def post_cfg_function(args):
            denoised = args["denoised"].clone()
            denoised[1, 0, 0, 0] = float("nan")
            return denoised

        unet.set_model_sampler_post_cfg_function(post_cfg_function)
        p.sd_model.forge_objects.unet = unet


@pytest.mark.parametrize("host", FAMILIES, indirect=True)
def test_nan_latent_passes_through_and_is_recorded_in_the_images_infotext(host):
    """Image 1's NaN sample passes through QSilk unchanged while image 0 is stabilised, and the
    infotext the WebUI writes after sampling records it (read once per batch, not per step)."""
    p, out = run(host, [{"preset": "Balanced"}], others=[_PoisonLike()], steps=3, batch_size=2)
    stab = CountingStabilizer.instances[-1]
    assert len(stab.applied) == 3 and not p.scripts.errors
    assert "non-finite values (NaN/Inf)" in out.infotexts[0]
    assert stab.report()["nan_passthrough"] == 3


@pytest.mark.parametrize("host", FAMILIES, indirect=True)
def test_the_console_line_names_the_host_family(host, capsys, caplog):
    """Printed by default (the WebUIs hide INFO unless started with --loglevel INFO); with the
    settings page's option off, logged at INFO instead."""
    h, _ = host
    run(host, [{"preset": "Balanced"}], steps=2)
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("QSilk (")]
    assert printed == [f"QSilk ({h.family}): 1 pass(es), 2 evaluation(s) stabilised: 2 attention map(s), "
                       "0 Lite fallback(s); 0 pre-decode(s), " + printed[0].split("pre-decode(s), ")[1]]
    h.env.opts.qsilk_console_summary = False
    with caplog.at_level("INFO", logger="qsilk"):
        run(host, [{"preset": "Balanced"}], steps=2)
    assert not [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("QSilk (")]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"QSilk ({h.family}): 1 pass")]


@pytest.mark.parametrize("host", FAMILIES, indirect=True)
def test_a_sampler_rewriting_its_sigmas_in_place_still_gets_the_before_decode_stage(host, monkeypatch):
    """ComfyUI's uni_pc sets the last σ of the tensor it is given to 0.001 in place. Forge's samplers
    do not (Neo's k-diffusion UniPC, ``sd_samplers_extra.sample_unipc``, clones before setting
    0.001; the rest only read σ), and the adapter decides nothing from σ after a pass: a sampler that
    did would still get the before-decode stage on every family."""
    sd = fw.make_model(host[0].family)
    _, ref = run(host, None, model=sd, steps=3)
    original, seen = fw.KDiffusionSampler.run, []

    def rewriting_run(self, x, sigmas, extra):
        sigmas[-1] = 0.001
        seen.append(sigmas)
        return original(self, x, sigmas, extra)

    monkeypatch.setattr(fw.KDiffusionSampler, "run", rewriting_run)
    p, out = run(host, [{"preset": "Paper (literal)"}], model=sd, steps=3)
    report = CountingStabilizer.instances[-1].report()
    assert seen and float(seen[-1][-1]) == pytest.approx(0.001)
    assert report["pre_decodes"] == 1 and not any("leftover" in n for n in report["notes"])
    assert not torch.equal(torch.stack(out.samples), torch.stack(ref.samples)) and not p.scripts.errors


@pytest.mark.parametrize("host", [FORGE_NEO], indirect=True)
@pytest.mark.parametrize("build, hook_calls", [("", 2), (fw.NEO_2026_02, 3)])
@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_both_neo_hires_flows(host, build, hook_calls, upscaler):
    """Neo 2.26 runs the hook once for the hires pass (1 + 1); a Neo of February 2026 runs it twice
    there (1 + 2, as new Forge) and lists Latent upscalers: each pass is started once and every evaluation
    stabilised once either way."""
    evaluations = []

    class CountEvaluations(fw.Script):
        def process(self, p, enabled):
            p.env.callbacks.cfg_denoiser.append(lambda params: evaluations.append(params.denoiser.step))

    p, out = run(host, [{"preset": "Balanced"}], others=[CountEvaluations()], enable_hr=True,
                 hr_upscaler=upscaler, steps=3, build=build)
    stab = CountingStabilizer.instances[-1]
    assert p.scripts.hook_calls.count("process_before_every_sampling") == hook_calls  # runner-level calls
    assert len(stab.applied) == len(evaluations) == 3 + 2 and stab.passes == 2  # hires: denoise 0.6 of 3
    assert not p.scripts.errors
