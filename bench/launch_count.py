"""Kernel launches and host synchronisations per evaluation, counted on CPU (issue #14).

On a GPU the stabilizer's cost is mostly how many kernels it launches (every eager torch op is
at least one launch, ~4–8 µs of CPU dispatch) and whether it makes the CPU wait for the GPU (a
host sync). Both are properties of the op sequence, not of the device, so they can be counted on
CPU with the torch profiler — deterministically, without timing:

- **launches**: aten ops that run a kernel themselves: ops with no kernel-running aten op below
  them, leaving out those that never launch one — views and metadata ops (`view`, `as_strided`,
  `expand`, `slice`, …), allocations (`empty*`), a ``to`` / ``contiguous`` that returned its
  input (a leaf ``aten::to`` has no ``_to_copy`` under it) and Python numbers wrapped as CPU
  scalars (``scalar_tensor``, and the CPU's 0-dim copy of such a number inside an op); a reduction (``sum``, ``mean``, ``amax``, …) is one kernel, as on
  CUDA, whatever helper ``fill_`` / ``copy_`` the CPU runs below it. `raw` also gives the issue's first count (every aten leaf that is
  not a view) for comparison. CPU is the proxy: an op that the CPU implements with a helper copy
  (a mixed-dtype op, ``sort``) counts its helpers too.
- **syncs**: ops that make a CUDA host wait for the device: ``item`` / ``_local_scalar_dense``
  (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``), ``equal``, ``is_nonzero``, ``nonzero``,
  ``masked_select``, ``unique``, boolean indexing, ``allclose`` …

Paths counted, each per evaluation after warm-up:

- ``post_cfg`` of every preset × Lite / Attn (the Attn map is given) on a 1×4×128×128 latent;
- the entropy probe (its ``to_q`` / ``to_k`` hooks + ``take_map``) on the real probed layer's
  shape: SD1.5 ``output_blocks.11.1.transformer_blocks.0.attn1`` (320 wide, 8 heads, 64×64 tokens)
  and SDXL ``output_blocks.5.1.transformer_blocks.1.attn1`` (640 wide, 10 heads, 64×64 tokens),
  batch 1 (cond + uncond rows), Q_max 1024 (the CUDA default);
- each host's per-evaluation glue through the test doubles of `tests/doubles/` (AUTOMATIC1111
  denoiser callbacks, Forge post-CFG function + fence + attention observer, ComfyUI post-CFG
  function + fence + attention observer), whole: glue, probe and stabilizer; and glue alone;
- ``pre_decode`` (once per pass, not per evaluation) on the same latent;

plus the CPU time of one ``post_cfg`` at an 8×8 latent, where the arithmetic is negligible and
what is left is dispatch (the median of many calls; this one number is timed).

    python bench/launch_count.py [--json PATH] [--quick]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from qsilk.probe import EntropyProbe  # noqa: E402
from qsilk.settings import PRESETS, Settings  # noqa: E402
from qsilk.stabilizer import Stabilizer  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "results" / "launch_count.json"

#: Leaf aten ops that launch no kernel: views, metadata, allocation.
NO_KERNEL = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::expand", "aten::expand_as", "aten::slice",
    "aten::select", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::permute", "aten::t",
    "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::detach", "aten::detach_", "aten::flatten",
    "aten::unflatten", "aten::narrow", "aten::diagonal", "aten::split", "aten::split_with_sizes", "aten::chunk",
    "aten::unbind", "aten::view_as", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::contiguous", "aten::to", "aten::type_as",
    "aten::result_type", "aten::size", "aten::stride", "aten::numel", "aten::dim", "aten::is_floating_point",
    "aten::set_", "aten::resize_", "aten::_nested_tensor_from_mask_left_aligned", "aten::movedim",
    "aten::swapaxes", "aten::matrix_H", "aten::real", "aten::_conj", "aten::conj", "aten::squeeze_",
    "aten::unsqueeze_", "aten::as_strided_", "aten::_has_compatible_shallow_copy_type", "aten::broadcast_to",
    "aten::unfold", "aten::align_as", "aten::refine_names", "aten::rename",
    # a Python number made a tensor for an op: a CPU "wrapped number", never a device kernel
    "aten::scalar_tensor",
})
#: Reductions: one kernel on CUDA (output initialisation and a dtype cast are fused into it); the
#: CPU implementation's helper ``fill_`` / ``copy_`` below them are not counted separately.
REDUCTIONS = frozenset({
    "aten::sum", "aten::mean", "aten::amax", "aten::amin", "aten::prod", "aten::any", "aten::all",
    "aten::count_nonzero", "aten::adaptive_avg_pool2d", "aten::_adaptive_avg_pool2d", "aten::max", "aten::min",
    "aten::logsumexp",
})
#: Views counted as such in `raw` (the issue's first count: every leaf that is not a view).
VIEWS = frozenset(NO_KERNEL - {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::to",
                               "aten::contiguous", "aten::type_as", "aten::set_", "aten::resize_"})
#: Ops that make a CUDA host wait for the device.
SYNC = frozenset({
    "aten::item", "aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero", "aten::nonzero",
    "aten::nonzero_static", "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2",
    "aten::unique_consecutive", "aten::unique_dim", "aten::allclose", "aten::_assert_async",
    "aten::index_put_with_sort", "aten::repeat_interleave_self_Tensor", "aten::argwhere",
    "aten::_cuda_sync", "aten::tolist", "aten::bincount", "aten::histc",
})


# -- counting -----------------------------------------------------------------------------------
def _free(ev) -> bool:
    """No device kernel: a view/metadata/allocation op, or the CPU-side conversion of a Python
    number an op was given (a 0-dim ``copy_`` below ``to`` inside another aten op: CUDA takes such
    "wrapped numbers" as kernel arguments)."""
    if ev.name in NO_KERNEL:
        return True
    if ev.name in ("aten::copy_", "aten::_to_copy", "aten::fill_") and all(
            not shape for shape in (getattr(ev, "input_shapes", None) or [[1]])):
        p = ev.cpu_parent
        while p is not None and p.name in ("aten::to", "aten::_to_copy"):
            p = p.cpu_parent
        return p is not None and p.name.startswith("aten::") and p.name not in ("aten::to", "aten::_to_copy")
    return False


def _inside(ev, names: frozenset[str]) -> bool:
    """Whether an op that encloses `ev` is one of `names`."""
    p = ev.cpu_parent
    while p is not None:
        if p.name in names:
            return True
        p = p.cpu_parent
    return False


def _below(ev, wanted: Callable[[Any], bool]) -> bool:
    """Whether an op that `ev` encloses is `wanted`."""
    stack = list(ev.cpu_children)
    while stack:
        c = stack.pop()
        if wanted(c):
            return True
        stack.extend(c.cpu_children)
    return False


def _in_reduction(ev) -> bool:
    return _inside(ev, REDUCTIONS)


def _launches_below(ev) -> bool:
    """Whether an aten op below `ev` launches a kernel itself (then `ev` is not counted);
    a reduction counts as one kernel whatever runs below it."""
    if ev.name in REDUCTIONS:
        return False
    return _below(ev, lambda c: c.name.startswith("aten::") and not _free(c))


def _aten_below(ev) -> bool:
    return _below(ev, lambda c: c.name.startswith("aten::"))


def _under(ev, scopes: frozenset[str] | None) -> bool:
    return scopes is None or _inside(ev, scopes)


def tally(events: Iterable, scopes: frozenset[str] | None = None, exclude: frozenset[str] = frozenset()) -> dict:
    """``{"launches", "raw", "syncs", "ops", "sync_ops"}`` of the profiled events, only those under
    one of `scopes` (record_function names; None = all) and under none of `exclude`."""
    launches: collections.Counter = collections.Counter()
    raw = 0
    syncs: collections.Counter = collections.Counter()
    for ev in events:
        name = ev.name
        if not name.startswith("aten::") or not _under(ev, scopes) or (exclude and _inside(ev, exclude)):
            continue
        if name in SYNC:
            # count a sync once: item → _local_scalar_dense is one sync
            parent = ev.cpu_parent
            if parent is None or parent.name not in SYNC:
                syncs[name] += 1
        if name not in VIEWS and not _aten_below(ev):
            raw += 1
        if (not _free(ev) and name != "aten::_local_scalar_dense" and not _launches_below(ev)
                and not _in_reduction(ev)):
            launches[name] += 1
    return {"launches": sum(launches.values()), "raw": raw, "syncs": sum(syncs.values()),
            "ops": dict(launches.most_common()), "sync_ops": dict(syncs)}


def profiled(fn: Callable[[], Any]) -> list:
    """Run `fn` once under the CPU profiler; its events (with parent/child links)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return list(prof.events())


