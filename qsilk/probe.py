"""Attention-entropy probe (spec §5): how unsure one self-attention layer is, per token.

The probe observes one `attn1` through forward hooks on its `to_q` and `to_k` projections. Every
attention kernel calls those two modules (SDP, xformers, sub-quadratic, Forge's backends, other
extensions' patches), so no kernel is replaced and the layer's output is never touched. Inside
the hooks only the selected cond rows, a few heads and a strided grid of queries are kept, and
their entropy over *all* keys is computed at once, in query chunks whose size depends only on
the token count and the head count (bounded memory, bit-reproducible maps).
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import nn

#: Float32 logits held at once by one query chunk: 8·2²⁰ values = 32 MiB (spec §5).
LOGITS_BUDGET = 8 * 2 ** 20


def default_max_queries(device: torch.device | str | None) -> int:
    """Auto query budget `Q_max`: 1024 on CUDA, 256 elsewhere (spec §5).

    >>> default_max_queries("cpu"), default_max_queries(torch.device("cuda", 0))
    (256, 1024)
    """
    return 1024 if torch.device(device or "cpu").type == "cuda" else 256


@lru_cache(maxsize=64)
def head_indices(num_heads: int, heads: int, /) -> tuple[int, ...]:
    """Sampled heads ``⌊(j+½)·H/n⌋`` for j = 0…n−1, n = min(heads, H).

    >>> head_indices(8, 2), head_indices(10, 2), head_indices(5, 2)
    ((2, 6), (2, 7), (1, 3))
    """
    n = max(1, min(heads, num_heads))
    return tuple(((2 * j + 1) * num_heads) // (2 * n) for j in range(n))


@lru_cache(maxsize=64)
def query_stride(h: int, w: int, max_queries: int, /) -> int:
    """Smallest stride s with ``⌈h/s⌉·⌈w/s⌉ ≤ Q_max``.

    >>> query_stride(64, 64, 1024), query_stride(76, 52, 256), query_stride(3, 5, 1)
    (2, 4, 5)
    """
    q = max(1, int(max_queries))
    s = max(1, math.isqrt((h * w) // q))  # ⌈h/s⌉⌈w/s⌉ ≥ hw/s², so no smaller s can fit
    while -(-h // s) * -(-w // s) > q:
        s += 1
    return s


def sampled_positions(size: int, stride: int, /) -> list[int]:
    """Rows (or columns) of the sampled queries: ``min(size−1, ⌊s/2⌋ + i·s)``, i < ⌈size/s⌉.

    >>> sampled_positions(7, 3), sampled_positions(4, 4)
    ([1, 4, 6], [2])
    """
    return [min(size - 1, stride // 2 + i * stride) for i in range(-(-size // stride))]


def query_chunk(n_tokens: int, heads: int, /) -> int:
    """Queries per chunk, ``max(1, ⌊8·2²⁰/(N·heads)⌋)``: ≤ 32 MiB of float32 logits per chunk.

    >>> query_chunk(4096, 2), query_chunk(16384, 2), query_chunk(102400, 2)
    (1024, 256, 40)
    """
    return max(1, LOGITS_BUDGET // (max(1, n_tokens) * max(1, heads)))


def _chunk_entropy(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(q·kᵀ)`` over the keys: ``(n, c, d) × (n, N, d) → (n, c)``.

    Math: with ``z = q·kᵀ`` and ``lse = log Σ exp z``: ``H = lse − Σ softmax(z)·z``.
    """
    z = torch.matmul(q, k.transpose(-1, -2))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    return (lse - (torch.exp(z - lse) * z).sum(-1, keepdim=True)).squeeze(-1)


def _row_entropy(q_rows: torch.Tensor, k_row: torch.Tensor, d: int) -> torch.Tensor:
    """Mean-over-heads normalised entropy of sampled queries ``(n, Q, d)`` against ``(n, N, d)`` keys.

    Returns ``(Q,)`` float32 in [0, 1].
    """
    n_keys = k_row.shape[1]
    if n_keys < 2:
        return q_rows.new_zeros(q_rows.shape[1])
    q_rows = q_rows * (d ** -0.5)
    step = query_chunk(n_keys, q_rows.shape[0])
    ent = torch.cat([_chunk_entropy(q_rows[:, i:i + step], k_row)
                     for i in range(0, q_rows.shape[1], step)], dim=1)
    return (ent.mean(0) / math.log(n_keys)).clamp_(0.0, 1.0)


