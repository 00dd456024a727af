"""``kvctl top``: a live view of one server computed from its Prometheus ``/metrics`` endpoint.

Totals come from one scrape; rates (requests/s per method, bytes served/s, chunk lookups/s) from the
difference of two consecutive scrapes divided by the time between them. ``--once --json`` prints one
snapshot (two scrapes ``--interval`` apart, or one without rates when ``--interval 0``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

DEFAULT_METRICS_URL = "http://127.0.0.1:9464/metrics"


@dataclass(frozen=True)
class Scrape:
    """Samples of one scrape: ``samples[name][labels] = value`` (labels as sorted tuples of pairs)."""

    at: float  # time.monotonic() of the scrape
    samples: Mapping[str, Mapping[tuple[tuple[str, str], ...], float]]

    def total(self, name: str, **match: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``match``."""
        return sum(
            v for labels, v in self.samples.get(name, {}).items() if match.items() <= dict(labels).items()
        )

    def by(self, name: str, label: str) -> dict[str, float]:
        """Samples of ``name`` summed per value of ``label``."""
        out: dict[str, float] = defaultdict(float)
        for labels, v in self.samples.get(name, {}).items():
            out[dict(labels).get(label, "")] += v
        return dict(out)


def parse_metrics(text: str, at: float = 0.0) -> Scrape:
    """Parse Prometheus text exposition format."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name][tuple(sorted(s.labels.items()))] = float(s.value)
    return Scrape(at, dict(samples))


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    """GET ``url`` and parse it; raises ``OSError`` (``urllib.error.URLError``) when unreachable."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - operator-given URL
        text = resp.read().decode("utf-8")
    return parse_metrics(text, time.monotonic())


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def snapshot(cur: Scrape, prev: Scrape | None = None) -> dict[str, Any]:
    """The figures ``top`` shows; ``rates`` is None without a previous scrape."""
    lookups = cur.by("kvstream_lookup_chunks_total", "result")
    reads = cur.by("kvstream_chunk_reads_total", "result")
    hot = cur.by("kvstream_hot_cache_reads_total", "result")
    level_bytes = cur.by("kvstream_sent_level_bytes_total", "level")
    served = sum(level_bytes.values())
    requests = cur.by("kvstream_requests_total", "method")
    errors = sum(v for k, v in cur.by("kvstream_requests_total", "code").items() if k != "OK")
    out: dict[str, Any] = {
        "lookup_hit_rate": _ratio(lookups.get("hit", 0.0), sum(lookups.values())),
        "read_hit_rate": _ratio(reads.get("hit", 0.0), sum(reads.values())),
        "hot_cache_hit_rate": _ratio(hot.get("hit", 0.0), sum(hot.values())),
        "hot_cache_bytes": int(cur.total("kvstream_hot_cache_bytes")),
        "bytes_served": int(cur.total("kvstream_sent_bytes_total")),
        "bytes_received": int(cur.total("kvstream_received_bytes_total")),
        "level_mix": {
            lv: _ratio(n, served) for lv, n in sorted(level_bytes.items(), key=lambda x: int(x[0]))
        },
        "level_bytes": {lv: int(n) for lv, n in sorted(level_bytes.items(), key=lambda x: int(x[0]))},
        "evictions": int(cur.total("kvstream_store_evictions")),
        "used_bytes": int(cur.total("kvstream_store_used_bytes")),
        "keys": int(cur.total("kvstream_store_keys")),
        "streams_active": int(cur.total("kvstream_streams_active")),
        "streams_truncated": int(cur.total("kvstream_streams_truncated_total")),
        "corrupt_records": int(cur.total("kvstream_corrupt_records_total")),
        "requests": {m: int(n) for m, n in sorted(requests.items())},
        "errors": int(errors),
        "rates": None,
    }
    if prev is not None and cur.at > prev.at:
        dt = cur.at - prev.at
        before = prev.by("kvstream_requests_total", "method")
        out["rates"] = {
            "seconds": round(dt, 3),
            "requests_per_s": {
                m: round((n - before.get(m, 0.0)) / dt, 3) for m, n in sorted(requests.items())
            },
            "bytes_served_per_s": round(
                (cur.total("kvstream_sent_bytes_total") - prev.total("kvstream_sent_bytes_total")) / dt, 1
            ),
            "lookup_chunks_per_s": round(
                (sum(lookups.values()) - sum(prev.by("kvstream_lookup_chunks_total", "result").values()))
                / dt,
                3,
            ),
        }
    return out


