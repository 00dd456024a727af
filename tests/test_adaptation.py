"""The SLO planner: best quality that fits, slack carried forward, recompute when nothing fits."""

from __future__ import annotations

import time

import pytest

from client.adaptation import RECOMPUTE, AdaptivePlanner
from kvstore.rpc import pb
from kvstore.server import AdaptiveLevelPolicy

SIZES = [{0: 1000, 1: 400, 2: 250, 3: 150, 4: 100}] * 10


def test_picks_the_best_level_that_fits() -> None:
    plan = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2500).plan(0, 1.0)
    assert plan.fits and set(plan.levels) == {2}
    plan = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=1e6).plan(0, 1.0)
    assert set(plan.levels) == {0}


def test_mixed_plan_uses_the_budget_between_two_levels() -> None:
    # 10 chunks at level 2 need 2500 B; give 2000 B worth of time -> a mix of levels 2 and 3.
    plan = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2000).plan(0, 1.0)
    assert plan.fits and set(plan.levels) == {2, 3} and plan.seconds <= 1.0
    assert list(plan.levels) == sorted(plan.levels)  # better quality first, then one step down


def test_slack_is_carried_forward() -> None:
    p = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2500)
    assert p.choose(5, elapsed_seconds=0.5) == 2  # on schedule
    assert p.choose(5, elapsed_seconds=0.1) < 2  # ahead of schedule: spend the slack on quality


def test_unmeasurable_samples_are_ignored() -> None:
    p = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2500)
    for nbytes, seconds in [(100, float("inf")), (100, 0.0), (0, 1.0), (10**300, 1e-300)]:
        p.observe(nbytes, seconds)
    p.observe_decode(float("inf"))
    assert p.bandwidth == 2500 and p.decode_seconds is None
    assert p.plan(0, 1.0).fits


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slo_seconds": float("nan")},
        {"slo_seconds": float("inf")},
        {"bandwidth_bps": float("nan")},
        {"bandwidth_floor_bps": float("inf")},
        {"decode_seconds": float("nan")},
        {"recompute_seconds": -1.0},
    ],
)
def test_bad_planner_inputs_are_refused(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {"slo_seconds": 1.0, "bandwidth_bps": 2500.0, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AdaptivePlanner(SIZES, **args)  # type: ignore[arg-type]


def test_choose_past_the_last_chunk_says_so() -> None:
    with pytest.raises(IndexError, match="chunk 10 is not in this plan's 10 chunks"):
        AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2500).choose(10, 0.0)


def test_bandwidth_drop_steps_quality_down() -> None:
    p = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2500)
    before = p.choose(3, elapsed_seconds=0.3)
    for _ in range(3):
        p.observe(100, 0.2)  # 500 B/s measured
    assert p.bandwidth < 1000
    assert p.choose(3, elapsed_seconds=0.3) > before or p.choose(3, 0.3) == RECOMPUTE


def test_plans_are_discounted_by_the_largest_recent_prediction_error() -> None:
    # A burst (a shaper's bucket) makes one sample 3x the link; the next, true, sample falls short.
    p = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2500, bandwidth_weight=4)
    assert p.planning_bandwidth == 2500  # no sample, no error yet
    p.observe(750, 0.1)  # 7500 B/s against an estimate of 2500: error |2500 / 7500 - 1| = 2/3
    assert p.bandwidth > 2500 and p.planning_bandwidth == pytest.approx(p.bandwidth / (1 + 2 / 3))
    optimistic = p.bandwidth
    p.observe(250, 0.1)  # 2500 B/s: over-predicted by optimistic / 2500 - 1 (< 2/3, the larger one stays)
    assert 0 < optimistic / 2500 - 1 < 2 / 3
    assert p.planning_bandwidth == pytest.approx(p.bandwidth / (1 + 2 / 3))
    assert p.planning_bandwidth < 2500 < p.bandwidth
    assert p.choose(0, 0.0) >= AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2500).choose(0, 0.0)
    for _ in range(10):  # steady samples age the burst out of the window, then its errors
        p.observe(250, 0.1)
    assert p.planning_bandwidth == pytest.approx(2500)


def test_head_recompute_overlaps_streaming_when_nothing_fits() -> None:
    plan = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=500, recompute_seconds=0.15).plan(0, 1.0)
    assert plan.fits
    r = plan.levels.count(RECOMPUTE)
    assert r > 0 and plan.levels[:r] == (RECOMPUTE,) * r and set(plan.levels[r:]) == {4}


def test_without_recompute_reports_the_miss() -> None:
    plan = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=100).plan(0, 1.0)
    assert not plan.fits and set(plan.levels) == {4}


