"""The diffusers adapter on real diffusers schedulers: exact write-back per scheduler × prediction
type, pass-through identity, signature, unsupported schedulers, Flux token packing.

The scheduler is driven directly (``step`` in a loop, each step's sample the previous step's output);
the adapter is attached to a minimal pipeline-shaped object (a denoiser module and the scheduler),
which is all it reads. The x0 the scheduler actually used comes from the scheduler itself where it
exposes it (``pred_original_sample``, the multistep solvers' ``model_outputs[-1]``, LCM's ``denoised``
and its own boundary scalings); for FlowMatch, TCD and DEIS from the formulas of their ``step`` (read
at diffusers 0.42.1), written out below in float64.
"""
from __future__ import annotations

import copy
import inspect
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from qsilk.hosts import diffusers as qd  # noqa: E402
from qsilk.hosts import diffusers_x0 as x0t  # noqa: E402
from qsilk.settings import Settings  # noqa: E402

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
#: SD1.5's DDIM/DDPM settings (the classes' own defaults clip x0 to [−1, 1], which SD switches off).
SD_DDIM = dict(SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
#: Clamps about a tenth of the values, so every step changes x0.
STRONG = Settings.from_preset("Balanced", q_lo=0.05, q_hi=0.95)

#: (scheduler class, config, prediction types) — every supported family and prediction type.
CASES = [
    ("EulerDiscreteScheduler", SD_BETAS, ("epsilon", "v_prediction", "sample")),
    ("EulerAncestralDiscreteScheduler", SD_BETAS, ("epsilon", "v_prediction")),
    ("HeunDiscreteScheduler", SD_BETAS, ("epsilon", "v_prediction", "sample")),
    ("DPMSolverMultistepScheduler", SD_BETAS, ("epsilon", "v_prediction", "sample")),
    ("DPMSolverMultistepScheduler", {**SD_BETAS, "algorithm_type": "sde-dpmsolver++"}, ("epsilon", "v_prediction")),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0}, ("flow_prediction",)),
    ("DPMSolverSinglestepScheduler", SD_BETAS, ("epsilon", "v_prediction", "sample")),
    ("UniPCMultistepScheduler", SD_BETAS, ("epsilon", "v_prediction", "sample")),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0}, ("flow_prediction",)),
    ("DEISMultistepScheduler", SD_BETAS, ("epsilon", "v_prediction")),
    ("DDIMScheduler", SD_DDIM, ("epsilon", "v_prediction", "sample")),
    ("DDPMScheduler", {**SD_BETAS, "clip_sample": False}, ("epsilon", "v_prediction", "sample")),
    ("LCMScheduler", SD_BETAS, ("epsilon", "v_prediction", "sample")),
    ("TCDScheduler", SD_BETAS, ("epsilon", "v_prediction", "sample")),
    ("FlowMatchEulerDiscreteScheduler", {}, (None,)),
    ("FlowMatchHeunDiscreteScheduler", {}, (None,)),
]
PARAMS = [(name, cfg, pred) for name, cfg, preds in CASES for pred in preds]
IDS = [f"{n}-{c.get('algorithm_type', 'flow' if c.get('use_flow_sigmas') else '')}-{p}".replace("--", "-")
       for n, c, p in PARAMS]


def make_scheduler(name: str, config: dict, prediction: str | None):
    cfg = dict(config)
    if prediction is not None:
        cfg["prediction_type"] = prediction
    scheduler = getattr(diffusers, name)(**cfg)
    scheduler.set_timesteps(6)
    return scheduler


def fake_pipe(scheduler):
    """What the adapter reads of a pipeline: a denoiser module and the scheduler."""
    return SimpleNamespace(unet=torch.nn.Identity(), scheduler=scheduler)


class StepSpy:
    """An instance ``step`` (put on before QSilk) recording what reaches the scheduler's own step."""

    def __init__(self, scheduler):
        self.calls: list[dict] = []
        original = scheduler.step

        def spy(model_output, timestep, sample, *args, **kwargs):
            self.calls.append({"m": model_output, "t": timestep, "s": sample,
                               "step_index": getattr(scheduler, "step_index", None)})
            out = original(model_output, timestep, sample, *args, **kwargs)
            self.calls[-1]["out"] = out
            history = getattr(scheduler, "model_outputs", None)  # multistep solvers: this step's converted output
            if history is not None and history[-1] is not None:
                self.calls[-1]["converted"] = history[-1].clone()
            return out

        self.fn = spy
        scheduler.step = spy


