"""Security of the gRPC service over real sockets: tokens, tenant isolation, quotas, TLS/mTLS, limits."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.api import AsyncKVCacheClient, KVStreamError
from deploy.launch import ServerProcess
from kvstore.auth import Tenant, TokenTable, bearer_token, token_digest
from kvstore.backends import open_backend
from kvstore.config import ServerConfig, load_config
from kvstore.keys import ModelKey
from kvstore.rpc import pb
from kvstore.server import KVStreamServer
from kvstore.wire import model_to_pb

TOKEN_A = "tenant-a-secret-0123456789"
TOKEN_B = "tenant-b-secret-0123456789"
TOKEN_ADMIN = "admin-secret-0123456789abc"
TOKEN_Q = "quota-secret-0123456789abcd"
QUOTA = 10_000  # bytes; one 64-token chunk of the small KV below is ~3.9 KB at level 0: two fit, three do not
IDS = list(range(128))
Code = grpc.StatusCode


def _kv(tokens: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, tokens, 2, 4, generator=g).half()  # [layers, 2, tokens, kv_heads, head_dim]


def _model(ns: str) -> ModelKey:
    return ModelKey("m", namespace=ns, chunk_tokens=64)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(
        f"""tokens:
  - token: {TOKEN_A}
    namespaces: [team-a]
    name: team-a
  - sha256: {token_digest(TOKEN_B).hex()}
    namespaces: [team-b]
  - token: {TOKEN_ADMIN}
    namespaces: ["*"]
  - token: {TOKEN_Q}
    namespaces: [small]
    quota_bytes: {QUOTA}