def test_missing_levels_fall_back_to_a_smaller_stored_level() -> None:
    sizes = [{0: 1000, 3: 150}] * 4
    plan = AdaptivePlanner(sizes, 1.0, bandwidth_bps=1000).plan(0, 1.0)
    assert set(plan.levels) <= {0, 3} and plan.fits


def test_a_large_chunk_is_bet_only_if_the_slo_survives_the_floor_rate() -> None:
    # 10 chunks, 1.0 s: at 10 kB/s all lossless fits (uniform plan); the client saw 1 kB/s recently, and
    # at that rate a lossless chunk (1 s) plus nine smallest ones (0.9 s) would not.
    trusting = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=10_000, bandwidth_weight=4)
    assert trusting.floor_bandwidth == 10_000 and trusting.plan(0, 1.0).levels[0] == 0
    hedged = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=10_000, bandwidth_weight=4, bandwidth_floor_bps=1000)
    plan = hedged.plan(0, 1.0)
    assert hedged.floor_bandwidth == 1000 and plan.fits
    # The first chunk is stepped down to what the floor allows (0.1 s left: 100 B, level 4); the rest of
    # the plan is unchanged and is re-decided chunk by chunk as samples come in.
    assert plan.levels[0] == 4 and set(plan.levels[1:]) == {0}
    # Banked slack buys quality: 0.3 s more and the next chunk may be 400 B even at the floor.
    assert hedged.plan(0, 1.0 + 0.3).levels[0] == 1
    # A floor sample of this stream counts too, and steady fast samples do not erase it from the window.
    p = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=10_000, bandwidth_weight=4)
    p.observe(100, 0.1)
    assert p.floor_bandwidth <= 1000


def test_a_quality_cap_recomputes_or_misses_instead_of_going_coarser() -> None:
    # 10 chunks in 1 s at 2000 B/s: uncapped, a mix of levels 2 and 3 fits.
    assert set(AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2000).plan(0, 1.0).levels) == {2, 3}
    capped = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2000, max_level=1).plan(0, 1.0)
    assert not capped.fits and set(capped.levels) == {1}  # at the cap, the miss reported
    plan = AdaptivePlanner(SIZES, 1.0, bandwidth_bps=2000, max_level=1, recompute_seconds=0.15).plan(0, 1.0)
    r = plan.levels.count(RECOMPUTE)
    assert plan.fits and r > 0 and plan.levels[:r] == (RECOMPUTE,) * r and set(plan.levels[r:]) <= {0, 1}
    # With time to spare the cap changes nothing; a chunk with no level within it keeps its finest one.
    assert set(AdaptivePlanner(SIZES, 1.0, bandwidth_bps=1e6, max_level=1).plan(0, 1.0).levels) == {0}
    sizes = [{0: 1000, 1: 400}, {3: 150, 4: 100}]
    assert AdaptivePlanner(sizes, 1.0, bandwidth_bps=1e6, max_level=2).plan(0, 1.0).levels == (0, 3)


def test_recompute_markers_after_the_head_are_owed_from_the_time_left() -> None:
    # Such markers are prefilled after the stream, one by one: a later re-plan must not spend that time.
    chunks = [
        pb.ChunkInfo(
            index=i,
            token_start=64 * i,
            token_end=64 * (i + 1),
            levels=[pb.LevelInfo(level=lv, size_bytes=n) for lv, n in SIZES[0].items()],
        )
        for i in range(10)
    ]
    for start_chunk, owed in ((0, 0.0), (1, 0.2)):  # 640 tokens/s: 0.1 s per 64-token chunk
        start = pb.StreamStart(
            start_chunk=start_chunk, slo_ms=1000, recompute_tokens_per_second=640, bandwidth_hint_bps=2500
        )
        policy = AdaptiveLevelPolicy(chunks[start_chunk:], start, started=time.perf_counter())
        before = policy._time_left()
        policy.sent(chunks[start_chunk], RECOMPUTE, 0, 0.0)  # a head marker only at the stream's start
        policy.sent(chunks[start_chunk + 1], RECOMPUTE, 0, 0.0)
        assert before - policy._time_left() == pytest.approx(owed, abs=0.01)


@pytest.mark.parametrize(
    "kwargs", [{"slo_seconds": 0}, {"bandwidth_bps": 0}, {"bandwidth_weight": 0}, {"bandwidth_floor_bps": 0}]
)
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {"slo_seconds": 1.0, "bandwidth_bps": 1.0, **kwargs}
    slo = args.pop("slo_seconds")
    with pytest.raises(ValueError):
        AdaptivePlanner(SIZES, slo, **args)  # type: ignore[arg-type]