def render(snap: dict[str, Any], url: str) -> Any:
    """A rich renderable of one snapshot."""
    from rich.table import Table

    from kvstore.kvctl import _human_bytes

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    rates = snap["rates"] or {}
    summary = Table(title=f"kvstream top — {url}", show_header=False)
    summary.add_column("field")
    summary.add_column("value")
    for k, v in (
        ("lookup hit rate (chunks)", pct(snap["lookup_hit_rate"])),
        ("read hit rate (blobs)", pct(snap["read_hit_rate"])),
        (
            "hot-chunk cache (hits, held)",
            f"{pct(snap['hot_cache_hit_rate'])}, {_human_bytes(snap['hot_cache_bytes'])}",
        ),
        ("bytes served", _human_bytes(snap["bytes_served"])),
        ("bytes served / s", _human_bytes(rates["bytes_served_per_s"]) + "/s" if rates else "-"),
        ("bytes received", _human_bytes(snap["bytes_received"])),
        (
            "level mix (served bytes)",
            " ".join(f"L{lv}:{pct(x)}" for lv, x in snap["level_mix"].items()) or "-",
        ),
        ("evictions", str(snap["evictions"])),
        ("store used", f"{_human_bytes(snap['used_bytes'])} in {snap['keys']} keys"),
        ("streams active / truncated", f"{snap['streams_active']} / {snap['streams_truncated']}"),
        ("corrupt records", str(snap["corrupt_records"])),
        ("errors (non-OK RPCs)", str(snap["errors"])),
    ):
        summary.add_row(k, v)
    per_method = Table(title="requests")
    for col in ("method", "total", "per s"):
        per_method.add_column(col)
    for method, n in snap["requests"].items():
        rate = rates.get("requests_per_s", {}).get(method) if rates else None
        per_method.add_row(method, str(n), "-" if rate is None else f"{rate:.1f}")
    from rich.console import Group

    return Group(summary, per_method)


def cmd_top(args: argparse.Namespace, client: Any) -> None:
    from rich.console import Console
    from rich.live import Live

    from client import KVStreamError
    from kvstore.kvctl import UsageError

    if args.interval < 0 or (args.iterations is not None and args.iterations < 1):
        raise UsageError("--interval must be >= 0 and --iterations >= 1")

    def take() -> Scrape:
        try:
            return scrape(args.metrics_url, args.timeout)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise KVStreamError(
                grpc.StatusCode.UNAVAILABLE, f"cannot scrape {args.metrics_url}: {reason}"
            ) from None

    prev = take()
    if args.once:
        cur = None
        if args.interval > 0:
            time.sleep(args.interval)
            cur = take()
        snap = snapshot(cur, prev) if cur is not None else snapshot(prev)
        if args.json:
            print(json.dumps(snap, sort_keys=True))
        else:
            Console(width=120).print(render(snap, args.metrics_url))
        return
    if args.json:
        raise UsageError("--json needs --once (the live view is for humans)")
    count = 0
    with Live(render(snapshot(prev), args.metrics_url), auto_refresh=False) as live:
        try:
            while args.iterations is None or count < args.iterations:
                time.sleep(args.interval)
                cur = take()
                live.update(render(snapshot(cur, prev), args.metrics_url), refresh=True)
                prev, count = cur, count + 1
        except KeyboardInterrupt:
            pass


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``top`` on kvctl's subparsers."""
    p = sub.add_parser("top", parents=[common], help="live hit rate, bytes served, level mix, request rates")
    p.add_argument(
        "--metrics-url",
        default=os.environ.get("KVSTREAM_METRICS_URL", DEFAULT_METRICS_URL),
        help=f"the server's Prometheus endpoint (env KVSTREAM_METRICS_URL; default {DEFAULT_METRICS_URL})",
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--iterations", type=int, help="stop after N refreshes (default: until Ctrl-C)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.set_defaults(fn=cmd_top, needs_client=False)  # reads /metrics only: no gRPC channel
