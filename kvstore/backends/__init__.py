"""Storage backends and the ``open_backend(url)`` factory.

URLs:

* ``embedded:///path/to/dir?capacity=10GiB`` or a plain path: LMDB on local disk (the default).
* ``memory://?capacity=1GiB``: in-process dict, lost on exit (tests, demos).
* ``redis://[user:pass@]host:port/db?socket_timeout=5`` (``rediss://`` for TLS): one Redis server; the
  query takes redis-py's connection options.
* ``redis+cluster://host:port[,host:port...]``: a Redis Cluster, any reachable nodes as seeds
  (``rediss+cluster://`` for TLS).

``capacity`` accepts bytes or a size with a unit (``KB MB GB TB`` = powers of 1000, ``KiB MiB GiB TiB``
= powers of 1024); omitted or 0 = unbounded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from kvstore.backends.base import BackendError, BackendFull, BackendStats, StorageBackend

__all__ = [
    "DEFAULT_BACKEND_URL",
    "BackendError",
    "BackendFull",
    "BackendStats",
    "StorageBackend",
    "default_backend_url",
    "open_backend",
    "parse_size",
]

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"10GiB"`` -> 10737418240; raises ``ValueError`` for anything else."""
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"bad size {text!r}: use bytes or a number with one of KB MB GB TB KiB MiB GiB TiB")
    return int(float(m.group(1)) * _UNITS[unit])


def default_backend_url() -> str:
    """Embedded store under ``$KVSTREAM_DATA`` (else ``~/.local/share/kvstream``)."""
    root = os.environ.get("KVSTREAM_DATA") or str(Path.home() / ".local" / "share" / "kvstream")
    return "embedded://" + str(Path(root).expanduser().absolute())


DEFAULT_BACKEND_URL = default_backend_url()


def _single_query(query: str, allowed: set[str], url: str) -> dict[str, str]:
    params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    out: dict[str, str] = {}
    for name, values in params.items():
        if name not in allowed:
            raise ValueError(f"backend URL {url!r}: unknown option {name!r} (allowed: {sorted(allowed)})")
        if len(values) != 1:
            raise ValueError(f"backend URL {url!r}: option {name!r} given more than once")
        out[name] = values[0]
    return out


def open_backend(url: str) -> StorageBackend:
    """Open the backend a URL names (see module docstring). Raises ``ValueError`` for a bad URL.

    Redis backends connect lazily: an unreachable server surfaces as ``BackendError`` on first use
    (``await backend.ping()`` checks it).
    """
    if not url or not url.strip():
        raise ValueError("backend URL is empty")
    url = url.strip()
    scheme, sep, _ = url.partition("://")
    if not sep:  # a plain filesystem path
        from kvstore.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(Path(url).expanduser())
    scheme = scheme.lower()
    parts = urlsplit(url)
    if scheme == "memory":
        from kvstore.backends.memory import MemoryBackend

        if parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"backend URL {url!r}: memory:// takes no host or path")
        opts = _single_query(parts.query, {"capacity"}, url)
        return MemoryBackend(capacity=parse_size(opts.get("capacity", "0")))
    if scheme == "embedded":
        from kvstore.backends.embedded import EmbeddedBackend

        path = unquote(parts.netloc + parts.path)
        if not path:
            raise ValueError(f"backend URL {url!r}: embedded:// needs a directory, e.g. embedded:///var/kvs")
        opts = _single_query(parts.query, {"capacity"}, url)
        return EmbeddedBackend(Path(path).expanduser(), capacity=parse_size(opts.get("capacity", "0")))
    if scheme in ("redis", "rediss"):
        from kvstore.backends.redis import RedisBackend

        if not parts.hostname:
            raise ValueError(f"backend URL {url!r}: no host")
        return RedisBackend(url)
    if scheme in ("redis+cluster", "rediss+cluster"):
        from kvstore.backends.cluster import ClusterBackend

        return ClusterBackend.from_url(url)
    raise ValueError(
        f"backend URL {url!r}: unknown scheme {scheme!r} (use embedded, memory, redis, rediss, redis+cluster)"
    )
