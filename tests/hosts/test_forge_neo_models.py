"""Forge Neo's DiT model families through the real ``scripts/qsilk.py`` on the Neo double.

Neo (release 2.26, ``backend/diffusion_engine/``) runs Flux, Flux.2, Z-Image, Chroma, Qwen-Image,
Wan and Anima: flow models whose denoised estimate is ``x0 = x − σ·v`` (``PredictionDiscreteFlow`` /
``PredictionFlux``, prediction type "const"), with no UNet self-attention and no attention patch on
their blocks. The Wan-VAE ones (Wan, Qwen-Image, Anima) sample 5-D latents ``(B, C, T, H, W)``.
The double (tests/doubles/forge_webui.py `make_model`, `DIT_FAMILIES`) reproduces each family's
latent shape and prediction type. QSilk must run the micro-clamp and AQClip-Lite on the x0 of every
evaluation, treat each latent frame as an image, skip the probe with a note naming the model (console
and ``QSilk note`` infotext), and never crash.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from doubles import forge_webui as fw  # noqa: E402
from doubles.forge_backend import FORGE_NEO  # noqa: E402

from qsilk.hosts import forge  # noqa: E402
from qsilk.settings import INFOTEXT_KEY  # noqa: E402

DIT_KINDS = tuple(fw.DIT_FAMILIES)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def neo():
    h = fw.ForgeHost(FORGE_NEO).install()
    try:
        yield h, fw.load_script(str(ROOT))
    finally:
        h.uninstall()
        for job in list(forge._LIVE_JOBS):
            job.close()


class Around(fw.Script):
    """Post-CFG functions registered before and after QSilk's (Neo applies them in list order):
    what QSilk received and what it returned, for every evaluation."""

    def __init__(self, into: list, key: str):
        self.into, self.key = into, key

    def process_before_every_sampling(self, p, enabled=True, **kwargs):
        unet = p.sd_model.forge_objects.unet.clone()

        def record(args):
            self.into.append((self.key, args["denoised"].clone(), args["input"].clone(), args["sigma"].clone()))
            return args["denoised"]

        unet.set_model_sampler_post_cfg_function(record)
        p.sd_model.forge_objects.unet = unet


def run(host, args, kind, **p_kwargs):
    h, mod = host
    seen: list = []
    scripts = [Around(seen, "in"), mod.QSilkScript(), Around(seen, "out")]
    p = fw.Txt2Img(fw.make_model(FORGE_NEO, kind), family=FORGE_NEO, env=h.env, **p_kwargs)
    p.scripts = fw.ScriptRunner(scripts, [[True], args, [True]])
    processed = fw.process_images(p)
    ins = [r for r in seen if r[0] == "in"]
    outs = [r for r in seen if r[0] == "out"]
    return p, processed, ins, outs


def hard_clamp_oracle(x0: torch.Tensor, q_lo: float, q_hi: float) -> torch.Tensor:
    """The micro-clamp's definition, written out: each sample's — and for a video latent each
    frame's — values clamped to its own q_lo / q_hi quantiles (torch.quantile, linear)."""
    frames = x0.unsqueeze(2) if x0.dim() == 4 else x0
    out = torch.empty_like(frames)
    for b in range(frames.shape[0]):
        for t in range(frames.shape[2]):
            image = frames[b, :, t].float()
            lo, hi = torch.quantile(image.flatten(), torch.tensor([q_lo, q_hi]))
            out[b, :, t] = image.clamp(lo, hi).to(frames.dtype)
    return out.squeeze(2) if x0.dim() == 4 else out


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_every_family_runs_balanced_with_lite_and_a_note_naming_the_model(neo, kind, caplog, capsys):
    channels, video = fw.DIT_FAMILIES[kind]
    with caplog.at_level(logging.INFO, logger="qsilk"):
        p, out, ins, outs = run(neo, [{"preset": "Balanced"}], kind, cfg_scale=1.0, steps=3, frames=3 if video else 1)
    assert len(ins) == len(outs) == 3  # every evaluation went through QSilk once
    shape = ins[0][1].shape
    assert shape[1] == channels and len(shape) == (5 if video else 4)
    assert any(not torch.equal(i[1], o[1]) for i, o in zip(ins, outs))  # QSilk changed the x0
    assert all(torch.isfinite(o[1]).all() for o in outs) and not p.scripts.errors
    engine = fw.ENGINE_NAMES[kind]
    note = p.extra_generation_params["QSilk note"]
    assert f"no UNet self-attention on this model ({engine})" in note and "Lite" in note
    assert p.extra_generation_params[INFOTEXT_KEY] == "v=1; preset=Balanced"
    console = [r.getMessage() for r in caplog.records]
    assert any(f"({engine})" in m and "Lite" in m for m in console)  # the note reaches the console
    summary = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("QSilk (")]
    assert len(summary) == 1 and summary[0].startswith("QSilk (forge_neo): 1 pass(es), 3 evaluation(s) "
                                                       "stabilised: 0 attention map(s), 3 Lite fallback(s)")
    assert torch.isfinite(torch.stack(out.samples)).all()
    assert len(out.samples) == (3 if video else 1)  # a Wan-VAE latent decodes one image per frame here


