"""kvctl against a live server: every subcommand, JSON and table output, error lines and exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvstore.keys import ModelKey, chunk_hashes
from kvstore.kvctl import main
from tests.support import KVCTL_DRIVER

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ",".join(str(i % 500) for i in range(3 * 16 + 5))


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """``kvstore serve`` on the memory backend in a subprocess.

    Not an in-process server on a second event-loop thread: grpc.aio with several live event loops in
    one process is unreliable (grpc/grpc#25364), and kvctl's client already runs a loop of its own.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "serve", "--listen", "127.0.0.1:0", "--backend", "memory://",
         "--log-level", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        m = re.match(r"kvstore listening on (\S+) backend=memory://", line)
        assert m, f"no ready line: {line!r}"
        yield m.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


# Runs kvctl's main() for each argv in one fresh process (as the CLI runs: one process per command).
# Each main() makes a new client with its own event loop, and once grpc.aio has run on another loop in
# the process, the first StreamContext on a new loop can fail with "Internal error from Core"
# (grpc/grpc#25364); so a `get` is always the first gRPC call of its batch.


def kvctl_batch(*commands: list[str]) -> list[tuple[int, str, str]]:
    """``(exit code, stdout, stderr)`` of each kvctl command, run in order in one subprocess."""
    proc = subprocess.run(
        [sys.executable, "-c", KVCTL_DRIVER], input=json.dumps(commands), cwd=ROOT, capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout)]