def drive(scheduler, dtype=torch.float32, seed=0, **step_kwargs):
    """Run the scheduler's whole schedule on random model outputs, passing ``generator`` only when
    the step's signature lists it (as pipelines do); returns the final latent."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(1, 4, 16, 16, generator=g) * float(getattr(scheduler, "init_noise_sigma", 1.0))).to(dtype)
    params = inspect.signature(scheduler.step).parameters
    extra = {"generator": torch.Generator().manual_seed(seed + 1)} if "generator" in params else {}
    for t in scheduler.timesteps:
        if hasattr(scheduler, "scale_model_input"):  # as pipelines do (the model itself is random here)
            scheduler.scale_model_input(s, t)
        m = torch.randn(1, 4, 16, 16, generator=g).to(dtype)
        s = scheduler.step(m, t, s, return_dict=True, **extra, **step_kwargs).prev_sample
    return s


def used_x0(name: str, scheduler, call: dict) -> torch.Tensor:
    """The x0 the scheduler formed from what it received, in float64."""
    out, m, s = call["out"], call["m"].double(), call["s"].double()
    pred = getattr(scheduler.config, "prediction_type", "epsilon")
    if getattr(out, "pred_original_sample", None) is not None:
        return out.pred_original_sample.double()
    if name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"):
        return call["converted"].double()
    if name == "LCMScheduler":
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(call["t"])
        return (out.denoised.double() - float(c_skip) * s) / float(c_out)
    if name.startswith("FlowMatch"):
        sigma = float(scheduler.sigmas[call["step_index"] if call["step_index"] is not None else 0])
        return s - sigma * m
    if name == "DEISMultistepScheduler":  # DEIS stores ε; x0 = (s − σₜ·ε)/αₜ with its own αₜ, σₜ
        sigma = scheduler.sigmas[call["step_index"]]
        alpha_t, sigma_t = (float(v) for v in scheduler._sigma_to_alpha_sigma_t(sigma))
        return (s - sigma_t * call["converted"].double()) / alpha_t
    if name == "TCDScheduler":  # ᾱ at t: the three prediction types of its step
        abar = float(scheduler.alphas_cumprod[int(call["t"])])
        if pred == "epsilon":
            return (s - math.sqrt(1 - abar) * m) / math.sqrt(abar)
        if pred == "v_prediction":
            return math.sqrt(abar) * s - math.sqrt(1 - abar) * m
        return m
    raise AssertionError(f"no oracle for {name}")


@pytest.mark.parametrize("name,config,prediction", PARAMS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_write_back_gives_the_scheduler_the_stabilised_x0(name, config, prediction, dtype):
    """``m' = m + (x0' − x0)/b`` makes the scheduler's own x0 the stabilised one.

    Tolerance per element, from rounding only: fp32 ``2⁻²⁰·(|x0'| + |b·m'| + |a·s| + 1)``; bf16
    (m' is rounded to bf16, and some schedulers compute in bf16) ``2⁻⁶·(…the same…)``."""
    scheduler = make_scheduler(name, config, prediction)
    spy = StepSpy(scheduler)
    targets = []
    with qd.attach(fake_pipe(scheduler), settings=STRONG, echo=False) as run:
        post_cfg = run.stabilizer.post_cfg

        def record(x0, *a, **k):
            out = post_cfg(x0, *a, **k)
            targets.append((x0, out))
            return out

        run.stabilizer.post_cfg = record
        drive(scheduler, dtype)
    assert len(targets) == len(spy.calls) == len(scheduler.timesteps)
    worst = 0.0
    changed = 0
    for (x0, x0_new), call in zip(targets, spy.calls):
        changed += int(not torch.equal(x0, x0_new))
        got = used_x0(name, scheduler, call)
        a, b = _ab(name, scheduler, call, prediction)
        tol = (2.0 ** -20 if dtype == torch.float32 else 2.0 ** -6) * (
            x0_new.double().abs() + call["m"].double().abs() * b + call["s"].double().abs() * a + 1)
        err = (got - x0_new.double()).abs()
        worst = max(worst, float(err.max()))
        assert bool((err <= tol).all()), f"{name}/{prediction}: max deviation {float(err.max()):.3g}"
    assert changed >= len(targets) - 1  # the stabiliser really changed x0 (the test is not vacuous)
    print(f"{name} {config.get('algorithm_type', '')} {prediction} {dtype}: max |x0_used − x0'| = {worst:.3g}")


def _ab(name, scheduler, call, prediction):
    """|a|, |b| of ``x0 = a·s + b·m`` at this call (for the rounding tolerance), from the
    scheduler's own ᾱ / σ values (Euler-type σ, or the solvers' αₜ, σₜ)."""
    if prediction == "sample":
        return 0.0, 1.0
    if name in ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler"):
        abar = float(scheduler.alphas_cumprod[int(call["t"])])
        if prediction == "epsilon":
            return 1 / math.sqrt(abar), math.sqrt((1 - abar) / abar)
        return math.sqrt(abar), math.sqrt(1 - abar)
    sigma = scheduler.sigmas[call["step_index"] if call["step_index"] is not None else 0]
    if name.startswith("FlowMatch") or prediction == "flow_prediction":
        return 1.0, float(sigma)
    if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"):
        sigma = float(sigma)
        if prediction == "epsilon":
            return 1.0, sigma
        return 1 / (sigma ** 2 + 1), sigma / math.sqrt(sigma ** 2 + 1)
    alpha_t, sigma_t = (float(v) for v in scheduler._sigma_to_alpha_sigma_t(sigma))
    if prediction == "epsilon":
        return 1 / alpha_t, sigma_t / alpha_t
    if name == "DEISMultistepScheduler":  # the oracle recovers x0 from DEIS's stored ε: (s − σₜ·ε)/αₜ
        return 1 / alpha_t, sigma_t
    return alpha_t, sigma_t


@pytest.mark.parametrize("name,config,prediction", PARAMS, ids=IDS)
def test_pass_through_is_bit_identical(name, config, prediction):
    """A stabiliser that returns an equal tensor (not the same object: the write-back arithmetic
    runs with x0' − x0 = 0) leaves the whole trajectory, ancestral noise included, bit-identical."""
    reference = drive(make_scheduler(name, config, prediction), torch.float32)
    scheduler = make_scheduler(name, config, prediction)
    with qd.attach(fake_pipe(scheduler), settings=STRONG, echo=False) as run:
        calls, decodes = [], []
        run.stabilizer.post_cfg = lambda x0, *a, **k: calls.append(1) or x0.clone()
        run.stabilizer.pre_decode = lambda x, *a, **k: decodes.append(1) or x.clone()
        got = drive(scheduler, torch.float32)
    assert len(calls) == len(scheduler.timesteps) and len(decodes) == 1
    assert torch.equal(got, reference)


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "LCMScheduler", "DDPMScheduler",
                                  "DPMSolverMultistepScheduler"])
