"""Attention-entropy probe (spec §5): oracle checks, geometry rules, memory bound, hooks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qsilk.probe as probe_mod
from qsilk.probe import (EntropyProbe, default_max_queries, entropy_map, find_probe_layer, grid_for_tokens,
                         head_indices, probe_layer_factor, query_chunk, query_stride, sampled_positions,
                         upsample_to_latent)


# --- oracle: written from spec §5, independent of qsilk.probe ---------------------------------

def oracle_entropy_map(q, k, h, w, num_heads, n_heads, q_max):
    """Direct softmax entropy over the full N×N attention, in float64, then the spec's sampling."""
    B, N, C = q.shape
    d = C // num_heads
    heads = [math.floor((j + 0.5) * num_heads / n_heads) for j in range(n_heads)]
    s = 1
    while math.ceil(h / s) * math.ceil(w / s) > q_max:
        s += 1
    qh = q.double().reshape(B, N, num_heads, d)
    kh = k.double().reshape(B, N, num_heads, d)
    ent = torch.zeros(B, N, dtype=torch.float64)
    for hd in heads:
        p = torch.softmax(qh[:, :, hd] @ kh[:, :, hd].transpose(1, 2) / math.sqrt(d), dim=-1)
        ent += -torch.special.xlogy(p, p).sum(-1)
    ent = ent / len(heads) / math.log(N)
    out = torch.empty(B, 1, h, w, dtype=torch.float64)
    for r in range(h):
        for c in range(w):
            qr = min(h - 1, (r // s) * s + s // 2)
            qc = min(w - 1, (c // s) * s + s // 2)
            out[:, 0, r, c] = ent[:, qr * w + qc]
    return out


def _qk(B, N, num_heads, d, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, N, num_heads * d, generator=g) * scale).to(dtype)
    k = (torch.randn(B, N, num_heads * d, generator=g) * scale).to(dtype)
    return q, k


@pytest.mark.parametrize("h,w,num_heads,n_heads,q_max", [
    (4, 4, 8, 2, 1024),      # every query sampled
    (6, 9, 10, 2, 12),        # non-square, strided
    (7, 5, 5, 2, 4),          # odd sides, SD2-style H=5
    (13, 19, 8, 3, 30),       # odd, three heads
    (3, 11, 4, 1, 1),         # one query for the whole grid
])
def test_entropy_map_matches_direct_softmax_entropy(h, w, num_heads, n_heads, q_max):
    q, k = _qk(2, h * w, num_heads, 8, seed=h * w, scale=1.5)
    got = entropy_map(q, k, (h, w), num_heads=num_heads, heads=n_heads, max_queries=q_max)
    want = oracle_entropy_map(q, k, h, w, num_heads, n_heads, q_max)
    assert got.shape == (2, 1, h, w) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    assert float(got.min()) >= 0.0 and float(got.max()) <= 1.0


def test_entropy_map_sdxl_832x1216_grid_matches_oracle():
    """832×1216 image → latent 104×152 → SDXL latent/2 grid 52×76 (3952 tokens), and portrait."""
    assert grid_for_tokens((104, 152), 52 * 76) == (52, 76, 2)
    assert grid_for_tokens((152, 104), 76 * 52) == (76, 52, 2)
    h, w = 52, 76
    q, k = _qk(1, h * w, 10, 4, seed=3)
    got = entropy_map(q, k, (h, w), num_heads=10, heads=2, max_queries=256)
    want = oracle_entropy_map(q, k, h, w, 10, 2, 256)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    lat = upsample_to_latent(got, (104, 152), 2)
    assert lat.shape == (1, 1, 104, 152)
    assert torch.equal(lat[0, 0, 2 * 51 + 1, 2 * 75 + 1], got[0, 0, 51, 75])


@pytest.mark.parametrize("latent_hw,n,expected", [
    ((125, 125), 63 * 63, (63, 63, 2)),   # 1000×1000 image at SDXL latent/2
    ((125, 125), 125 * 125, (125, 125, 1)),
    ((13, 7), 4 * 2, (4, 2, 4)),
    ((1, 1), 1, (1, 1, 1)),
    ((64, 64), 1000, None),               # ToMe-style reduced token count
    ((64, 64), 64 * 64 // 4, (32, 32, 2)),
])
def test_grid_for_tokens_odd_sizes(latent_hw, n, expected):
    assert grid_for_tokens(latent_hw, n) == expected


@given(H=st.integers(1, 70), W=st.integers(1, 70), f=st.sampled_from([1, 2, 4, 8]))
@settings(max_examples=60, deadline=None)
def test_upsample_to_latent_each_token_fills_its_fxf_pixels(H, W, f):
    h, w = -(-H // f), -(-W // f)
    emap = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    lat = upsample_to_latent(emap, (H, W), f)
    assert lat.shape == (1, 1, H, W)
    for y in range(0, H, max(1, H // 5)):
        for x in range(0, W, max(1, W // 5)):
            assert lat[0, 0, y, x] == emap[0, 0, y // f, x // f]


def test_upsample_to_latent_rejects_wrong_grid():
    with pytest.raises(ValueError, match="grid"):
        upsample_to_latent(torch.zeros(1, 1, 5, 5), (16, 16), 2)


def test_head_index_rule_examples():
    assert head_indices(8, 2) == (2, 6)
    assert head_indices(10, 2) == (2, 7)
    assert head_indices(5, 2) == (1, 3)
    assert head_indices(20, 2) == (5, 15)
    assert head_indices(1, 2) == (0,)


@given(H=st.integers(1, 64), n=st.integers(1, 64))
def test_head_index_rule_formula(H, n):
    n_eff = min(n, H)
    got = head_indices(H, n)
    assert got == tuple(math.floor((j + 0.5) * H / n_eff) for j in range(n_eff))
    assert len(set(got)) == n_eff and all(0 <= i < H for i in got)


@given(h=st.integers(1, 120), w=st.integers(1, 120), q_max=st.integers(1, 2048))
@settings(max_examples=200)
def test_query_stride_is_smallest_that_fits(h, w, q_max):
    s = query_stride(h, w, q_max)
    count = lambda t: math.ceil(h / t) * math.ceil(w / t)  # noqa: E731
    assert count(s) <= q_max
    assert s == 1 or count(s - 1) > q_max


@given(size=st.integers(1, 200), s=st.integers(1, 50))
def test_sampled_positions_rule_and_block_membership(size, s):
    pos = sampled_positions(size, s)
    assert pos == [min(size - 1, s // 2 + i * s) for i in range(math.ceil(size / s))]
    for i, p in enumerate(pos):  # the sampled query lies inside the s-block it fills
        assert i * s <= p < min(size, (i + 1) * s)


def test_default_max_queries():
    assert default_max_queries("cpu") == 256
    assert default_max_queries(torch.device("cuda")) == 1024
    q, k = _qk(1, 40 * 40, 2, 4)
    auto = entropy_map(q, k, (40, 40), num_heads=2, max_queries=0)
    assert torch.equal(auto, entropy_map(q, k, (40, 40), num_heads=2, max_queries=256))
    assert torch.equal(auto, entropy_map(q, k, (40, 40), num_heads=2, max_queries=None))


def test_memory_bounded_no_full_attention_matrix(monkeypatch):
    """At N = 16384 tokens (128×128) no logits tensor exceeds 8·2²⁰ floats (32 MiB); N×N would be 2²⁸."""
    shapes = []
    real = probe_mod._chunk_entropy

    def spy(q, k):
        shapes.append((q.shape, k.shape))
        return real(q, k)

    monkeypatch.setattr(probe_mod, "_chunk_entropy", spy)
    h = w = 128
    N, heads = h * w, 2
    q, k = _qk(1, N, 8, 4, seed=1)
    emap = entropy_map(q, k, (h, w), num_heads=8, heads=heads, max_queries=1024)
    assert emap.shape == (1, 1, h, w)
    expected_chunk = max(1, 8 * 2 ** 20 // (N * heads))  # 256
    assert len(shapes) == 1024 // expected_chunk
    for qs, ks in shapes:
        n_logits = qs[0] * qs[1] * ks[1]
        assert qs[1] <= expected_chunk and n_logits <= 8 * 2 ** 20
        assert ks[1] == N  # all keys, every chunk
    assert query_chunk(N, heads) == expected_chunk


def test_chunking_does_not_change_values(monkeypatch):
    """A tiny logits budget forces many chunks; the map matches the oracle all the same."""
    monkeypatch.setattr(probe_mod, "LOGITS_BUDGET", 50)
    q, k = _qk(1, 9 * 7, 4, 8, seed=5)
    got = entropy_map(q, k, (9, 7), num_heads=4, heads=2, max_queries=1024)
    torch.testing.assert_close(got.double(), oracle_entropy_map(q, k, 9, 7, 4, 2, 1024), atol=2e-6, rtol=1e-5)


def test_entropy_map_deterministic_and_per_row():
    q, k = _qk(3, 24 * 20, 8, 8, seed=7, scale=2.0)
    a = entropy_map(q, k, (24, 20), num_heads=8, max_queries=100)
    b = entropy_map(q.clone(), k.clone(), (24, 20), num_heads=8, max_queries=100)
    assert torch.equal(a, b)
    for i in range(3):  # row i's map depends only on row i
        assert torch.equal(a[i:i + 1], entropy_map(q[i:i + 1], k[i:i + 1], (24, 20), num_heads=8, max_queries=100))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_entropy_map_low_precision_inputs_compute_in_float32(dtype):
    q, k = _qk(1, 8 * 8, 4, 16, seed=2, dtype=dtype)
    got = entropy_map(q, k, (8, 8), num_heads=4, max_queries=64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), oracle_entropy_map(q.float(), k.float(), 8, 8, 4, 2, 64),
                               atol=2e-6, rtol=1e-5)


def test_entropy_map_extremes():
    # identical keys: uniform attention, entropy exactly log N → 1; one dominant key → ≈ 0
    q = torch.randn(1, 16, 8)
    k = torch.ones(1, 16, 8)
    torch.testing.assert_close(entropy_map(q, k, (4, 4), num_heads=2), torch.ones(1, 1, 4, 4))
    k = torch.zeros(1, 16, 8)
    k[0, 5] = 100.0
    q = torch.ones(1, 16, 8) * 100.0
    assert float(entropy_map(q, k, (4, 4), num_heads=2).max()) < 1e-3


def test_entropy_map_rejects_token_count_mismatch():
    q, k = _qk(1, 20, 2, 4)
    with pytest.raises(ValueError, match="h·w"):
        entropy_map(q, k, (4, 4), num_heads=2)
    with pytest.raises(ValueError, match="N_k"):
        entropy_map(q[:, :16], torch.cat([k, k], 1), (4, 4), num_heads=2)


# --- EntropyProbe on attention modules built like the hosts' ---------------------------------

class LdmCrossAttention(nn.Module):
    """Mirrors ``ldm.modules.attention.CrossAttention`` (Stability-AI/stablediffusion cf1d67a6; the same
    attributes in generative-models ``sgm.modules.attention.CrossAttention`` 45c443b3 and Forge's
    ``backend.nn.unet.CrossAttention``): ``heads``, ``scale``, ``to_q``/``to_k``/``to_v`` Linear without
    bias, ``to_out = Sequential(Linear, Dropout)``; forward as A1111's "sdp" optimisation
    (``modules/sd_hijack_optimizations.py scaled_dot_product_attention_forward``): to_q(x), then
    to_k/to_v of the context (x for attn1), heads split as ``view(B, -1, heads, d).transpose(1, 2)``."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=8, dropout=0.0, k_first=False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.k_first = k_first  # some patched kernels project k before q

    def forward(self, x, context=None, mask=None, **kwargs):
        context = x if context is None else context
        if self.k_first:
            k = self.to_k(context)
            q = self.to_q(x)
        else:
            q = self.to_q(x)
            k = self.to_k(context)
        v = self.to_v(context)
        B, _, inner = q.shape
        d = inner // self.heads
        q, k, v = (t.view(B, -1, self.heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(B, -1, inner).to(x.dtype)
        return self.to_out(out)


def _attn(seed=0, **kw):
    torch.manual_seed(seed)
    return LdmCrossAttention(32, heads=kw.pop("heads", 8), dim_head=8, **kw).eval()


def _expected(attn, x_rows, latent_hw, f, max_queries):
    with torch.no_grad():
        q, k = attn.to_q(x_rows), attn.to_k(x_rows)
    H, W = latent_hw
    grid = (-(-H // f), -(-W // f))
    return upsample_to_latent(entropy_map(q, k, grid, num_heads=attn.heads, max_queries=max_queries), latent_hw, f)


def test_probe_captures_grid_and_matches_entropy_map_bit_for_bit():
    attn = _attn()
    latent_hw, f = (10, 15), 2             # odd latent side: 5×8 tokens
    x = torch.randn(4, 5 * 8, 32)          # cond rows of 2 images, then 2 uncond rows (A1111 order)
    probe = EntropyProbe(heads=2, max_queries=12)
    probe.attach(attn)
    probe.begin_evaluation(latent_hw, batch_size=2)
    with torch.no_grad():
        attn(x)
    emap = probe.take_map()
    assert probe.factor == 2 and probe.last_failure is None
    assert emap.shape == (2, 1, 10, 15)
    assert torch.equal(emap, _expected(attn, x[:2], latent_hw, f, 12))
    probe.detach()


def test_probe_hooks_do_not_change_output_and_detach_leaves_nothing():
    attn = _attn(heads=4)
    x = torch.randn(2, 36, 32)
    with torch.no_grad():
        ref = attn(x)
    probe = EntropyProbe(heads=2, max_queries=0)
    probe.attach(attn)
    assert probe.attached
    probe.begin_evaluation((6, 6), 1)
    with torch.no_grad():
        out = attn(x)
    assert torch.equal(out, ref)
    assert probe.take_map() is not None
    probe.detach()
    assert not probe.attached
    for m in (attn, attn.to_q, attn.to_k, attn.to_v):
        assert len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0
    with torch.no_grad():
        assert torch.equal(attn(x), ref)


def test_probe_robust_to_k_before_q():
    x = torch.randn(2, 7 * 9, 32)
    maps = []
    for k_first in (False, True):
        attn = _attn(seed=3, k_first=k_first)
        probe = EntropyProbe(max_queries=20)
        probe.attach(attn)
        probe.begin_evaluation((7, 9), 1)
        with torch.inference_mode():
            attn(x)
        maps.append(probe.take_map())
        probe.detach()
    assert maps[0] is not None and torch.equal(maps[0], maps[1])


def test_probe_mean_over_cond_rows_across_chunked_calls():
    """A1111 with AND prompts and chunked cond/uncond: image 0 owns rows 0–1, image 1 row 2,
    spread over two UNet calls; a selector tracking the row offset maps them (keys = global row)."""
    attn = _attn(seed=1)
    x = torch.randn(5, 16, 32)           # rows: img0 c, img0 c, img1 c, uncond, uncond
    owner = {0: 0, 1: 0, 2: 1}
    offset = [0]

    def selector(n):
        start = offset[0]
        offset[0] += n
        return [(r - start, owner[r], r) for r in range(start, start + n) if r in owner]

    probe = EntropyProbe(max_queries=1024)
    probe.attach(attn)
    probe.begin_evaluation((4, 4), 2, selector)
    with torch.no_grad():
        attn(x[:3])
        attn(x[3:])
    emap = probe.take_map()
    per_row = _expected(attn, x[:3], (4, 4), 1, 1024)
    torch.testing.assert_close(emap[0], (per_row[0] + per_row[1]) / 2, rtol=0, atol=1e-7)
    assert torch.equal(emap[1], per_row[2])


def test_probe_row_seen_twice_is_ambiguous():
    attn = _attn()
    x = torch.randn(2, 16, 32)
    probe = EntropyProbe()
    probe.attach(attn)
    # default selector: a second UNet call in one evaluation (PAG/SAG extra pass) repeats the cond rows
    probe.begin_evaluation((4, 4), 1)
    with torch.no_grad():
        attn(x)
        attn(x)
    assert probe.take_map() is None and "twice" in probe.last_failure
    # explicit keys repeated by the host's selector
    probe.begin_evaluation((4, 4), 1, lambda n: [(0, 0, "row0")])
    with torch.no_grad():
        attn(x)
        attn(x)
    assert probe.take_map() is None and "twice" in probe.last_failure
    # host-detected extra pass
    probe.begin_evaluation((4, 4), 1)
    with torch.no_grad():
        attn(x)
    probe.mark_ambiguous()
    assert probe.take_map() is None and probe.last_failure
    # the next evaluation is clean again
    probe.begin_evaluation((4, 4), 1)
    with torch.no_grad():
        attn(x)
    assert probe.take_map() is not None and probe.last_failure is None
    assert probe.maps == 1 and sum(probe.failures.values()) == 3


def test_probe_rejects_mismatched_tokens_and_cross_attention():
    attn = _attn()
    probe = EntropyProbe()
    probe.attach(attn, factor=1)
    # Hypertile-like: 2×2 tiles of a 8×8 latent → 16 tokens per row; fits f=2 but the layer is f=1
    probe.begin_evaluation((8, 8), 1)
    with torch.no_grad():
        attn(torch.randn(4, 16, 32))
    assert probe.take_map() is None and "tokens" in probe.last_failure
    # ToMe-like: a token count that fits no grid at all (factor inferred)
    probe.attach(attn)
    probe.begin_evaluation((8, 8), 1)
    with torch.no_grad():
        attn(torch.randn(2, 50, 32))
    assert probe.take_map() is None and "tokens" in probe.last_failure
    # reference bank: keys from a longer context → N_q ≠ N_k
    probe.begin_evaluation((8, 8), 1)
    with torch.no_grad():
        x = torch.randn(2, 64, 32)
        attn(x, context=torch.cat([x, x], 1))
    assert probe.take_map() is None and "N_k" in probe.last_failure
    probe.detach()


def test_probe_image_without_cond_row_and_ignored_calls():
    attn = _attn()
    probe = EntropyProbe()
    probe.attach(attn)
    probe.begin_evaluation((4, 4), 2, lambda n: [(0, 0)])
    with torch.no_grad():
        attn(torch.randn(4, 16, 32))
    assert probe.take_map() is None and "image 1" in probe.last_failure
    probe.begin_evaluation((4, 4), 1, lambda n: None)   # e.g. an uncond-only call
    with torch.no_grad():
        attn(torch.randn(1, 16, 32))
    assert probe.take_map() is None and "no capture" in probe.last_failure
    with torch.no_grad():                               # outside an evaluation nothing is captured
        attn(torch.randn(1, 16, 32))
    assert probe.take_map() is None


def test_probe_keeps_no_reference_to_full_q_k():
    attn = _attn()
    seen = []
    attn.to_q.register_forward_hook(lambda m, a, out: seen.append(out))
    attn.to_k.register_forward_hook(lambda m, a, out: seen.append(out))
    probe = EntropyProbe(max_queries=4)
    probe.attach(attn)
    probe.begin_evaluation((8, 8), 1, lambda n: [(0, 0)])
    with torch.no_grad():
        attn(torch.randn(3, 64, 32))
    full = {t.untyped_storage().data_ptr() for t in seen}
    stack = [probe.__dict__]
    while stack:  # walk everything the probe holds
        obj = stack.pop()
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple, set)) else ()
        for v in items:
            if isinstance(v, torch.Tensor):
                assert v.untyped_storage().data_ptr() not in full
            elif isinstance(v, (dict, list, tuple, set)):
                stack.append(v)
    assert probe.take_map() is not None


def test_diffusers_attention_probe():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    x = torch.randn(2, 6 * 5, 32)
    with torch.no_grad():
        ref = attn(x)
    probe = EntropyProbe(max_queries=9)
    probe.attach(attn)
    probe.begin_evaluation((12, 10), 1)
    with torch.no_grad():
        out = attn(x)
    emap = probe.take_map()
    probe.detach()
    assert torch.equal(out, ref)
    assert emap.shape == (1, 1, 12, 10) and probe.factor == 2
    assert torch.equal(emap, _expected(attn, x[:1], (12, 10), 2, 9))


# --- layer finder ------------------------------------------------------------------------------

class _Upsample(nn.Module):
    pass


_Upsample.__name__ = "Upsample"  # ldm.modules.diffusionmodules.openaimodel.Upsample


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = LdmCrossAttention(8, heads=2, dim_head=4)
        self.attn2 = LdmCrossAttention(8, context_dim=16, heads=2, dim_head=4)


class _SpatialTransformer(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(_Block() for _ in range(depth))


def tiny_ldm_unet(attention_depth: list[int], upsample_at: set[int]) -> nn.Module:
    """Module names as in ldm/sgm ``openaimodel.UNetModel`` (``output_blocks.{i}`` = TimestepEmbedSequential
    of ResBlock, [SpatialTransformer], [Upsample]) and Forge's ``backend.nn.unet``; weights irrelevant."""
    unet = nn.Module()
    blocks = []
    for i, depth in enumerate(attention_depth):
        layers = [nn.Identity()]
        if depth:
            layers.append(_SpatialTransformer(depth))
        if i in upsample_at:
            layers.append(_Upsample())
        blocks.append(nn.Sequential(*layers))
    unet.input_blocks = nn.ModuleList([nn.Sequential(nn.Identity(), _SpatialTransformer(1))])
    unet.output_blocks = nn.ModuleList(blocks)
    return unet


def test_find_probe_layer_ldm_sd15_and_sdxl_layouts():
    sd15 = tiny_ldm_unet([0, 0, 0] + [1] * 9, upsample_at={2, 5, 8})
    name, module = find_probe_layer(sd15)
    assert name == "output_blocks.11.1.transformer_blocks.0.attn1"
    assert module is sd15.output_blocks[11][1].transformer_blocks[0].attn1
    assert probe_layer_factor(sd15, name) == 1
    sdxl = tiny_ldm_unet([10, 10, 10, 2, 2, 2, 0, 0, 0], upsample_at={2, 5})
    wrapper = nn.Module()
    wrapper.diffusion_model = sdxl  # A1111: sd_model.model.diffusion_model
    name, module = find_probe_layer(wrapper)
    assert name == "diffusion_model.output_blocks.5.1.transformer_blocks.1.attn1"
    assert module is sdxl.output_blocks[5][1].transformer_blocks[1].attn1
    assert probe_layer_factor(wrapper, name) == 2


def test_find_probe_layer_none_without_unet_attention():
    flux_like = nn.Module()
    flux_like.double_blocks = nn.ModuleList([nn.Module()])
    flux_like.double_blocks[0].img_attn = nn.Linear(4, 4)
    assert find_probe_layer(flux_like) is None
    assert find_probe_layer(nn.Sequential(nn.Linear(2, 2))) is None
    assert probe_layer_factor(flux_like, "transformer_blocks.0.attn") is None


def _tiny_diffusers_unet(sdxl_like: bool):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if sdxl_like:
        return diffusers.UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2), cross_attention_dim=16, attention_head_dim=8).eval()
    return diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=8).eval()


@pytest.mark.parametrize("sdxl_like,expected,factor", [
    (False, "up_blocks.1.attentions.1.transformer_blocks.0.attn1", 1),
    (True, "up_blocks.1.attentions.1.transformer_blocks.1.attn1", 2),
])
def test_find_probe_layer_diffusers_unet_and_probe_end_to_end(sdxl_like, expected, factor):
    unet = _tiny_diffusers_unet(sdxl_like)
    name, attn = find_probe_layer(unet)
    assert name == expected and probe_layer_factor(unet, name) == factor
    x, t, ctx = torch.randn(2, 4, 14, 18), torch.tensor([500, 500]), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    probe = EntropyProbe(max_queries=16)
    probe.attach(attn, factor=factor)
    probe.begin_evaluation((14, 18), 1)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=ctx).sample
    emap = probe.take_map()
    probe.detach()
    assert torch.equal(out, ref)                       # observing never changes the output
    assert emap is not None and emap.shape == (1, 1, 14, 18), probe.last_failure
    assert float(emap.min()) >= 0 and float(emap.max()) <= 1


def test_probe_path_never_syncs_with_the_host(monkeypatch):
    """Hooks and take_map (the per-evaluation path) make no Tensor → Python conversion and build no
    tensor from Python data (a host → device copy on CUDA)."""
    attn = _attn(heads=10)
    probe = EntropyProbe(max_queries=7)
    probe.attach(attn)
    x = torch.randn(3, 7 * 9, 32)

    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation on the per-evaluation path")
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "tensor", sync)
    monkeypatch.setattr(torch, "as_tensor", sync)
    probe.begin_evaluation((14, 18), 2, lambda n: [(0, 0, 0), (1, 1, 1)])
    with torch.no_grad():
        attn(x)
    emap = probe.take_map()
    entropy_map(x, x, (7, 9), num_heads=4, max_queries=7)
    monkeypatch.undo()
    assert emap is not None and emap.shape == (2, 1, 14, 18)
    assert torch.equal(emap, _expected(attn, x[:2], (14, 18), 2, 7))


def test_row_selector_called_once_per_unet_call():
    """A1111's selector tracks the row offset across calls, so it must see each call exactly once,
    also when it ignores the call (uncond chunk) — whichever projection fires first."""
    for k_first in (False, True):
        attn = _attn(k_first=k_first)
        seen = []

        def selector(n):
            seen.append(n)
            return None if len(seen) % 2 == 0 else [(0, 0, len(seen))]

        probe = EntropyProbe()
        probe.attach(attn)
        probe.begin_evaluation((4, 4), 1, selector)
        with torch.no_grad():
            attn(torch.randn(2, 16, 32))   # cond chunk
            attn(torch.randn(3, 16, 32))   # uncond chunk: ignored
        assert seen == [2, 3] and probe.take_map() is not None