"""
    )
    return path


async def _start(**settings: Any) -> KVStreamServer:
    cfg = ServerConfig(
        listen="127.0.0.1:0", backend="memory://", health_interval=0.1, grace_seconds=0.1, **settings
    ).validate()
    srv = KVStreamServer(cfg, backend=open_backend("memory://"))
    await srv.start()
    return srv


@pytest.fixture
async def auth_server(token_file: Path) -> AsyncIterator[KVStreamServer]:
    srv = await _start(auth_tokens=str(token_file))
    try:
        yield srv
    finally:
        await srv.stop(0)


def _client(srv: KVStreamServer, ns: str = "default", **kw: Any) -> AsyncKVCacheClient:
    return AsyncKVCacheClient(srv.address, namespace=ns, timeout=5.0, **kw)


async def _code(coro: Awaitable[Any]) -> grpc.StatusCode:
    with pytest.raises(KVStreamError) as err:
        await coro
    return err.value.code


# ----- token file -----------------------------------------------------------------------------------


def test_token_file_formats_and_digests(tmp_path: Path, token_file: Path) -> None:
    table = TokenTable.from_file(token_file)
    a, b, admin, q = (table.lookup(t) for t in (TOKEN_A, TOKEN_B, TOKEN_ADMIN, TOKEN_Q))
    assert a == Tenant("team-a", frozenset({"team-a"}), 0)
    assert b is not None and b.namespaces == {"team-b"} and b.name == token_digest(TOKEN_B).hex()[:8]
    assert admin is not None and admin.allows("anything") and admin.allows("*")
    assert q is not None and q.quota_bytes == QUOTA and not q.allows("*")
    assert table.lookup("not-a-known-token-at-all") is None
    assert table.authenticate([("authorization", f"Bearer {TOKEN_A}")]) == a
    assert table.authenticate([("authorization", TOKEN_A)]) is None  # no scheme
    assert bearer_token([("x-other", "1"), ("Authorization", "bearer  tok ")]) == "tok"

    lines = tmp_path / "tokens.txt"
    lines.write_text(
        f"# comment\n{TOKEN_A} team-a,shared 1MiB\n\nsha256:{token_digest(TOKEN_B).hex()} team-b  # tail\n"
    )
    table = TokenTable.from_file(lines)
    assert table.lookup(TOKEN_A) == Tenant(
        token_digest(TOKEN_A).hex()[:8], frozenset({"team-a", "shared"}), 1 << 20
    )
    tb = table.lookup(TOKEN_B)
    assert tb is not None and tb.namespaces == {"team-b"}

    for bad in (
        "short team-a\n",  # guessable token
        f"{TOKEN_A} team-a\n{TOKEN_A} team-b\n",  # duplicate
        f"{TOKEN_A} team-a lots\n",  # bad quota
        "sha256:abcd team-a\n",  # short digest
        f"{TOKEN_A}\n",  # no namespace
        "tokens:\n  - token: " + TOKEN_A + "\n    namespaces: [a]\n    role: x\n",  # unknown key
        "# nothing\n",  # empty table
    ):
        lines.write_text(bad)
        with pytest.raises(ValueError):
            TokenTable.from_file(lines)


def test_config_and_flags(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="together"):
        ServerConfig(tls_cert="c.pem").validate()
    with pytest.raises(ValueError, match="mutual"):
        ServerConfig(tls_client_ca="ca.pem").validate()
    with pytest.raises(ValueError, match="max_data_streams"):
        ServerConfig(max_data_streams=0).validate()
    for bad, needle in (
        ({"health_interval": 0}, "health_interval"),  # would probe the backend in a busy loop
        ({"grace_seconds": -1}, "grace_seconds"),
        ({"listen": "127.0.0.1:99999"}, "port"),  # grpc would quietly listen on 99999 - 65536
    ):
        with pytest.raises(ValueError, match=needle):
            ServerConfig(**bad).validate()  # type: ignore[arg-type]
    (tmp_path / "bad.yaml").write_text("listen: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    cfg = load_config(
        env={"KVSTREAM_AUTH_TOKENS": "/etc/kv/tokens", "KVSTREAM_MAX_DATA_STREAMS": "3"},
        overrides={"tls_cert": "c.pem", "tls_key": "k.pem"},
    )
    assert (cfg.auth_tokens, cfg.max_data_streams, cfg.tls_cert, cfg.tls_key) == (
        "/etc/kv/tokens",
        3,
        "c.pem",
        "k.pem",
    )
    from kvstore.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--auth-tokens", "t", "--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca"]
    )
    assert (args.auth_tokens, args.tls_cert, args.tls_key, args.tls_client_ca) == ("t", "c", "k", "ca")


async def test_serve_startup_failures_are_one_line(tmp_path: Path) -> None:
    import socket
    import sys

    from kvstore.backends.embedded import EmbeddedBackend
    from tests.support import ROOT

    def serve(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kvstore", "serve", "--listen", "127.0.0.1:0", *argv],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    held = EmbeddedBackend(tmp_path / "db")  # this process owns the store
    try:
        in_use = await asyncio.to_thread(serve, "--backend", f"embedded://{tmp_path / 'db'}")
    finally:
        await held.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        metrics = await asyncio.to_thread(serve, "--backend", "memory://", "--metrics-port", str(port))
    for proc, needle in ((in_use, "in use"), (metrics, f"cannot serve metrics on 127.0.0.1:{port}")):
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("kvstore: error: ") and needle in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr  # no traceback, no "Exception ignored"


# ----- authentication ---------------------------------------------------------------------------------


async def test_without_auth_everything_works_as_before() -> None:
    srv = await _start()
    try:
        async with _client(srv, "any-ns") as kvs:
            await kvs.store(_model("any-ns"), IDS, _kv(), levels=[0])
            res = await kvs.fetch(_model("any-ns"), IDS, level=0)
            assert res.prefix_tokens == 128
            assert (await kvs.stat("")).contexts == 1
    finally:
        await srv.stop(0)


async def test_requests_without_a_valid_token_are_unauthenticated(auth_server: KVStreamServer) -> None:
    for kw in ({}, {"token": "wrong-token-0123456789abcdef"}):
        async with _client(auth_server, "team-a", **kw) as kvs:
            assert await _code(kvs.lookup(_model("team-a"), IDS)) == Code.UNAUTHENTICATED
            assert await _code(kvs.store(_model("team-a"), IDS, _kv(), levels=[0])) == Code.UNAUTHENTICATED
            assert await _code(kvs.fetch(_model("team-a"), IDS)) == Code.UNAUTHENTICATED
            assert await _code(kvs.ls()) == Code.UNAUTHENTICATED
            assert await _code(kvs.stat("team-a")) == Code.UNAUTHENTICATED
    assert auth_server.metrics.registry.get_sample_value(
        "kvstream_requests_total", {"method": "StreamContext", "code": "UNAUTHENTICATED"}
    )
    # Health and reflection stay open (load balancers and grpcurl carry no token).
    async with grpc.aio.insecure_channel(auth_server.address) as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        async for resp in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([req])):
            assert "kvstream.v1.KVStream" in {s.name for s in resp.list_services_response.service}
            break


async def test_tenants_are_isolated(auth_server: KVStreamServer) -> None:
    kv = _kv()
    async with (
        _client(auth_server, "team-a", token=TOKEN_A) as a,
        _client(auth_server, "team-b", token=TOKEN_B) as b,
        _client(auth_server, "default", token=TOKEN_ADMIN) as admin,
    ):
        put = await a.store(_model("team-a"), IDS, kv, levels=[0], name="doc")
        assert put.stored_chunks == 2
        got = await a.fetch(_model("team-a"), IDS, level=0)
        assert got.prefix_tokens == 128 and got.kv is not None

        # Same model id and token ids in B's own namespace: the namespace salts every chunk key, so a miss.
        assert (await b.lookup(_model("team-b"), IDS)).prefix_tokens == 0
        miss = await b.fetch(_model("team-b"), IDS, level=0)
        assert miss.prefix_tokens == 0 and miss.kv is None
        assert await b.ls() == []

        # Naming A's namespace (or the default one B was not given) is refused on every RPC.
        ma = _model("team-a")
        refused: list[Callable[[], Awaitable[Any]]] = [
            lambda: b.lookup(ma, IDS),
            lambda: b.fetch(ma, IDS, level=0),
            lambda: b.store(ma, IDS, kv, levels=[0]),
            lambda: b.get_context(ma, IDS),
            lambda: b.get_context(ModelKey("any", namespace="team-a"), context_id=put.context_id),
            lambda: b.delete(ma, IDS),
            lambda: b.pin(ma, IDS),
            lambda: b.unpin(ma, context_id=put.context_id),
            lambda: b.ls(namespace="team-a"),
            lambda: b.stat("team-a"),
            lambda: b.stat(""),  # the whole store: wildcard tokens only
            lambda: b.lookup(_model("default"), IDS),
        ]
        assert [await _code(f()) for f in refused] == [Code.PERMISSION_DENIED] * len(refused)
        # A name resolves in the caller's own namespace: allowed, and A's name is not there.
        assert await _code(b.get_context("m", name="doc")) == Code.NOT_FOUND

        # Empty namespaces in raw requests mean "default" and are checked as such.
        ch_ok = await b.ls(namespace="team-b")
        assert ch_ok == []
        stub = b._stub(auth_server.address)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.List(pb.ListRequest(namespace=""))
        assert err.value.code() == Code.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetContext(pb.ContextRef(model=pb.ModelSpec(), name="doc"))
        assert err.value.code() == Code.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            spec = model_to_pb(ma)
            await stub.Lookup(pb.LookupRequest(model=spec, token_ids=pb.TokenIds(ids=IDS)))
        assert err.value.code() == Code.PERMISSION_DENIED

        # The wildcard token sees everything; A's data is intact after B's attempts.
        assert (await admin.stat("")).contexts == 1
        assert [c.name for c in await admin.ls(namespace="team-a")] == ["doc"]
        assert (await admin.fetch(_model("team-a"), IDS, level=0)).prefix_tokens == 128
        assert (await a.get_context(_model("team-a"), name="doc")).context_id == put.context_id


async def test_sighup_reloads_the_token_file(tmp_path: Path) -> None:
    """``kvstore serve`` re-reads --auth-tokens on SIGHUP: rotated tokens work at once, revoked ones stop,
    and a file that does not load keeps the previous table (no lockout by typo)."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN_A} team-a\n")
    model = _model("team-a")
    with ServerProcess("memory://", extra_args=["--auth-tokens", str(tokens)]) as srv:

        async def code_with(token: str) -> grpc.StatusCode | None:
            async with AsyncKVCacheClient(srv.address, namespace="team-a", token=token, timeout=5.0) as c:
                try:
                    await c.lookup(model, IDS)
                except KVStreamError as e:
                    return e.code
            return None

        async def after_sighup(token: str, want: grpc.StatusCode | None) -> None:
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while (got := await code_with(token)) != want:  # the reload runs on the server's loop
                assert time.monotonic() < deadline, (got, want, srv.log_tail())
                await asyncio.sleep(0.05)

        assert await code_with(TOKEN_A) is None  # also proves the handlers are installed
        tokens.write_text(f"{TOKEN_B} team-a\n")  # rotate: A revoked, B issued
        await after_sighup(TOKEN_B, None)
        assert await code_with(TOKEN_A) == Code.UNAUTHENTICATED
        tokens.write_text(f"{TOKEN_A} team-a lots\n")  # broken (bad quota): B must keep working
        srv.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        for _ in range(20):
            if "keeping the previous 1 tokens" in srv.log_tail():
                break
            await asyncio.sleep(0.05)
        assert "keeping the previous 1 tokens" in srv.log_tail()
        assert await code_with(TOKEN_B) is None and await code_with(TOKEN_A) == Code.UNAUTHENTICATED
        tokens.write_text("# every token revoked\n")  # an emptied file revokes the last token too
        await after_sighup(TOKEN_B, Code.UNAUTHENTICATED)


