"""Prometheus metrics of one kvstream server (or one ``ChunkStore``), in a registry of their own.

Every ``Metrics`` instance owns a fresh ``CollectorRegistry`` so several servers can live in one process
(tests) without colliding on metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kvstore.envelope import Kind

# Request latencies span sub-millisecond lookups to multi-second context streams.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


TRUNCATION_REASONS = ("deadline", "missing_or_corrupt")  # kvstream_streams_truncated_total{reason}
REJECTION_REASONS = ("data_streams", "buffered_puts", "namespace_busy")  # kvstream_rejected_total{reason}


class Metrics:
    """The counters, histograms and gauges kvstream exports (names prefixed ``kvstream_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kvstream_requests", "RPCs by method and final status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "kvstream_request_seconds",
            "RPC latency by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter("kvstream_received_bytes", "Blob bytes received by PutChunks", registry=r)
        self.bytes_out = Counter("kvstream_sent_bytes", "Blob bytes sent by StreamContext", registry=r)
        self.sent_level_bytes = Counter(
            "kvstream_sent_level_bytes",
            "Codec blob bytes sent by StreamContext, by level",
            ["level"],
            registry=r,
        )
        self.lookup_chunks = Counter(
            "kvstream_lookup_chunks",
            "Chunks asked for by lookups: hit (committed) or miss",
            ["result"],
            registry=r,
        )
        self.chunk_reads = Counter(
            "kvstream_chunk_reads",
            "Blob reads on the streaming path: hit, miss or corrupt",
            ["result"],
            registry=r,
        )
        self.hot_cache_reads = Counter(
            "kvstream_hot_cache_reads",
            "Streaming-path blob reads answered by the front end's hot-chunk cache (hit) or storage (miss)",
            ["result"],
            registry=r,
        )
        self.hot_cache_bytes = Gauge(
            "kvstream_hot_cache_bytes",
            "Verified blob bytes held by the front end's hot-chunk cache",
            registry=r,
        )
        self.corrupt_records = Counter(
            "kvstream_corrupt_records",
            "Stored records that failed verification, by record kind",
            ["kind"],
            registry=r,
        )
        self.streams_active = Gauge("kvstream_streams_active", "StreamContext calls in progress", registry=r)
        self.streams_truncated = Counter(
            "kvstream_streams_truncated",
            "Streams that ended short of the announced prefix",
            ["reason"],
            registry=r,
        )
        self.backend_up = Gauge(
            "kvstream_backend_up", "1 while the last backend health probe succeeded, else 0", registry=r
        )
        self.rejected = Counter(
            "kvstream_rejected",
            "Requests refused as UNAVAILABLE because this front end is busy (clients try another), by reason",
            ["reason"],
            registry=r,
        )
        self.store_used_bytes = Gauge("kvstream_store_used_bytes", "Bytes used by the backend", registry=r)
        self.store_keys = Gauge("kvstream_store_keys", "Keys held by the backend", registry=r)
        self.store_evictions = Gauge(
            "kvstream_store_evictions", "Evictions reported by the backend", registry=r
        )
        self.store_partial_read_failures = Gauge(
            "kvstream_store_partial_read_failures",
            "Shard reads that failed or timed out and were served as misses (Redis Cluster)",
            registry=r,
        )
        # Series that alerts compute increase()/rate() over exist from the start at 0: Prometheus takes
        # a series' first sample as its baseline, so a counter born at 1 never shows an increase.
        for kind in Kind:
            self.corrupt_records.labels(kind.name.lower())
        for reason in TRUNCATION_REASONS:
            self.streams_truncated.labels(reason)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> tuple[object, int]:
        """Expose ``/metrics`` on ``addr:port`` (0 = any free port) in a daemon thread.

        Returns ``(http_server, bound_port)``; call ``http_server.shutdown()`` to stop it.
        """
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server, int(server.server_address[1])
