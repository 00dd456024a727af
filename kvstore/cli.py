"""``kvstore serve``: run the kvstream gRPC server (uvloop) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from kvstore.backends.base import BackendError
from kvstore.config import LOG_LEVELS, ServerConfig, load_config

LOG_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


def redact(url: str) -> str:
    """``url`` without its user:password part (safe to print)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def configure_logging(level: str) -> None:
    """``key=value`` log lines on stderr."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)


async def serve(config: ServerConfig) -> int:
    """Start a server, print one ready line, stop gracefully on SIGTERM/SIGINT. Returns the exit code."""
    from kvstore.server import KVStreamServer  # heavy imports (grpc, torch via codec) after arg parsing

    server = KVStreamServer(config)
    try:
        await server.start()
    except BaseException:
        await server.backend.close()
        raise
    metrics = (
        f" metrics=http://{config.metrics_addr}:{server.metrics_port}/metrics" if server.metrics_port else ""
    )
    tls = "mutual" if config.tls_client_ca else "on" if config.tls_cert else "off"
    security = f" tls={tls} auth={'tokens' if config.auth_tokens else 'off'}"
    print(
        f"kvstore listening on {server.address} backend={redact(config.backend)}{metrics}{security}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.auth_tokens or config.tls_cert:
        loop.add_signal_handler(signal.SIGHUP, server.reload)  # rotate tokens / certificates, no restart
    waiter = asyncio.create_task(server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    logging.getLogger("kvstore.server").info("shutdown grace_s=%s", config.grace_seconds)
    await server.stop()
    waiter.cancel()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="kvstream KV-cache storage server")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gRPC server", description="Run the kvstream gRPC server.")
    p.add_argument(
        "--listen", help="host:port to listen on (default 127.0.0.1:50551; port 0 = any free port)"
    )
    p.add_argument(
        "--backend", help="backend URL: embedded:///dir (default), memory://, redis://, redis+cluster://"
    )
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--default-ttl", type=float, help="TTL in seconds of unpinned contexts (default 86400)")
    p.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper)
    p.add_argument(
        "--auth-tokens", help="token file (YAML or 'TOKEN NS[,NS...] [QUOTA]' lines); requires bearer tokens"
    )
    p.add_argument("--tls-cert", help="server certificate chain (PEM); with --tls-key serves TLS")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA bundle (PEM) that client certificates must chain to (mTLS)")
    p.add_argument("--max-data-streams", type=int, help="concurrent PutChunks + StreamContext calls (64)")
    p.add_argument(
        "--hot-cache-bytes", help="verified blobs kept in memory for repeat streams (default 256MiB; 0 = off)"
    )
    # An exported but empty KVSTREAM_CONFIG means unset, as for every other variable.
    p.add_argument("--config", default=os.environ.get("KVSTREAM_CONFIG") or None, help="YAML settings file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``kvstore``."""
    args = build_parser().parse_args(argv)
    overrides = {
        "listen": args.listen,
        "backend": args.backend,
        "metrics_port": args.metrics_port,
        "default_ttl": args.default_ttl,
        "log_level": args.log_level,
        "auth_tokens": args.auth_tokens,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "max_data_streams": args.max_data_streams,
        "hot_cache_bytes": args.hot_cache_bytes,
    }
    try:
        config = load_config(args.config, overrides=overrides)
    except (ValueError, OSError) as e:
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    import uvloop

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve(config))
    except (ValueError, OSError, BackendError) as e:  # bad backend URL, port in use, store in use
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
