"""Launch and host-sync budgets of the per-evaluation path (issue #14), enforced by COUNTING ops
with the CPU profiler (`bench/launch_count.py`) — deterministic, no timing.

On a GPU every eager op is at least one kernel launch and a host sync stalls the CPU until the
device drains; both are properties of the op sequence, so they are counted here on CPU.
Budgets: no host sync anywhere on any host's per-evaluation path; Balanced / Crisp / High-res
``post_cfg`` ≤ 60 launches (Lite and Attn), Gentle ≤ 20, the entropy probe ≤ 40.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench import launch_count as lc  # noqa: E402

POST_CFG_BUDGET = 60
GENTLE_BUDGET = 20
PROBE_BUDGET = 40

SHAPES = [(1, 4, 128, 128), (2, 4, 104, 152), (1, 16, 64, 64), (1, 4, 13, 29)]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_counter_counts_launches_and_syncs():
    """The counter itself: a known op sequence gives known counts (views and allocations free,
    ``.item()``, ``torch.quantile`` with a tensor q and ``nonzero`` are syncs)."""
    x = torch.randn(4, 8)
    r = lc.count(lambda: (x.view(2, 16).t() * 2).sum(0), warmup=0)  # a view, a mul, a reduction
    assert r["launches"] == 2 and r["ops"] == {"aten::mul": 1, "aten::sum": 1} and r["syncs"] == 0
    assert lc.count(lambda: torch.empty(3), warmup=0)["launches"] == 0  # allocation only
    for sync in (lambda: float(x.sum()), lambda: torch.nonzero(x > 0),
                 lambda: torch.quantile(x, torch.tensor([0.5]), dim=1)):  # q as a tensor: checked on the host
        assert lc.count(sync, warmup=0)["syncs"] >= 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_post_cfg_budget_every_preset_lite_and_attn(shape, dtype):
    x = lc.latent(shape).to(dtype)
    emap = lc.attn_map(x)
    for preset in ("Gentle", "Balanced", "Crisp", "High-res"):
        for mode in lc.MODES:
            stab = lc.stabilizer_for(preset, mode)
            r = lc.count(lambda: stab.post_cfg(x, 5, 20, emap if mode == "attn" else None))
            budget = GENTLE_BUDGET if preset == "Gentle" else POST_CFG_BUDGET
            assert r["syncs"] == 0, (preset, mode, r["sync_ops"])
            assert r["launches"] <= budget, (preset, mode, r["launches"], r["ops"])
            assert stab.errors == 0 and stab.evaluations == 3


def test_first_evaluation_and_ema_reuse_stay_within_budget():
    """The first evaluation of a pass (no EMA yet) and an evaluation that reuses the Attn EMA
    without a map also stay within the budget and never sync."""
    x = lc.latent((1, 4, 128, 128))
    emap = lc.attn_map(x)
    stab = lc.stabilizer_for("Balanced", "attn")
    first = lc.tally(lc.profiled(lambda: stab.post_cfg(x, 0, 20, emap)))
    reuse = lc.tally(lc.profiled(lambda: stab.post_cfg(x, 1, 20, None)))
    for r in (first, reuse):
        assert r["syncs"] == 0 and r["launches"] <= POST_CFG_BUDGET, r


def test_launches_do_not_grow_with_the_latent():
    """A fixed number of batched ops: the same count at 64² and at 640² (no per-tile or per-chunk
    Python loop over the latent)."""
    counts = []
    for side in (64, 640):
        x = lc.latent((1, 4, side, side))
        stab = lc.stabilizer_for("Balanced", "lite")
        counts.append(lc.count(lambda: stab.post_cfg(x, 5, 20))["launches"])
    assert counts[0] == counts[1]


def test_pre_decode_never_syncs():
    for preset, r in lc.count_pre_decode((1, 4, 64, 64)).items():
        assert r["syncs"] == 0, (preset, r["sync_ops"])


def test_probe_budget_on_the_probed_layers():
    for layer, r in lc.count_probe(max_queries=1024, batch=1).items():
        assert r["syncs"] == 0 and r["launches"] <= PROBE_BUDGET, (layer, r)


@pytest.mark.parametrize("host", list(lc.HOST_RUNS))
def test_every_hosts_per_evaluation_path_never_syncs(host):
    """The whole per-evaluation path through each host's glue (test doubles of the real host APIs),
    Balanced with Attn maps and a step window that is not the whole pass, every sampler the
    double has: no host sync at all; the glue itself launches next to nothing."""
    fn, samplers, _ = lc.HOST_RUNS[host]
    preset, overrides = lc.HOST_SETTINGS
    for sampler in samplers:
        r = fn(preset, overrides, sampler, 4)
        assert r["evaluations"] >= 3  # DDIM: steps − 1
        assert r["syncs_total"] == 0, (sampler, r["sync_ops"])
        assert r["glue"]["launches"] <= 3, (sampler, r["glue"])
        assert r["whole"]["launches"] <= POST_CFG_BUDGET + PROBE_BUDGET, (sampler, r["whole"])
