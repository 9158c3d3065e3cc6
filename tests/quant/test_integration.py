"""Q-Sched through the Stabilizer and the settings table: factory, order, ε frame, per-σ corridor."""
from __future__ import annotations

import math

import pytest
import torch

from qsilk import quant
from qsilk.clamp import limit
from qsilk.quant import coeffs as cf
from qsilk.quant.coeffs import CoefficientSet
from qsilk.quant.thresholds import SigmaCorridor, rowwise_quantile
from qsilk.settings import MODEL_PARAMS, PRESET_PARAMS, PRESETS, Settings, SettingsError
from qsilk.stabilizer import Stabilizer, eps_to_x0

META = {"format": "1", "model_hash": "abcdef0123", "storage": "nf4", "prediction": "eps", "sampler": "euler",
        "steps": "4", "method": "manual", "created_by": "test"}
INFO = quant.ModelInfo(model_hash="abcdef0123", storage="nf4", sampler="euler", steps=4)


def _file(tmp_path, name="m", meta=META, c_x=(0.9, 0.95, 1.0), thresholds=False):
    sig = torch.tensor([0.1, 1.0, 10.0])
    cs = CoefficientSet(sig, torch.tensor(c_x[::-1]), torch.ones(3), dict(meta))
    if thresholds:
        cs.clamp_lo, cs.clamp_hi = torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([0.5, 1.0, 2.0])
    cf.save(tmp_path / "QSilk" / f"{name}.safetensors", cs)
    return quant.ModelInfo(**{**INFO.__dict__, "coeff_dir": str(tmp_path / "QSilk")})


def _data(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g) * 3


# -- settings -------------------------------------------------------------------------------
def test_quant_params_are_outside_presets_and_off_by_default():
    assert set(MODEL_PARAMS) == {"qsched", "qsched_cx", "qsched_cf", "qsched_file", "qsched_thresholds"}
    assert not set(MODEL_PARAMS) & set(PRESET_PARAMS)
    for name in PRESETS:
        s = Settings.from_preset(name)
        assert s.qsched == "off" and "qsched" not in s.to_infotext()


def test_quant_params_round_trip_through_infotext_api_and_positional_args():
    s = Settings.from_preset("Crisp", qsched="file", qsched_file="sdxl nf4 (v2)", qsched_thresholds=True,
                             qsched_cx=0.93)
    text = s.to_infotext()
    assert "qfile=sdxl nf4 (v2)" in text and "," not in text and ":" not in text
    assert Settings.from_infotext(f"Steps: 20, QSilk: {text}, Seed: 1") == s
    assert Settings.from_api(s.to_api()) == s
    assert Settings.from_args(s.to_args()) == s


@pytest.mark.parametrize("data,field", [
    ({"qsched": "auto"}, "qsched must be one of"), ({"qsched_cx": 1.6}, "qsched_cx must be 0.5..1.5"),
    ({"qsched_cf": "x"}, "qsched_cf must be"), ({"qsched_file": "a;b"}, "qsched_file must be empty or a name"),
    ({"qsched_file": "../../etc"}, "qsched_file must be"), ({"qsched": "file"}, "qsched_file must name"),
])
def test_bad_quant_api_values_name_the_field_and_range(data, field):
    with pytest.raises(SettingsError, match=field):
        Settings.from_api(data)


# -- factory --------------------------------------------------------------------------------
def test_factory_returns_none_when_off_or_identity():
    assert quant.make_preconditioner(Settings(), INFO) is None
    assert quant.make_preconditioner(Settings(qsched="ramp"), INFO) is None  # c = 1, 1
    assert quant.make_preconditioner(Settings(enabled=False, qsched="ramp", qsched_cx=0.9), INFO) is None
    assert quant.make_preconditioner(Settings(qsched="ramp", qsched_cx=0.9), INFO).mode == "ramp"


