"""ComfyUI nodes: inputs from the parameter table, the root entry point, off = same object,
invalid advanced inputs, and the LATENT node (noise_mask, other keys, video latents)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from doubles import comfy as dc  # noqa: E402
from qsilk.hosts import comfy_nodes as nodes  # noqa: E402
from qsilk.settings import PARAMS, PRESETS  # noqa: E402

NODE_NAMES = {"QSilkModel": "QSilk (model)", "QSilkModelAdvanced": "QSilk (model, advanced)",
              "QSilkLatent": "QSilk before decode / upscale"}


def load_root_like_comfyui(tmp_path: Path, folder: str):
    """``nodes.load_custom_node`` (ComfyUI a125cd84): module name = the folder's path with '.' → '_x_',
    loaded from ``<folder>/__init__.py`` as a package."""
    link = tmp_path / "custom_nodes" / folder
    link.parent.mkdir()
    link.symlink_to(ROOT, target_is_directory=True)
    name = str(link).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(link, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    return module


@pytest.mark.parametrize("folder", ["qsilk", "sd-webui-qsilk", "QSilk.v1"])
def test_root_init_exports_the_three_nodes(tmp_path, folder):
    module = load_root_like_comfyui(tmp_path, folder)
    assert set(module.NODE_CLASS_MAPPINGS) == set(NODE_NAMES)
    assert module.NODE_DISPLAY_NAME_MAPPINGS == NODE_NAMES
    for cls in module.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls(), cls.FUNCTION))
        assert cls.CATEGORY == ("latent" if cls.RETURN_TYPES == ("LATENT",) else "model_patches/unet")
        assert isinstance(cls.INPUT_TYPES()["required"], dict)


def test_simple_nodes_inputs():
    for cls, first, output in ((nodes.QSilkModel, ("model", "MODEL"), "MODEL"),
                               (nodes.QSilkLatent, ("samples", "LATENT"), "LATENT")):
        required = cls.INPUT_TYPES()["required"]
        assert list(required) == [first[0], "enabled", "preset"]
        assert required[first[0]][0] == first[1]
        assert required["enabled"][0] == "BOOLEAN" and required["enabled"][1]["default"] is True
        choices, spec = required["preset"]
        assert choices == ["Off", "Gentle", "Balanced", "Crisp", "High-res", "Paper (literal)"]
        assert spec["default"] == "Balanced"
        assert cls.RETURN_TYPES == (output,)


def test_advanced_inputs_follow_the_parameter_table():
    required = nodes.QSilkModelAdvanced.INPUT_TYPES()["required"]
    wanted = [p for p in PARAMS if p.group in ("qsilk", "aqclip", "schedule", "probe") and p.name != "hires"]
    assert list(required) == ["model", "enabled"] + [p.name for p in wanted]
    assert "hires" not in required and "show_maps" not in required and "qsched" not in required
    kinds = {"bool": "BOOLEAN", "int": "INT", "float": "FLOAT"}
    for p in wanted:
        kind, spec = required[p.name]
        assert spec["tooltip"] == p.help
        assert spec["default"] == PRESETS["Balanced"][p.name], p.name
        if p.kind == "choice":
            assert kind == list(p.choices)
        else:
            assert kind == kinds[p.kind]
        if p.kind in ("int", "float"):
            assert (spec["min"], spec["max"], spec["step"]) == (p.minimum, p.maximum, p.step)
            assert spec["min"] <= spec["default"] <= spec["max"]
            assert isinstance(spec["default"], int if p.kind == "int" else float)


def test_off_and_disabled_return_the_same_model():
    model = dc.sd15_like()
    assert nodes.QSilkModel().patch(model, False, "Balanced")[0] is model
    assert nodes.QSilkModel().patch(model, True, "Off")[0] is model
    assert nodes.QSilkModelAdvanced().patch(model, False)[0] is model
    assert nodes.QSilkModelAdvanced().patch(model, True, qsilk_enabled=False, aqclip_enabled=False)[0] is model
    assert model.clones == 0 and model.wrappers == {} and model.model_options == {"transformer_options": {}}
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    assert nodes.QSilkLatent().stabilize(latent, False, "Balanced")[0] is latent
    assert nodes.QSilkLatent().stabilize(latent, True, "Off")[0] is latent


def test_on_returns_a_patched_clone_and_leaves_the_input_alone():
    model = dc.sd15_like()
    patched = nodes.QSilkModel().patch(model, True, "Balanced")[0]
    assert patched is not model and patched.model is model.model
    assert model.model_options == {"transformer_options": {}} and model.wrappers == {}
    assert patched.get_wrappers("sampler_sample", "qsilk")


@pytest.mark.parametrize("values, field", [
    ({"p_wide": 0.05, "p_narrow": 0.01}, "p_wide"),
    ({"step_start": 0.8, "step_end": 0.2}, "step_start"),
    ({"q_lo": 0.05, "q_hi": 0.95, "qsilk_shape": "tanh", "qsilk_alpha": 6.0}, "qsilk_alpha"),
    ({"aqclip_shape": "tanh", "aqclip_alpha": 4.5}, "aqclip_alpha"),
    ({"tile": 300}, "tile"),
    ({"aqclip_mode": "entropy"}, "aqclip_mode"),
    ({"hires": False}, "hires"),
])
def test_invalid_advanced_inputs_name_the_field(values, field):
    with pytest.raises(ValueError, match=field) as raised:
        nodes.QSilkModelAdvanced().patch(dc.sd15_like(), True, **values)
    assert type(raised.value) is ValueError  # not SettingsError: ComfyUI prints the qualified type name


def test_simple_nodes_raise_a_plain_value_error():
    for call in (lambda: nodes.QSilkModel().patch(dc.sd15_like(), True, "Loud"),
                 lambda: nodes.QSilkLatent().stabilize({"samples": torch.zeros(1, 4, 8, 8)}, True, "Loud")):
        with pytest.raises(ValueError, match="preset must be one of") as raised:
            call()
        assert type(raised.value) is ValueError


# -- queue-time validation (ComfyUI's execution.validate_inputs, on the double) -----------------------
def widget_values(cls, **changes):
    """The node's widget values as a prompt sends them (defaults), with `changes`."""
    required = cls.INPUT_TYPES()["required"]
    values = {k: spec[1]["default"] for k, spec in required.items() if len(spec) > 1 and "default" in spec[1]}
    values.update(changes)
    return values