def test_every_subcommand(address: str, tmp_path: Path) -> None:
    kv = np.random.default_rng(0).standard_normal((2, 2, 60, 2, 4)).astype(np.float32)
    np.save(tmp_path / "kv.npy", kv)
    (tmp_path / "ids.txt").write_text(TOKENS.replace(",", " \n"))
    model = ["--server", address, "--model", "stories260K", "--chunk-tokens", "16"]
    base = [*model, "--json"]
    ids = [int(t) for t in TOKENS.split(",")]
    ctx_id = chunk_hashes(ModelKey("stories260K", chunk_tokens=16), ids)[-1].hex()
    put, look = kvctl_batch(
        ["put", str(tmp_path / "kv.npy"), *base, "--tokens", TOKENS, "--levels", "0", "--name", "doc"],
        ["lookup", *base, "--tokens-file", str(tmp_path / "ids.txt")],
    )
    # A stream as the first gRPC call of its process (see KVCTL_DRIVER).
    (get,) = kvctl_batch(["get", str(tmp_path / "out.npy"), *base, "--tokens", TOKENS])
    ls, stat, pin, table, unpin, rm, rm_again = kvctl_batch(
        ["ls", *base],
        ["stat", "--server", address, "--json"],
        ["pin", "--server", address, "--name", "doc", "--json"],
        ["ls", "--server", address],  # a human table
        ["unpin", "--server", address, "--context-id", ctx_id, "--json"],
        ["rm", *base, "--tokens", TOKENS],
        ["rm", "--server", address, "--name", "doc"],
    )
    for code, _, err in (put, look, get, ls, stat, pin, table, unpin, rm):
        assert code == 0, err
    res = json.loads(put[1])
    assert (res["stored_chunks"], res["stored_tokens"], res["dedup_chunks"]) == (3, 48, 0)
    assert res["context_id"] == ctx_id
    res = json.loads(look[1])
    assert (res["prefix_chunks"], res["prefix_tokens"]) == (3, 48)
    assert res["chunks"][2]["tokens"] == [32, 48] and list(res["chunks"][0]["levels"]) == ["0"]
    assert json.loads(get[1])["prefix_tokens"] == 48
    got = np.load(tmp_path / "out.npy", allow_pickle=False)
    assert got.dtype == np.float16 and np.array_equal(got, kv[:, :, :48].astype(np.float16))
    (ctx,) = json.loads(ls[1])
    assert (ctx["name"], ctx["context_id"], ctx["num_chunks"]) == ("doc", ctx_id, 3)
    res = json.loads(stat[1])
    assert res["backend"] == "memory" and res["contexts"] == 1 and res["keys"] > 0
    assert json.loads(pin[1]) == {"pinned": True, "chunks": 3}
    assert "doc" in table[1] and "True" in table[1]
    assert json.loads(unpin[1]) == {"pinned": False, "chunks": 3}
    assert json.loads(rm[1]) == {"deleted": True, "chunks_freed": 3}
    code, out, err = rm_again
    assert code == 1 and out == "" and err.startswith("kvctl: error: not found:") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["lookup", "--model", "m", "--tokens", ""], "no token ids"),
        (["lookup", "--model", "m", "--tokens=-1,2"], "[0, 2**32)"),
        (["lookup", "--model", "m", "--tokens", "4294967296"], "[0, 2**32)"),
        (["lookup", "--model", "m", "--tokens", "1,x"], "integers"),
        (["lookup", "--tokens", "1,2"], "--model is required"),
        (["lookup", "--model", "m", "--dtype", "int8", "--tokens", "1"], "invalid choice"),
        (["lookup", "--model", "bad model", "--tokens", "1"], "model_id"),
        (["put", "missing.npy", "--model", "m", "--chunk-tokens", "2", "--tokens", "1,2"], "cannot load"),
        (["rm", "--name", "a", "--context-id", "00"], "exactly one of"),
        (["pin", "--context-id", "zz"], "hex"),
        (["frobnicate"], "invalid choice"),
        (["fetch", "--model", "m", "--tokens", "1", "--max-level", "1"], "--max-level needs --slo"),
        (["rm", "--tokens", "1,2"], "--model is required to name a context by its token ids"),
        (["put", "x.npy", "--model", "m", "--tokens", "1", "--ttl", "inf"], "--ttl"),
        (["fetch", "--model", "m", "--tokens", "1", "--slo", "1", "--max-level", "5"], "--max-level needs"),
    ],
)
def test_bad_input_exits_2(
    address: str, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse errors exit from inside parse_args
        code = main([*argv, "--server", address])
        raise SystemExit(code)
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == ""
    assert err.startswith("kvctl: error: ") and needle in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("array", "needle"),
    [
        (np.full((1, 2, 4, 1, 2), 1e6, np.float32), "16 values exceed the range of --dtype float16"),
        (np.full((1, 2, 4, 1, 2), np.nan, np.float32), "are not finite"),
        (np.zeros((1, 2, 4, 1, 2), np.longdouble), "expected a float16/32/64 array"),
        (np.zeros((1, 2, 4, 1, 2), np.int8), "expected a float16/32/64 array"),
        ({"a": np.zeros(2), "b": np.zeros(2)}, "got an archive of 2"),
    ],
)
def test_put_refuses_what_it_cannot_store_faithfully(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], array: object, needle: str
) -> None:
    # Checked before connecting: a silent fp32 -> fp16 overflow stored inf that verify then flagged.
    path = tmp_path / "kv.npy"
    if isinstance(array, dict):
        with path.open("wb") as f:
            np.savez(f, **array)
    else:
        np.save(path, array)
    code = main(["put", str(path), "--model", "m", "--chunk-tokens", "4", "--tokens", "1,2,3,4"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("kvctl: error: ") and needle in err, err
    assert err.count("\n") == 1


def test_server_side_rejection_and_unavailable(address: str, tmp_path: Path) -> None:
    np.save(tmp_path / "short.npy", np.zeros((1, 2, 4, 1, 2), np.float32))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    common = ["--server", address, "--model", "m", "--chunk-tokens", "4", "--tokens", "1,2,3,4,5,6,7,8"]
    (tmp_path / "empty.npy").write_bytes(b"")
    bad_level, short, down, empty = kvctl_batch(
        ["get", str(tmp_path / "out.npy"), *common, "--level", "9"],  # refused by the server
        ["put", str(tmp_path / "short.npy"), *common, "--levels", "0"],
        ["stat", "--server", dead, "--timeout", "5"],
        ["put", str(tmp_path / "empty.npy"), *common],
    )
    assert empty[0] == 2 and "cannot load" in empty[2] and empty[2].count("\n") == 1
    assert short[0] == 2 and "holds 4 tokens" in short[2]
    assert bad_level[0] == 2 and bad_level[2].startswith("kvctl: error: level must be one of")
    code, _, err = down
    assert code == 1 and err.startswith("kvctl: error: unavailable:") and err.count("\n") == 1


def test_module_entry_point(address: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVSTREAM_SERVER": address}
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore.kvctl", "stat", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "used_bytes" in json.loads(proc.stdout)
