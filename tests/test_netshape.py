"""Tests for deploy.tcp_proxy (loopback only) and deploy.netshape (root + iproute2; skipped otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from deploy import netshape
from deploy.netshape import NetShapeUnavailable, ShapedLink, measure_throughput
from deploy.tcp_proxy import ProxyConfig, TcpProxy

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


def streamer(nbytes: int) -> Handler:
    """Server that sends nbytes of seeded random data on connect, then closes."""
    payload = random.Random(7).randbytes(nbytes)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(payload)
            await writer.drain()
            writer.close()
    return handler


async def read_all(reader: asyncio.StreamReader, limit_s: float = 20.0) -> tuple[bytes, bool]:
    """Read to EOF; returns (data, was_reset)."""
    chunks = []
    try:
        async with asyncio.timeout(limit_s):
            while data := await reader.read(65536):
                chunks.append(data)
    except ConnectionResetError:
        return b"".join(chunks), True
    return b"".join(chunks), False


async def timed_download(addr: tuple[str, int], nbytes: int) -> tuple[float, list[tuple[float, int]]]:
    """Download nbytes; returns (Mbit/s from first to last read, [(time, cumulative bytes)])."""
    reader, writer = await asyncio.open_connection(*addr)
    loop = asyncio.get_running_loop()
    got, samples = 0, []
    async with asyncio.timeout(20):
        while got < nbytes and (data := await reader.read(65536)):
            got += len(data)
            samples.append((loop.time(), got))
    writer.close()
    assert got >= nbytes
    (t0, b0), (t1, b1) = samples[0], samples[-1]
    return (b1 - b0) * 8 / (t1 - t0) / 1e6, samples


async def ping_rtt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rounds: int = 5) -> float:
    """Median round trip of a 1-byte ping through an echo server."""
    loop = asyncio.get_running_loop()
    rtts = []
    for _ in range(rounds):
        t0 = loop.time()
        writer.write(b"x")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
        rtts.append(loop.time() - t0)
    return statistics.median(rtts)


# -- TcpProxy ---------------------------------------------------------------------------------------

async def test_proxy_bytes_unchanged_both_ways() -> None:
    payload = random.Random(1).randbytes(3 << 20)
    async with serve(echo) as target, TcpProxy(target, delay_ms=1, jitter_ms=1, loss=0.001,
                                               seed=3) as proxy:
        assert proxy.address is not None
        reader, writer = await asyncio.open_connection(*proxy.address)

        async def send() -> None:
            for i in range(0, len(payload), 100_000):  # odd-sized writes cross chunk boundaries
                writer.write(payload[i:i + 100_000])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        back, reset = await read_all(reader)
        await sender
        writer.close()
        assert not reset
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
        assert proxy.stats.bytes_up == proxy.stats.bytes_down == len(payload)
        assert proxy.stats.connections == 1


async def test_proxy_adds_delay_and_runtime_set_changes_it() -> None:
    async with serve(echo) as target, TcpProxy(target, delay_ms=40) as proxy:
        assert proxy.address is not None
        reader, writer = await asyncio.open_connection(*proxy.address)
        rtt = await ping_rtt(reader, writer)
        assert 0.080 <= rtt < 0.080 + 0.060, rtt  # 2 x one-way delay, plus generous scheduling slack
        proxy.set(delay_ms=5)
        rtt_low = await ping_rtt(reader, writer)
        assert 0.010 <= rtt_low < 0.050, rtt_low
        writer.close()


async def test_proxy_loss_costs_rto_penalty() -> None:
    async with serve(echo) as target, TcpProxy(target, delay_ms=1, loss=0.5, seed=11) as proxy:
        assert proxy.address is not None
        reader, writer = await asyncio.open_connection(*proxy.address)
        rtts = []
        for _ in range(8):
            rtts.append(await ping_rtt(reader, writer, rounds=1))
        writer.close()
        slow = [r for r in rtts if r >= 0.2]
        # With p=0.5 per direction, P(no penalty in 8 RTTs) = 0.75**8 ~ 10%; the seed fixes the draw.
        assert slow and len(slow) < len(rtts), rtts
        assert proxy.stats.penalised_chunks == len(slow) + sum(r >= 0.4 for r in rtts)


async def test_proxy_rate_limit_and_runtime_rate_change() -> None:
    n = 1 << 20
    async with serve(streamer(4 * n)) as target, TcpProxy(target, rate_mbit=40) as proxy:
        assert proxy.address is not None
        rates = []
        for _ in range(3):
            rate, _ = await timed_download(proxy.address, 2 * n)
            rates.append(rate)
        assert 0.7 * 40 <= statistics.median(rates) <= 1.15 * 40, rates

        # Mid-stream: 80 Mbit/s for the first MiB, then 16 Mbit/s.
        proxy.set(rate_mbit=80)
        reader, writer = await asyncio.open_connection(*proxy.address)
        loop = asyncio.get_running_loop()
        got, marks = 0, {}
        async with asyncio.timeout(10):
            while got < 4 * n and (data := await reader.read(65536)):
                got += len(data)
                if got >= n and "set" not in marks:
                    marks["set"] = (loop.time(), got)
                    proxy.set(rate_mbit=16)
                if got >= n + n // 4 and "a" not in marks:
                    marks["a"] = (loop.time(), got)
                if got >= 2 * n and "b" not in marks:
                    marks["b"] = (loop.time(), got)
                    proxy.set(rate_mbit=None)  # finish fast
        writer.close()
        (ta, ba), (tb, bb) = marks["a"], marks["b"]
        after = (bb - ba) * 8 / (tb - ta) / 1e6
        assert 0.7 * 16 <= after <= 1.15 * 16, after


async def test_proxy_cut_counts_delivered_bytes_in_both_directions() -> None:
    # The target speaks first (1000 B), then the client sends 2000 B; jitter reorders their delivery.
    # Counting bytes read would cut at 2500 read and drop the queued reply; delivered must be 2500.
    async def target_speaks_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"d" * 1000)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    for seed in range(6):
        async with serve(target_speaks_first) as target, TcpProxy(
            target, seed=seed, break_after_bytes=2500, delay_ms=60, jitter_ms=55
        ) as proxy:
            assert proxy.address is not None
            reader, writer = await asyncio.open_connection(*proxy.address)
            await asyncio.sleep(0.005)
            writer.write(b"u" * 2000)
            await writer.drain()
            _, reset = await read_all(reader, 5)
            writer.close()
            await asyncio.sleep(0.05)
            assert reset and proxy.stats.bytes_up + proxy.stats.bytes_down == 2500, (seed, proxy.stats)


async def test_proxy_stops_with_idle_connections_open() -> None:
    errors: list[str] = []  # asyncio logged "Exception in callback" per connection open at stop()
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(str(ctx.get("message"))))
    async with serve(echo) as target:
        proxy = TcpProxy(target)
        address = await proxy.start()
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"x")
        await reader.readexactly(1)  # the connection is live, both ways
        await asyncio.wait_for(proxy.stop(), 5)  # Python >= 3.12: wait_closed() waits for connections
        writer.close()
        await asyncio.sleep(0.05)
    assert errors == []


async def test_proxy_break_after_bytes_then_reconnect() -> None:
    n = 1 << 20
    async with serve(streamer(n)) as target, TcpProxy(target, break_after_bytes=100_000) as proxy:
        assert proxy.address is not None
        reader, writer = await asyncio.open_connection(*proxy.address)
        data, reset = await read_all(reader, 5)
        writer.close()
        assert reset and len(data) == 100_000
        assert proxy.stats.broken == 1
        # Resume pattern: disarm, reconnect, the stream passes whole.
        proxy.set(break_after_bytes=None)
        reader, writer = await asyncio.open_connection(*proxy.address)
        data2, reset2 = await read_all(reader, 5)
        writer.close()
        assert not reset2 and len(data2) == n and data2[:100_000] == data


async def test_proxy_kill_resets_live_connections() -> None:
    async with serve(echo) as target, TcpProxy(target) as proxy:
        assert proxy.address is not None
        reader, writer = await asyncio.open_connection(*proxy.address)
        await ping_rtt(reader, writer, rounds=1)
        assert proxy.stats.active == 1
        assert proxy.kill() == 1
        _, reset = await read_all(reader, 5)
        writer.close()
        assert reset
        await asyncio.sleep(0.05)
        assert proxy.stats.active == 0 and proxy.stats.broken == 1


def test_proxy_rejects_foreign_targets_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="outside"):
        TcpProxy(("192.0.2.1", 80))
    with pytest.raises(ValueError):
        ProxyConfig(loss=1.5)
    proxy = TcpProxy("127.0.0.1:9")
    with pytest.raises(TypeError):
        proxy.set(bandwidth=3)
    with pytest.raises(ValueError):
        proxy.set(rate_mbit=0)


def test_proxy_cli_runs_and_forwards() -> None:
    async def main() -> bytes:
        async with serve(echo) as (host, port):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "deploy.tcp_proxy", "--target", f"{host}:{port}", "--delay-ms", "5",
                "--max-seconds", "20", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                assert proc.stdout is not None
                info = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
                phost, _, pport = info["listen"].rpartition(":")
                reader, writer = await asyncio.open_connection(phost, int(pport))
                writer.write(b"hello")
                back = await asyncio.wait_for(reader.readexactly(5), 5)
                writer.close()
                return back
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 10)
    assert asyncio.run(main()) == b"hello"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["-m", "deploy.tcp_proxy", "--target", "127.0.0.1"], "expected HOST:PORT"),
        (["-m", "deploy.tcp_proxy", "--target", "127.0.0.1:9", "--loss", "1.5"], "loss must be"),
        (["-m", "deploy.tcp_proxy", "--target", "127.0.0.1:9", "--rate-mbit", "nan"], "rate_mbit must be"),
        (["-m", "deploy.tcp_proxy", "--target", "192.0.2.1:80"], "outside"),
        (["-m", "deploy.tcp_proxy", "--target", "127.0.0.1:9", "--listen", "127.0.0.1:99999"], "port"),
        (["-m", "deploy.netshape", "measure", "--rate-mbit", "10", "--repeat", "0"], "finite and > 0"),
        (["-m", "deploy.netshape", "up", "--rate-mbit", "nan"], "must be finite and > 0"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(argv: list[str], needle: str) -> None:
    # Checked before any namespace or socket exists (netshape's need root only after parsing).
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# -- ShapedLink -------------------------------------------------------------------------------------

def _require_netshape() -> None:
    try:
        netshape.check_available()
    except NetShapeUnavailable as e:
        pytest.skip(str(e))


def test_check_available_reports_non_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netshape.os, "geteuid", lambda: 1000)
    with pytest.raises(NetShapeUnavailable, match="root"), ShapedLink(10):
        pass


def test_shaped_link_tracks_target_rate() -> None:
    _require_netshape()
    achieved = {}
    for rate, nbytes in ((50, 4 << 20), (200, 8 << 20)):
        with ShapedLink(rate) as link:
            runs = [measure_throughput(link, nbytes, timeout_s=10) for _ in range(2)]
        assert all(r.complete for r in runs)
        achieved[rate] = statistics.median(r.mbit_s for r in runs)
        assert 0.7 * rate <= achieved[rate] <= 1.3 * rate, achieved
    assert achieved[200] > 2.5 * achieved[50], achieved


def test_shaped_link_set_rate_mid_transfer() -> None:
    _require_netshape()
    with ShapedLink(100) as link:
        result: list[netshape.TransferResult] = []
        t = threading.Thread(target=lambda: result.append(
            measure_throughput(link, 64 << 20, timeout_s=1.6)))
        t.start()
        for _ in range(100):  # wait (bounded) until the transfer is under way, then ~0.5 s at 100 Mbit/s
            sent = re.search(r"Sent (\d+) bytes", link.qdisc_show())
            if sent and int(sent.group(1)) > 1 << 20:
                break
            time.sleep(0.05)
        time.sleep(0.5)
        t_set = time.monotonic()
        link.set_rate(20)
        t.join(timeout=15)
        assert result, "transfer did not finish"
        r = result[0]
        assert not r.complete  # bounded by time, not bytes
        t_end = r.samples[-1][0]
        assert r.samples[0][0] < t_set - 0.2 and t_end > t_set + 0.4, (r.samples[0][0], t_set, t_end)
        before = r.rate_between(r.samples[0][0], t_set)
        after = r.rate_between(t_set + 0.1, t_end)
        assert 70 <= before <= 130, before
        assert 14 <= after <= 26, after


def test_shaped_link_teardown_removes_namespaces_even_on_error() -> None:
    _require_netshape()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"kvs-{dead.pid}-1-srv"  # what a crashed earlier run would leave behind
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    link = ShapedLink(100)
    with pytest.raises(RuntimeError, match="boom"), link:
        names = set(netshape._list_netns())
        assert {link.server.ns, link.client.ns} <= names and stale not in names
        sleeper = link.popen(link.server.ns, ["sleep", "30"])
        # the veth and its shaper exist only inside our namespaces
        assert "htb" in link.qdisc_show()
        ping = link.run(link.client.ns, ["ip", "-4", "addr", "show", "dev", link.client.ifname])
        assert link.client.addr in ping.stdout
        raise RuntimeError("boom")
    left = set(netshape._list_netns())
    assert link.server.ns not in left and link.client.ns not in left
    assert sleeper.poll() is not None


def test_shaped_link_with_proxy_for_delay() -> None:
    """The docs/network-shaping.md recipe: rate from tc, delay from a tcp_proxy in the client namespace."""
    _require_netshape()
    with ShapedLink(50) as link:
        proxy = link.popen(link.client.ns, link.python_argv(
            "deploy.tcp_proxy", "--listen", "127.0.0.1:0", "--target", f"{link.server.addr}:5201",
            "--delay-ms", "25", "--max-seconds", "30"), stdout=subprocess.PIPE)
        assert proxy.stdout is not None
        listen = json.loads(proxy.stdout.readline())["listen"]
        direct = measure_throughput(link, 1 << 20, timeout_s=10)
        r = measure_throughput(link, 2 << 20, timeout_s=10, port=5201, connect=listen)
    assert r.complete and 0.5 * 50 <= r.mbit_s <= 1.3 * 50, r.mbit_s
    # The source writes as soon as it accepts, so its first bytes cross the proxy's 25 ms leg once.
    assert r.ttfb_s >= 0.025 > direct.ttfb_s, (r.ttfb_s, direct.ttfb_s)