def test_validate_inputs_takes_every_float_widget_and_the_shapes():
    import inspect
    args = inspect.getfullargspec(nodes.QSilkModelAdvanced.VALIDATE_INPUTS).args
    assert tuple(a for a in args if a != "cls") == nodes.VALIDATED_INPUTS
    floats = {p.name for p in nodes.ADVANCED_PARAMS if p.kind == "float"}
    assert floats | {"qsilk_shape", "aqclip_shape"} == set(nodes.VALIDATED_INPUTS)


def test_default_values_are_queued():
    for cls in (nodes.QSilkModel, nodes.QSilkModelAdvanced, nodes.QSilkLatent):
        assert dc.validate_inputs(cls, widget_values(cls)) == []


@pytest.mark.parametrize("changes, field, words", [
    ({"p_wide": float("nan")}, "p_wide", "got nan"),
    ({"sigma_floor": "nan"}, "sigma_floor", "got nan"),  # ComfyUI turns the string into float('nan')
    ({"ema_beta": float("inf")}, "ema_beta", "got inf"),
    ({"p_wide": 0.05, "p_narrow": 0.01}, "p_wide", "at most p_narrow"),
    ({"step_start": 0.8, "step_end": 0.2}, "step_start", "at most step_end"),
    ({"q_lo": 0.2}, "q_lo", "0..0.05"),  # its range check is QSilk's now: same range, same words
    ({"aqclip_shape": "tanh", "aqclip_alpha": 6.0}, "aqclip_alpha", "tanh"),
])
def test_bad_advanced_values_are_refused_at_queue_time_naming_the_field(changes, field, words):
    errors = dc.validate_inputs(nodes.QSilkModelAdvanced, widget_values(nodes.QSilkModelAdvanced, **changes))
    assert errors and all(e["type"] == "custom_validation_failed" for e in errors)
    assert all(f"QSilk: {field} must" in e["details"] and words in e["details"] for e in errors)


def test_comfyuis_own_range_check_still_covers_the_other_widgets():
    errors = dc.validate_inputs(nodes.QSilkModelAdvanced, widget_values(nodes.QSilkModelAdvanced, tile=3))
    assert [(e["type"], e["details"]) for e in errors] == [("value_smaller_than_min", "tile")]


def test_a_linked_value_is_left_to_run_time():
    """An input fed by a link is not given at queue time: no cross-field verdict on a guess."""
    values = widget_values(nodes.QSilkModelAdvanced, p_wide=0.05)
    del values["p_narrow"]
    assert dc.validate_inputs(nodes.QSilkModelAdvanced, values) == []