def test_step_signature_is_kept(name):
    """Pipelines pass ``generator`` / ``eta`` only if ``inspect.signature(scheduler.step)`` lists them."""
    scheduler = make_scheduler(name, SD_BETAS, "epsilon")
    before = inspect.signature(scheduler.step)
    with qd.attach(fake_pipe(scheduler), echo=False):
        assert "step" in scheduler.__dict__
        assert inspect.signature(scheduler.step) == before
    assert "step" not in scheduler.__dict__


def test_an_instance_step_of_someone_else_is_restored():
    scheduler = make_scheduler("EulerDiscreteScheduler", SD_BETAS, "epsilon")
    spy = StepSpy(scheduler)
    with qd.attach(fake_pipe(scheduler), echo=False):
        assert scheduler.step is not spy.fn
    assert scheduler.__dict__["step"] is spy.fn


@pytest.mark.parametrize("name,reason", [
    ("KDPM2DiscreteScheduler", "interpolated sigmas"),
    ("KDPM2AncestralDiscreteScheduler", "interpolated sigmas"),
    ("PNDMScheduler", "combine several model outputs"),
    ("IPNDMScheduler", "combine several model outputs"),
    ("EDMEulerScheduler", "EDM"),
])
def test_unsupported_schedulers_pass_through_with_one_note(name, reason):
    config = {} if name.startswith(("EDM", "IPNDM")) else SD_BETAS
    scheduler = getattr(diffusers, name)(**config)
    scheduler.set_timesteps(6)
    fresh = copy.deepcopy(scheduler)
    reference = drive(fresh)
    notes = []
    with qd.attach(fake_pipe(scheduler), settings=STRONG, on_note=notes.append, echo=False) as run:
        got = drive(scheduler)
        scheduler.set_timesteps(6)
        drive(scheduler)  # a second pass: no second note
    assert torch.equal(got, reference)
    mine = [n for n in notes if name in n]
    assert len(mine) == 1 and reason in mine[0] and "passes it through" in mine[0]
    assert run.last_report["evaluations"] == 0


