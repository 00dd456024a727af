"""kvctl against secured servers: bearer tokens (flag, file, env), TLS, mutual TLS, and usage errors.

Servers run in-process on the test's event loop (``tests.test_security._start``); kvctl runs in one
subprocess per batch of commands (``tests.support.kvctl``), whose environment is this process's, so the
``KVSTREAM_*`` defaults are set with ``monkeypatch``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import test_security
from tests.support import kvctl
from tests.test_security import IDS, TOKEN_A, _kv, _start

# test_security's fixtures (throwaway CA + certificates via openssl, the tenants' token file), registered
# in this module by binding them here.
certs = test_security.certs
token_file = test_security.token_file

SECURITY_ENV = (
    "KVSTREAM_TOKEN", "KVSTREAM_CLIENT_TLS_CA", "KVSTREAM_CLIENT_TLS_CERT", "KVSTREAM_CLIENT_TLS_KEY"
)
WRONG_TOKEN = "wrong-token-0123456789abcdef"
MODEL = ["--model", "m", "--chunk-tokens", "64", "--tokens", ",".join(map(str, IDS))]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECURITY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def kv_file(tmp_path: Path) -> Path:
    path = tmp_path / "kv.npy"
    np.save(path, _kv().numpy(), allow_pickle=False)  # [2 layers, 2, 128 tokens, 2 kv heads, 4] float16
    return path


def _ok(result: tuple[int, str, str]) -> dict[str, object]:
    code, out, err = result
    assert code == 0, err
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def _error(result: tuple[int, str, str], code: int, starts: str) -> str:
    """The stderr line of a failed command, checked to be exactly one ``kvctl: error: <starts>...`` line."""
    got, out, err = result
    assert got == code, (got, err)
    assert out == "" and err.count("\n") == 1 and err.startswith(f"kvctl: error: {starts}"), err
    return err


def _no_secret(results: list[tuple[int, str, str]]) -> None:
    for _, out, err in results:
        assert TOKEN_A not in out + err and WRONG_TOKEN not in out + err


async def test_tokens_from_flag_file_and_env(
    token_file: Path, kv_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "token"
    secret.write_text(f"  {TOKEN_A}\n")  # as written by `echo` or a mounted secret: whitespace stripped
    srv = await _start(auth_tokens=str(token_file))
    try:
        ns_a = ["--namespace", "team-a", "--json"]
        results = await kvctl(
            srv.address,
            ["put", str(kv_file), "--levels", "0", "--token", TOKEN_A, *ns_a, *MODEL],
            ["get", str(tmp_path / "out.npy"), "--token-file", str(secret), *ns_a, *MODEL],
            ["verify", "--all", "--token", TOKEN_A, *ns_a],  # opens channels of its own (Verifier)
            ["du", "--token-file", str(secret), *ns_a],
            ["ls", *ns_a],
            ["ls", "--token", WRONG_TOKEN, *ns_a],
            ["verify", "--token-file", str(tmp_path / "nope"), *ns_a, *MODEL],
            ["verify", *ns_a, *MODEL],
            ["ls", "--token", TOKEN_A, "--namespace", "team-b"],
            ["ls", "--token", TOKEN_A, "--token-file", str(secret)],
            ["stat", "--token", TOKEN_A, "--tls-cert", "client.pem"],
        )
        put, get, verify, du, anon, wrong, missing_file, verify_anon, other_ns, both, half = results
        assert _ok(put)["stored_chunks"] == 2
        assert _ok(get)["prefix_tokens"] == 128
        assert np.load(tmp_path / "out.npy").shape == (2, 2, 128, 2, 4)
        assert _ok(verify)["ok"] is True and _ok(verify)["checked"] == 2
        assert du[0] == 0 and json.loads(du[1])[0]["contexts"] == 1
        assert "no token given" in _error(anon, 1, "unauthenticated: ")
        assert "no token given" not in _error(wrong, 1, "unauthenticated: ")
        _error(missing_file, 2, f"--token-file {tmp_path / 'nope'}: cannot read")
        _error(verify_anon, 1, "unauthenticated: ")
        _error(other_ns, 1, "permission denied: ")
        _error(both, 2, "argument --token-file: not allowed with argument --token")
        _error(half, 2, "--tls-cert and --tls-key")
        _no_secret(results)

        # $KVSTREAM_TOKEN is the default; a flag still wins over it.
        monkeypatch.setenv("KVSTREAM_TOKEN", TOKEN_A)
        results = await kvctl(srv.address, ["ls", *ns_a], ["ls", "--token", WRONG_TOKEN, *ns_a])
        assert results[0][0] == 0 and len(json.loads(results[0][1])) == 1
        _error(results[1], 1, "unauthenticated: ")
        _no_secret(results)
    finally:
        await srv.stop(0)


async def test_tls_and_mutual_tls(
    certs: Path, token_file: Path, kv_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = ["--tls-ca", str(certs / "ca.pem")]
    client_cert = ["--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key")]
    tls = await _start(
        tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"), auth_tokens=str(token_file)
    )
    mtls = await _start(
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
        tls_client_ca=str(certs / "ca.pem"),
    )
    try:
        on_tls = ["--server", tls.address, "--namespace", "team-a", "--json"]
        on_mtls = ["--server", mtls.address, "--json"]
        put, get, plain, mput, mverify, no_cert, not_pem = await kvctl(
            tls.address,
            ["put", str(kv_file), "--levels", "0", "--token", TOKEN_A, *ca, *on_tls, *MODEL],
            ["get", str(tmp_path / "out.npy"), "--token", TOKEN_A, *ca, *on_tls, *MODEL],
            ["ls", "--token", TOKEN_A, *on_tls],  # plaintext to a TLS port
            ["put", str(kv_file), "--levels", "0", *ca, *client_cert, *on_mtls, *MODEL],
            ["verify", "--all", *ca, *client_cert, *on_mtls],
            ["ls", *ca, *on_mtls],  # TLS without a client certificate
            ["ls", "--tls-ca", str(kv_file), *on_mtls],
        )
        assert _ok(put)["stored_chunks"] == 2 and _ok(get)["prefix_tokens"] == 128
        assert "give --tls-ca" in _error(plain, 1, "unavailable: ")
        assert _ok(mput)["stored_chunks"] == 2
        assert _ok(mverify)["ok"] is True and _ok(mverify)["checked"] == 2
        assert "--tls-cert/--tls-key" in _error(no_cert, 1, "unavailable: ")
        _error(not_pem, 2, f"--tls-ca {kv_file}: not a PEM file")

        # Everything from the environment: token, CA and client certificate.
        monkeypatch.setenv("KVSTREAM_TOKEN", TOKEN_A)
        monkeypatch.setenv("KVSTREAM_CLIENT_TLS_CA", str(certs / "ca.pem"))
        monkeypatch.setenv("KVSTREAM_CLIENT_TLS_CERT", str(certs / "client.pem"))
        monkeypatch.setenv("KVSTREAM_CLIENT_TLS_KEY", str(certs / "client.key"))
        results = await kvctl(
            tls.address,
            ["get", str(tmp_path / "env.npy"), *on_tls, *MODEL],
            ["ls", *on_mtls],
            ["ls", "--tls-key", "", *on_mtls],  # an empty flag unsets the key: the cert alone is bad usage
        )
        assert _ok(results[0])["prefix_tokens"] == 128
        assert results[1][0] == 0 and len(json.loads(results[1][1])) == 1
        _error(results[2], 2, "--tls-cert and --tls-key")
        _no_secret(results)
    finally:
        await tls.stop(0)
        await mtls.stop(0)
