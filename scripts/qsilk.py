"""QSilk for AUTOMATIC1111 stable-diffusion-webui (v1.6–v1.10), Forge and SD.Next: the always-on script.

The WebUI executes this file with the extension's root directory on ``sys.path`` and under the
module name ``qsilk.py`` — a name it never puts in ``sys.modules`` — so ``import qsilk`` below
finds the package beside ``scripts/`` and cannot be confused with this file. Imports happen here,
at top level, because the extension root is on ``sys.path`` only while this file executes.

This file is thin: the controls come from ``qsilk.ui``, argument parsing, infotext, XYZ axes and
the settings page from ``qsilk.hosts.common``, and the per-job work from the host adapter that
``qsilk.hosts.load_adapter()`` picks (``qsilk/hosts/a1111.py`` on AUTOMATIC1111,
``qsilk/hosts/sdnext.py`` on SD.Next).
"""
from __future__ import annotations

import logging
import time

import gradio as gr

from modules import script_callbacks, scripts, shared

from qsilk import ui as qsilk_ui
from qsilk.hosts import common, load_adapter
from qsilk.settings import Settings, SettingsError

try:  # v1.6+ (A1111) and every Forge; a plain accordion with a checkbox otherwise
    from modules.ui_components import InputAccordion as _InputAccordion
except ImportError:  # pragma: no cover - only on WebUIs older than supported
    _InputAccordion = None

log = logging.getLogger("qsilk")
adapter = load_adapter()


class QSilkScript(scripts.Script):
    """Always visible in txt2img and img2img; the accordion's header checkbox is the on/off switch."""

    # Forge only (A1111 ignores it): always-on accordions are sorted by this, larger = lower. Put
    # QSilk with Forge's built-in latent tools, right after Latent Modifier (15), its closest kin.
    sorting_priority = 15.5

    def __init__(self) -> None:
        super().__init__()
        self.ui_default_preset: str | None = None

    def title(self) -> str:
        return "QSilk"

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool):
        # Re-entrant: the API calls ui() twice more (inside a throwaway Blocks) to read defaults.
        enabled, preset = common.ui_defaults(shared.opts)
        self.ui_default_preset = preset
        # SD.Next has InputAccordion but not its JavaScript (no header checkbox would be drawn):
        # the adapter says so, and the controls then get a visible "Enable QSilk" checkbox.
        accordion = _InputAccordion if getattr(adapter, "INPUT_ACCORDION", True) else None
        quant_ui = _quant_ui()
        controls = qsilk_ui.build_controls(
            gr, enabled=enabled, values=Settings.from_preset(preset).as_dict(),
            elem_id=self.elem_id, accordion=accordion, quant_status=quant_ui["quant_status"],
            coefficient_files=quant_ui["coefficient_files"])
        _MODEL_FOLLOW.add(controls, quant_ui["status_after_change"])
        self.infotext_fields = common.infotext_fields(controls.components)
        self.paste_field_names = common.paste_field_names()
        return controls.components

    # -- processing hooks -----------------------------------------------------------------
    def process(self, p, *args):
        if _nested(p):
            return  # SD.Next detailer pass: a copy of the job's p; the job's own hooks handle it
        stale = common.pop_job(p)  # a p reused after a job that raised (postprocess never ran)
        if stale is not None:
            adapter.end_job(p, stale)
        common.restore_sample(p)
        enabled_default, preset_default = common.ui_defaults(shared.opts)
        preset_default = self.ui_default_preset or preset_default
        is_api = bool(getattr(p, "is_api", False))
        sent = getattr(p, "per_script_args", None)
        if isinstance(sent, dict) and self.title() in sent:
            # SD.Next passes an API request's args exactly as sent, without the UI defaults the
            # other WebUIs fill in: add them, so one request means the same on every host.
            args = common.with_ui_defaults(args, Settings.from_preset(preset_default, enabled=enabled_default))
            is_api = True
        try:
            settings = common.settings_from_script_args(args, preset_default, is_api=is_api)
            settings = common.apply_overrides(settings, common.overrides_of(p))
        except SettingsError as error:
            # Raising here would be swallowed by the WebUI (HTTP 200, image without QSilk).
            common.clear_infotext(p)
            getattr(adapter, "refuse", common.fail_job)(p, error)
            return
        common.clear_infotext(p)  # a key written for an earlier XYZ cell must not label this one
        job = adapter.start_job(p, settings) if settings.enabled else None
        if job is None:
            return  # off means off: nothing installed; only a note the adapter wrote (an unusable Q-Sched file)
        common.set_job(p, job)
        common.write_infotext(p, settings)

    def process_before_every_sampling(self, p, *args, **kwargs):
        job = common.job_of(p)
        if job is not None:
            adapter.before_every_sampling(p, job, **kwargs)

    def before_hr(self, p, *args):
        job = common.job_of(p)
        if job is not None:
            adapter.before_hr(p, job)

    def postprocess(self, p, processed, *args):
        if _nested(p):
            return
        job = common.pop_job(p)
        if job is not None:
            adapter.end_job(p, job, processed)