@pytest.mark.parametrize("kind", ["flux", "zimage", "wan", "qwen"])
def test_micro_clamp_acts_on_the_flow_x0_of_each_evaluation_frame_by_frame(neo, kind):
    """Gentle (micro-clamp only) on the x0 the host computed: Neo's denoised for a flow model is
    ``x − σ·v``; QSilk's output is each (sample, frame) image clamped to its own quantiles."""
    video = fw.DIT_FAMILIES[kind][1]
    p, out, ins, outs = run(neo, [{"preset": "Gentle"}], kind, cfg_scale=3.5, steps=3, batch_size=2,
                            frames=2 if video else 1)
    assert len(ins) == 3
    for (_, x0, x, sigma), (_, got, _, _) in zip(ins, outs):
        # the host's denoised is the flow x0 = x − σ·v: at the first step (x pure noise, σ ≈ 1)
        # it is far from x; QSilk clamps exactly that tensor
        torch.testing.assert_close(got, hard_clamp_oracle(x0, 0.001, 0.999), rtol=0, atol=1e-6)
    assert not torch.allclose(ins[0][1], ins[0][2], atol=1e-3)


def test_wan_video_pre_decode_stabilises_the_5d_latent_before_the_vae(neo):
    """With ``pre_decode`` always, the 5-D latent the sampler returns is stabilised frame by frame
    before the VAE decodes it (the decoder double records what it received)."""
    h, mod = neo
    sd = fw.make_model(FORGE_NEO, "wan")
    p = fw.Txt2Img(sd, family=FORGE_NEO, env=h.env, steps=3, frames=3, cfg_scale=5.0)
    p.scripts = fw.ScriptRunner([mod.QSilkScript()], [[{"preset": "Gentle", "qsilk_placement": "per_pass",
                                                         "pre_decode": "always"}]])
    fw.process_images(p)
    decoded = sd.forge_objects_original.vae.decoded
    assert len(decoded) == 1 and decoded[0].dim() == 5
    latent = decoded[0]
    # clamped frame by frame: every frame's values lie inside its own quantile corridor, with some
    # values exactly on the corridor's edges (a clamp that acted)
    for t in range(latent.shape[2]):
        frame = latent[0, :, t].flatten()
        assert (frame == frame.max()).sum() > 1 and (frame == frame.min()).sum() > 1


def test_off_on_neo_dit_is_bit_identical(neo):
    h, mod = neo
    sd = fw.make_model(FORGE_NEO, "wan")
    outs = []
    for args in (None, [{"enabled": False}]):
        p = fw.Txt2Img(sd, family=FORGE_NEO, env=h.env, steps=3, frames=2)
        p.scripts = fw.ScriptRunner([mod.QSilkScript()] if args else [], [args] if args else [])
        outs.append(torch.stack(fw.process_images(p).samples))
        assert "QSilk note" not in p.extra_generation_params
    assert torch.equal(outs[0], outs[1])
