"""Q-Sched end to end through the real ``scripts/qsilk.py`` on both hosts' doubles.

The doubles are the other test suites' (tests/doubles: A1111 v1.10.1 flow, Forge dfdcbab6 /
bfee03d8 / reForge 3b56b268 flows; see their docstrings). A coefficient file is put in the
double's ``<models>/QSilk`` and selected through the API dict, exactly as a user would.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from doubles import a1111 as d  # noqa: E402
from doubles import forge_webui as fw  # noqa: E402
from doubles.forge_backend import FORGE_NEW, FORGE_OLD, REFORGE  # noqa: E402

from qsilk import quant  # noqa: E402
from qsilk.hosts import forge  # noqa: E402
from qsilk.quant import coeffs as cf  # noqa: E402
from qsilk.quant.coeffs import CoefficientSet  # noqa: E402

SMALL = dict(width=64, height=64, steps=3)


def _coefficients(folder: Path, name: str, model_hash: str, storage: str) -> None:
    meta = {"format": "1", "model_hash": model_hash, "storage": storage, "prediction": "eps", "sampler": "Euler",
            "steps": "3", "method": "manual", "created_by": "test"}
    cs = CoefficientSet(torch.tensor([0.05, 1.0, 20.0]), torch.tensor([1.0, 0.9, 0.8]), torch.tensor([1.0, 1.1, 1.2]),
                        meta)
    cf.save(folder / "QSilk" / f"{name}.safetensors", cs)


@pytest.fixture
def a1111(tmp_path):
    webui = d.WebUI("1.10.1").install()
    webui.modules["modules.paths"].models_path = str(tmp_path)
    try:
        yield webui, d.Harness(str(ROOT), webui)
    finally:
        webui.uninstall()


def test_a1111_applies_a_matching_file_and_writes_it_to_infotext(a1111, tmp_path):
    webui, harness = a1111
    model = webui.shared.sd_model
    storage = quant.detect_storage(model).mode
    _coefficients(tmp_path, "tiny q", model.sd_model_hash, storage)
    _coefficients(tmp_path, "other", model.sd_model_hash, "nf4" if storage != "nf4" else "fp16")
    harness.txt2img([{"preset": "Off"}], **SMALL)
    plain = webui.log["pixels"][-1]
    processed = harness.txt2img([{"preset": "Off", "qsched": "file", "qsched_file": "tiny q"}], **SMALL)
    assert not torch.equal(webui.log["pixels"][-1], plain)
    assert "qsched=file; qfile=tiny q" in processed.infotexts[0]
    processed = harness.txt2img([{"preset": "Off", "qsched": "file", "qsched_file": "other"}], **SMALL)
    assert torch.equal(webui.log["pixels"][-1], plain)  # not applied: bit-identical, and said so
    assert "not applied" in processed.infotexts[0] and "nf4" in processed.infotexts[0] + processed.comments


def test_a1111_ramp_at_identity_installs_nothing(a1111):
    webui, harness = a1111
    harness.txt2img([{"preset": "Off"}], **SMALL)
    plain = webui.log["pixels"][-1]
    processed = harness.txt2img([{"preset": "Off", "qsched": "ramp"}], **SMALL)
    assert torch.equal(webui.log["pixels"][-1], plain) and "QSilk" not in processed.infotexts[0]
    harness.txt2img([{"preset": "Off", "qsched": "ramp", "qsched_cx": 0.9}], **SMALL)
    assert not torch.equal(webui.log["pixels"][-1], plain)


@pytest.mark.parametrize("family", [FORGE_NEW, FORGE_OLD, REFORGE])
def test_forge_applies_the_file_through_the_post_cfg_function(family, tmp_path):
    h = fw.ForgeHost(family).install()
    sys.modules["modules.paths"].models_path = str(tmp_path)  # the double's module, installed above
    try:
        mod = fw.load_script(str(ROOT))

        def run(args):
            sd = fw.make_model(family, "sd15")
            info = quant.model_info(sd)
            _coefficients(tmp_path, "forge", info.model_hash or "*", info.storage or "*")
            script = mod.QSilkScript()
            p = fw.Txt2Img(sd, family=family, env=h.env, steps=3)
            p.scripts = fw.ScriptRunner([script], [[args]])
            return p, fw.process_images(p)

        _, plain = run({"preset": "Off", "qsched": "ramp"})
        p, pre = run({"preset": "Off", "qsched": "file", "qsched_file": "forge"})
        assert not torch.equal(pre.samples[0], plain.samples[0])
        assert "qfile=forge" in pre.infotexts[0]
    finally:
        h.uninstall()
        for job in list(forge._LIVE_JOBS):
            job.close()