def test_euler_with_churn_passes_through_with_a_note():
    reference = drive(make_scheduler("EulerDiscreteScheduler", SD_BETAS, "epsilon"), torch.float32, s_churn=1.0)
    scheduler = make_scheduler("EulerDiscreteScheduler", SD_BETAS, "epsilon")
    with qd.attach(fake_pipe(scheduler), settings=STRONG, echo=False) as run:
        got = drive(scheduler, torch.float32, s_churn=1.0)
    assert torch.equal(got, reference)
    assert any("s_churn=1.0" in n and "EulerDiscreteScheduler" in n for n in run.last_report["notes"])


def test_a_custom_scheduler_passes_through_with_a_note_naming_it():
    class MyEuler(diffusers.EulerDiscreteScheduler):
        def step(self, *args, **kwargs):
            return super().step(*args, **kwargs)

    scheduler = MyEuler(**SD_BETAS)
    scheduler.set_timesteps(6)
    reference = drive(copy.deepcopy(scheduler), torch.float32)
    with qd.attach(fake_pipe(scheduler), settings=STRONG, echo=False) as run:
        got = drive(scheduler, torch.float32)
    assert torch.equal(got, reference)
    assert any("MyEuler" in n for n in run.last_report["notes"])


def test_a_subclass_keeping_step_is_supported():
    class Renamed(diffusers.EulerDiscreteScheduler):
        pass

    scheduler = Renamed(**SD_BETAS)
    scheduler.set_timesteps(6)
    with qd.attach(fake_pipe(scheduler), settings=STRONG, echo=False) as run:
        drive(scheduler, torch.float32)
    assert run.last_report["evaluations"] == 6


@pytest.mark.parametrize("hw", [(32, 32), (32, 48), (48, 16)])
def test_flux_token_packing_matches_the_pipeline(hw):
    """`unpack_tokens` / `pack_tokens` against FluxPipeline's own static (un)packers."""
    h, w = hw
    x = torch.randn(2, 16, h, w)
    packed = diffusers.FluxPipeline._pack_latents(x, 2, 16, h, w)
    assert torch.equal(x0t.pack_tokens(x), packed)
    unpacked = diffusers.FluxPipeline._unpack_latents(packed, h, w, 1)
    assert torch.equal(x0t.unpack_tokens(packed, (h // 2, w // 2)), unpacked)


def test_token_grid_comes_from_flux_image_ids_only():
    ids = diffusers.FluxPipeline._prepare_latent_image_ids(1, 12, 20, torch.device("cpu"), torch.float32)
    assert x0t.token_grid(240, ids) == (12, 20)
    kontext = torch.cat([ids, ids + torch.tensor([1.0, 0.0, 0.0])])  # reference-image rows appended
    assert x0t.token_grid(240, kontext) == (12, 20)
    assert x0t.token_grid(256) is None  # no ids: another packing (LTX, Flux.2 …) is not guessed
    assert x0t.token_grid(240, torch.zeros(240, 4)) is None and x0t.token_grid(190, ids) is None


def test_zero_terminal_snr_first_step_keeps_its_epsilon():
    """DDIM with zero-terminal-SNR betas: ᾱ = 0 at t = 999, where ε determines no x0 (diffusers
    itself then divides by zero). That step's model output reaches the scheduler unchanged."""
    config = dict(SD_DDIM, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    plain = make_scheduler("DDIMScheduler", config, "epsilon")
    plain_spy = StepSpy(plain)
    drive(plain)
    scheduler = make_scheduler("DDIMScheduler", config, "epsilon")
    assert float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])]) == 0.0
    spy = StepSpy(scheduler)
    seen = []
    with qd.attach(fake_pipe(scheduler), settings=STRONG, echo=False) as run:
        post_cfg = run.stabilizer.post_cfg
        run.stabilizer.post_cfg = lambda x0, *a, **k: seen.append(x0) or post_cfg(x0, *a, **k)
        drive(scheduler)
    assert torch.isfinite(seen[0]).all()  # x0 formed with ᾱ clamped, as Stabilizer.post_cfg_eps does
    assert torch.equal(spy.calls[0]["m"], plain_spy.calls[0]["m"])