def test_factory_rejects_mismatched_or_bad_files_with_a_note(tmp_path):
    info = _file(tmp_path)
    notes = []
    s = Settings(qsched="file", qsched_file="m")
    assert quant.make_preconditioner(s, info, notes.append).mode == "file" and notes == []
    other = quant.ModelInfo(**{**info.__dict__, "model_hash": "9999999999"})
    assert quant.make_preconditioner(s, other, notes.append) is None and "model hash" in notes[-1]
    fp8 = quant.ModelInfo(**{**info.__dict__, "storage": "fp8-e4m3fn"})
    assert quant.make_preconditioner(s, fp8, notes.append) is None and "fp8-e4m3fn" in notes[-1]
    steps = quant.ModelInfo(**{**info.__dict__, "steps": 30})
    assert quant.make_preconditioner(s, steps, notes.append) is not None and "30" in notes[-1]
    (tmp_path / "QSilk" / "broken.safetensors").write_bytes(b"nonsense")
    assert quant.make_preconditioner(Settings(qsched="file", qsched_file="broken"), info, notes.append) is None
    assert "broken.safetensors" in notes[-1]
    assert quant.make_preconditioner(Settings(qsched="file", qsched_file="absent"), info, notes.append) is None
    nodir = quant.ModelInfo(**{**info.__dict__, "coeff_dir": ""})
    assert quant.make_preconditioner(s, nodir, notes.append) is None and "folder" in notes[-1]


# -- the Stabilizer seam --------------------------------------------------------------------
def test_off_preset_with_ramp_installs_and_applies_only_the_preconditioner():
    s = Settings.from_preset("Off", qsched="ramp", qsched_cx=0.9, qsched_cf=1.1)
    stab = Stabilizer(s, preconditioner=quant.make_preconditioner(s, INFO))
    assert stab.enabled
    stab.begin_pass()
    d, x = _data()
    out = stab.post_cfg(d, 0, 4, sigma=torch.tensor([14.6, 14.6]), x_noisy=x)
    torch.testing.assert_close(out, 1.1 * d + (0.9 - 1.1) * x)
    assert torch.equal(stab.post_cfg(d, 3, 4, sigma=torch.tensor([0.1, 0.1]), x_noisy=x), d)


def test_preconditioner_runs_before_the_clamp():
    s = Settings.from_preset("Balanced", aqclip_enabled=False, qsched="ramp", qsched_cx=0.8)
    pre = quant.make_preconditioner(s, INFO)
    stab = Stabilizer(s, preconditioner=pre)
    stab.begin_pass()
    d, x = _data(1)
    out = stab.post_cfg(d, 0, 4, sigma=torch.tensor([5.0, 5.0]), x_noisy=x)
    plain = Stabilizer(s)
    plain.begin_pass()
    expected = plain.post_cfg(pre(d, x, None, None, 0.0), 0, 4)
    assert torch.equal(out, expected)


def test_disabled_or_identity_is_bit_identical_to_no_preconditioner():
    d, x = _data(2)
    for s in (Settings(qsched="ramp"), Settings(enabled=False, qsched="ramp", qsched_cx=0.7)):
        a, b = Stabilizer(s, preconditioner=quant.make_preconditioner(s, INFO)), Stabilizer(s)
        a.begin_pass(), b.begin_pass()
        assert torch.equal(a.post_cfg(d, 1, 4, sigma=2.0, x_noisy=x), b.post_cfg(d, 1, 4, sigma=2.0))


