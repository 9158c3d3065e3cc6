"""QSilk on SD.Next through the test double of SD.Next 058a7f0c (tests/doubles/sdnext.py), which
drives a real tiny diffusers pipeline through SD.Next's Script API call order: ``process`` → per
pass a new scheduler and a pipeline call with SD.Next's ``callback_on_step_end`` → ``postprocess``
(skipped on interrupt) → ``after_process`` (always)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from doubles import sdnext as d  # noqa: E402

from qsilk.hosts import SDNEXT, common, detect_host, load_adapter  # noqa: E402
from qsilk.hosts import sdnext as adapter  # noqa: E402
from qsilk.settings import INFOTEXT_KEY, PARAMS, Settings  # noqa: E402

SUMMARY = re.compile(r"QSilk \(sdnext\): (\d+) pass\(es\), (\d+) evaluation\(s\) stabilised")


@pytest.fixture
def sdnext():
    w = d.SDNext(refiner=True).install()
    yield w
    w.uninstall()


@pytest.fixture
def harness(sdnext):
    return d.Harness(str(ROOT), sdnext)


def qsilk_args(**values) -> dict:
    return {"QSilk": {"args": [values]}}


def info_line(result) -> str:
    return result.body["info"].splitlines()[-1]


def summaries(capsys) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in SUMMARY.findall(capsys.readouterr().out)]


def assert_clean(w: d.SDNext) -> None:
    """Nothing of QSilk left: no hooks on any model module, no wrapped ``step``, no job callback."""
    assert w.hooks() == 0
    for pipe in (w.shared.sd_model, w.shared.sd_refiner):
        assert "step" not in pipe.scheduler.__dict__
    assert w.callbacks("model_loaded") == []


# -- detection and loading -------------------------------------------------------------------------
def test_sdnext_is_detected_and_gets_its_adapter(harness):
    assert detect_host() == SDNEXT
    assert load_adapter() is adapter
    assert harness.module.adapter is adapter


def test_sdnext_markers_win_over_a1111_defaults():
    mods = {n: object() for n in ("modules", "modules.processing", "modules.scripts", "modules.scripts_manager")}
    assert detect_host(mods) == SDNEXT
    assert detect_host({n: object() for n in ("modules", "modules.processing")}) != SDNEXT


def test_controls_have_a_visible_on_off_checkbox(harness):
    """SD.Next draws no header checkbox for InputAccordion: a plain, visible checkbox is used."""
    import gradio as gr
    enabled = harness.components[0]
    assert len(harness.components) == len(PARAMS)
    assert type(enabled) is gr.Checkbox and enabled.visible is not False and enabled.label == "Enable QSilk"
    assert not isinstance(enabled, d._input_accordion_class())
    assert harness.script.alwayson


def test_after_process_is_registered(harness, sdnext):
    assert adapter.after_process in sdnext.callbacks("after_process")


# -- off, on ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "Default"])
def test_off_is_bit_identical_and_installs_nothing(harness, sdnext, sampler):
    off = harness.api_txt2img(qsilk_args(enabled=False), sampler_name=sampler)
    off_latent = sdnext.log["decoded"][-1]
    assert sdnext.log["hooks_at_call"][-1] == 0
    harness.without_script(sampler_name=sampler)
    assert off.status == 200
    assert torch.equal(off_latent, sdnext.log["decoded"][-1])
    assert INFOTEXT_KEY not in info_line(off)
    assert_clean(sdnext)


def test_balanced_changes_the_image_writes_infotext_and_cleans_up(harness, sdnext, capsys):
    harness.without_script(sampler_name="Euler")
    plain = sdnext.log["decoded"][-1]
    on = harness.api_txt2img(qsilk_args(enabled=True, preset="Balanced"), sampler_name="Euler")
    assert on.status == 200
    assert not torch.equal(plain, sdnext.log["decoded"][-1])
    assert "QSilk: v=1; preset=Balanced" in info_line(on)
    assert sdnext.log["hooks_at_call"][-1] > 0  # hooks live during the pipeline call …
    assert summaries(capsys) == [(1, 4)]         # … one pass of 4 steps, one summary line
    assert_clean(sdnext)                          # … and nothing after the job


def test_ui_request_runs_with_every_control_value(harness, sdnext, capsys):
    values = Settings.from_preset("Crisp", enabled=True).to_args()
    result = harness.ui_txt2img(values, sampler_name="Euler")
    assert "preset=Crisp" in result.infotexts[0]
    assert summaries(capsys) == [(1, 4)]


@pytest.mark.parametrize("sampler", sorted(d.SAMPLERS))
def test_every_sampler_runs_and_leaves_nothing_behind(harness, sdnext, sampler, capsys):
    result = harness.api_txt2img(qsilk_args(enabled=True), sampler_name=sampler, steps=3)
    assert result.status == 200 and sdnext.log["errors"] == []
    (passes, evaluations), = summaries(capsys)
    assert passes == 1
    if sampler in ("PNDM", "KDPM2"):  # no single x0 formula: passed through, said once in the infotext
        assert evaluations == 0
        assert "QSilk note: scheduler" in info_line(result)
    else:
        assert evaluations >= 1
    assert_clean(sdnext)


def test_default_scheduler_of_sd15_is_reported_not_silently_skipped(harness, sdnext, capsys):
    result = harness.api_txt2img(qsilk_args(enabled=True))  # no sampler_name: the model's PNDM
    assert "QSilk note: scheduler PNDMScheduler" in info_line(result)
    out = capsys.readouterr().out
    assert "QSilk (sdnext): 1 pass(es), 0 evaluation(s)" in out and "PNDMScheduler" in out


# -- API arguments -----------------------------------------------------------------------------------
def test_api_args_arrive_as_sent_and_get_the_ui_defaults(harness, sdnext, capsys):
    short = harness.api_txt2img({"QSilk": {"args": [True, "Crisp"]}}, sampler_name="Euler")
    assert harness.last_p.per_script_args["QSilk"] == [True, "Crisp"]
    assert "preset=Crisp" in info_line(short) and "tile=" not in info_line(short)
    empty = harness.api_txt2img({"QSilk": {"args": []}}, sampler_name="Euler")
    assert "QSilk: v=1; preset=Balanced" in info_line(empty)  # the settings page's defaults
    assert len(summaries(capsys)) == 2


@pytest.mark.parametrize("args, field", [
    ([{"tile": 1000}], "tile"),
    ([{"q_hi": "x"}], "q_hi"),
    ([True, "Nope"], "preset"),
    ([{"enabled": True}, {"preset": "Gentle"}], "one argument dict"),
    ([{"tiles": 48}], "unknown parameter 'tiles'"),
])
def test_bad_arguments_fail_the_request_naming_the_field(harness, sdnext, args, field):
    result = harness.api_txt2img({"QSilk": {"args": args}}, sampler_name="Euler")
    assert result.status == 422
    assert result.body["error"] == "QSilkArgumentError" and field in result.body["errors"]
    assert sdnext.log["decoded"] == []  # no image made without QSilk
    assert_clean(sdnext)
    ok = harness.api_txt2img(qsilk_args(enabled=False), sampler_name="Euler")  # the next job is not refused
    assert ok.status == 200


def test_the_refusal_is_not_a_type_sdnext_swallows():
    """SD.Next catches ValueError/RuntimeError/AssertionError around the pipeline call."""
    assert not issubclass(adapter.QSilkArgumentError, (ValueError, RuntimeError, AssertionError))


def test_a_ui_request_with_bad_values_raises_visibly(harness, sdnext):
    values = Settings.from_preset("Balanced", enabled=True).to_args()
    values[[p.name for p in PARAMS].index("preset")] = "Nope"
    with pytest.raises(adapter.QSilkArgumentError, match="preset"):
        harness.ui_txt2img(values, sampler_name="Euler")
    assert_clean(sdnext)


# -- passes: hires, refiner, detailer, batches --------------------------------------------------------
def hires(**extra):
    return dict(sampler_name="Euler", enable_hr=True, hr_upscaler="Latent Bilinear", hr_resize_mode=1,
                hr_denoising_strength=0.5, hr_sampler_name="DPM++ 2M", **extra)


def test_hires_pass_gets_its_own_new_scheduler_hooked(harness, sdnext, capsys):
    result = harness.api_txt2img(qsilk_args(enabled=True, hires=True), **hires())
    assert [(job, sched) for job, _, sched in sdnext.log["passes"]] == [
        ("Base", "EulerDiscreteScheduler"), ("Hires", "DPMSolverMultistepScheduler")]
    assert result.status == 200
    (passes, evaluations), = summaries(capsys)
    assert passes == 2 and evaluations > 4  # the hires steps were stabilised too
    assert_clean(sdnext)


def test_hires_switch_off_leaves_the_hires_pass_alone(harness, sdnext, capsys):
    harness.api_txt2img(qsilk_args(enabled=True, hires=False), **hires())
    (passes, evaluations), = summaries(capsys)
    assert passes == 2 and evaluations == 4  # base only


def test_refiner_pass_is_stabilised_on_the_refiner_model(harness, sdnext, capsys):
    result = harness.api_txt2img(qsilk_args(enabled=True), sampler_name="Euler", enable_hr=True,
                                 refiner_steps=3, refiner_start=0.5, hr_sampler_name="UniPC")
    assert sdnext.log["passes"][-1][0] == "Refiner"
    assert result.status == 200
    (passes, evaluations), = summaries(capsys)
    assert passes == 2 and evaluations > 4
    assert_clean(sdnext)


def test_detailer_passes_are_left_alone_and_do_not_end_the_job(harness, sdnext, capsys):
    result = harness.api_txt2img(qsilk_args(enabled=True), sampler_name="Euler", detailer_enabled=True)
    assert sdnext.log["detailer_passes"] == [1]
    assert [job for job, _, _ in sdnext.log["passes"]] == ["Base", "Base"]  # base, then the detail pass
    assert summaries(capsys) == [(1, 4)]  # one job, the detail pass not stabilised
    assert "QSilk: v=1" in info_line(result)
    assert "QSilk note: detailer passes ran without QSilk" in info_line(result)
    assert_clean(sdnext)


def test_img2img_pass_is_stabilised_from_its_start_step(harness, sdnext, capsys):
    torch.manual_seed(0)
    init = torch.randn(1, 4, 8, 8)
    off = harness.api_img2img(qsilk_args(enabled=False), sampler_name="Euler", init_images=[init],
                              denoising_strength=0.5)
    off_latent = sdnext.log["decoded"][-1]
    on = harness.api_img2img(qsilk_args(enabled=True), sampler_name="Euler", init_images=[init],
                             denoising_strength=0.5)
    assert off.status == on.status == 200
    assert sdnext.log["passes"][-1][1] == "StableDiffusionImg2ImgPipeline"
    assert not torch.equal(off_latent, sdnext.log["decoded"][-1])
    assert summaries(capsys) == [(1, 2)]  # 4 steps × strength 0.5
    assert_clean(sdnext)


def test_batches_share_one_job(harness, sdnext, capsys):
    harness.api_txt2img(qsilk_args(enabled=True), sampler_name="Euler", n_iter=2)
    assert summaries(capsys) == [(2, 8)]


# -- interrupt ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", [("Base", 1), ("Hires", 0)])
def test_interrupt_skips_postprocess_and_after_process_cleans_up(harness, sdnext, capsys, where):
    sdnext.state.interrupt_at = where
    result = harness.api_txt2img(qsilk_args(enabled=True, hires=True), **hires())
    assert result.status == 200 and sdnext.state.interrupted
    assert len(summaries(capsys)) == 1  # reported once, from after_process
    assert common.job_of(harness.last_p) is None
    assert_clean(sdnext)


# -- SD.Next's own corrections, paste, XYZ ----------------------------------------------------------
def test_sdnext_latent_corrections_still_run(harness, sdnext):
    sdnext.opts.latent_correction = 0.01
    harness.without_script(sampler_name="Euler")
    without = list(sdnext.log["corrections"])
    sdnext.log["corrections"].clear()
    harness.api_txt2img(qsilk_args(enabled=True), sampler_name="Euler")
    assert sdnext.log["corrections"] == without == [0, 1, 2, 3]  # after every step, as without QSilk


def test_paste_sets_the_controls_through_sdnext_paste(harness, sdnext):
    params = {INFOTEXT_KEY: "v=1; preset=Crisp; tile=48", "Steps": "4"}
    sdnext.opts.disable_apply_params = "steps"  # should_skip(key) → key.lower() on every target
    values = d.paste(harness.script.infotext_fields, params)
    by_name = dict(zip([p.name for p in PARAMS], values))
    assert by_name["enabled"] is True and by_name["preset"] == "Crisp" and by_name["tile"] == 48
    assert d.paste(harness.script.infotext_fields, {"Steps": "4"})[0] is False  # no QSilk key: off


def test_xyz_axes_run_one_job_per_cell(harness, sdnext, capsys):
    labels = [o.label for o in sdnext.xyz_module.axis_options]
    assert "[QSilk] Preset" in labels and "[QSilk] Enabled" in labels
    p = d.StableDiffusionProcessingTxt2Img(scripts=harness.runner, script_args=[0] + harness.defaults,
                                           sampler_name="Euler")
    cells = d.run_xyz_cells(p, "[QSilk] Preset", ["Gentle", "Crisp"])
    assert "preset=Gentle" in cells[0].info and "preset=Crisp" in cells[1].info
    assert len(summaries(capsys)) == 2
    with pytest.raises(ValueError, match="preset"):
        d.run_xyz_cells(p, "[QSilk] Preset", ["Nope"])


def test_a_scheduler_deep_copied_during_a_job_is_sound_after_it(harness, sdnext):
    """SD.Next's create_sampler deep-copies the current scheduler when a model has no
    ``default_scheduler`` yet: a copy taken while QSilk's ``step`` is on must step itself."""
    model = sdnext.shared.sd_model
    pristine = type(model.scheduler).from_config(model.scheduler.config)
    model.default_scheduler = None
    assert harness.api_txt2img(qsilk_args(enabled=True)).status == 200  # Default: the copy is made now
    assert sdnext.log["errors"] == []
    harness.without_script()  # Default again: a deep copy of that copy
    after = sdnext.log["decoded"][-1]
    model.default_scheduler = pristine
    harness.without_script()
    assert torch.equal(after, sdnext.log["decoded"][-1])
    assert_clean(sdnext)