# -- texts that describe their own node ---------------------------------------------------------------
def test_each_nodes_texts_describe_that_node():
    model = nodes.QSilkModel.INPUT_TYPES()["required"]
    latent = nodes.QSilkLatent.INPUT_TYPES()["required"]
    advanced = nodes.QSilkModelAdvanced.INPUT_TYPES()["required"]
    for required in (model, latent):
        assert "control" not in required["preset"][1]["tooltip"]  # nothing "below" on these nodes
    assert all(f"{name}: " in model["preset"][1]["tooltip"] for name in PRESETS)
    assert all(f"{name}: " in latent["preset"][1]["tooltip"] for name in PRESETS)
    assert "Lite" in latent["preset"][1]["tooltip"] and "attention confidence" not in latent["preset"][1]["tooltip"]
    assert "preset" not in advanced["enabled"][1]["tooltip"]  # the advanced node has no preset
    assert "earlier QSilk patch" in model["enabled"][1]["tooltip"]
    assert "earlier QSilk patch" in advanced["enabled"][1]["tooltip"]
    assert "latent" in latent["enabled"][1]["tooltip"] and "model" not in latent["enabled"][1]["tooltip"]


def test_advanced_defaults_sample_like_the_balanced_preset():
    model = dc.sd15_like()
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    simple = dc.ksampler(nodes.QSilkModel().patch(model, True, "Balanced")[0], latent)["samples"]
    defaults = {k: v[1]["default"] for k, v in nodes.QSilkModelAdvanced.INPUT_TYPES()["required"].items()
                if k not in ("model", "enabled")}
    advanced = dc.ksampler(nodes.QSilkModelAdvanced().patch(model, True, **defaults)[0], latent)["samples"]
    plain = dc.ksampler(model, latent)["samples"]
    assert torch.equal(simple, advanced)
    assert not torch.equal(simple, plain)


# -- the LATENT node ---------------------------------------------------------------------------------
def quantile_clamp(x: torch.Tensor, q_lo=0.001, q_hi=0.999) -> torch.Tensor:
    """Oracle: each row of (R, …) clamped to its own torch.quantile corridor."""
    flat = x.reshape(x.shape[0], -1).float()
    lo = torch.quantile(flat, q_lo, dim=1)
    hi = torch.quantile(flat, q_hi, dim=1)
    return torch.maximum(torch.minimum(flat, hi[:, None]), lo[:, None]).reshape(x.shape).to(x.dtype)


def spiky(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (40,), generator=g)] *= 8.0
    return x


def test_latent_node_honours_noise_mask_and_keeps_every_key():
    x = spiky((2, 4, 16, 16))
    before = x.clone()
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 64:] = 1.0  # right half generated (image resolution, as SetLatentNoiseMask stores it)
    latent = {"samples": x, "noise_mask": mask, "batch_index": [3, 4], "type": "test"}
    out = nodes.QSilkLatent().stabilize(latent, True, "Gentle")[0]
    assert out is not latent and set(out) == set(latent)
    assert out["noise_mask"] is mask and out["batch_index"] is latent["batch_index"] and out["type"] == "test"
    assert torch.equal(x, before), "the input tensor was changed"
    y = out["samples"]
    assert torch.equal(y[..., :8], x[..., :8]), "changed outside the noise mask"
    expected = quantile_clamp(x)
    assert torch.allclose(y[..., 8:], expected[..., 8:], atol=1e-6)
    assert not torch.equal(y[..., 8:], x[..., 8:])


def test_latent_node_without_mask_clamps_each_sample():
    x = spiky((2, 4, 12, 20), seed=1)
    y = nodes.QSilkLatent().stabilize({"samples": x}, True, "Gentle")[0]["samples"]
    assert torch.allclose(y, quantile_clamp(x), atol=1e-6)


def test_latent_node_balanced_runs_both_components_once():
    x = spiky((1, 4, 32, 32), seed=2)
    gentle = nodes.QSilkLatent().stabilize({"samples": x}, True, "Gentle")[0]["samples"]
    balanced = nodes.QSilkLatent().stabilize({"samples": x}, True, "Balanced")[0]["samples"]
    assert torch.allclose(gentle, quantile_clamp(x), atol=1e-6)
    assert not torch.allclose(balanced, gentle), "AQClip (Lite) did not run"
    again = nodes.QSilkLatent().stabilize({"samples": x}, True, "Balanced")[0]["samples"]
    assert torch.equal(balanced, again)


def test_latent_node_video_latent_is_stabilised_frame_by_frame():
    x = spiky((1, 4, 3, 10, 12), seed=3)
    x[:, :, 0] *= 4.0  # the first latent frame (encoded alone by a causal VAE) has another spread
    y = nodes.QSilkLatent().stabilize({"samples": x}, True, "Gentle")[0]["samples"]
    per_frame = torch.stack([quantile_clamp(x[:, :, t]) for t in range(3)], dim=2)
    per_clip = quantile_clamp(x)
    assert y.shape == x.shape
    assert torch.allclose(y, per_frame, atol=1e-6)
    assert not torch.allclose(y, per_clip, atol=1e-3)


def test_latent_node_passes_other_shapes_through():
    audio = {"samples": torch.randn(1, 64, 100)}
    assert nodes.QSilkLatent().stabilize(audio, True, "Balanced")[0] is audio