def _take_positions(t: torch.Tensor, size: int, s: int) -> torch.Tensor:
    """Entries ``min(size−1, ⌊s/2⌋ + i·s)`` of dim 0, by slicing (no index tensor, no host copy)."""
    picked = t[s // 2::s]
    if picked.shape[0] < -(-size // s):  # the last block is short: its query is clamped to size − 1
        picked = torch.cat([picked, t[size - 1:size]])
    return picked


def _split_heads(t: torch.Tensor, num_heads: int, heads: Sequence[int],
                 grid: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``(N, H·d)`` → float32 ``(n, N', d)`` for the chosen heads — and, with ``grid = (h, w, s)``,
    only the sampled query tokens, row-major. Always a copy, never a view of `t`."""
    n_tok, width = t.shape
    if width % num_heads:
        raise ValueError(f"QSilk probe: width {width} is not a multiple of {num_heads} heads")
    t = t.reshape(n_tok, num_heads, width // num_heads)
    if grid is not None:
        h, w, s = grid
        t = _take_positions(t.reshape(h, w, num_heads, -1), h, s)
        t = _take_positions(t.transpose(0, 1), w, s).transpose(0, 1).reshape(-1, num_heads, t.shape[-1])
    return torch.stack([t[:, i] for i in heads]).to(torch.float32)


def _sampling(h: int, w: int, max_queries: int | None, device: torch.device) -> tuple[int, int, int]:
    """(stride, sampled rows, sampled columns)."""
    s = query_stride(h, w, max_queries or default_max_queries(device))
    return s, -(-h // s), -(-w // s)


def _fill_blocks(values: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """``(..., nh, nw)`` sampled values → ``(..., h, w)``: each value fills its s×s token block."""
    return values.repeat_interleave(s, -2).repeat_interleave(s, -1)[..., :h, :w]


def entropy_map(q: torch.Tensor, k: torch.Tensor, grid_hw: tuple[int, int], *, num_heads: int, heads: int = 2,
                max_queries: int | None = 1024) -> torch.Tensor:
    """Normalised attention entropy per token of one self-attention layer (spec §5).

    Math: heads ``⌊(j+½)·H/n⌋``; query stride s = the smallest with ``⌈h/s⌉·⌈w/s⌉ ≤ Q_max``, at
    rows/cols ``min(h−1, ⌊s/2⌋+i·s)``; ``P = softmax(q·kᵀ/√d)`` over all N keys;
    ``E = mean_heads(−Σ P·log P) / log N``; each sampled query fills its s×s token block.

    Args:
        q, k: ``(B, N, H·d)`` outputs of `to_q` / `to_k`, any float dtype, N = h·w.
        grid_hw: the token grid ``(h, w)``.
        num_heads: H, the layer's head count. heads: n, heads sampled.
        max_queries: Q_max; 0 or None = auto (`default_max_queries`).
    Returns: ``(B, 1, h, w)`` float32 in [0, 1] on q's device.
    Guarantees: no N×N matrix (query chunks of ``max(1, ⌊8·2²⁰/(N·n)⌋)``, one row at a time); the
    same inputs give bit-identical maps; inputs are not modified.

    >>> q = torch.zeros(1, 4, 2)   # identical logits: uniform attention, entropy log N
    >>> entropy_map(q, torch.randn(1, 4, 2), (2, 2), num_heads=1, heads=1).flatten().tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    h, w = grid_hw
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0]:
        raise ValueError(f"QSilk probe: q, k must be (B, N, H·d) with one B (got {tuple(q.shape)}, {tuple(k.shape)})")
    if q.shape[1] != h * w or k.shape[1] != h * w:
        raise ValueError(f"QSilk probe: N_q = {q.shape[1]} and N_k = {k.shape[1]} must both be h·w = {h * w}")
    hs = head_indices(num_heads, heads)
    d = q.shape[2] // num_heads
    s, nh, nw = _sampling(h, w, max_queries, q.device)
    with torch.no_grad():
        rows = [_row_entropy(_split_heads(q[b], num_heads, hs, (h, w, s)), _split_heads(k[b], num_heads, hs), d)
                for b in range(q.shape[0])]
        return _fill_blocks(torch.stack(rows).view(-1, 1, nh, nw), s, h, w)


def grid_for_tokens(latent_hw: tuple[int, int], n_tokens: int) -> tuple[int, int, int] | None:
    """``(h, w, f)`` with ``h = ⌈H/f⌉, w = ⌈W/f⌉, h·w = n_tokens`` for f in 1, 2, 4, 8; None if none fits.

    >>> grid_for_tokens((104, 152), 52 * 76), grid_for_tokens((125, 125), 63 * 63), grid_for_tokens((64, 64), 1000)
    ((52, 76, 2), (63, 63, 2), None)
    """
    H, W = latent_hw
    for f in (1, 2, 4, 8):
        h, w = -(-H // f), -(-W // f)
        if h * w == n_tokens:
            return h, w, f
    return None


def upsample_to_latent(emap: torch.Tensor, latent_hw: tuple[int, int], factor: int) -> torch.Tensor:
    """Each token fills its f×f latent pixels (nearest), cropped to the latent: ``(B,1,H,W)``.

    >>> upsample_to_latent(torch.tensor([[[[0., 1.]]]]), (2, 3), 2).tolist()
    [[[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]]]
    """
    H, W = latent_hw
    h, w = emap.shape[-2:]
    if h != -(-H // factor) or w != -(-W // factor):
        raise ValueError(f"QSilk probe: a {h}×{w} map is not the f={factor} grid of a {H}×{W} latent")
    return _fill_blocks(emap, factor, H, W)


_LDM_ATTN1 = re.compile(r"(?:^|\.)output_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)\.attn1$")
_DIFFUSERS_ATTN1 = re.compile(r"(?:^|\.)up_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1$")


def _is_self_attention(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "heads", None), int) and isinstance(getattr(m, "to_q", None), nn.Module)
            and isinstance(getattr(m, "to_k", None), nn.Module) and not getattr(m, "is_cross_attention", False))


def find_probe_layer(unet: nn.Module) -> tuple[str, nn.Module] | None:
    """The default probed self-attention: the last ``attn1`` of the decoder at the highest-resolution
    level that has attention. Understands ldm/sgm/Forge names
    (``output_blocks.{i}.1.transformer_blocks.{j}.attn1``: largest i, then largest j) and diffusers
    names (``up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn1``: largest i, j, k). None if
    the UNet has none (e.g. Flux/SD3 or unknown architectures)."""
    best: tuple[tuple[int, ...], str, nn.Module] | None = None
    for name, module in unet.named_modules():
        m = _LDM_ATTN1.search(name) or _DIFFUSERS_ATTN1.search(name)
        if m is None or not _is_self_attention(module):
            continue
        key = (1 if m.re is _LDM_ATTN1 else 0, *map(int, m.groups()))
        if best is None or key > best[0]:
            best = (key, name, module)
    return None if best is None else (best[1], best[2])


def probe_layer_factor(unet: nn.Module, name: str) -> int | None:
    """Downsampling factor f of the level of a layer found by `find_probe_layer`, from the model's
    structure: 2 to the number of upsamplers at or after its decoder block (ldm: `Upsample`
    modules in ``output_blocks.{≥i}``; diffusers: ``up_blocks.{≥i}.upsamplers``). None if unknown.
    Knowing f lets the probe reject token counts that fit another level (Hypertile tiles)."""
    m = _LDM_ATTN1.search(name)
    if m is not None:
        prefix, i = name[:m.start()] + ("." if m.start() else ""), int(m.group(1))
        pat = re.compile(re.escape(prefix) + r"output_blocks\.(\d+)\.\d+$")
        ups = {int(pm.group(1)) for n, mod in unet.named_modules()
               if (pm := pat.fullmatch(n)) and type(mod).__name__ == "Upsample"}
        return 2 ** sum(1 for j in ups if j >= i)
    m = _DIFFUSERS_ATTN1.search(name)
    if m is not None:
        prefix, i = name[:m.start()] + ("." if m.start() else ""), int(m.group(1))
        pat = re.compile(re.escape(prefix) + r"up_blocks\.(\d+)\.upsamplers$")
        ups = {int(pm.group(1)) for n, mod in unet.named_modules() if (pm := pat.fullmatch(n)) and len(mod)}
        return 2 ** sum(1 for j in ups if j >= i)
    return None


#: ``selector(rows_in_this_call) -> [(row_index_in_call, image_index), ...]`` for the cond rows of one
#: UNet call, or None to ignore this call. Set by the host adapter (row layout is host-specific).
#: An entry may carry a third element, a key naming the row within the evaluation (e.g. its global
#: row offset): a key seen twice in one evaluation (PAG/SAG/reference passes) makes the map ambiguous.
RowSelector = Callable[[int], Sequence[tuple[int, int]] | Sequence[tuple[int, int, Hashable]] | None]


class EntropyProbe:
    """Observing forward hooks on one attention layer's `to_q` and `to_k` (spec §5).

    Usage by a host adapter, per job::

        probe = EntropyProbe(heads=2, max_queries=256)
        probe.attach(attn1_module)            # reads attn1_module.heads; hooks to_q / to_k
        ...per evaluation:
        probe.begin_evaluation(latent_hw=(H, W), batch_size=B, row_selector=sel)
        ...UNet runs (one or more calls); hooks compute entropy for the selected cond rows at once,
           keeping no reference to full q/k...
        emap = probe.take_map()               # (B,1,H,W) in [0,1] at latent resolution, or None
        ...after the job (also on error/interrupt):
        probe.detach()

    `take_map` returns None — and sets `last_failure` to a short reason — when no capture happened,
    the token count matched no grid (Hypertile, ToMe), an image got no cond row, or a row was seen
    twice in one evaluation (`mark_ambiguous`, or the selector returned an image twice per call set).
    Hooks never change the module's output.

    Without a `row_selector`, rows ``0..B−1`` of each call are the cond rows of images ``0..B−1``
    (one call per evaluation, cond rows first) and a second call in the same evaluation counts as
    those rows seen twice. `max_queries` 0 or None = auto (`default_max_queries` of q's device).
    `failures` counts the reasons of maps not produced; `maps` the maps produced.
    """

    def __init__(self, *, heads: int = 2, max_queries: int | None = 1024):
        self.heads = int(heads)
        self.max_queries = max_queries
        self.factor: int | None = None
        self.last_failure: str | None = None
        self.maps = 0
        self.failures: dict[str, int] = {}
        self._module: nn.Module | None = None
        self._handles: list = []
        self._active = False
        self._reset_evaluation((0, 0), 0, None)

    # -- job lifetime ---------------------------------------------------------------------
    def attach(self, attn: nn.Module, *, factor: int | None = None) -> None:
        """Hook `attn.to_q` / `attn.to_k`. `factor`: the layer's level f if known
        (`probe_layer_factor`); otherwise inferred from the first capture and kept for the job."""
        if not _is_self_attention(attn):
            raise TypeError("QSilk probe: the layer needs an int `heads` and `to_q` / `to_k` modules")
        self.detach()
        self._module, self.factor = attn, factor
        self._handles = [attn.to_q.register_forward_hook(self._on_q),
                         attn.to_k.register_forward_hook(self._on_k)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._module, self._active = [], None, False
        self._pending = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- per evaluation -------------------------------------------------------------------
    def begin_evaluation(self, latent_hw: tuple[int, int], batch_size: int,
                         row_selector: RowSelector | None = None) -> None:
        self._reset_evaluation(latent_hw, batch_size, row_selector)
        self._active = self.attached

    def mark_ambiguous(self, reason: str = "rows seen twice in one evaluation") -> None:
        self._fail(reason)

    def take_map(self) -> torch.Tensor | None:
        """This evaluation's map ``(B,1,H,W)`` float32 in [0, 1], or None (see `last_failure`)."""
        self._active, self._pending = False, None
        reason = self._failure
        if reason is None and not self._counts:
            reason = "no capture in this evaluation"
        if reason is None:
            missing = [i for i in range(self._batch) if self._counts.get(i, 0) == 0]
            if missing:
                reason = f"image {missing[0]} got no cond row"
        self.last_failure = reason
        if reason is not None:
            self.failures[reason] = self.failures.get(reason, 0) + 1
            return None
        h, w, f = self._grid
        emap = torch.stack([self._sums[i] / self._counts[i] for i in range(self._batch)]).view(-1, 1, h, w)
        self.maps += 1
        return upsample_to_latent(emap, self._latent_hw, f)

    # -- internals ------------------------------------------------------------------------
    def _reset_evaluation(self, latent_hw, batch_size, row_selector) -> None:
        self._latent_hw, self._batch, self._selector = tuple(latent_hw), int(batch_size), row_selector
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}
        self._keys: set = set()
        self._grid: tuple[int, int, int] | None = None
        self._failure: str | None = None
        self._pending: dict[str, Any] | None = None

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason

    def _select(self, rows: int) -> list[tuple[int, int, Hashable]] | None:
        if self._selector is None:
            return [(i, i, i) for i in range(min(rows, self._batch))]
        chosen = self._selector(rows)
        if chosen is None:
            return None
        return [(int(e[0]), int(e[1]), e[2] if len(e) > 2 else None) for e in chosen]

    def _grid_for(self, n_tokens: int) -> tuple[int, int, int] | None:
        if self.factor is not None:
            H, W = self._latent_hw
            h, w = -(-H // self.factor), -(-W // self.factor)
            return (h, w, self.factor) if h * w == n_tokens else None
        grid = grid_for_tokens(self._latent_hw, n_tokens)
        if grid is not None:
            self.factor = grid[2]
        return grid

    def _on_q(self, module, args, output) -> None:
        self._on_projection("q", output)

    def _on_k(self, module, args, output) -> None:
        self._on_projection("k", output)

    def _on_projection(self, which: str, out: torch.Tensor) -> None:
        """First projection of a call: select rows, keep only their slices; second: compute."""
        if not self._active or self._failure is not None or self._module is None:
            return
        pend = self._pending
        if pend is None or which in pend:
            pend = self._pending = self._start_call(out)
            if pend is None:
                # an ignored call: skip its other projection too, so the selector sees each call once
                self._pending = {which: None, "ignored": True}
                return
        else:
            self._pending = None
            if pend.get("ignored"):
                return
            if out.shape[:2] != pend["shape"]:
                self._fail(f"N_q ≠ N_k ({pend['shape'][1]} vs {out.shape[1]}): not plain self-attention")
                return
        with torch.no_grad():
            num_heads = self._module.heads
            hs = head_indices(num_heads, self.heads)
            if which == "q":
                h, w, _ = self._grid
                pend["q"] = [_split_heads(out[r], num_heads, hs, (h, w, pend["s"])) for r, _ in pend["rows"]]
            else:
                pend["k"] = [_split_heads(out[r], num_heads, hs) for r, _ in pend["rows"]]
            if "q" in pend and "k" in pend:
                self._finish_call(pend, out.shape[2] // num_heads)

    def _start_call(self, out: torch.Tensor) -> dict[str, Any] | None:
        if out.dim() != 3:
            return None
        chosen = self._select(out.shape[0])
        if not chosen:
            return None
        for row, image, key in chosen:
            if not (0 <= row < out.shape[0] and 0 <= image < self._batch):
                self._fail(f"row selector gave row {row} / image {image} outside "
                           f"{out.shape[0]} rows / {self._batch} images")
                return None
            if key is not None:
                if (image, key) in self._keys:
                    self._fail("rows seen twice in one evaluation")
                    return None
                self._keys.add((image, key))
        grid = self._grid_for(out.shape[1])
        if grid is None:
            self._fail(f"{out.shape[1]} tokens fit no grid of the {self._latent_hw[0]}×{self._latent_hw[1]} latent")
            return None
        if self._grid is not None and self._grid != grid:
            self._fail("token grid changed within one evaluation")
            return None
        self._grid = grid
        s, nh, nw = _sampling(grid[0], grid[1], self.max_queries, out.device)
        rows = [(r, image) for r, image, _ in chosen]
        return {"shape": out.shape[:2], "rows": rows, "s": s, "nhw": (nh, nw)}

    def _finish_call(self, pend: dict[str, Any], d: int) -> None:
        h, w, _ = self._grid
        nh, nw = pend["nhw"]
        for (_, image), q_rows, k_row in zip(pend["rows"], pend["q"], pend["k"]):
            emap = _fill_blocks(_row_entropy(q_rows, k_row, d).view(nh, nw), pend["s"], h, w)
            self._sums[image] = self._sums[image] + emap if image in self._sums else emap
            self._counts[image] = self._counts.get(image, 0) + 1
