"""Host detection from already-imported modules, and the no-import rule.

The module sets below are what each host has in ``sys.modules`` when extension scripts load
(modules.processing and the samplers are imported by then): AUTOMATIC1111 v1.10.1 (82a973c0),
Forge main dfdcbab6 (``backend/``), Forge tag ``previous`` bfee03d8 (``ldm_patched`` +
``modules_forge.forge_sampler``), reForge main 3b56b268 (``ldm_patched`` with ComfyUI's
``calc_cond_batch`` and ``ldm_patched.hooks``, and also ``modules_forge.forge_sampler``), Forge Neo
release 2.26 (new Forge's ``backend/``, ``forge_version.version = "neo"``) and Forge Classic
1f95d717 (old Forge's ``ldm_patched`` without ``calc_cond_batch``, ``version = "classic"``).
"""
from __future__ import annotations

import subprocess
import sys
import types

import pytest

from qsilk.hosts import (A1111, FORGE_CLASSIC, FORGE_NEO, FORGE_NEW, FORGE_OLD, REFORGE, detect_host,
                         load_adapter)


def mod(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def a1111():
    return {n: mod(n) for n in ("modules", "modules.processing", "modules.sd_samplers", "ldm", "sgm")}


def forge_new(version="2.0.1v1.10.1"):
    names = ("modules", "modules.processing", "modules_forge", "backend", "backend.patcher", "backend.patcher.unet",
             "backend.sampling", "backend.sampling.sampling_function", "backend.diffusion_engine.base")
    mods = {n: mod(n) for n in names}
    mods["modules_forge.forge_version"] = mod("modules_forge.forge_version", version=version)
    return mods


def forge_old(version="0.0.17v1.8.0rc"):
    names = ("modules", "modules.processing", "modules_forge", "modules_forge.forge_sampler",
             "modules_forge.unet_patcher", "ldm_patched", "ldm_patched.modules")
    mods = {n: mod(n) for n in names}
    mods["ldm_patched.modules.samplers"] = mod("ldm_patched.modules.samplers", sampling_function=len,
                                               calc_cond_uncond_batch=len)
    mods["modules_forge.forge_version"] = mod("modules_forge.forge_version", version=version)
    return mods


def reforge(version="1.0.0v2-v1.10.1RC", hooks=True):
    mods = forge_old(version)
    mods["ldm_patched.modules.samplers"] = mod("ldm_patched.modules.samplers", sampling_function=len,
                                               calc_cond_batch=len, cfg_function=len, calc_cond_uncond_batch=len)
    if hooks:
        mods["ldm_patched.hooks"] = mod("ldm_patched.hooks")
    return mods


@pytest.mark.parametrize("modules,expected", [
    (a1111(), A1111),
    (forge_new(), FORGE_NEW),
    (forge_old(), FORGE_OLD),
    (reforge(), REFORGE),
    (reforge(hooks=False), REFORGE),  # an older reForge: ComfyUI's calc_cond_batch is enough
    (reforge(version="2.0.0-v1.10.1RC"), REFORGE),  # reForge has shipped a 2.* version string
    (reforge(version="0.0.17v1.8.0rc"), REFORGE),  # structure wins over the version string
    (forge_new(version="neo"), FORGE_NEO),
    (forge_old(version="classic"), FORGE_CLASSIC),
    (forge_old(version="Classic"), FORGE_CLASSIC),
])
def test_each_family_is_recognised(modules, expected):
    assert detect_host(modules) == expected


def test_a_package_called_backend_alone_is_not_forge():
    mods = a1111()
    mods["backend"] = mod("backend")
    assert detect_host(mods) == A1111
    mods = forge_old()
    mods["backend"] = mod("backend")  # some unrelated top-level `backend` next to old Forge
    assert detect_host(mods) == FORGE_OLD


@pytest.mark.parametrize("version,expected", [("0.0.17v1.8.0rc", FORGE_OLD), ("2.0.1v1.10.1", FORGE_NEW),
                                              ("1.7.0-v1.10.1RC", REFORGE), ("neo", FORGE_NEO),
                                              ("classic", FORGE_CLASSIC)])
def test_version_string_only_when_nothing_else_is_imported(version, expected):
    mods = {"modules_forge": mod("modules_forge"),
            "modules_forge.forge_version": mod("modules_forge.forge_version", version=version)}
    assert detect_host(mods) == expected


def test_detection_reads_sys_modules_by_default(monkeypatch):
    for name, m in forge_new().items():
        monkeypatch.setitem(sys.modules, name, m)
    assert detect_host() == FORGE_NEW


@pytest.mark.parametrize("host,adapter", [(A1111, "qsilk.hosts.a1111"), (FORGE_NEW, "qsilk.hosts.forge"),
                                          (FORGE_OLD, "qsilk.hosts.forge"), (REFORGE, "qsilk.hosts.forge"),
                                          (FORGE_NEO, "qsilk.hosts.forge"), (FORGE_CLASSIC, "qsilk.hosts.forge")])
def test_each_family_gets_its_adapter(host, adapter):
    module = load_adapter(host)
    assert module.__name__ == adapter
    for fn in ("start_job", "before_every_sampling", "before_hr", "end_job"):
        assert callable(getattr(module, fn))


def test_importing_the_adapters_imports_no_host_module():
    """Nothing Forge-specific is imported on A1111 and vice versa: the adapters import no WebUI
    module at all (checked in a fresh interpreter)."""
    code = (
        "import sys, qsilk.hosts as h, qsilk.hosts.forge, qsilk.hosts.a1111\n"
        "h.detect_host()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('modules', 'modules_forge', 'backend', 'ldm_patched', 'ldm', 'sgm', 'gradio')]\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
