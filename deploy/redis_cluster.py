"""Throwaway local Redis servers and Redis Clusters on loopback, for tests, benchmarks and demos.

Each ``redis-server`` runs in the foreground as our child (``subprocess.Popen``; never
``--daemonize yes``, whose detached servers outlive us), on a free loopback port, in its own temporary
directory, with persistence off (``--save '' --appendonly no``). Stopping terminates, waits for and
removes everything, also at interpreter exit if the owner forgot.

    with redis_server(maxmemory="64mb") as srv:          # srv.url == "redis://127.0.0.1:PORT/0"
        ...
    with redis_cluster(primaries=3, replicas=1) as cl:    # cl.url == "redis+cluster://127.0.0.1:P1,..."
        ...

``python -m deploy.redis_cluster [--single] [--primaries 3] [--replicas 1]`` keeps one running until
Ctrl-C and prints its backend URL.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from deploy.launch import stop_on_sigterm

HOST = "127.0.0.1"
N_SLOTS = 16384
_live: set[RedisProcess] = set()


class HarnessError(RuntimeError):
    """A server or cluster did not come up."""


def redis_server_path() -> str | None:
    """Absolute path of ``redis-server`` on PATH, or None."""
    return shutil.which("redis-server")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(rng: random.Random) -> int:
    """A port free on loopback whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = rng.randrange(20000, 55000)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise HarnessError("no free loopback port pair found")


@dataclass(eq=False)
class RedisProcess:
    """One foreground ``redis-server`` child process."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5)

    def log_tail(self, n: int = 20) -> str:
        log = self.workdir / "redis.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""

    def stop(self) -> None:
        """Terminate, reap, and delete the working directory (idempotent)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        _live.discard(self)


def _wait_ping(srv: RedisProcess, deadline: float) -> None:
    client = srv.client()
    try:
        while True:
            if srv.proc.poll() is not None:
                raise HarnessError(
                    f"redis-server on port {srv.port} exited ({srv.proc.returncode}):\n{srv.log_tail()}"
                )
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                pass  # still loading
            if time.monotonic() > deadline:
                raise HarnessError(f"redis-server on port {srv.port} did not answer PING:\n{srv.log_tail()}")
            time.sleep(0.02)
    finally:
        client.close()


