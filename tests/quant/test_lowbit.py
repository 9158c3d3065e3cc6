"""Low-bit storage detection (duck-typed) and the command line's storage simulation.

The doubles mirror the attributes the hosts really set, read at these commits (no code copied):
- Forge dfdcbab backend/loader.py: the UNet module gets ``storage_dtype`` (a torch dtype or 'nf4' /
  'fp4' / 'gguf') and backend/modules/k_model.py copies it onto ``KModel.storage_dtype``; the KModel
  is ``sd_model.forge_objects.unet.model`` with ``diffusion_model`` and ``predictor``.
- Forge dfdcbab backend/operations_gguf.py: ``ParameterGGUF(torch.nn.Parameter)`` with ``gguf_cls``
  (a class per quant type, e.g. ``Q4_K``) and ``computation_dtype``.
- bitsandbytes ``Params4bit`` (Forge's ``ForgeParams4bit`` subclasses it): ``quant_type`` and
  ``quant_state`` attributes.
- A1111 PR 14031: with "FP8 weight" the UNet's Linear/Conv weights are ``torch.float8_e4m3fn``;
  ``shared.opts.fp8_storage`` holds the option ("Enable" / "Enable for SDXL" / "Disable").
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qsilk import quant
from qsilk.quant.lowbit import NF4_LEVELS, SIMULATED, detect_storage, round_weight, simulate_storage


class Q4_K:  # noqa: N801 (named like the gguf quant class)
    pass


class ParameterGGUF(nn.Parameter):
    """Forge's GGUF parameter: a uint8 payload with `gguf_cls` naming the quant type."""

    def __new__(cls, data):
        return super().__new__(cls, data, requires_grad=False)

    def __init__(self, data):
        self.gguf_cls = Q4_K
        self.computation_dtype = torch.float16


class Params4bit(nn.Parameter):
    def __new__(cls, data, quant_type="nf4"):
        return super().__new__(cls, data, requires_grad=False)

    def __init__(self, data, quant_type="nf4"):
        self.quant_type = quant_type
        self.quant_state = object()


def _unet(weight_dtype=torch.float16):
    m = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8), nn.Linear(8, 8))
    with torch.no_grad():
        m[0].weight.data = m[0].weight.data.to(weight_dtype)
        m[2].weight.data = m[2].weight.data.to(weight_dtype)
    return m


def _forge(storage, diffusion_model=None, prediction="eps"):
    kmodel = SimpleNamespace(storage_dtype=storage, computation_dtype=torch.float16,
                             diffusion_model=diffusion_model or _unet(),
                             predictor=SimpleNamespace(prediction_type=prediction, sigma_data=1.0))
    return SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=kmodel)),
                           sd_checkpoint_info=SimpleNamespace(shorthash="abcdef0123", name_for_extra="flux1-dev"))


def _a1111(weight_dtype, parameterization="eps"):
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=_unet(weight_dtype)), sd_model_hash="0123456789",
                           parameterization=parameterization)


@pytest.mark.parametrize("tag,mode", [("nf4", "nf4"), ("fp4", "fp4"), (torch.float8_e4m3fn, "fp8-e4m3fn"),
                                      (torch.float8_e5m2, "fp8-e5m2"), (torch.bfloat16, "bf16")])
def test_forge_storage_tag(tag, mode):
    st = detect_storage(_forge(tag))
    assert st.mode == mode and st.low_bit == (mode not in ("bf16",))
    assert mode in st.describe()


def test_forge_gguf_names_the_quant_type_from_parameters():
    unet = nn.Module()
    unet.w = ParameterGGUF(torch.zeros(16, dtype=torch.uint8))
    unet.norm = nn.Parameter(torch.ones(8, dtype=torch.float16))
    assert detect_storage(_forge("gguf", unet)).mode == "gguf-Q4_K"


def test_bnb_params_detected_without_a_forge_tag():
    unet = nn.Module()
    unet.w = Params4bit(torch.zeros(16, 2, dtype=torch.uint8), "fp4")
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
    assert detect_storage(model).mode == "fp4"


def test_a1111_fp8_weight_option_and_plain_fp16():
    opts = SimpleNamespace(fp8_storage="Enable for SDXL")
    st = detect_storage(_a1111(torch.float8_e4m3fn), opts)
    assert st.mode == "fp8-e4m3fn" and st.low_bit and "Enable for SDXL" in st.source
    assert detect_storage(_a1111(torch.float16), opts).mode == "fp16"  # option on, SD1.5: not applied
    assert not detect_storage(_a1111(torch.float16)).low_bit


@pytest.mark.parametrize("thing", [None, object(), SimpleNamespace(forge_objects=None), 42,
                                   SimpleNamespace(model=SimpleNamespace(diffusion_model="not a module"))])
def test_unknown_objects_never_raise(thing):
    st = detect_storage(thing)
    assert st.mode == "unknown" and not st.low_bit and "not detected" in quant.describe_storage(thing)


def test_model_info_from_both_hosts():
    info = quant.model_info(_forge("nf4", prediction="const"), models_dir="/m", sampler="Euler", steps=4)
    assert (info.model_hash, info.storage, info.prediction, info.coeff_dir) == ("abcdef0123", "nf4", "flow", "/m/QSilk")
    info = quant.model_info(_a1111(torch.float8_e4m3fn, "v"))
    assert (info.model_hash, info.storage, info.prediction, info.coeff_dir) == ("0123456789", "fp8-e4m3fn", "v", "")


def test_round_weight_modes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    nf4 = round_weight(w, "nf4")
    levels = torch.tensor(NF4_LEVELS)
    per_block = (nf4.reshape(-1, 64) / w.reshape(-1, 64).abs().amax(1, keepdim=True)).reshape(-1)
    assert torch.isclose(per_block[:, None], levels).any(1).all()
    assert round_weight(w, "int4").reshape(-1, 64).unique(dim=None).numel() <= 8 * 15
    assert torch.equal(round_weight(w, "fp8-e4m3fn"), w.to(torch.float8_e4m3fn).float())
    for mode in SIMULATED:
        err = (round_weight(w, mode) - w).abs().max()
        assert 0 < err < 0.5, mode
    with pytest.raises(ValueError, match="storage simulation must be one of"):
        round_weight(w, "int3")


def test_simulate_storage_copies_and_leaves_original_untouched():
    m = _unet(torch.float32)
    before = [p.clone() for p in m.parameters()]
    twin = simulate_storage(m, "nf4")
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert not torch.equal(twin[0].weight, m[0].weight) and torch.equal(twin[1].weight, m[1].weight)


def test_panel_status_names_storage_and_files(tmp_path):
    from qsilk.quant import coeffs as cf
    from qsilk.quant.coeffs import CoefficientSet

    meta = {"format": "1", "model_hash": "*", "storage": "*", "prediction": "eps", "sampler": "*", "steps": "*",
            "method": "manual", "created_by": "test"}
    cf.save(tmp_path / "QSilk" / "flux nf4.safetensors",
            CoefficientSet(torch.tensor([1.0]), torch.tensor([0.97]), torch.tensor([1.0]), meta))
    line = quant.panel_status(_forge("nf4"), models_dir=str(tmp_path))
    assert "nf4" in line and "low-bit" in line and "1 (flux nf4)" in line
    assert "0." in quant.panel_status(_forge(torch.float16), models_dir=str(tmp_path / "none"))