# ----- quotas -------------------------------------------------------------------------------------------


async def test_quota_rejects_uploads_that_would_exceed_it(auth_server: KVStreamServer) -> None:
    model = _model("small")
    async with (
        _client(auth_server, "small", token=TOKEN_Q) as q,
        _client(auth_server, token=TOKEN_ADMIN) as adm,
    ):
        first = await q.store(model, IDS[:64], _kv(64, seed=1), levels=[0])
        second = await q.store(model, [500 + i for i in range(64)], _kv(64, seed=2), levels=[0])
        used = first.bytes_written + second.bytes_written
        assert used <= QUOTA < used + first.bytes_written - 500  # the test's premise: a third one cannot fit
        again = await q.store(model, IDS[:64], _kv(64, seed=1), levels=[0])  # a retry adds nothing
        assert again.dedup_chunks == 1
        # Adding levels one put at a time counts every level: the quota cannot be walked around.
        refused = []
        for level in (1, 2, 3, 4):
            try:
                await q.store(model, IDS[:64], _kv(64, seed=1), levels=[level])
            except KVStreamError as e:
                assert e.code == Code.RESOURCE_EXHAUSTED and "quota" in e.message
                refused.append(level)
        assert refused and sum(c.total_bytes for c in await q.ls()) <= QUOTA
        third_ids = [1000 + i for i in range(64)]
        with pytest.raises(KVStreamError) as err:
            await q.store(model, third_ids, _kv(64, seed=3), levels=[0])
        assert err.value.code == Code.RESOURCE_EXHAUSTED and "quota" in err.value.message
        assert (await q.lookup(model, third_ids)).prefix_tokens == 0  # nothing stored
        stored = await q.ls()
        assert sum(c.total_bytes for c in stored) <= QUOTA

        # An upload larger than the quota by itself fails while streaming, before Commit.
        with pytest.raises(KVStreamError) as err:
            await q.store(model, list(range(2000, 2000 + 64 * 4)), _kv(256, seed=4), levels=[0, 1])
        assert err.value.code == Code.RESOURCE_EXHAUSTED and "quota" in err.value.message

        # Freeing space makes room again; tokens without a quota are not limited.
        for c in stored:
            await q.delete(model, context_id=c.context_id)
        await q.store(model, third_ids, _kv(64, seed=3), levels=[0])
        await adm.store(model, list(range(3000, 3000 + 256)), _kv(256, seed=5), levels=[0, 1])


