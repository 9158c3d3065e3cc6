"""Coefficient files: round trip, metadata, matching, and bad files rejected with a clear error."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from qsilk.quant import coeffs as cf
from qsilk.quant.coeffs import CoefficientFileError, CoefficientSet

META = {"format": "1", "model_hash": "0123456789", "storage": "nf4", "prediction": "eps",
        "sampler": "euler", "steps": "4", "method": "manual", "created_by": "test"}


def _tensors(**over):
    t = {"sigmas": torch.tensor([14.6, 3.0, 0.8, 0.1]), "c_x": torch.tensor([0.95, 0.97, 0.99, 1.0]),
         "c_f": torch.tensor([1.05, 1.03, 1.01, 1.0])}
    t.update(over)
    return {k: v for k, v in t.items() if v is not None}


def _write(path, tensors=None, meta=None):
    save_file(tensors if tensors is not None else _tensors(), str(path), metadata=META if meta is None else meta)
    return path


def test_round_trip_keeps_values_order_and_metadata(tmp_path):
    lo = torch.tensor([[-2.0, -1.0], [-1.5, -0.8], [-1.2, -0.7], [-1.0, -0.5]])
    cs = CoefficientSet(torch.tensor([0.1, 0.8, 3.0, 14.6]), torch.tensor([1.0, 0.99, 0.97, 0.95]),
                        torch.tensor([1.0, 1.01, 1.03, 1.05]), dict(META, model_name="x"),
                        clamp_lo=lo, clamp_hi=-lo)
    path = cf.save(tmp_path / "a.safetensors", cs)
    back = cf.load(path)
    for name in ("sigmas", "c_x", "c_f", "clamp_lo", "clamp_hi"):
        assert torch.equal(getattr(back, name), getattr(cs, name)), name
    assert back.metadata["model_name"] == "x" and back.metadata["format"] == "1"
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:  # on disk in the sampler's order (decreasing σ)
        assert f.get_tensor("sigmas").tolist() == pytest.approx([14.6, 3.0, 0.8, 0.1])
    assert path.read_bytes()[:8] != pickle.dumps(0)[:8]


def test_decreasing_file_is_loaded_increasing(tmp_path):
    back = cf.load(_write(tmp_path / "d.safetensors"))
    assert back.sigmas.tolist() == pytest.approx([0.1, 0.8, 3.0, 14.6])
    assert back.c_x.tolist() == pytest.approx([1.0, 0.99, 0.97, 0.95])


@pytest.mark.parametrize("tensors,meta,message", [
    (_tensors(c_x=torch.tensor([0.95, 0.97, 0.99, 1.0], dtype=torch.float64)), None, "must be float32"),
    (_tensors(c_f=torch.tensor([1.0, 1.0, 1.0])), None, r"must have shape \(4,\)"),
    (_tensors(sigmas=torch.tensor([14.6, 3.0, 3.0, 0.1])), None, "strictly monotone"),
    (_tensors(sigmas=torch.tensor([14.6, 0.8, 3.0, 0.1])), None, "strictly monotone"),
    (_tensors(sigmas=torch.tensor([14.6, 3.0, 0.8, 0.0])), None, "positive"),
    (_tensors(c_x=torch.tensor([0.95, float("nan"), 0.99, 1.0])), None, "non-finite"),
    (_tensors(c_f=torch.tensor([1.05, 1.6, 1.01, 1.0])), None, r"c_f must stay in 0.5..1.5"),
    (_tensors(c_x=None), None, "missing tensor 'c_x'"),
    (_tensors(extra=torch.zeros(4)), None, "unknown tensor"),
    (_tensors(q_lo=torch.full((4,), 0.001)), None, "given together"),
    (_tensors(q_lo=torch.full((4,), 0.2), q_hi=torch.full((4,), 0.999)), None, "q_lo must stay"),
    (_tensors(clamp_lo=torch.ones(4), clamp_hi=torch.zeros(4)), None, "below clamp_hi"),
    (_tensors(), {k: v for k, v in META.items() if k != "model_hash"}, "missing metadata model_hash"),
    (_tensors(), {}, "missing metadata"),
    (_tensors(), dict(META, format="2"), "newer than this QSilk"),
    (_tensors(), dict(META, format="one"), "must be an integer"),
    (_tensors(), dict(META, prediction="x0"), "prediction must be one of"),
])
def test_bad_files_are_rejected_with_a_clear_error(tmp_path, tensors, meta, message):
    path = _write(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CoefficientFileError, match=message) as err:
        cf.load(path)
    assert "bad.safetensors" in str(err.value)


def test_pickle_and_garbage_are_not_loaded(tmp_path):
    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps({"sigmas": [1.0]}))
    with pytest.raises(CoefficientFileError, match="not a readable safetensors"):
        cf.load(p)
    header = json.dumps({"sigmas": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CoefficientFileError, match="not a readable safetensors"):
        cf.load(p)
    with pytest.raises(CoefficientFileError, match="not found"):
        cf.load(tmp_path / "missing.safetensors")


def test_oversized_file_is_refused_before_reading(tmp_path):
    p = tmp_path / "big.safetensors"
    p.write_bytes(b"\0" * (cf.MAX_BYTES + 1))
    with pytest.raises(CoefficientFileError, match="too large"):
        cf.load(p)


def test_save_refuses_invalid_sets(tmp_path):
    bad = CoefficientSet(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), dict(META))
    with pytest.raises(CoefficientFileError, match="c_x must stay"):
        cf.save(tmp_path / "x.safetensors", bad)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("name", ["a,b", "a:b", "a;b", "../a", "a/b", "a\\b", "a=b", "", ".hidden", "x" * 120])
def test_names_that_infotext_cannot_carry_are_refused(name, tmp_path):
    with pytest.raises(CoefficientFileError, match="qsched_file must be a file name"):
        cf.resolve(name, tmp_path)


def test_resolve_and_list_files(tmp_path):
    d = cf.folder(tmp_path)
    assert d.name == "QSilk" and cf.list_files(d) == []
    _write(d.mkdir() or d / "my model (nf4).safetensors")
    (d / "notes.txt").write_text("x")
    (d / "a,b.safetensors").write_bytes(b"")
    assert cf.list_files(d) == ["my model (nf4).safetensors"]
    assert cf.resolve("my model (nf4)", d) == d / "my model (nf4).safetensors"
    assert cf.resolve("my model (nf4).safetensors", d) == d / "my model (nf4).safetensors"


def test_match_errors_on_model_or_storage_warns_on_sampler_or_steps(tmp_path):
    cs = cf.load(_write(tmp_path / "m.safetensors"))
    assert cf.match(cs, model_hash="0123456789", storage="NF4", sampler="euler", steps=4) == ([], [])
    assert cf.match(cs, model_hash="0123456789abcdef")[0] == []  # long form of the same hash
    errors, _ = cf.match(cs, model_hash="fedcba9876", storage="fp8-e4m3fn")
    assert len(errors) == 2 and "model hash" in errors[0] and "fp8-e4m3fn" in errors[1]
    errors, warnings = cf.match(cs, sampler="dpmpp_2m", steps=20)
    assert errors == [] and len(warnings) == 2 and "uses 20" in warnings[1]
    assert cf.match(cs) == ([], [])  # nothing known about the host: nothing held against the file
    generic = cf.load(_write(tmp_path / "g.safetensors", meta=dict(META, model_hash="*", storage="*")))
    assert cf.match(generic, model_hash="fedcba9876", storage="fp16") == ([], [])


def test_sampler_names_from_ui_and_command_line_match(tmp_path):
    cs = cf.load(_write(tmp_path / "s.safetensors", meta=dict(META, sampler="euler_a")))
    for name in ("Euler a", "euler_a", "k_euler_ancestral"):
        assert cf.match(cs, sampler=name) == ([], []), name
    assert cf.match(cs, sampler="Euler")[1]