@pytest.mark.parametrize("when", ["attached", "detached"])
def test_a_deep_copy_of_a_wrapped_scheduler_steps_itself(when):
    """SD.Next keeps ``copy.deepcopy(model.scheduler)`` as its default scheduler. The copy must step
    its own state (PNDM: its PLMS history) with QSilk attached or not, and keep no QSilk wrapper."""
    reference = drive(make_scheduler("PNDMScheduler", dict(SD_BETAS, skip_prk_steps=True), None))
    scheduler = make_scheduler("PNDMScheduler", dict(SD_BETAS, skip_prk_steps=True), None)
    run = qd.attach(fake_pipe(scheduler), settings=STRONG, echo=False)
    clone = copy.deepcopy(scheduler)
    if when == "detached":
        run.detach()
    assert not isinstance(clone.__dict__.get("step"), qd.StepWrapper)
    assert inspect.signature(clone.step) == inspect.signature(type(clone).step.__get__(clone))
    assert torch.equal(drive(clone), reference)
    run.detach()
    assert "step" not in scheduler.__dict__


def test_a_shallow_copy_of_a_wrapped_scheduler_is_rewrapped_for_itself():
    scheduler = make_scheduler("EulerDiscreteScheduler", SD_BETAS, "epsilon")
    with qd.attach(fake_pipe(scheduler), settings=STRONG, echo=False) as run:
        clone = copy.copy(scheduler)
        clone.set_timesteps(6)
        run._wrap(clone)  # what the denoiser hook does for a pipeline's current scheduler
        assert clone.step.scheduler is clone
        drive(clone)
        assert run.report()["evaluations"] == 6 and scheduler.step_index is None
    assert "step" not in clone.__dict__ and "step" not in scheduler.__dict__


def test_attach_failing_on_a_later_pipeline_leaves_nothing_installed():
    scheduler = make_scheduler("EulerDiscreteScheduler", SD_BETAS, "epsilon")
    pipe = fake_pipe(scheduler)
    with pytest.raises(TypeError, match="unet"):
        qd.attach(pipe, SimpleNamespace(scheduler=scheduler))
    assert "step" not in scheduler.__dict__ and not pipe.unet._forward_pre_hooks


# -- properties of the pure pieces ------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_pack_then_unpack_is_the_identity(b, c, h, w, seed):
    x = torch.randn(b, c, 2 * h, 2 * w, generator=torch.Generator().manual_seed(seed))
    packed = x0t.pack_tokens(x)
    assert packed.shape == (b, h * w, 4 * c)
    assert torch.equal(x0t.unpack_tokens(packed, (h, w)), x)