def start_server(
    *,
    maxmemory: str | int | None = None,
    policy: str = "volatile-lru",
    cluster: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float = 15.0,
    seed: int | None = None,
) -> RedisProcess:
    """Start one ``redis-server`` and return once it answers PING.

    ``maxmemory`` as Redis accepts it (``"64mb"`` or bytes); ``policy`` is the maxmemory policy
    (``volatile-lru``: only TTL keys are evicted, pinned keys never; ``noeviction``: writes fail with OOM).
    """
    binary = redis_server_path()
    if binary is None:
        raise HarnessError("redis-server not found on PATH (apt-get install redis-server)")
    rng = random.Random(seed)
    last_error: Exception | None = None
    for _ in range(5):  # a port can be taken between the probe and the bind: retry elsewhere
        port = free_port(rng)
        workdir = Path(tempfile.mkdtemp(prefix=f"kvs-redis-{port}-"))
        args = [
            binary, "--port", str(port), "--bind", HOST, "--dir", str(workdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
            "--maxmemory-policy", policy,
        ]  # fmt: skip
        if maxmemory is not None:
            args += ["--maxmemory", str(maxmemory)]
        if cluster:
            # no 5 s wait before a replica's first (diskless) full sync: start_cluster waits for it
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf"),
                     "--cluster-node-timeout", "5000", "--repl-diskless-sync-delay", "0"]  # fmt: skip
        args += list(extra_args)
        with open(workdir / "redis.log", "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        srv = RedisProcess(port, workdir, proc)
        _live.add(srv)
        try:
            _wait_ping(srv, time.monotonic() + timeout)
            return srv
        except HarnessError as e:
            srv.stop()
            last_error = e
    raise HarnessError(f"could not start redis-server: {last_error}")


@dataclass(eq=False)
class LocalCluster:
    """A Redis Cluster of foreground child processes on loopback."""

    nodes: list[RedisProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """``redis+cluster://`` backend URL listing every node as a seed."""
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def primaries(self) -> list[RedisProcess]:
        out = []
        for n in self.nodes:
            with contextlib.closing(n.client()) as c:
                if c.info("replication").get("role") == "master":
                    out.append(n)
        return out

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def _cluster_ready(nodes: Sequence[RedisProcess], primaries: int) -> str | None:
    """None when every node reports ``cluster_state:ok``, knows every node and all slots are covered."""
    for n in nodes:
        with contextlib.closing(n.client()) as c:
            info = c.cluster("info")
            if info.get("cluster_state") != "ok":
                return f"port {n.port}: cluster_state {info.get('cluster_state')}"
            if int(info.get("cluster_known_nodes", 0)) != len(nodes):
                return f"port {n.port}: knows {info.get('cluster_known_nodes')} of {len(nodes)} nodes"
            covered = sum(end - start + 1 for start, end, *_ in c.execute_command("CLUSTER", "SLOTS"))
            owners = {tuple(r[2][:2]) for r in c.execute_command("CLUSTER", "SLOTS")}
            if covered != N_SLOTS or len(owners) != primaries:
                return f"port {n.port}: {covered} slots covered by {len(owners)} primaries"
    return None


def _replicas_synced(nodes: Sequence[RedisProcess], replicas: int) -> str | None:
    """None when every replica's link is up and its primary lists it ``state=online``."""
    online: dict[int, set[int]] = {}  # primary port -> ports of its online replicas
    links: list[tuple[int, int]] = []  # (replica port, primary port)
    for n in nodes:
        with contextlib.closing(n.client()) as c:
            info = c.info("replication")
        if info.get("role") == "master":
            slaves = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            online[n.port] = {int(r["port"]) for r in slaves if r.get("state") == "online"}
        elif info.get("master_link_status") != "up":
            return f"replica port {n.port}: master_link_status {info.get('master_link_status')}"
        else:
            links.append((n.port, int(info["master_port"])))
    if len(links) != len(online) * replicas:
        return f"{len(links)} replicas with a link up, {len(online) * replicas} expected"
    for replica, primary in links:
        if replica not in online.get(primary, set()):
            return f"replica port {replica}: not online at its primary (port {primary})"
    return None


def _wait_for(check: Callable[[], str | None], timeout: float, what: str) -> None:
    """Poll ``check`` (None = done, else why not) every 50 ms; ``HarnessError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (why := check()) is not None:
        if time.monotonic() > deadline:
            raise HarnessError(f"{what} after {timeout:.0f} s: {why}")
        time.sleep(0.05)


def start_cluster(
    primaries: int = 3,
    replicas: int = 1,
    *,
    maxmemory: str | int | None = None,
    policy: str = "volatile-lru",
    timeout: float = 60.0,
    sync_timeout: float = 30.0,
    seed: int | None = None,
) -> LocalCluster:
    """Start ``primaries * (1 + replicas)`` nodes and join them with ``redis-cli --cluster create``.

    Returns once every node reports ``cluster_state:ok`` and every replica has finished its initial sync
    (link up, ``state=online`` at its primary), so killing a primary right away tests a real failover.
    """
    cli = shutil.which("redis-cli")
    if cli is None:
        raise HarnessError("redis-cli not found on PATH (apt-get install redis-server)")
    if primaries < 3:
        raise ValueError("redis-cli --cluster create needs at least 3 primaries")
    cluster = LocalCluster()
    rng = random.Random(seed)
    try:
        for _ in range(primaries * (1 + replicas)):
            node_seed = rng.randrange(1 << 30) if seed is not None else None
            cluster.nodes.append(
                start_server(maxmemory=maxmemory, policy=policy, cluster=True, seed=node_seed)
            )
        create = [cli, "--cluster", "create", *(f"{HOST}:{n.port}" for n in cluster.nodes),
                  "--cluster-replicas", str(replicas), "--cluster-yes"]  # fmt: skip
        res = subprocess.run(
            create, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if res.returncode != 0:
            raise HarnessError(
                f"redis-cli --cluster create failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
            )
        _wait_for(lambda: _cluster_ready(cluster.nodes, primaries), timeout, "cluster not ready")
        _wait_for(lambda: _replicas_synced(cluster.nodes, replicas), sync_timeout, "replicas not in sync")
        return cluster
    except BaseException:
        cluster.stop()
        raise


@contextlib.contextmanager
def redis_server(**kwargs: object) -> Iterator[RedisProcess]:
    """``start_server(**kwargs)`` as a context manager that always stops it."""
    srv = start_server(**kwargs)  # type: ignore[arg-type]
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def redis_cluster(primaries: int = 3, replicas: int = 1, **kwargs: object) -> Iterator[LocalCluster]:
    """``start_cluster(...)`` as a context manager that always stops it."""
    cluster = start_cluster(primaries, replicas, **kwargs)  # type: ignore[arg-type]
    try:
        yield cluster
    finally:
        cluster.stop()


@atexit.register
def _stop_leftovers() -> None:
    for srv in list(_live):
        srv.stop()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run a local Redis (Cluster) on loopback until Ctrl-C.")
    ap.add_argument("--single", action="store_true", help="one server instead of a cluster")
    ap.add_argument("--primaries", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--maxmemory", default=None, help="per node, e.g. 256mb")
    args = ap.parse_args(argv)
    stop_on_sigterm()  # `kill` stops as cleanly as Ctrl-C
    if args.single:
        ctx: contextlib.AbstractContextManager[RedisProcess | LocalCluster] = redis_server(
            maxmemory=args.maxmemory
        )
    else:
        ctx = redis_cluster(args.primaries, args.replicas, maxmemory=args.maxmemory)
    with ctx as running:
        print(running.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
