"""Per-chunk quality selection that meets a time-to-first-token SLO.

CacheGen's released scripts split the SLO evenly over chunks (unused slack is lost) and read bandwidth
from a trace; LMCache has no adaptation at all. ``AdaptivePlanner`` instead re-plans the *whole
remaining context* before every chunk from the live throughput estimate and the time actually left:

* the plan is the best "almost uniform" assignment that fits: ``k`` chunks at level ``l`` and the rest at
  the next smaller level, searched from the best quality downwards — quality is spread evenly instead of
  being spent on the first chunks;
* slack is carried forward automatically: a chunk that arrived faster than planned leaves more time for
  the next re-plan;
* when even the smallest level cannot fit, the first chunks switch to *recompute* (prefill from text on
  the inference node), which overlaps with streaming the rest because a context head needs no fetched
  KV; mid-stream, chunks at the end switch to recompute where that beats their transfer; failing that
  the smallest level is used and the miss is reported (``Plan.fits``).

Throughput is an EWMA of per-chunk goodput (bytes / seconds) reported by the client or measured by the
server. Levels are codec levels: 0 is lossless (largest), higher levels are smaller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RECOMPUTE = -1  # pseudo-level: the client prefills the chunk's tokens itself


@dataclass(frozen=True)
class Plan:
    """A full assignment of the remaining chunks; ``levels[0]`` is for the next chunk."""

    levels: tuple[int, ...]
    seconds: float  # predicted time to finish the remaining chunks
    fits: bool  # whether ``seconds`` is within the time left


class AdaptivePlanner:
    """Chooses a level (or ``RECOMPUTE``) for each chunk of a stream in order.

    Args:
        chunk_sizes: per chunk, ``level -> encoded bytes`` for the levels stored.
        slo_seconds: target time from the start of the stream to the last chunk being usable.
        bandwidth_bps: initial throughput estimate in bytes/second (e.g. from the last stream).
        recompute_seconds: per-chunk cost of prefilling it locally (``None``: recompute not offered).
        decode_bytes_per_second: client decode speed in input bytes/s; decode of the last chunk cannot be
            hidden behind the network, so it is reserved from the budget.
        alpha: EWMA weight of the newest throughput sample.
    """

    def __init__(
        self,
        chunk_sizes: Sequence[Mapping[int, int]],
        slo_seconds: float,
        *,
        bandwidth_bps: float,
        recompute_seconds: float | None = None,
        decode_bytes_per_second: float | None = None,
        alpha: float = 0.5,
    ) -> None:
        if slo_seconds <= 0:
            raise ValueError("slo_seconds must be positive")
        if bandwidth_bps <= 0:
            raise ValueError("bandwidth_bps must be positive")
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.chunk_sizes = [dict(s) for s in chunk_sizes]
        if any(not s for s in self.chunk_sizes):
            raise ValueError("every chunk needs at least one stored level")
        self.slo = slo_seconds
        self.bandwidth = float(bandwidth_bps)
        self.recompute_seconds = recompute_seconds
        self.decode_rate = decode_bytes_per_second
        self.alpha = alpha

    def observe(self, nbytes: int, seconds: float) -> None:
        """Feed one measured transfer (a chunk, or a report from the client)."""
        if nbytes > 0 and seconds > 0:
            sample = nbytes / seconds
            self.bandwidth = self.alpha * sample + (1 - self.alpha) * self.bandwidth

    def _cost(self, index: int, level: int) -> float:
        if level == RECOMPUTE:
            assert self.recompute_seconds is not None
            return self.recompute_seconds
        return self.chunk_sizes[index][level] / self.bandwidth

    def _tail_reserve(self, index: int, level: int) -> float:
        if level == RECOMPUTE or not self.decode_rate:
            return 0.0
        return self.chunk_sizes[index][level] / self.decode_rate

    def _at(self, i: int, level: int) -> int:
        """``level`` if chunk ``i`` stores it, else the nearest smaller stored level (or its smallest)."""
        stored = sorted(self.chunk_sizes[i])
        smaller = [lvl for lvl in stored if lvl >= level]
        return smaller[0] if smaller else stored[-1]

    def _network_seconds(self, first: int, levels: Sequence[int]) -> float:
        idx = range(first, first + len(levels))
        secs = sum(self._cost(i, lvl) for i, lvl in zip(idx, levels, strict=True) if lvl != RECOMPUTE)
        return secs + (self._tail_reserve(idx[-1], levels[-1]) if levels else 0.0)

    def _uniform(self, first: int, time_left: float) -> list[int] | None:
        """Best almost-uniform plan for chunks ``first..`` within ``time_left``, or None."""
        idx = range(first, len(self.chunk_sizes))
        all_levels = sorted({lvl for i in idx for lvl in self.chunk_sizes[i]})
        n = len(idx)
        for pos, level in enumerate(all_levels):
            worse = all_levels[min(pos + 1, len(all_levels) - 1)]
            # k chunks at `level`, the rest at the next smaller level; k = n first (best quality).
            for k in range(n, -1, -1):
                levels = [self._at(i, level if j < k else worse) for j, i in enumerate(idx)]
                if self._network_seconds(first, levels) <= time_left:
                    return levels
                if worse == level:
                    break
        return None

    def plan(self, start: int, time_left: float, head_recompute: bool | None = None) -> Plan:
        """Best plan for chunks ``start..`` given ``time_left`` seconds.

        Order of preference: (1) an almost-uniform level assignment that fits; (2) recompute the first
        ``r`` chunks on the inference node *while* the rest stream (prefill of a context head needs no
        fetched KV, so the two overlap) — only possible at the start of a stream (``head_recompute``,
        default ``start == 0``); (3) recompute chunks from the end, serially after the stream, where that
        is faster than their transfer; (4) the smallest levels, reported as not fitting.
        """
        n = len(self.chunk_sizes) - start
        if n <= 0:
            return Plan((), 0.0, True)
        if (levels := self._uniform(start, time_left)) is not None:
            return Plan(tuple(levels), self._network_seconds(start, levels), True)
        rc = self.recompute_seconds
        if rc is not None and (start == 0 if head_recompute is None else head_recompute):
            for r in range(1, n):
                if r * rc > time_left:
                    break
                if (rest := self._uniform(start + r, time_left)) is not None:
                    secs = max(r * rc, self._network_seconds(start + r, rest))
                    return Plan((RECOMPUTE,) * r + tuple(rest), secs, True)
            if n * rc <= time_left:
                return Plan((RECOMPUTE,) * n, n * rc, True)
        smallest = [self._at(i, max(self.chunk_sizes[i])) for i in range(start, start + n)]
        secs = self._network_seconds(start, smallest)
        if rc is not None:
            for j in range(n - 1, -1, -1):
                saved = self._cost(start + j, smallest[j]) - rc
                if saved <= 0:
                    continue
                smallest[j] = RECOMPUTE
                secs -= saved
                if secs <= time_left:
                    break
        return Plan(tuple(smallest), secs, secs <= time_left)

    def choose(self, index: int, elapsed_seconds: float) -> int:
        """Level (or ``RECOMPUTE``) for chunk ``index``, ``elapsed_seconds`` after the stream started."""
        return self.plan(index, self.slo - elapsed_seconds).levels[0]
