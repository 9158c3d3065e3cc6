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
"""
from __future__ import annotations

import importlib
import sys

A1111 = "a1111"
FORGE_OLD = "forge_old"  # lllyasviel Forge before August 2024 (ldm_patched, Gradio 3.41)
FORGE_NEW = "forge_new"  # lllyasviel Forge from August 2024 (backend/, Gradio 4)
REFORGE = "reforge"  # Panchovix reForge (ldm_patched, Gradio 3.41)


def detect_host(modules: dict | None = None) -> str:
    """Which WebUI family is running, from the modules it has imported."""
    mods = sys.modules if modules is None else modules
    if "modules_forge" not in mods:
        return A1111
    if "backend" in mods or "backend.patcher.unet" in mods:
        return FORGE_NEW
    version = getattr(mods.get("modules_forge.forge_version"), "version", "") or ""
    if "modules_forge.forge_sampler" in mods or version.startswith("0."):
        return FORGE_OLD
    return REFORGE


def load_adapter(host: str | None = None):
    """Import and return the adapter module for `host` (default: the detected one)."""
    host = host or detect_host()
    name = "a1111" if host == A1111 else "forge"
    return importlib.import_module(f"{__name__}.{name}")