@settings(max_examples=60, deadline=None)
@given(a=st.floats(0.05, 20.0), b=st.floats(-20.0, -0.01) | st.floats(0.01, 20.0),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2 ** 16))
def test_write_back_is_exact_where_nothing_changed_and_hits_x0_elsewhere(a, b, dtype, seed):
    """Where x0' = x0 the output is m bit for bit; elsewhere ``a·s + b·m'`` equals x0' up to the
    rounding of m' to its dtype (half an ulp of m' times |b|, plus float32 arithmetic)."""
    g = torch.Generator().manual_seed(seed)
    s, m = torch.randn(2, 4, 4, 4, generator=g).to(dtype), torch.randn(2, 4, 4, 4, generator=g).to(dtype)
    m[0, 0, 0, :2] = torch.tensor([-0.0, 0.0], dtype=dtype)  # signed zeros must survive too
    c = x0t.Coefficients(a, b)
    x0 = x0t.x0_of(c, s, m)
    changed = torch.rand(x0.shape, generator=g) < 0.3
    x0_new = torch.where(changed, x0.clamp(-0.5, 0.5), x0)
    m_new = x0t.write_back(m, c, x0_new - x0)
    assert m_new.dtype == m.dtype
    assert torch.equal(m_new[~changed].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       m[~changed].view(torch.int16 if dtype != torch.float32 else torch.int32))
    got = a * s.double() + b * m_new.double()
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    tol = abs(b) * m_new.double().abs() * ulp + 1e-5 * (1 + x0_new.double().abs() + abs(a) * s.double().abs())
    assert bool(((got - x0_new.double()).abs() <= tol)[changed].all())


@settings(max_examples=30, deadline=None)
@given(keep=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_write_back_keeps_epsilon_on_a_terminal_step(keep, seed):
    g = torch.Generator().manual_seed(seed)
    m, delta = torch.randn(1, 4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)
    c = x0t.Coefficients(torch.tensor(3.0), torch.tensor(-2.0), torch.tensor(keep))
    out = x0t.write_back(m, c, delta)
    assert torch.equal(out, m) != keep


def test_packed_latents_without_flux_ids_pass_through_with_a_note():
    """A (B, N, F) latent from a transformer that got no Flux ``img_ids`` (LTX-, Flux.2-style
    packings) is not guessed at: the steps pass through unchanged, with a note."""
    def run_flow(scheduler):
        g = torch.Generator().manual_seed(0)
        s = torch.randn(1, 256, 8, generator=g)
        for t in scheduler.timesteps:
            s = scheduler.step(torch.randn(1, 256, 8, generator=g), t, s).prev_sample
        return s

    reference = run_flow(make_scheduler("FlowMatchEulerDiscreteScheduler", {}, None))
    scheduler = make_scheduler("FlowMatchEulerDiscreteScheduler", {}, None)
    with qd.attach(fake_pipe(scheduler), settings=STRONG, echo=False) as run:
        got = run_flow(scheduler)
    assert torch.equal(got, reference) and run.last_report["evaluations"] == 0
    assert any("without Flux-style img_ids" in n for n in run.last_report["notes"])


ALPHA_PARAMS = [(n, c, p) for n, c, p in PARAMS if n in ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler")]


@pytest.mark.parametrize("name,config,prediction", ALPHA_PARAMS, ids=[f"{n}-{p}" for n, _, p in ALPHA_PARAMS])
def test_timestep_schedulers_coefficients_read_nothing_back(name, config, prediction):
    """The ᾱ of timestep schedulers (DDIM, DDPM, LCM, TCD) is gathered on the model's device with
    the timestep tensor the pipeline passes (``acp[t]`` with a 0-d tensor calls ``.item()``: a host
    sync on every step on CUDA — issue #14). Counted with the CPU profiler (bench/launch_count.py).
    (σ schedulers read ``sigmas[step_index]``, which diffusers keeps on the CPU: no device sync.)"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench import launch_count as lc

    scheduler = make_scheduler(name, config, prediction)
    family, cls = x0t.scheduler_family(scheduler)
    assert family == "alpha"
    t = scheduler.timesteps[1]
    like, cache = torch.zeros(1, 4, 8, 8), {}
    first = x0t.coefficients(scheduler, family, cls, t, like, cache)  # builds the per-pass cache
    assert isinstance(first, x0t.Coefficients)
    result = lc.count(lambda: x0t.coefficients(scheduler, family, cls, t, like, cache), warmup=0)
    assert result["syncs"] == 0, result["sync_ops"]
    by_int = x0t.coefficients(scheduler, family, cls, int(t), like)  # the plain ``acp[int(t)]`` lookup
    assert all(torch.equal(torch.as_tensor(u), torch.as_tensor(v)) for u, v in zip(first[:2], by_int[:2]))
