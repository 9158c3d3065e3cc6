"""Reference-free calibration search, Q-Sched style (quant.md §1.5, §5.3).

Candidates are the released search space — two ramp start values (c_x, c_F), each going linearly
to 1 over the pass. Coarse-to-fine: a ``points × points`` grid of half-width `half_width` around
1, then grids at half the spacing around the best so far. `evaluate` must score every candidate on
the *same* samples (common random numbers), so score differences are not seed noise. The identity
(1, 1) is always evaluated; the winner must beat it by more than 2 standard errors of the paired
per-sample differences to count. `SearchLog` makes the search resumable.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .coeffs import CoefficientSet, metadata_value
from .precondition import BAND


def _mean(v: Sequence[float]) -> float:
    return sum(v) / max(1, len(v))


# -- (a) reference-free search --------------------------------------------------------------
def ramp_knots(c_x0: float, c_f0: float, sigmas: Sequence[float]) -> CoefficientSet:
    """The ramp (start → 1 over the n evaluated σ of `sigmas`, n + 1 entries) as knots."""
    s = [float(v) for v in sigmas if v > 0]
    n = len(s)
    p = torch.tensor([i / (n - 1) if n > 1 else 1.0 for i in range(n)], dtype=torch.float64)
    cx = (c_x0 + (1 - c_x0) * p).float()
    cf = (c_f0 + (1 - c_f0) * p).float()
    return CoefficientSet(torch.tensor(s, dtype=torch.float32).flip(0), cx.flip(0), cf.flip(0))


@dataclass
class SearchResult:
    best: tuple[float, float]
    best_score: float
    baseline_score: float
    gain: float
    gain_se: float
    significant: bool
    evaluated: dict = field(default_factory=dict)  # (c_x, c_F) -> per-sample scores


class SearchLog:
    """Resumable JSONL log: a config line, then one line per evaluated candidate."""

    def __init__(self, path: str | Path | None, config: dict):
        self.path = Path(path) if path else None
        self.config = json.loads(json.dumps(config))
        self.done: dict[tuple[float, float], list[float]] = {}
        if self.path is None:
            return
        if self.path.exists() and self.path.stat().st_size:
            lines = [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x.strip()]
            head = lines[0] if lines else {}
            if head.get("type") != "config" or head.get("config") != self.config:
                old = head.get("config") or {}
                diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
                raise ValueError(f"QSilk: log {self.path} belongs to another calibration (differs in: "
                                 f"{', '.join(diff) or 'format'}); use another --log or delete it")
            for rec in lines[1:]:
                if rec.get("type") == "candidate":
                    self.done[_key(rec["c_x"], rec["c_f"])] = rec["scores"]
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write({"type": "config", "config": self.config})

    def add(self, c_x: float, c_f: float, scores: list[float], level: int) -> None:
        self.done[_key(c_x, c_f)] = scores
        self._write({"type": "candidate", "level": level, "c_x": c_x, "c_f": c_f,
                     "score": _mean(scores), "scores": scores})

    def finish(self, result: SearchResult) -> None:
        self._write({"type": "result", "best": list(result.best), "best_score": result.best_score,
                     "baseline_score": result.baseline_score, "gain": result.gain,
                     "gain_se": result.gain_se, "significant": result.significant})

    def _write(self, rec: dict) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")


def _key(c_x: float, c_f: float) -> tuple[float, float]:
    return (round(float(c_x), 6), round(float(c_f), 6))


def grid(center: tuple[float, float], half_width: float, points: int) -> list[tuple[float, float]]:
    """``points × points`` candidates around `center`, clipped to the band, rounded to 1e-6.

    >>> grid((1.0, 1.0), 0.1, 3)[:4]
    [(0.9, 0.9), (0.9, 1.0), (0.9, 1.1), (1.0, 0.9)]
    """
    offs = [0.0] if points <= 1 else [half_width * (2 * i / (points - 1) - 1) for i in range(points)]
    out = []
    for dx in offs:
        for df in offs:
            c = _key(min(BAND[1], max(BAND[0], center[0] + dx)), min(BAND[1], max(BAND[0], center[1] + df)))
            if c not in out:
                out.append(c)
    return out


def search(evaluate: Callable[[float, float], Sequence[float]], *, half_width: float = 0.1, points: int = 5,
           levels: int = 2, log: SearchLog | None = None, progress: "Progress | None" = None) -> SearchResult:
    """Coarse-to-fine search for the ramp start values maximising the mean score.

    `evaluate(c_x, c_F)` returns one score per calibration sample, on the same samples (seeds)
    for every candidate. Ties go to the candidate closest to the identity, then the smallest.
    """
    log = log or SearchLog(None, {})
    scores: dict[tuple[float, float], list[float]] = {}

    def visit(c: tuple[float, float], level: int) -> None:
        if c in scores:
            return
        if c in log.done:
            scores[c] = list(log.done[c])
        else:
            scores[c] = [float(v) for v in evaluate(*c)]
            log.add(c[0], c[1], scores[c], level)
        if progress is not None:
            progress.advance()

    def best() -> tuple[float, float]:
        return max(scores, key=lambda c: (_mean(scores[c]), -abs(c[0] - 1) - abs(c[1] - 1), -c[0], -c[1]))

    identity = (1.0, 1.0)
    visit(identity, 0)
    center, hw = identity, half_width
    for level in range(levels):
        for c in grid(center, hw, points):
            visit(c, level)
        center = best()
        hw = hw / 2
    win = best()
    d = torch.tensor(scores[win], dtype=torch.float64) - torch.tensor(scores[identity], dtype=torch.float64)
    gain = float(d.mean())
    se = float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")
    significant = win != identity and gain > 0 and (gain > 2 * se if math.isfinite(se) else True)
    result = SearchResult(win, _mean(scores[win]), _mean(scores[identity]), gain, se, significant, scores)
    log.finish(result)
    return result


def search_budget(points: int, levels: int) -> int:
    """Upper bound on candidates evaluated (grids overlap in practice)."""
    return 1 + levels * points * points


class Progress:
    """A text progress bar on stderr (a line every 10 % when not a terminal)."""

    def __init__(self, total: int, label: str, stream=None, width: int = 30):
        self.total, self.label, self.width = max(1, total), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.n, self.t0, self._last = 0, time.perf_counter(), -1
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def advance(self, k: int = 1) -> None:
        self.n = min(self.total, self.n + k)
        frac = self.n / self.total
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        line = f"{self.label} [{bar}] {self.n}/{self.total} eta {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.n == self.total else ""))
        elif int(frac * 10) != self._last:
            self._last = int(frac * 10)
            self.stream.write(line + "\n")
        self.stream.flush()


def search_coefficients(result: SearchResult, sigmas: Sequence[float], metadata: dict) -> CoefficientSet:
    """The winning ramp as knots at the calibration schedule's σ, with the scores in the metadata."""
    cs = ramp_knots(result.best[0], result.best[1], sigmas)
    meta = {**metadata, "method": "search", "best_score": result.best_score,
            "baseline_score": result.baseline_score, "significant": str(result.significant).lower(),
            "ramp_start": f"c_x={result.best[0]:g} c_F={result.best[1]:g}"}
    return CoefficientSet(cs.sigmas, cs.c_x, cs.c_f, {k: metadata_value(v) for k, v in meta.items()})
