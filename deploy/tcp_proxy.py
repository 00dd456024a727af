"""User-space TCP proxy that adds delay, jitter, "loss", a rate limit and connection cuts.

Our machines have no ``netem``, so this proxy supplies what ``tc`` cannot: it sits between a client and a
server (on loopback, or inside the namespaces of ``deploy.netshape``) and forwards both directions.

Model, per direction and per forwarded *chunk* (one ``read()`` of at most 64 KiB, or about 2 ms of data
when a rate limit is set; a chunk of ``n`` bytes stands for ``ceil(n / 1448)`` TCP segments):

* rate: a token bucket (5 ms deep) shared by all connections of the direction, like one link. A chunk
  departs when the previous one has been "serialised"; the proxy does not read further ahead than that,
  so the sender sees TCP back-pressure exactly as behind a slow link.
* delay: each chunk is delivered ``delay_ms`` (+ uniform jitter in ``[-jitter_ms, +jitter_ms]``, floored
  at 0) after it departs; order inside a connection is kept, so jitter never reorders bytes (a late
  chunk holds the ones behind it, as TCP's in-order delivery would). RTT through the proxy is
  ``2 * delay_ms`` plus the real path.
* loss: bytes cannot really be lost over a user-space TCP relay, so a lost segment is modelled as the
  cost TCP pays to recover it: a chunk containing at least one lost segment (each lost independently with
  probability ``loss``) is held back one RTO-like penalty, ``max(200 ms, 2 * delay_ms)``; chunks behind it
  wait too (head-of-line blocking).
* faults: ``break_after_bytes`` resets each connection (RST to both peers) once that many bytes, both
  directions together, have been delivered on it; ``kill()`` resets all current connections now.

All parameters can be changed while traffic flows with ``proxy.set(...)``; they apply to chunks read
afterwards. Targets are restricted to loopback and 10.231.0.0/16 (the ``deploy.netshape`` link) so a test
harness cannot send anywhere else by mistake.

CLI::

    python -m deploy.tcp_proxy --listen 127.0.0.1:0 --target 127.0.0.1:50051 \\
        --delay-ms 20 --jitter-ms 5 --loss 0.01 --rate-mbit 100

prints ``{"listen": "127.0.0.1:PORT", ...}`` on one line once listening, then runs until SIGINT/SIGTERM
or ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import json
import math
import random
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["ProxyConfig", "ProxyStats", "TcpProxy", "main", "split_hostport"]

_ALLOWED_TARGETS = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "10.231.0.0/16")]
_MSS = 1448
_MAX_CHUNK = 64 * 1024
_CHUNK_S = 0.002  # with a rate limit, chunks of ~2 ms of data keep pacing and delay fine-grained
# Token-bucket depth: credit that lets the shaper catch up after the event loop wakes it late (a
# bucketless pacer loses every oversleep and ends up ~20% under the target rate).
_BURST_S = 0.005


@dataclass(frozen=True)
class ProxyConfig:
    """Impairments; every field can be changed at runtime with ``TcpProxy.set``.

    delay_ms: one-way delay added to each direction. jitter_ms: uniform +- spread of that delay.
    loss: per-segment probability (0..1) of paying one RTO-like penalty. rate_mbit: per-direction rate
    limit in Mbit/s (None = unlimited). break_after_bytes: reset a connection after this many delivered
    bytes (both directions; None = never).
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float | None = None
    break_after_bytes: int | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.delay_ms < math.inf and 0 <= self.jitter_ms < math.inf):
            raise ValueError("delay_ms and jitter_ms must be finite and >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        if self.rate_mbit is not None and not 0 < self.rate_mbit < math.inf:  # NaN meant "unlimited"
            raise ValueError("rate_mbit must be finite and > 0, or None")
        if self.break_after_bytes is not None and self.break_after_bytes < 0:
            raise ValueError("break_after_bytes must be >= 0 or None")


@dataclass
class ProxyStats:
    """Counters. bytes_up: client -> target, bytes_down: target -> client (delivered bytes)."""

    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0  # accepted (and connected to the target) since start
    active: int = 0
    broken: int = 0  # reset by break_after_bytes or kill()
    penalised_chunks: int = 0  # chunks that paid the loss penalty


def _check_target(host: str) -> None:
    try:
        addr = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError as e:
        raise ValueError(f"target must be an IP literal or localhost, got {host!r}") from e
    if not any(addr in net for net in _ALLOWED_TARGETS):
        raise ValueError(f"target {host} is outside loopback / 10.231.0.0/16 (the test networks)")


def split_hostport(s: str) -> tuple[str, int]:
    """``"host:port"`` / ``"[::1]:port"`` -> ``(host, port)``."""
    host, sep, port = s.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


class _Conn:
    """One proxied connection: both stream writers, its four pump tasks and its delivered-byte count."""

    def __init__(self, client: asyncio.StreamWriter, target: asyncio.StreamWriter) -> None:
        self.writers = (client, target)
        self.tasks: list[asyncio.Task[None]] = []
        self.delivered_bytes = 0  # written to either side; decides where break_after_bytes cuts
        self.aborted = False

    def abort(self) -> None:
        """Reset both sockets (SO_LINGER 0 makes close() send RST, like a failed network path)."""
        if self.aborted:
            return
        self.aborted = True
        for w in self.writers:
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        current = asyncio.current_task()
        for t in self.tasks:
            if t is not current:
                t.cancel()


_Item = tuple[float, bytes]  # (deliver_at loop time, data)


class _Pipe:
    """FIFO of chunks between a direction's reader and writer, bounded in *bytes* (not items) so that
    many small chunks in flight are fine while memory stays capped. ``None`` marks EOF."""

    def __init__(self, limit_bytes: int) -> None:
        self._items: collections.deque[_Item | None] = collections.deque()
        self._bytes = 0
        self._limit = limit_bytes
        self._cond = asyncio.Condition()

    async def put(self, item: _Item | None) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self._bytes < self._limit)
            self._items.append(item)
            self._bytes += len(item[1]) if item else 0
            self._cond.notify_all()

    async def get(self) -> _Item | None:
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._items))
            item = self._items.popleft()
            self._bytes -= len(item[1]) if item else 0
            self._cond.notify_all()
            return item


