"""Device constants and scratch buffers made once and cached (issue #14): a per-call
``torch.tensor(...)`` / ``zeros`` would be a host→device copy or a fill kernel on every evaluation."""
from __future__ import annotations

import threading
from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def scalar(value: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A 0-dim constant on the device, made once (read-only)."""
    return torch.tensor(value, dtype=dtype).to(device)


@lru_cache(maxsize=16)
def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str, written: tuple, thread: int,
           inference: bool, fill: tuple) -> torch.Tensor:
    buf = torch.zeros(shape, dtype=dtype, device=device)
    for i, v in enumerate(fill):
        buf[i].fill_(v)
    return buf


def zeroed_scratch(shape: tuple[int, ...], dtype: torch.dtype, device: str, written: tuple,
                   fill: tuple = ()) -> torch.Tensor:
    """A zero-filled buffer made once per shape, dtype, device, thread and `written` — the part
    of it callers write (e.g. the extent of a slice): what lies outside that part stays 0 for
    good (or ``fill[i]`` in ``buf[i]``, for the leading indices `fill` names). Its contents are
    valid only until the same caller's next call in the same thread (the
    device stream orders the reuse)."""
    # one per inference-mode state: a buffer made under torch.inference_mode (ComfyUI samples
    # there) cannot be written outside it
    return _zeros(tuple(shape), dtype, device, tuple(written), threading.get_ident(),
                  torch.is_inference_mode_enabled(), tuple(fill))


@lru_cache(maxsize=16)
def _scratch(shape: tuple[int, ...], dtype: torch.dtype, tag: str, thread: int, inference: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, tag: str) -> torch.Tensor:
    """An uninitialised temporary for the per-evaluation path: on CPU one buffer kept per shape,
    dtype, `tag`, thread and inference-mode state (the last 16), so that a large temporary is not
    a fresh allocation every call (on a busy CPU process a fresh multi-MiB block is mapped and
    page-faulted anew after other work has returned memory to the OS: ~20 % of AQClip's time at
    128²); elsewhere a plain ``torch.empty`` (CUDA's caching allocator already reuses blocks, and
    a cache would hold device memory for good). Contents are valid until the same caller's next
    call in the same thread; never return one to a caller."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return _scratch(tuple(shape), dtype, tag, threading.get_ident(), torch.is_inference_mode_enabled())