def test_eps_samplers_see_the_same_correction_in_k_diffusion_frame(tmp_path):
    """post_cfg_eps hands the pre-conditioner x = x_t/√ᾱ and σ = √((1−ᾱ)/ᾱ)."""
    info = _file(tmp_path)
    s = Settings.from_preset("Off", qsched="file", qsched_file="m")
    pre = quant.make_preconditioner(s, info)
    stab = Stabilizer(s, preconditioner=pre)
    stab.begin_pass()
    x_t, eps = _data(3)
    a = torch.tensor(0.3)
    eps_new = stab.post_cfg_eps(x_t, eps, a, 0, 4, sigma=600)
    sigma = math.sqrt((1 - 0.3) / 0.3)
    x_ve = x_t / math.sqrt(0.3)
    d_expected = pre(eps_to_x0(x_t, eps, a), x_ve, torch.tensor([sigma, sigma]))
    torch.testing.assert_close(eps_to_x0(x_t, eps_new, a), d_expected, rtol=1e-5, atol=1e-5)


def test_per_sigma_corridor_replaces_the_micro_clamp_corridor(tmp_path):
    info = _file(tmp_path, c_x=(1.0, 1.0, 1.0), thresholds=True)
    s = Settings.from_preset("Balanced", aqclip_enabled=False, qsched="file", qsched_file="m",
                             qsched_thresholds=True)
    pre = quant.make_preconditioner(s, info)
    assert pre is not None and pre.identity and isinstance(pre.thresholds, SigmaCorridor)
    stab = Stabilizer(s, preconditioner=pre)
    stab.begin_pass()
    d, x = _data(4)
    out = stab.post_cfg(d, 1, 4, sigma=torch.tensor([1.0, 10.0]), x_noisy=x)
    expected = limit(d, torch.tensor([-1.0, -2.0]).view(2, 1, 1, 1), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
    assert torch.equal(out, expected)
    notes = []
    off = Settings.from_preset("Balanced", qsilk_enabled=False, qsched="file", qsched_file="m", qsched_thresholds=True)
    assert quant.make_preconditioner(off, info, notes.append) is None and "micro-clamp" in notes[0]


def test_quantile_corridor_and_nan_rows_pass_through():
    knots = torch.tensor([1.0, 10.0])
    corr = SigmaCorridor(knots, q_lo=torch.tensor([0.1, 0.01]), q_hi=torch.tensor([0.9, 0.99]))
    d, _ = _data(5)
    d[1, 0, 0, 0] = float("nan")
    out = corr(d, torch.tensor([1.0, 10.0]))
    flat = d[0].flatten()
    lo, hi = torch.quantile(flat, 0.1), torch.quantile(flat, 0.9)
    torch.testing.assert_close(out[0], d[0].clamp(float(lo), float(hi)))
    assert torch.equal(out[1].nan_to_num(7.0), d[1].nan_to_num(7.0))


def test_rowwise_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(6)
    v = torch.randn(5, 257, generator=g)
    q = torch.tensor([0.0, 0.001, 0.37, 0.999, 1.0])
    expected = torch.stack([torch.quantile(v[i], q[i]) for i in range(5)])
    torch.testing.assert_close(rowwise_quantile(v, q), expected)


def test_per_step_path_reads_nothing_back_from_the_device(monkeypatch):
    """No `.item()`, `.tolist()` or truth value of a tensor on the per-evaluation path (a host
    sync on a GPU); checked on CPU by making those raise."""
    knots = torch.tensor([0.1, 1.0, 10.0])
    q = quant.QSched("file", torch.tensor([0.9, 1.0, 1.1]), torch.tensor([1.0, 1.05, 1.0]),
                                   knots=knots, prediction="v")
    corr_abs = SigmaCorridor(knots, clamp_lo=-torch.ones(3, 4), clamp_hi=torch.ones(3, 4))
    corr_q = SigmaCorridor(knots, q_lo=torch.full((3,), 0.01), q_hi=torch.full((3,), 0.99))
    d, x = _data(7)
    sigma = torch.tensor([0.5, 3.0])
    q(d, x, sigma)  # warm the device cache outside the guard

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync on the per-step path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    q(d, x, sigma)
    quant.QSched("ramp", 0.9, 1.1)(d, x, sigma, None, 0.3)
    corr_abs.bounds(d, sigma)
    corr_q.bounds(d, sigma, per_channel=True)