async def test_quota_holds_across_front_ends_sharing_a_store(redis_url: str, tmp_path: Path) -> None:
    """Three front ends over one Redis, one upload each, at once; the quota fits two: exactly two land.

    Each front end's commit is slowed down (fault injection around the real store) so that, without a
    lease shared through the store, all three quota checks would run before any commit and pass.
    """
    ns = f"race-{tmp_path.name}"[-60:]
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"tokens:\n  - token: {TOKEN_Q}\n    namespaces: [{ns}]\n    quota_bytes: {QUOTA}\n")
    fronts = []
    for _ in range(3):
        cfg = ServerConfig(
            listen="127.0.0.1:0", backend=redis_url, grace_seconds=0.1, auth_tokens=str(tokens)
        ).validate()
        srv = KVStreamServer(cfg, backend=open_backend(redis_url))
        real_put = srv.store.put

        async def slow_put(*args: Any, _real: Callable[..., Awaitable[Any]] = real_put, **kw: Any) -> Any:
            await asyncio.sleep(0.2)
            return await _real(*args, **kw)

        srv.store.put = slow_put  # type: ignore[method-assign]
        await srv.start()
        fronts.append(srv)
    model = _model(ns)
    try:
        clients = [_client(srv, ns, token=TOKEN_Q) for srv in fronts]
        async with contextlib.AsyncExitStack() as stack:
            for c in clients:
                await stack.enter_async_context(c)
            results = await asyncio.gather(
                *(
                    c.store(model, [10_000 * i + t for t in range(64)], _kv(64, seed=i), levels=[0])
                    for i, c in enumerate(clients)
                ),
                return_exceptions=True,
            )
            stored = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, KVStreamError)]
            assert len(stored) == 2 and len(refused) == 1, results
            assert all(r.code == Code.RESOURCE_EXHAUSTED and "quota" in r.message for r in refused)
            assert sum(c.total_bytes for c in await clients[0].ls()) <= QUOTA
    finally:
        for srv in fronts:
            await srv.stop(0)


