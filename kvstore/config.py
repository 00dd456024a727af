"""Server settings: defaults < YAML file (``--config``) < env ``KVSTREAM_<FIELD>`` < command-line flags."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvstore.backends import default_backend_url, parse_size
from kvstore.wire import DEFAULT_PART_BYTES, MAX_PART_BYTES

ENV_PREFIX = "KVSTREAM_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class ServerConfig:
    """Settings of ``kvstore serve``. Sizes are bytes (config files and env also accept ``8MiB``)."""

    listen: str = "127.0.0.1:50551"
    backend: str = field(default_factory=default_backend_url)
    metrics_port: int = 0  # 0 = no /metrics endpoint
    metrics_addr: str = "127.0.0.1"
    default_ttl: float = 86400.0  # seconds, for unpinned contexts stored without a TTL
    log_level: str = "INFO"
    max_message_bytes: int = 8 << 20  # gRPC send/receive limit; parts stay far below it
    max_part_bytes: int = DEFAULT_PART_BYTES  # default part size of streamed blobs
    max_blob_bytes: int = 256 << 20  # one uploaded blob
    max_put_bytes: int = 2 << 30  # all blobs of one PutChunks call (held in memory until Commit)
    max_buffered_put_bytes: int = 4 << 30  # all PutChunks calls of this front end together (the memory bound)
    max_context_chunks: int = 16384
    max_concurrent_rpcs: int = 256
    max_concurrent_streams: int = 128  # HTTP/2 streams per connection
    health_interval: float = 5.0  # seconds between backend health probes
    grace_seconds: float = 5.0  # shutdown grace for in-flight RPCs
    max_data_streams: int = 64  # concurrent PutChunks + StreamContext calls (each buffers or streams blobs)
    hot_cache_bytes: int = 256 << 20  # verified blobs kept in memory for repeat streams (0 = off)
    auth_tokens: str = ""  # token file (kvstore.auth); "" = no authentication
    tls_cert: str = ""  # server certificate chain (PEM); with tls_key enables TLS
    tls_key: str = ""  # server private key (PEM)
    tls_client_ca: str = ""  # CA bundle (PEM) of client certificates; set = mutual TLS (certs required)

    def validate(self) -> ServerConfig:
        """Raise ``ValueError`` for inconsistent settings; returns self."""
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level {self.log_level!r} not one of {', '.join(LOG_LEVELS)}")
        self.log_level = self.log_level.upper()
        if not self.default_ttl > 0:
            raise ValueError(f"default_ttl must be > 0 seconds, got {self.default_ttl}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port {self.metrics_port} outside [0, 65535]")
        if not 1 <= self.max_part_bytes <= MAX_PART_BYTES:
            raise ValueError(f"max_part_bytes must be in [1, {MAX_PART_BYTES}], got {self.max_part_bytes}")
        if self.max_message_bytes < MAX_PART_BYTES + (64 << 10):
            raise ValueError(
                f"max_message_bytes {self.max_message_bytes} cannot carry a {MAX_PART_BYTES}-byte part"
            )
        for name in (
            "max_blob_bytes",
            "max_put_bytes",
            "max_buffered_put_bytes",
            "max_context_chunks",
            "max_concurrent_rpcs",
            "max_concurrent_streams",
            "max_data_streams",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.hot_cache_bytes < 0:
            raise ValueError(f"hot_cache_bytes must be >= 0 (0 = off), got {self.hot_cache_bytes}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        port = self.listen.rpartition(":")[2]
        if ":" not in self.listen or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"listen {self.listen!r}: use host:port with a port in [0, 65535]")
        if not self.health_interval > 0:  # 0 would probe the backend in a busy loop
            raise ValueError(f"health_interval must be > 0 seconds, got {self.health_interval}")
        if not self.grace_seconds >= 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML/env value to the field's type; raises ``ValueError`` naming the setting."""
    kind = _FIELDS[name].type
    try:
        if kind == "int":
            if isinstance(value, str) and name.endswith("_bytes"):
                return parse_size(value)
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("not an integer")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("not a number")
            return float(value)
        if not isinstance(value, str):
            raise ValueError("not a string")
        return value
    except (TypeError, ValueError) as e:
        raise ValueError(f"setting {name}: bad value {value!r} ({e})") from None


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Merge defaults < YAML file ``path`` < ``env`` (``KVSTREAM_LISTEN`` ...) < ``overrides`` (flags).

    ``overrides`` entries that are None are ignored (flags not given). Unknown keys in the file raise.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config {path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config {path}: expected a mapping of settings")
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in _FIELDS:
                raise ValueError(f"config {path}: unknown setting {key!r} (known: {', '.join(_FIELDS)})")
            values[name] = _coerce(name, value)
    env = os.environ if env is None else env
    for name in _FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw)
    for name, value in (overrides or {}).items():
        if name not in _FIELDS:
            raise ValueError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = _coerce(name, value)
    return ServerConfig(**values).validate()
