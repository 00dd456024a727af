"""Rate-shaped links between two private network namespaces, for bandwidth-adaptive streaming tests.

``ShapedLink`` creates two namespaces (``server`` and ``client``), a veth pair that exists *only* inside
them (it is created from inside the server namespace, so the host's interfaces, addresses and routes are
never touched), /30 addresses from 10.231.0.0/16, and an egress ``htb`` shaper on both veth ends.
Delay, jitter and loss are not available here (no ``netem`` on our machines): put
``deploy.tcp_proxy`` in the path for those (see docs/network-shaping.md).

Why htb and not tbf: measured here (8 MiB transfers) both deliver 95.5-96% of the target as TCP payload
at 10..200 Mbit/s, which is the payload/frame ratio 1448/1514, i.e. both track the rate exactly (at
1000 Mbit/s the Python test ends get CPU-bound on 2 cores and vary run to run). htb is
the default because a rate change is a ``tc class change`` on a live class that leaves the root qdisc
and its queue alone, whereas tbf's ``tc qdisc change`` rebuilds the root qdisc's parameters (in one
early trial a transfer stalled for the rest of its run after a tbf change; not reproduced in 16 later
trials, never seen with htb). Both use a burst of max(16 KiB, 2 ms of data): tc needs >= rate/HZ, and a
small bucket keeps short transfers from overshooting. ``qdisc="tbf"`` stays available for comparison
(``python -m deploy.netshape measure --qdisc tbf``).

CLI::

    python -m deploy.netshape up --rate-mbit 100     # persistent link kvs-shaped-{srv,cli}
    python -m deploy.netshape set --rate-mbit 10
    python -m deploy.netshape down
    python -m deploy.netshape measure --rate-mbit 100  # JSON: achieved throughput over a fresh link
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from deploy.tcp_proxy import split_hostport

__all__ = [
    "NetShapeUnavailable",
    "LinkEnd",
    "ShapedLink",
    "TransferResult",
    "measure_throughput",
    "start_source",
    "run_sink",
    "check_available",
    "cleanup_stale",
]

PREFIX = "kvs-"
_CLI_NAME = "kvs-shaped"  # the persistent link of `up`/`set`/`down`; never matches the stale-pid pattern
_STALE_RE = re.compile(r"^kvs-(\d+)-\d+-(srv|cli)$")
_REPO_ROOT = Path(__file__).resolve().parents[1]
_CMD_TIMEOUT_S = 10.0
Qdisc = Literal["htb", "tbf"]


class NetShapeUnavailable(RuntimeError):
    """Namespaces/tc cannot be used here (not root, or `ip`/`tc` missing or refused). Tests skip on it."""


@dataclass(frozen=True)
class LinkEnd:
    """One side of a ShapedLink: namespace name, veth interface name inside it, and its IPv4 address."""

    ns: str
    ifname: str
    addr: str


def check_available() -> None:
    """Raise NetShapeUnavailable unless we are root and `ip` and `tc` are on PATH."""
    if os.geteuid() != 0:
        raise NetShapeUnavailable("network namespaces and tc need root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetShapeUnavailable(f"`{tool}` (iproute2) is not installed")


def _cmd(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    except FileNotFoundError as e:
        raise NetShapeUnavailable(str(e)) from e
    if check and proc.returncode != 0:
        msg = f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
        if "Operation not permitted" in proc.stderr:
            raise NetShapeUnavailable(msg)
        raise RuntimeError(msg)
    return proc


def _list_netns() -> list[str]:
    out = _cmd(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_ns(ns: str) -> None:
    """Kill what still runs inside our namespace (it was created by this module), then delete it.

    Deleting a namespace that still has processes only unlinks its name: the veth and qdiscs would live
    on with them, so the processes go first.
    """
    pids = _cmd(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    _cmd(["ip", "netns", "delete", ns], check=False)


def cleanup_stale() -> list[str]:
    """Delete `kvs-<pid>-<n>-{srv,cli}` namespaces whose creating process is gone; returns their names."""
    removed = []
    for ns in _list_netns():
        m = _STALE_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _delete_ns(ns)
            removed.append(ns)
    return removed


def _burst_bytes(rate_mbit: float) -> int:
    # ~2 ms worth of bytes (tc needs burst >= rate/HZ with HZ=1000), never below a few full-size frames.
    return max(16 * 1024, int(rate_mbit * 1e6 / 8 * 0.002))


class ShapedLink:
    """Two namespaces joined by a veth pair whose egress is rate-shaped on both ends.

    ``server`` (10.231.0.1) and ``client`` (10.231.0.2) are the two ``LinkEnd`` s. Use as a context
    manager; teardown kills processes started with ``popen`` and deletes both namespaces (which removes
    the veth and its qdiscs), also when the body raises.

    Args:
        rate_mbit: egress rate of each direction in Mbit/s (> 0).
        qdisc: "htb" (default, see module docstring) or "tbf".
        name: base namespace name; default ``kvs-<pid>-<n>`` (stale ones of dead pids are removed at start).
        persistent: if True, ``__exit__`` leaves the link up (used by the `up` CLI).
    """

    _seq = 0

    def __init__(self, rate_mbit: float, *, qdisc: Qdisc = "htb", name: str | None = None,
                 persistent: bool = False) -> None:
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be > 0")
        if qdisc not in ("htb", "tbf"):
            raise ValueError(f"unknown qdisc {qdisc!r}")
        if name is None:
            ShapedLink._seq += 1
            name = f"{PREFIX}{os.getpid()}-{ShapedLink._seq}"
        if not name.startswith(PREFIX):
            raise ValueError(f"namespace name must start with {PREFIX!r}")
        self.rate_mbit = float(rate_mbit)
        self.qdisc: Qdisc = qdisc
        self.persistent = persistent
        self.server = LinkEnd(f"{name}-srv", "veth-srv", "10.231.0.1")
        self.client = LinkEnd(f"{name}-cli", "veth-cli", "10.231.0.2")
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> ShapedLink:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.persistent:
            return
        self.close()

    def open(self) -> None:
        """Create namespaces, veth, addresses and shaping. On any failure everything created is removed."""
        check_available()
        cleanup_stale()
        existing = set(_list_netns())
        if self.server.ns in existing or self.client.ns in existing:
            raise RuntimeError(f"namespaces {self.server.ns}/{self.client.ns} already exist "
                               "(`python -m deploy.netshape down` removes the CLI link)")
        try:
            for end in (self.server, self.client):
                _cmd(["ip", "netns", "add", end.ns])
                _cmd(["ip", "-n", end.ns, "link", "set", "lo", "up"])
            # Created from inside the server namespace with the peer put straight into the client one,
            # so the pair never appears in the host namespace.
            _cmd(["ip", "-n", self.server.ns, "link", "add", self.server.ifname, "type", "veth",
                  "peer", "name", self.client.ifname, "netns", self.client.ns])
            for end in (self.server, self.client):
                _cmd(["ip", "-n", end.ns, "addr", "add", f"{end.addr}/30", "dev", end.ifname])
                _cmd(["ip", "-n", end.ns, "link", "set", end.ifname, "up"])
                self._shape(end, add=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop processes started by ``popen`` and delete both namespaces. Idempotent."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self._procs.clear()
        present = set(_list_netns())
        for end in (self.server, self.client):
            if end.ns in present:
                _delete_ns(end.ns)

    # -- shaping ----------------------------------------------------------------------------------
    def _shape(self, end: LinkEnd, *, add: bool) -> None:
        rate = f"{self.rate_mbit}mbit"
        burst = str(_burst_bytes(self.rate_mbit))
        tc = ["tc", "-n", end.ns]
        if self.qdisc == "htb":
            if add:
                _cmd([*tc, "qdisc", "add", "dev", end.ifname, "root", "handle", "1:", "htb", "default", "1"])
            _cmd([*tc, "class", "add" if add else "change", "dev", end.ifname, "parent", "1:", "classid",
                  "1:1", "htb", "rate", rate, "ceil", rate, "burst", burst, "cburst", burst])
        else:
            _cmd([*tc, "qdisc", "add" if add else "change", "dev", end.ifname, "root", "handle", "1:",
                  "tbf", "rate", rate, "burst", burst, "latency", "50ms"])

    def set_rate(self, rate_mbit: float) -> None:
        """Change the egress rate of both directions in place (live connections keep going)."""
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be > 0")
        self.rate_mbit = float(rate_mbit)
        for end in (self.server, self.client):
            self._shape(end, add=False)

    def qdisc_show(self) -> str:
        """`tc -s qdisc show` of both veth ends (for debugging/reporting)."""
        return "".join(_cmd(["tc", "-n", e.ns, "-s", "qdisc", "show", "dev", e.ifname]).stdout
                       for e in (self.server, self.client))

    # -- processes in a namespace -----------------------------------------------------------------
    @staticmethod
    def _wrap(ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True,
            **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside namespace ``ns`` (``link.server.ns`` / ``link.client.ns``);
        stdout/stderr captured as text."""
        proc: subprocess.CompletedProcess[str] = subprocess.run(
            self._wrap(ns, argv), capture_output=True, text=True, timeout=timeout, check=check,
            **kwargs)  # type: ignore[call-overload]
        return proc

    def popen(self, ns: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside namespace ``ns``; the process is killed at teardown if still running.
        kwargs go to subprocess.Popen (e.g. ``stdout=subprocess.PIPE``)."""
        p: subprocess.Popen[bytes] = subprocess.Popen(self._wrap(ns, argv), **kwargs)  # type: ignore[call-overload]
        self._procs.append(p)
        return p

    def python_argv(self, module: str, *args: str) -> list[str]:
        """argv that runs ``python -m module args`` from this checkout (works inside a namespace)."""
        return ["env", f"PYTHONPATH={_REPO_ROOT}", sys.executable, "-m", module, *args]


# -- throughput measurement: a bounded source in one namespace, a sink in the other ---------------------

@dataclass(frozen=True)
class TransferResult:
    """A bounded TCP transfer seen by the receiver.

    samples: ``(time.monotonic(), cumulative_bytes)`` about every ``sample_s``, the first at the first
    read; monotonic is system-wide, so it can be compared with the caller's clock (e.g. the moment
    ``set_rate`` was called). ``seconds`` runs from the first to the last read; ``ttfb_s`` from the
    start of ``connect()`` to the first read (one handshake plus one server->client trip).
    """

    nbytes: int
    seconds: float
    complete: bool
    samples: list[tuple[float, int]]
    ttfb_s: float

    @property
    def mbit_s(self) -> float:
        """Achieved Mbit/s of TCP payload, from the first read to the last one."""
        if self.seconds <= 0 or not self.samples:
            return 0.0
        return (self.samples[-1][1] - self.samples[0][1]) * 8 / self.seconds / 1e6

    def rate_between(self, t0: float, t1: float) -> float:
        """Achieved Mbit/s between monotonic times t0 and t1 (interpolated on the samples)."""
        def at(t: float) -> float:
            pts = self.samples
            for (ta, ba), (tb, bb) in zip(pts, pts[1:], strict=False):
                if ta <= t <= tb:
                    return ba + (bb - ba) * ((t - ta) / (tb - ta) if tb > ta else 1.0)
            return float(pts[0][1] if t < pts[0][0] else pts[-1][1])
        return (at(t1) - at(t0)) * 8 / (t1 - t0) / 1e6


def start_source(listen: str, nbytes: int, timeout_s: float, out: IO[str]) -> None:
    """Accept one connection on ``host:port`` (port 0 = any), send ``nbytes`` of zeros, close.
    Prints ``{"port": N}`` to ``out`` once listening. Bounded by ``timeout_s``."""
    host, port = split_hostport(listen)
    deadline = time.monotonic() + timeout_s
    with socket.create_server((host, port)) as srv:
        srv.settimeout(timeout_s)
        print(json.dumps({"port": srv.getsockname()[1]}), file=out, flush=True)
        conn, _ = srv.accept()
        with conn:
            buf = bytes(256 * 1024)
            sent = 0
            while sent < nbytes and time.monotonic() < deadline:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    sent += conn.send(memoryview(buf)[: min(len(buf), nbytes - sent)])
                except (TimeoutError, OSError):
                    break


def run_sink(connect: str, nbytes: int, timeout_s: float, sample_s: float = 0.05) -> TransferResult:
    """Connect to ``host:port``, read up to ``nbytes`` or until EOF/``timeout_s``; time from first byte."""
    host, port = split_hostport(connect)
    t_connect = time.monotonic()
    deadline = t_connect + timeout_s
    got = 0
    samples: list[tuple[float, int]] = []
    t_first = t_last = t_connect
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        while got < nbytes:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(1 << 20)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            t_last = time.monotonic()
            got += len(chunk)
            if not samples:
                # The first read starts the clock, so its bytes are not counted in the rate (see mbit_s).
                t_first = t_last
                samples.append((t_first, got))
            elif t_last - samples[-1][0] >= sample_s:
                samples.append((t_last, got))
    if samples and samples[-1][1] != got:
        samples.append((t_last, got))
    return TransferResult(got, t_last - t_first, got >= nbytes, samples, t_first - t_connect)


def _read_json_line(stream: IO[bytes], timeout_s: float) -> dict[str, object]:
    ready, _, _ = select.select([stream], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"no output within {timeout_s}s")
    line = stream.readline()
    if not line:
        raise RuntimeError("process exited before printing its status line")
    result: dict[str, object] = json.loads(line)
    return result


def measure_throughput(link: ShapedLink, nbytes: int = 8 << 20, timeout_s: float = 20.0,
                       port: int = 0, connect: str | None = None) -> TransferResult:
    """Send ``nbytes`` from a source in the server namespace to a sink in the client namespace
    (the direction kvstore streams in) and return what the sink saw. Bounded by ``timeout_s``.

    port: the source's port on ``link.server.addr`` (0 = any free one). connect: ``host:port`` the sink
    dials instead of the source itself, e.g. a ``deploy.tcp_proxy`` in the client namespace whose
    target is ``{link.server.addr}:{port}``."""
    src = link.popen(link.server.ns, link.python_argv(
        "deploy.netshape", "_source", "--listen", f"{link.server.addr}:{port}", "--bytes", str(nbytes),
        "--timeout", str(timeout_s)), stdout=subprocess.PIPE)
    try:
        assert src.stdout is not None
        bound = int(str(_read_json_line(src.stdout, 10.0)["port"]))
        sink = link.run(link.client.ns, link.python_argv(
            "deploy.netshape", "_sink", "--connect", connect or f"{link.server.addr}:{bound}",
            "--bytes", str(nbytes), "--timeout", str(timeout_s)), timeout=timeout_s + 10)
        d = json.loads(sink.stdout)
        return TransferResult(int(d["nbytes"]), float(d["seconds"]), bool(d["complete"]),
                              [(float(t), int(b)) for t, b in d["samples"]], float(d["ttfb_s"]))
    finally:
        if src.poll() is None:
            src.kill()
        src.wait(timeout=5)


# -- CLI ------------------------------------------------------------------------------------------

def _link_info(link: ShapedLink) -> dict[str, object]:
    return {"server": vars(link.server), "client": vars(link.client), "rate_mbit": link.rate_mbit,
            "qdisc": link.qdisc}


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """argparse type: a finite number > 0 of ``kind``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.netshape", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, hlp in (("up", "create the persistent link kvs-shaped-{srv,cli}"),
                      ("set", "change the rate of the persistent link"),
                      ("measure", "measure throughput over a fresh temporary link (JSON)")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--rate-mbit", type=_positive(float), required=True)
        if name != "set":
            p.add_argument("--qdisc", choices=["htb", "tbf"], default="htb")
        if name == "measure":
            p.add_argument("--bytes", type=_positive(int), default=8 << 20)
            p.add_argument("--timeout", type=_positive(float), default=20.0)
            p.add_argument("--repeat", type=_positive(int), default=3)
    sub.add_parser("down", help="delete the persistent link")
    for name in ("_source", "_sink"):  # internal: the two ends of `measure`, run inside the namespaces
        p = sub.add_parser(name)
        p.add_argument("--listen" if name == "_source" else "--connect", required=True)
        p.add_argument("--bytes", type=int, required=True)
        p.add_argument("--timeout", type=float, required=True)
    args = ap.parse_args(argv)

    try:
        if args.cmd == "_source":
            start_source(args.listen, args.bytes, args.timeout, sys.stdout)
        elif args.cmd == "_sink":
            r = run_sink(args.connect, args.bytes, args.timeout)
            print(json.dumps({"nbytes": r.nbytes, "seconds": r.seconds, "complete": r.complete,
                              "samples": r.samples, "ttfb_s": r.ttfb_s}))
        elif args.cmd == "up":
            link = ShapedLink(args.rate_mbit, qdisc=args.qdisc, name=_CLI_NAME, persistent=True)
            link.open()
            print(json.dumps(_link_info(link)))
        elif args.cmd == "set":
            link = ShapedLink(args.rate_mbit, name=_CLI_NAME, persistent=True)
            if link.server.ns not in _list_netns():
                print("no link: run `python -m deploy.netshape up` first", file=sys.stderr)
                return 1
            if " tbf " in link.qdisc_show():  # `up --qdisc tbf`: change the qdisc `up` created
                link.qdisc = "tbf"
            link.set_rate(args.rate_mbit)
            print(json.dumps(_link_info(link)))
        elif args.cmd == "down":
            link = ShapedLink(1.0, name=_CLI_NAME)
            link.close()
            print(json.dumps({"deleted": [link.server.ns, link.client.ns]}))
        elif args.cmd == "measure":
            with ShapedLink(args.rate_mbit, qdisc=args.qdisc) as link:
                runs = [measure_throughput(link, args.bytes, args.timeout) for _ in range(args.repeat)]
            rates = sorted(r.mbit_s for r in runs)
            print(json.dumps({"rate_mbit": args.rate_mbit, "qdisc": args.qdisc, "bytes": args.bytes,
                              "achieved_mbit": [round(r.mbit_s, 2) for r in runs],
                              "median_mbit": round(rates[len(rates) // 2], 2),
                              "median_ratio": round(rates[len(rates) // 2] / args.rate_mbit, 3),
                              "complete": all(r.complete for r in runs)}))
    except NetShapeUnavailable as e:
        print(f"netshape unavailable: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a failed ip/tc command, or `up` over an existing link
        print(f"netshape: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
