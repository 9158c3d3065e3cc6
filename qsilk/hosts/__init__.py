"""Host detection and adapter loading.

Detection looks only at what the running WebUI has already imported (`sys.modules`), in the
spirit of einops' `get_backend`: it never imports a host package, so nothing Forge-specific is
imported on AUTOMATIC1111 and vice versa. The adapter module for the detected host is imported
lazily by `load_adapter()`.

Every adapter module exposes the same functions, called by `scripts/qsilk.py`:

- ``start_job(p, settings) -> job | None``   from `process()`; None when QSilk does nothing
- ``before_every_sampling(p, job, **kwargs)`` from `process_before_every_sampling()`
- ``before_hr(p, job)``                       from `before_hr()`
- ``end_job(p, job, processed=None)``         from `postprocess()` and on failure paths

Optional, where a host needs them (SD.Next): ``INPUT_ACCORDION`` (False: build a visible checkbox
instead of the WebUI's ``InputAccordion``), ``nested_pass(p)`` (a pass QSilk leaves to the job
that started it: ``process()``/``postprocess()`` do nothing), ``refuse(p, error)`` (make the job
fail with `error` where ``p.sample`` is never called), ``after_process(p)`` (registered with
``on_after_process``: runs also when ``postprocess`` is skipped).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Mapping

A1111 = "a1111"
FORGE_OLD = "forge_old"  # lllyasviel Forge before August 2024 (ldm_patched, Gradio 3.41)
FORGE_NEW = "forge_new"  # lllyasviel Forge from August 2024 (backend/, Gradio 4)
REFORGE = "reforge"  # Panchovix reForge (ldm_patched, Gradio 3.41)
FORGE_NEO = "forge_neo"  # Haoming02 Forge Neo (backend/, Gradio 4.40; Flux, Wan, Z-Image, Qwen-Image …)
FORGE_CLASSIC = "forge_classic"  # Haoming02 Forge Classic (ldm_patched, Gradio 3.41)
SDNEXT = "sdnext"  # vladmandic SD.Next (diffusers-only backend, A1111's Script API)

#: Modules only SD.Next has (058a7f0c): its script manager (``modules/scripts.py`` is a re-export of
#: it there) and its diffusers processing path. Either is imported before extension scripts load.
_SDNEXT_MARKERS = ("modules.scripts_manager", "modules.processing_diffusers", "modules.sd_samplers_diffusers")

#: The ``modules_forge.forge_version.version`` strings of Haoming02's two lines; they say which
#: line it is outright (lllyasviel Forge and reForge write a number there).
_VERSION_NAMES = {"neo": FORGE_NEO, "classic": FORGE_CLASSIC}


def detect_host(modules: Mapping[str, Any] | None = None) -> str:
    """Which WebUI family is running, from the modules it has already imported.

    Only `sys.modules` (or `modules`) is read; nothing is imported. Markers, checked against the
    hosts' source (Forge main dfdcbab6, Forge tag ``previous`` bfee03d8, reForge main 3b56b268):

    - ``modules.scripts_manager`` / ``modules.processing_diffusers`` / ``modules.sd_samplers_diffusers``
      → SD.Next (vladmandic/sdnext ``058a7f0c``: A1111's Script API on a diffusers-only backend, so
      the AUTOMATIC1111 adapter's ``p.sample`` and sampler hooks do not exist there);
    - no ``modules_forge`` package → AUTOMATIC1111;
    - ``modules_forge.forge_version.version`` ``"neo"`` / ``"classic"`` → Forge Neo / Forge Classic
      (Haoming02/sd-webui-forge-classic, branches ``neo`` (release 2.26) and ``classic``
      (``1f95d717``)): Neo has new Forge's ``backend/``, Classic old Forge's ``ldm_patched``;
    - ``backend.patcher.unet`` / ``backend.sampling.sampling_function`` /
      ``backend.diffusion_engine.base`` (Forge's ``backend/``, from August 2024) → new Forge;
    - ``ldm_patched.hooks``, or an ``ldm_patched.modules.samplers`` with ComfyUI's newer
      ``calc_cond_batch`` → reForge; that module without it → old Forge;
    - nothing else imported yet: the ``modules_forge.forge_version`` string (``0.*`` old Forge,
      ``2.*`` new Forge), else reForge.

    The version string alone is not trusted first: reForge has shipped both ``1.*`` and ``2.*``.
    Old Forge and reForge share the adapter, whose few differences are handled by feature checks,
    so a wrong guess between those two changes only what the report names.
    """
    mods = sys.modules if modules is None else modules
    if any(name in mods for name in _SDNEXT_MARKERS):
        return SDNEXT
    if "modules_forge" not in mods:
        return A1111
    named = _VERSION_NAMES.get(str(getattr(mods.get("modules_forge.forge_version"), "version", "")).lower())
    if named is not None:
        return named
    if any(name in mods for name in _NEW_FORGE_MARKERS):
        return FORGE_NEW
    if "ldm_patched.hooks" in mods:
        return REFORGE
    samplers = mods.get("ldm_patched.modules.samplers")
    if samplers is not None:
        return REFORGE if hasattr(samplers, "calc_cond_batch") else FORGE_OLD
    version = str(getattr(mods.get("modules_forge.forge_version"), "version", "") or "")
    if version.startswith("0."):
        return FORGE_OLD
    if version.startswith("2.") and "ldm_patched" not in mods:
        return FORGE_NEW
    return REFORGE


_NEW_FORGE_MARKERS = ("backend.patcher.unet", "backend.sampling.sampling_function",
                      "backend.diffusion_engine.base")


def load_adapter(host: str | None = None):
    """Import and return the adapter module for `host` (default: the detected one)."""
    host = host or detect_host()
    name = {A1111: "a1111", SDNEXT: "sdnext"}.get(host, "forge")
    return importlib.import_module(f"{__name__}.{name}")