def _nested(p) -> bool:
    nested = getattr(adapter, "nested_pass", None)
    return bool(nested is not None and nested(p))


def _quant_ui() -> dict:
    """The low-bit line and the coefficient files of ``<models>/QSilk`` for the panel (`qsilk.quant`).

    Reads ``sd_models.model_data.sd_model`` rather than ``shared.sd_model``, which on A1111 would
    load a checkpoint just to build the UI; Forge loads models on the first generation, so the
    panel has a refresh button.
    """
    import sys

    from qsilk import quant

    models_dir = getattr(sys.modules.get("modules.paths"), "models_path", None)

    def loaded_model():
        return getattr(getattr(sys.modules.get("modules.sd_models"), "model_data", None), "sd_model", None)

    def status() -> str:
        return quant.panel_status(loaded_model(), shared.opts, models_dir)

    def status_after_change(selected=None, wait_s: float = 120.0) -> str:
        """After the checkpoint selector changed: wait (A1111 loads the new checkpoint in the same
        change) until the loaded model is the selected one, then describe it. Forge loads on the
        next generation: the line then says so until Refresh or the next page load."""
        deadline = time.monotonic() + wait_s
        while selected and time.monotonic() < deadline:
            info = getattr(loaded_model(), "sd_checkpoint_info", None)
            if selected in (getattr(info, "title", None), getattr(info, "name", None),
                            getattr(info, "name_for_extra", None)):
                break
            time.sleep(0.5)
        return status()

    return {"quant_status": status, "status_after_change": status_after_change,
            "coefficient_files": lambda: quant.list_files(quant.folder(models_dir)) if models_dir else []}


class _ModelFollow:
    """Connects the low-bit lines of the panels built so far to the WebUI's checkpoint selector
    (``setting_sd_model_checkpoint``, created after the txt2img/img2img tabs) when it appears;
    panels built later (the API's throwaway builds) are not connected."""

    ELEM_ID = "setting_sd_model_checkpoint"

    def __init__(self) -> None:
        self.pending: list = []
        self.done = False

    def add(self, controls, status) -> None:
        if not self.done and controls.quant_line is not None:
            self.pending.append((controls, status))

    def after_component(self, component, **kwargs) -> None:
        if self.done or getattr(component, "elem_id", None) != self.ELEM_ID:
            return
        self.done = True
        for controls, status in self.pending:
            qsilk_ui.follow_model_changes(component, controls, status)
        self.pending.clear()


_MODEL_FOLLOW = _ModelFollow()


def _on_ui_settings() -> None:
    common.register_settings_options(shared, gr)


def _add_xyz_axes() -> None:
    common.add_xyz_axes(scripts.scripts_data)


script_callbacks.on_ui_settings(_on_ui_settings)
if hasattr(script_callbacks, "on_after_component"):
    script_callbacks.on_after_component(_MODEL_FOLLOW.after_component)
# XYZ's own script file loads before extensions', so its axes can usually be extended right away;
# that also covers --nowebui, where the UI is built before on_before_ui callbacks run.
if common.find_xyz_module(scripts.scripts_data) is not None:
    _add_xyz_axes()
script_callbacks.on_before_ui(_add_xyz_axes)
if hasattr(adapter, "after_process"):  # SD.Next: runs from a finally, also when postprocess is skipped
    script_callbacks.on_after_process(adapter.after_process)
if hasattr(adapter, "cleanup_all"):
    script_callbacks.on_script_unloaded(adapter.cleanup_all)