def count(fn: Callable[[], Any], *, warmup: int = 2) -> dict:
    """`tally` of one call of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    return tally(profiled(fn))


def per(result: dict, n: int) -> dict:
    """A tally divided by `n` evaluations (ops rounded to 0.1)."""
    n = max(1, n)
    return {"launches": round(result["launches"] / n, 1), "raw": round(result["raw"] / n, 1),
            "syncs": round(result["syncs"] / n, 1),
            "ops": {k: round(v / n, 1) for k, v in result["ops"].items()}, "sync_ops": result["sync_ops"]}


@contextlib.contextmanager
def scoped(targets: Iterable[tuple[Any, str, str]]):
    """Wrap ``owner.attr`` (a function or method) so every call runs inside
    ``record_function(label)``; restored on exit."""
    saved = []
    try:
        for owner, attr, label in targets:
            original = owner.__dict__[attr]
            func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original

            def make(func=func, label=label):
                @functools.wraps(func)
                def wrapper(*args, **kwargs):
                    with record_function(label):
                        return func(*args, **kwargs)
                return wrapper

            setattr(owner, attr, make())
            saved.append((owner, attr, original))
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


# -- the paths ----------------------------------------------------------------------------------
MODES = ("lite", "attn")


def latent(shape=(1, 4, 128, 128), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., : shape[-2] // 2, :] *= 2.5  # some structure, some spikes
    x.view(-1)[:: 997] *= 6.0
    return x


def attn_map(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(x.shape[0], 1, x.shape[-2], x.shape[-1], generator=g)


def presets() -> list[str]:
    return [name for name in PRESETS if Settings.from_preset(name).enabled and Stabilizer(Settings.from_preset(name)).enabled]


#: The paper preset places both components per pass; its per-evaluation cost is counted per step.
PER_STEP = {"qsilk_placement": "per_step", "aqclip_placement": "per_step"}


def stabilizer_for(preset: str, mode: str, **overrides) -> Stabilizer:
    s = Settings.from_preset(preset, **overrides)
    if not overrides and s.qsilk_placement != "per_step" and s.aqclip_placement != "per_step":
        s = s.replace(**PER_STEP)
    if s.aqclip_enabled:
        s = s.replace(aqclip_mode=mode)
    stab = Stabilizer(s)
    stab.begin_pass()
    return stab


def count_post_cfg(shape=(1, 4, 128, 128)) -> dict:
    """``{preset: {mode: tally}}``: one `post_cfg` after two (the EMA holds state)."""
    x = latent(shape)
    emap = attn_map(x)
    out: dict = {}
    for preset in presets():
        out[preset] = {}
        for mode in MODES:
            stab = stabilizer_for(preset, mode)
            if not stab.settings.aqclip_enabled and mode == "attn":
                out[preset][mode] = out[preset]["lite"]
                continue
            m = emap if mode == "attn" else None
            out[preset][mode] = count(lambda: stab.post_cfg(x, 5, 20, m))
            assert stab.errors == 0, stab.notes
    return out


def count_pre_decode(shape=(1, 4, 128, 128)) -> dict:
    """``{preset: tally}`` of `pre_decode` with ``pre_decode="always"`` (every enabled component)."""
    x = latent(shape)
    out = {}
    for preset in presets():
        stab = stabilizer_for(preset, "lite", pre_decode="always")

        def once():
            stab._pre_cache = None  # a fresh latent every call
            return stab.pre_decode(x)

        out[preset] = count(once)
    return out


PROBE_LAYERS = {  # name: (query_dim, heads, dim_head, token grid) of the default probed layer
    "SD1.5 512² (output_blocks.11.1.transformer_blocks.0.attn1)": (320, 8, 40, (64, 64)),
    "SDXL 1024² (output_blocks.5.1.transformer_blocks.1.attn1)": (640, 10, 64, (64, 64)),
}


def count_probe(max_queries: int = 1024, batch: int = 1) -> dict:
    """``{layer: tally}`` of the probe's hooks + `take_map` for one evaluation of `batch` images
    (cond rows first, then uncond: A1111's layout) on the probed layer's shape."""
    from bench.sd_unet import CrossAttention
    out = {}
    for label, (dim, heads, dim_head, (h, w)) in PROBE_LAYERS.items():
        torch.manual_seed(0)
        attn = CrossAttention(dim, None, heads, dim_head).eval()
        probe = EntropyProbe(heads=2, max_queries=max_queries)
        probe.attach(attn, factor=1)
        hidden = torch.randn(2 * batch, h * w, dim)

        def evaluation():
            probe.begin_evaluation((h, w), batch, lambda rows: [(r, r, r) for r in range(min(rows, batch))])
            with torch.no_grad():
                attn.to_q(hidden)
                attn.to_k(hidden)
            with record_function("qsilk::take_map"):
                emap = probe.take_map()
            assert emap is not None, probe.last_failure
            return emap

        with scoped([(EntropyProbe, "_on_projection", "qsilk::probe_hook")]):
            for _ in range(2):
                evaluation()
            events = profiled(evaluation)
        out[label] = tally(events, frozenset({"qsilk::probe_hook", "qsilk::take_map"}))
        probe.detach()
    return out


# -- hosts (test doubles) -------------------------------------------------------------------------
CORE_SCOPES = frozenset({"qsilk::stabilizer", "qsilk::probe_hook", "qsilk::probe_take_map"})


def _core_targets():
    from qsilk.stabilizer import Stabilizer as S
    return [(S, "post_cfg", "qsilk::stabilizer"), (S, "post_cfg_eps", "qsilk::stabilizer"),
            (EntropyProbe, "_on_projection", "qsilk::probe_hook"), (EntropyProbe, "take_map", "qsilk::probe_take_map")]


def _host_result(events, glue: frozenset[str], evaluations: int) -> dict:
    whole = tally(events, glue | CORE_SCOPES)
    alone = tally(events, glue, exclude=CORE_SCOPES)
    return {"evaluations": evaluations, "whole": per(whole, evaluations), "glue": per(alone, evaluations),
            "syncs_total": whole["syncs"], "sync_ops": whole["sync_ops"]}


def _count_host_run(run: Callable[[], Any], glue: list[tuple[Any, str, str]]) -> dict:
    """Warm `run` up, then profile one more `run` with the `glue` labelled, counting the
    evaluations that reach `Stabilizer.post_cfg`: `_host_result` of it."""
    with scoped(glue + _core_targets()):
        run()
        evaluations = []
        orig = Stabilizer.post_cfg

        def counting(self, *a, **k):
            evaluations.append(1)
            return orig(self, *a, **k)

        Stabilizer.post_cfg = counting
        try:
            events = profiled(run)
        finally:
            Stabilizer.post_cfg = orig
    return _host_result(events, frozenset(label for _, _, label in glue), len(evaluations))


def _a1111(preset: str, overrides: dict, sampler: str, steps: int) -> dict:
    from doubles import a1111 as d
    from qsilk.hosts import a1111 as adapter
    torch.set_num_threads(1)
    webui = d.WebUI("1.10.1").install()
    try:
        harness = d.Harness(str(ROOT), webui)
        request = [{"preset": preset, **overrides}]
        glue = [(adapter.Job, "_on_cfg_denoiser", "qsilk::a1111_cfg_denoiser"),
                (adapter.Job, "_on_cfg_after_cfg", "qsilk::a1111_after_cfg")]
        return _count_host_run(
            lambda: harness.txt2img(request, width=64, height=64, steps=steps, sampler_name=sampler), glue)
    finally:
        webui.uninstall()


def _forge(preset: str, overrides: dict, sampler: str, steps: int) -> dict:
    from doubles import forge_webui as fw
    from qsilk.hosts import forge, patcher
    torch.set_num_threads(1)
    h = fw.ForgeHost(fw.FORGE_NEW).install()
    try:
        mod = fw.load_script(str(ROOT))
        glue = [(forge.ForgeJob, "post_cfg", "qsilk::forge_post_cfg"),
                (patcher.AttentionCapture, "take_map", "qsilk::fence"),
                (patcher.AttentionCapture, "observe", "qsilk::attn1_observer"),
                (patcher.AttentionCapture, "watches", "qsilk::attn1_observer")]

        def job():
            sd = fw.make_model(h.family, "sd15")
            p = fw.Txt2Img(sd, family=h.family, env=h.env, steps=steps, sampler_name=sampler)
            p.scripts = fw.ScriptRunner([mod.QSilkScript()], [[{"preset": preset, **overrides}]])
            return fw.process_images(p)

        return _count_host_run(job, glue)
    finally:
        h.uninstall()
        for j in list(forge._LIVE_JOBS):
            j.close()


def _comfy(preset: str, overrides: dict, sampler: str, steps: int) -> dict:
    from doubles import comfy as dc
    from qsilk.hosts import comfy, patcher
    torch.set_num_threads(1)
    glue = [(comfy.ComfyRun, "post_cfg", "qsilk::comfy_post_cfg"),
            (patcher.AttentionCapture, "take_map", "qsilk::fence"),
            (patcher.AttentionCapture, "observe", "qsilk::attn1_observer"),
            (patcher.AttentionCapture, "watches", "qsilk::attn1_observer")]
    model = dc.sd15_like()
    lat = {"samples": torch.zeros(1, 4, 16, 16)}
    patched = comfy.patch_model(model, Settings.from_preset(preset, **overrides))
    return _count_host_run(lambda: dc.ksampler(patched, lat, steps=steps, sampler_name=sampler), glue)


#: Host runs: Balanced (Attn, probe on) with a step window that is not the whole pass, so the
#: glue must place every evaluation; Euler (one evaluation per step) and Heun (two).
HOST_RUNS = {
    "AUTOMATIC1111 (denoiser callbacks)": (_a1111, ("Euler", "Heun", "DDIM"), "Euler"),
    "Forge (post-CFG function, fence, attn1 observer)": (_forge, ("Euler", "Heun"), "Euler"),
    "ComfyUI (post-CFG function, fence, attn1 observer)": (_comfy, ("euler", "heun"), "euler"),
}
HOST_SETTINGS = ("Balanced", {"step_start": 0.0, "step_end": 0.9})


def count_hosts(steps: int = 4, samplers: str = "all") -> dict:
    preset, overrides = HOST_SETTINGS
    out = {}
    for host, (fn, names, first) in HOST_RUNS.items():
        for sampler in (names if samplers == "all" else (first,)):
            out[f"{host} / {sampler}"] = fn(preset, overrides, sampler, steps)
    return out


def dispatch_time(shape=(1, 4, 8, 8), calls: int = 200) -> dict:
    """Median CPU time of one `post_cfg` at a tiny latent: what is left is dispatch (one thread)."""
    x = latent(shape)
    emap = attn_map(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict = {}
    try:
        for preset in presets():
            out[preset] = {}
            for mode in MODES:
                stab = stabilizer_for(preset, mode)
                m = emap if mode == "attn" else None
                for _ in range(10):
                    stab.post_cfg(x, 5, 20, m)
                samples = []
                for _ in range(calls):
                    t0 = time.process_time()
                    stab.post_cfg(x, 5, 20, m)
                    samples.append(time.process_time() - t0)
                out[preset][mode] = statistics.median(samples) * 1e3
    finally:
        torch.set_num_threads(threads)
    return out


# -- report ---------------------------------------------------------------------------------------
def measure(quick: bool = False) -> dict:
    return {
        "torch": torch.__version__,
        "post_cfg": count_post_cfg(),
        "probe": count_probe(),
        "pre_decode": count_pre_decode(),
        "hosts": count_hosts(samplers="first" if quick else "all"),
        "dispatch_ms_8x8": dispatch_time(calls=30 if quick else 200),
    }


def format_table(r: dict) -> str:
    lines = ["| path | launches / evaluation (all non-view leaf ops) | host syncs | CPU ms at 8×8 (dispatch) |", "| --- | --- | --- | --- |"]
    for preset, modes in r["post_cfg"].items():
        for mode, t in modes.items():
            ms = r["dispatch_ms_8x8"][preset][mode]
            where = " (placed per step)" if preset.startswith("Paper") else ""
            lines.append(f"| post_cfg {preset}{where}, {mode.capitalize()} | {t['launches']} ({t['raw']}) | "
                         f"{t['syncs']} | {ms:.3f} |")
    for layer, t in r["probe"].items():
        lines.append(f"| probe (hooks + take_map), {layer} | {t['launches']} | {t['syncs']} | |")
    for host, t in r["hosts"].items():
        lines.append(f"| {host}: glue alone / whole path (Balanced, Attn) | {t['glue']['launches']} / "
                     f"{t['whole']['launches']} | {t['syncs_total']} | |")
    for preset, t in r["pre_decode"].items():
        lines.append(f"| pre_decode {preset} (once per pass) | {t['launches']} | {t['syncs']} | |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the numbers ('' = nowhere)")
    ap.add_argument("--quick", action="store_true", help="one sampler per host, fewer timing calls")
    ap.add_argument("--ops", action="store_true", help="also print the op names of each post_cfg count")
    args = ap.parse_args(argv)
    r = measure(quick=args.quick)
    print(format_table(r))
    if args.ops:
        for preset, modes in r["post_cfg"].items():
            for mode, t in modes.items():
                print(f"\n{preset} {mode}: {t['ops']} syncs {t['sync_ops']}")
        for layer, t in r["probe"].items():
            print(f"\nprobe {layer}: {t['ops']} syncs {t['sync_ops']}")
        for host, t in r["hosts"].items():
            print(f"\n{host}: glue {t['glue']['ops']} whole {t['whole']['ops']} syncs {t['sync_ops']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