class TcpProxy:
    """Asyncio TCP proxy ``listen`` -> ``target`` with runtime-adjustable impairments (see module doc).

    Usage::

        async with TcpProxy(("127.0.0.1", port), delay_ms=20) as proxy:
            host, pport = proxy.address
            ...
            proxy.set(rate_mbit=10)   # takes effect for data read from now on

    Args:
        target: ``(host, port)`` or ``"host:port"``; loopback or 10.231.0.0/16 only.
        listen: ``(host, port)`` or ``"host:port"``; port 0 picks a free port.
        seed: seeds jitter and loss so runs are reproducible.
        max_buffer_bytes: per direction and connection, bytes read but not yet delivered (bounds memory).
        idle_timeout_s: a direction with no data for this long resets its connection (bounds every loop).
        **impairments: the ``ProxyConfig`` fields.
    """

    def __init__(self, target: tuple[str, int] | str, listen: tuple[str, int] | str = ("127.0.0.1", 0), *,
                 seed: int = 0, max_buffer_bytes: int = 8 << 20, idle_timeout_s: float = 600.0,
                 connect_timeout_s: float = 5.0, **impairments: Any) -> None:
        self.target = split_hostport(target) if isinstance(target, str) else target
        _check_target(self.target[0])
        self.listen = split_hostport(listen) if isinstance(listen, str) else listen
        self.config = ProxyConfig(**impairments)
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._max_buffer_bytes = max_buffer_bytes
        self._idle_timeout_s = idle_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._vclock = {"up": 0.0, "down": 0.0}  # per-direction time the shaper is busy until
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] | None = None

    # -- control ----------------------------------------------------------------------------------
    def set(self, **changes: Any) -> ProxyConfig:
        """Change impairments now (ProxyConfig field names, e.g. ``rate_mbit=None`` removes the limit)."""
        names = {f.name for f in fields(ProxyConfig)}
        unknown = set(changes) - names
        if unknown:
            raise TypeError(f"unknown proxy settings: {sorted(unknown)}")
        self.config = replace(self.config, **changes)
        return self.config

    def kill(self) -> int:
        """Reset every current connection (RST to both peers); returns how many were cut."""
        conns = [c for c in self._conns if not c.aborted]
        for c in conns:
            c.abort()
        self.stats.broken += len(conns)
        return len(conns)

    async def start(self) -> tuple[str, int]:
        """Start listening; returns the bound ``(host, port)``."""
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1])
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        return self.address

    async def stop(self) -> None:
        """Stop listening and reset all connections; returns when every handler has finished."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for c in list(self._conns):  # before wait_closed: from Python 3.12 on it waits for every connection
            c.abort()
        for t in list(self._handlers):  # including handlers still connecting to the target
            t.cancel()
        if server is not None:
            await server.wait_closed()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5.0)

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- forwarding -------------------------------------------------------------------------------
    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            try:
                treader, twriter = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), self._connect_timeout_s)
            except (OSError, TimeoutError):
                cwriter.transport.abort()  # target unreachable: refuse like a dead path would
                return
            conn = _Conn(cwriter, twriter)
            self._conns.add(conn)
            self.stats.connections += 1
            self.stats.active += 1
            try:
                await self._run_conn(conn, creader, treader)
            finally:
                self._conns.discard(conn)
                self.stats.active -= 1
                for w in conn.writers:
                    w.close()
        except asyncio.CancelledError:
            # stop(): end quietly. asyncio's stream server calls task.exception() on a handler task
            # that ended cancelled, which logs "Exception in callback" for every open connection.
            pass
        finally:
            self._handlers.discard(task)

    async def _run_conn(self, conn: _Conn, creader: asyncio.StreamReader,
                        treader: asyncio.StreamReader) -> None:
        cwriter, twriter = conn.writers
        up, down = _Pipe(self._max_buffer_bytes), _Pipe(self._max_buffer_bytes)
        conn.tasks = [asyncio.create_task(c) for c in (
            self._ingress(conn, creader, up, "up"), self._egress(conn, twriter, up, "up"),
            self._ingress(conn, treader, down, "down"), self._egress(conn, cwriter, down, "down"))]
        pending: set[asyncio.Task[None]] = set(conn.tasks)
        while pending:  # at most four rounds: one per task
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = any(not t.cancelled() and t.exception() is not None for t in done)
            if failed or conn.aborted:
                # A reset or error on one side becomes a reset on the other, as on a broken path.
                conn.abort()
                break
        await asyncio.gather(*conn.tasks, return_exceptions=True)

    def _read_size(self) -> int:
        rate = self.config.rate_mbit
        if rate is None:
            return _MAX_CHUNK
        return int(min(_MAX_CHUNK, max(_MSS, rate * 1e6 / 8 * _CHUNK_S)))

    async def _ingress(self, conn: _Conn, reader: asyncio.StreamReader,
                       q: _Pipe, direction: str) -> None:
        loop = asyncio.get_running_loop()
        last_deliver = 0.0
        while True:  # ends at EOF, reset, idle timeout or break_after_bytes
            data = await asyncio.wait_for(reader.read(self._read_size()), self._idle_timeout_s)
            if not data:
                await q.put(None)
                return
            cfg = self.config
            now = loop.time()
            depart = now
            if cfg.rate_mbit is not None:
                start = max(self._vclock[direction], now - _BURST_S)
                depart = start + len(data) * 8 / (cfg.rate_mbit * 1e6)
                self._vclock[direction] = depart
            delay = max(0.0, cfg.delay_ms + self._rng.uniform(-cfg.jitter_ms, cfg.jitter_ms)) / 1e3
            if cfg.loss > 0:
                p_hit = 1.0 - (1.0 - cfg.loss) ** math.ceil(max(1, len(data)) / _MSS)
                if self._rng.random() < p_hit:
                    delay += max(0.2, 2 * cfg.delay_ms / 1e3)
                    self.stats.penalised_chunks += 1
            last_deliver = max(depart + delay, last_deliver)
            await q.put((last_deliver, data))
            if depart > now:  # read no further ahead than the shaper: the sender feels back-pressure
                await asyncio.sleep(depart - now)

    async def _egress(self, conn: _Conn, writer: asyncio.StreamWriter,
                      q: _Pipe, direction: str) -> None:
        loop = asyncio.get_running_loop()
        while True:  # ends at the EOF marker or after a cut
            item = await q.get()
            if item is None:
                if writer.can_write_eof():
                    writer.write_eof()  # propagate the half-close
                return
            deliver_at, data = item
            wait = deliver_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # The cut is counted in bytes delivered (both directions), not read: bytes still queued in
            # the other direction when it comes were never seen by their receiver.
            cut = False
            if self.config.break_after_bytes is not None:
                room = max(0, self.config.break_after_bytes - conn.delivered_bytes)
                if len(data) >= room:
                    data, cut = data[:room], True
            conn.delivered_bytes += len(data)
            if data:
                writer.write(data)
                await writer.drain()
                if direction == "up":
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
            if cut:
                self.stats.broken += 1
                conn.abort()
                return


async def _serve(args: argparse.Namespace) -> None:
    proxy = TcpProxy(args.target, args.listen, seed=args.seed, delay_ms=args.delay_ms,
                     jitter_ms=args.jitter_ms, loss=args.loss, rate_mbit=args.rate_mbit,
                     break_after_bytes=args.break_after_bytes)
    host, port = await proxy.start()
    print(json.dumps({"listen": f"{host}:{port}", "target": f"{proxy.target[0]}:{proxy.target[1]}",
                      "config": vars(proxy.config)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.max_seconds)
    finally:
        await proxy.stop()
        print(json.dumps({"stats": vars(proxy.stats)}), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.tcp_proxy", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0 = any)")
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to (loopback or 10.231.x.y)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- jitter of the delay")
    ap.add_argument("--loss", type=float, default=0.0, help="per-segment loss probability (RTO penalty)")
    ap.add_argument("--rate-mbit", type=float, default=None, help="per-direction rate limit")
    ap.add_argument("--break-after-bytes", type=int, default=None, help="reset connections after N bytes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long")
    args = ap.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except (ValueError, OSError, OverflowError) as e:  # bad address, refused target, port in use
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
