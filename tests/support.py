"""Helpers shared by the test modules that drive a live in-process server and the kvctl CLI."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from deploy.launch import free_port
from kvstore.backends.memory import MemoryBackend
from kvstore.config import ServerConfig
from kvstore.server import KVStreamServer

ROOT = Path(__file__).resolve().parents[1]

# Runs kvctl's main() for each argv (JSON list on stdin) in one fresh process, as the CLI runs, and prints
# [[exit code, stdout, stderr], ...]. A fresh process matters: once grpc.aio has run on one event loop,
# the first stream on a new loop in the same process can fail (grpc/grpc#25364).
KVCTL_DRIVER = """
import contextlib, io, json, sys
from kvstore.kvctl import main
results = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append([code, out.getvalue(), err.getvalue()])
json.dump(results, sys.stdout)
"""


@asynccontextmanager
async def memory_server() -> AsyncIterator[KVStreamServer]:
    """A kvstream server on this event loop: memory backend, any free port, /metrics on."""
    srv = KVStreamServer(
        ServerConfig(listen="127.0.0.1:0", backend="memory://", metrics_port=free_port()),
        backend=MemoryBackend(),
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=0)


async def kvctl(server: str, *commands: list[str], timeout: float = 180) -> list[tuple[int, str, str]]:
    """``(exit code, stdout, stderr)`` of each kvctl command, in order, in one subprocess; the event loop
    keeps serving an in-process server meanwhile."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVSTREAM_SERVER": server}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KVCTL_DRIVER, cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(commands).encode()), timeout)
    assert proc.returncode == 0, err.decode()
    return [(int(c), o, e) for c, o, e in json.loads(out)]
