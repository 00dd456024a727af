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

Throughput is the harmonic mean of recent per-chunk goodput samples (bytes / seconds) reported by the
client or measured by the server, and plans use it discounted by the largest recent prediction error
(``planning_bandwidth``, as RobustMPC does for video bitrate): a token-bucket shaper that lets bursts
through makes the mean run ahead of the link, and a plan that trusts it misses the SLO by the
difference. Errors count both ways: a burst that beats the estimate is the same noise that later
falls short of it, and it shows first. One more hedge bounds a single bad bet: the next chunk's level
must leave the SLO reachable even if the link falls to the slowest rate seen recently
(``floor_bandwidth``, this stream's samples and the client's earlier ones) for that chunk and all the
rest at their smallest level. On a steady link the floor is the rate and this never binds; on a link
that swings 20x between slots it keeps the SLO a promise and spends only slack already banked.
Levels are codec levels: 0 is lossless (largest), higher levels are smaller.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client.model.llama2c import Llama2c

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
        decode_seconds: client decode time of one chunk (it hardly depends on the level: the work is per
            token). Decode of the last chunk cannot be hidden behind the network, so it is reserved from
            the budget, and when decoding is slower than the network it paces the pipelined stream.
        window: how many recent throughput samples the estimate is the harmonic mean of.
        bandwidth_weight: how many of those samples ``bandwidth_bps`` counts as at the start (a
            measured estimate from earlier streams deserves more trust than a default).
        bandwidth_floor_bps: the slowest throughput the client saw on earlier streams (bytes/s), if known.
        max_level: the coarsest level the caller accepts (``None``: any stored level). Levels above it are
            never planned: when the finer ones cannot meet the SLO, chunks are recomputed instead (if
            ``recompute_seconds`` is given) or the SLO is missed (``Plan.fits`` false), never met by
            handing out KV the caller considers too lossy. A chunk storing no level within the cap
            keeps its finest stored level (the closest to it).
    """

    def __init__(
        self,
        chunk_sizes: Sequence[Mapping[int, int]],
        slo_seconds: float,
        *,
        bandwidth_bps: float,
        recompute_seconds: float | None = None,
        decode_seconds: float | None = None,
        window: int = 5,
        bandwidth_weight: int = 1,
        bandwidth_floor_bps: float | None = None,
        max_level: int | None = None,
    ) -> None:
        if not 0 < slo_seconds < math.inf:
            raise ValueError("slo_seconds must be positive and finite")
        if not 0 < bandwidth_bps < math.inf:
            raise ValueError("bandwidth_bps must be positive and finite")
        for arg, seconds in (("recompute_seconds", recompute_seconds), ("decode_seconds", decode_seconds)):
            if seconds is not None and not 0 <= seconds < math.inf:
                raise ValueError(f"{arg} must be finite and >= 0")
        if not 1 <= bandwidth_weight <= window:
            raise ValueError("need 1 <= bandwidth_weight <= window")
        if bandwidth_floor_bps is not None and not 0 < bandwidth_floor_bps < math.inf:
            raise ValueError("bandwidth_floor_bps must be positive and finite")
        if any(not s for s in chunk_sizes):
            raise ValueError("every chunk needs at least one stored level")
        self.chunk_sizes = [_within(s, max_level) for s in chunk_sizes]
        self.slo = slo_seconds
        self.bandwidth = float(bandwidth_bps)
        self._prior_floor = bandwidth_floor_bps or float(bandwidth_bps)
        self.recompute_seconds = recompute_seconds
        self.decode_seconds = decode_seconds
        self._samples: deque[float] = deque([float(bandwidth_bps)] * bandwidth_weight, maxlen=window)
        self._errors: deque[float] = deque(maxlen=window)  # relative prediction errors of recent samples
        self._decodes: deque[float] = deque([decode_seconds] if decode_seconds else [], maxlen=window)

    def observe(self, nbytes: int, seconds: float) -> None:
        """Feed one measured transfer (a chunk, or a report from the client).

        The estimate is the harmonic mean of the last ``window`` samples: low samples dominate it, so it
        drops at once with the link but rises only when fast samples persist. Short samples err upwards
        (a stall on the receiver delays one arrival and makes the next one look fast; a shaper lets the
        first tens of kilobytes after an idle pause through at line rate), and a too-high estimate
        misses the SLO where a too-low one only costs a notch of quality.
        """
        sample = nbytes / seconds if nbytes > 0 and seconds > 0 else 0.0
        if 0 < sample < math.inf:  # an underflowed or infinite rate is no measurement
            self._errors.append(abs(self.bandwidth / sample - 1.0))
            self._samples.append(sample)
            self.bandwidth = len(self._samples) / sum(1 / s for s in self._samples)

    @property
    def planning_bandwidth(self) -> float:
        """The estimate discounted by the largest recent prediction error (bytes/s): what plans assume."""
        return self.bandwidth / (1.0 + max(self._errors, default=0.0))

    @property
    def floor_bandwidth(self) -> float:
        """The slowest recent throughput (bytes/s): samples, ``planning_bandwidth`` and the client's floor
        (without one, the first estimate ``bandwidth_bps``, for the whole stream)."""
        return min(self.planning_bandwidth, self._prior_floor, *self._samples)

    def observe_decode(self, seconds: float) -> None:
        """Feed one measured client decode time of a chunk."""
        if 0 < seconds < math.inf:
            self._decodes.append(seconds)
            self.decode_seconds = statistics.median(self._decodes)  # one slow decode (a JIT, a GC) is noise

    def _cost(self, index: int, level: int, bandwidth: float | None = None) -> float:
        if level == RECOMPUTE:
            assert self.recompute_seconds is not None
            return self.recompute_seconds
        # Chunk i decodes while chunk i+1 is on the wire: the slower of the two stages sets the pace.
        rate = bandwidth or self.planning_bandwidth
        return max(self.chunk_sizes[index][level] / rate, self.decode_seconds or 0.0)

    def _tail_reserve(self, level: int) -> float:
        return 0.0 if level == RECOMPUTE else self.decode_seconds or 0.0

    def _at(self, i: int, level: int) -> int:
        """``level`` if chunk ``i`` stores it, else the nearest smaller stored level (or its smallest)."""
        stored = sorted(self.chunk_sizes[i])
        smaller = [lvl for lvl in stored if lvl >= level]
        return smaller[0] if smaller else stored[-1]

    def _network_seconds(self, first: int, levels: Sequence[int], bandwidth: float | None = None) -> float:
        """Predicted seconds for chunks ``first..`` at ``levels`` (``bandwidth`` default: planning)."""
        idx = range(first, first + len(levels))
        pairs = zip(idx, levels, strict=True)
        secs = sum(self._cost(i, lvl, bandwidth) for i, lvl in pairs if lvl != RECOMPUTE)
        return secs + (self._tail_reserve(levels[-1]) if levels else 0.0)

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

    def _hedged(self, first: int, levels: list[int], time_left: float) -> list[int]:
        """``levels`` with the first chunk stepped down until it is a bet the rest can pay back.

        Holds when chunk ``first`` and every later chunk at its smallest level fit ``time_left`` at
        ``floor_bandwidth``; never steps below the smallest stored level.
        """
        floor = self.floor_bandwidth
        rest = [self._at(i, max(self.chunk_sizes[i])) for i in range(first + 1, first + len(levels))]
        stored = sorted(lvl for lvl in self.chunk_sizes[first] if lvl >= levels[0])
        for level in stored:
            if self._network_seconds(first, [level, *rest], floor) <= time_left:
                return [level, *levels[1:]]
        return [stored[-1], *levels[1:]]

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
            levels = self._hedged(start, levels, time_left)
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
        if not 0 <= index < len(self.chunk_sizes):
            raise IndexError(f"chunk {index} is not in this plan's {len(self.chunk_sizes)} chunks")
        return self.plan(index, self.slo - elapsed_seconds).levels[0]


def _within(sizes: Mapping[int, int], max_level: int | None) -> dict[int, int]:
    """``sizes`` restricted to levels ``<= max_level``; the finest stored level if none is."""
    if max_level is None:
        return dict(sizes)
    allowed = {lvl: n for lvl, n in sizes.items() if lvl <= max_level}
    finest = min(sizes)
    return allowed or {finest: sizes[finest]}


def measure_prefill_tokens_per_second(model: Llama2c, tokens: int | None = None, repeats: int = 3) -> float:
    """Local recompute speed of a llama2.c ``model``: prefill tokens per second (median of ``repeats``).

    Prefills ``tokens`` ids (default: the model's context length) from an empty cache, i.e. the work a
    recompute marker of that many tokens costs; pass the result as
    ``fetch(..., recompute_tokens_per_second=...)``. One untimed warm-up run comes first.
    """
    n = min(tokens or model.config.seq_len, model.config.seq_len)
    if n < 1 or repeats < 1:
        raise ValueError("tokens and repeats must be >= 1")
    ids = [(7 * i + 1) % model.config.vocab_size for i in range(n)]  # speed does not depend on the ids
    model.forward(ids)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.forward(ids)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)