# ----- TLS ------------------------------------------------------------------------------------------------


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Throwaway CA, server cert (localhost / 127.0.0.1) and client cert, all P-256, valid one day."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to generate test certificates")
    d = tmp_path_factory.mktemp("certs")
    key = _EC_KEY
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=kvstream test CA", cwd=d)  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


async def _round_trip(kvs: AsyncKVCacheClient, ns: str = "default") -> None:
    await kvs.store(_model(ns), IDS, _kv(), levels=[0])
    assert (await kvs.fetch(_model(ns), IDS, level=0)).prefix_tokens == 128


async def test_tls(certs: Path, token_file: Path) -> None:
    srv = await _start(tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
    try:
        async with _client(srv, tls_ca=certs / "ca.pem") as kvs:
            await _round_trip(kvs)
        async with _client(srv) as plain:  # a plaintext client cannot talk to a TLS port
            assert await _code(plain.lookup(_model("default"), IDS)) == Code.UNAVAILABLE
    finally:
        await srv.stop(0)
    # TLS and tokens together.
    srv = await _start(
        tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"), auth_tokens=str(token_file)
    )
    try:
        async with _client(srv, "team-a", tls_ca=certs / "ca.pem", token=TOKEN_A) as kvs:
            await _round_trip(kvs, "team-a")
        async with _client(srv, "team-a", tls_ca=certs / "ca.pem") as anon:
            assert await _code(anon.lookup(_model("team-a"), IDS)) == Code.UNAUTHENTICATED
    finally:
        await srv.stop(0)


async def test_reload_rotates_the_server_certificate(certs: Path, tmp_path: Path) -> None:
    """A certificate from a new CA, staged by ``reload()`` (SIGHUP), serves every later handshake; a
    broken file is refused by the reload and the running certificate stays."""
    new = tmp_path / "new"
    new.mkdir()
    _openssl("req", "-x509", *_EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=kvstream test CA 2", cwd=new)  # fmt: skip
    _openssl("req", *_EC_KEY, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server", cwd=new)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "1", "-extfile", str(certs / "server.ext"), cwd=new)  # fmt: skip
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(certs / name, live / name)
    srv = await _start(tls_cert=str(live / "server.pem"), tls_key=str(live / "server.key"))
    try:
        async with _client(srv, tls_ca=new / "ca.pem") as kvs:  # does not trust the running certificate
            assert await _code(kvs.lookup(_model("default"), IDS)) == Code.UNAVAILABLE
        for name in ("server.pem", "server.key"):
            shutil.copy(new / name, live / name)
        assert srv.reload()
        async with _client(srv, tls_ca=new / "ca.pem") as kvs:
            await _round_trip(kvs)
        async with _client(srv, tls_ca=certs / "ca.pem") as old:
            assert await _code(old.lookup(_model("default"), IDS)) == Code.UNAVAILABLE
        (live / "server.key").write_text("not a key")
        assert not srv.reload()  # refused: the running certificate stays
        async with _client(srv, tls_ca=new / "ca.pem") as kvs:
            await _round_trip(kvs)
    finally:
        await srv.stop(0)


async def test_mutual_tls_requires_a_client_certificate(certs: Path) -> None:
    srv = await _start(
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem"),
    )
    try:
        async with _client(
            srv, tls_ca=certs / "ca.pem", tls_cert=certs / "client.pem", tls_key=certs / "client.key"
        ) as kvs:
            await _round_trip(kvs)
        async with _client(srv, tls_ca=certs / "ca.pem") as no_cert:
            assert await _code(no_cert.lookup(_model("default"), IDS)) == Code.UNAVAILABLE
        # A certificate the client CA did not sign (the server's own key pair is signed by the CA, so use
        # a self-signed one) is refused as well.
        _openssl("req", "-x509", *_EC_KEY, "-keyout", "rogue.key", "-out", "rogue.pem", "-days", "1",
                 "-subj", "/CN=rogue", cwd=certs)  # fmt: skip
        async with _client(
            srv, tls_ca=certs / "ca.pem", tls_cert=certs / "rogue.pem", tls_key=certs / "rogue.key"
        ) as rogue:
            assert await _code(rogue.lookup(_model("default"), IDS)) == Code.UNAVAILABLE
    finally:
        await srv.stop(0)
    with pytest.raises(ValueError, match="together"):
        AsyncKVCacheClient("127.0.0.1:1", tls_cert=certs / "client.pem")


# ----- limits -----------------------------------------------------------------------------------------------


async def test_concurrent_data_streams_are_capped() -> None:
    srv = await _start(max_data_streams=1)
    try:
        async with _client(srv) as kvs:
            await kvs.store(_model("default"), IDS, _kv(), levels=[0])
            stub = kvs._stub(srv.address)
            # A StreamContext whose client has not sent its StreamStart yet holds the only slot.
            held = stub.StreamContext(timeout=10)
            for _ in range(500):
                if srv.metrics.registry.get_sample_value("kvstream_streams_active") == 1:
                    break
                await asyncio.sleep(0.01)
            assert srv.metrics.registry.get_sample_value("kvstream_streams_active") == 1
            for attempt in (
                kvs.fetch(_model("default"), IDS),
                kvs.store(_model("default"), IDS, _kv(), levels=[0]),
            ):
                with pytest.raises(KVStreamError) as err:
                    await attempt
                assert err.value.code == Code.UNAVAILABLE and "max_data_streams" in err.value.message
            registry = srv.metrics.registry  # busy refusals are told apart from backend trouble
            assert registry.get_sample_value("kvstream_rejected_total", {"reason": "data_streams"}) == 2
            # With a second front end over the same store, a busy one is skipped.
            other = KVStreamServer(srv.config, backend=srv.backend)
            await other.start()
            try:
                async with AsyncKVCacheClient([srv.address, other.address], timeout=5.0) as both:
                    for _ in range(2):  # round robin: one of the two starts at the busy front end
                        assert (await both.fetch(_model("default"), IDS, level=0)).prefix_tokens == 128
                        await both.store(_model("default"), IDS, _kv(), levels=[0])
            finally:
                await other.stop(0)
            assert (
                await kvs.lookup(_model("default"), IDS)
            ).prefix_tokens == 128  # unary RPCs are not capped
            held.cancel()
            for _ in range(500):
                if not srv.metrics.registry.get_sample_value("kvstream_streams_active"):
                    break
                await asyncio.sleep(0.01)
            assert (
                await kvs.fetch(_model("default"), IDS, level=0)
            ).prefix_tokens == 128  # slot is free again
    finally:
        await srv.stop(0)
