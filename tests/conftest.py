"""Shared fixtures: real Redis servers (single node and cluster) and the test model's path.

Redis fixtures skip when ``redis-server`` is not installed, unless ``KVSTREAM_REQUIRE_REDIS=1`` (CI),
in which case they fail. Servers are session-scoped: tests must use their own key names or clean up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

# Triton reads TRITON_INTERPRET when its modules are first imported, and other tests (transformers,
# torch) may import it before the kernel tests run: set it before anything else. This machine and CI
# have no GPU, so every Triton kernel runs in the interpreter against its torch twin.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from deploy.redis_cluster import LocalCluster, RedisProcess, redis_server_path, start_cluster, start_server


@pytest.fixture(scope="session")
def redis_bin() -> str:
    """Path of ``redis-server``; skips without one (fails instead if ``KVSTREAM_REQUIRE_REDIS=1``)."""
    path = redis_server_path()
    if path is None:
        reason = "redis-server not on PATH (apt-get install redis-server)"
        if os.environ.get("KVSTREAM_REQUIRE_REDIS") == "1":
            pytest.fail(f"KVSTREAM_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def redis_server(redis_bin: str) -> Iterator[RedisProcess]:
    """One ``redis-server`` (``volatile-lru``, 256 MiB) for the whole session."""
    srv = start_server(maxmemory="256mb")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisProcess) -> str:
    """``redis://127.0.0.1:PORT/0`` of the session server."""
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(redis_bin: str) -> Iterator[LocalCluster]:
    """A 3-primary + 3-replica Redis Cluster on loopback for the whole session."""
    cluster = start_cluster(3, 1, maxmemory="256mb")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: LocalCluster) -> str:
    """``redis+cluster://127.0.0.1:P1,...`` of the session cluster."""
    return redis_cluster.url


@pytest.fixture(scope="session")
def model_path() -> Path:
    """Path of ``stories260K.bin`` (``$KVSTREAM_MODEL`` or ../shared/models); skips if absent."""
    from client.model.llama2c import default_model_path

    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"test model not found at {path} (set KVSTREAM_MODEL)")
    return path
