"""The code in the docs runs: every ```python block of README.md and docs/*.md, and the kvctl session of
docs/operator-guide.md, against a live server started here.

* A ```python block is skipped when the line before it (blank lines aside) is ``<!-- no-test -->``
  (API signatures, examples that need root or a GPU). Each block runs in a fresh interpreter with
  ``KVSTREAM_SERVER`` set to the test server; examples read
  ``os.environ.get("KVSTREAM_SERVER", "127.0.0.1:50551")``.
* ```bash blocks marked ``<!-- smoke-test -->`` run in order under ``bash -e`` in a scratch directory with
  ``kvctl`` on PATH, ``../shared/models/stories260K.bin`` replaced by the test model's path.

The server runs on the test's event loop (memory backend); examples run in subprocesses, so this process
never drives a second grpc.aio loop (grpc/grpc#25364).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvstore.server import KVStreamServer
from tests.support import memory_server

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SKIP_MARK = "<!-- no-test -->"
SMOKE_MARK = "<!-- smoke-test -->"
MODEL_IN_DOCS = "../shared/models/stories260K.bin"
TIMEOUT_S = 120


def fenced_blocks(path: Path, lang: str) -> list[tuple[int, str, str]]:
    """``(line, marker, code)`` of each fenced block of ``lang``; ``marker`` is the HTML comment on the
    closest non-blank line before the fence ("" if none)."""
    text = path.read_text()
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1) != lang:
            continue
        before = [ln.strip() for ln in text[: m.start()].splitlines() if ln.strip()]
        marker = before[-1] if before and before[-1].startswith("<!--") else ""
        out.append((text.count("\n", 0, m.start()) + 1, marker, m.group(2)))
    return out


PYTHON_BLOCKS = [
    pytest.param(code, id=f"{p.relative_to(ROOT)}:{line}", marks=[pytest.mark.skip(reason=SKIP_MARK)])
    if marker == SKIP_MARK
    else pytest.param(code, id=f"{p.relative_to(ROOT)}:{line}")
    for p in DOC_FILES
    for line, marker, code in fenced_blocks(p, "python")
]


@pytest.fixture
async def server() -> AsyncIterator[KVStreamServer]:
    async with memory_server() as srv:
        yield srv


async def _run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Exit code and combined output of ``argv``; the event loop keeps serving meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{argv[:3]} did not finish in {TIMEOUT_S} s")
    return int(proc.returncode or 0), out.decode(errors="replace")


def _env(server: KVStreamServer) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KVSTREAM_SERVER": server.address,
        "KVSTREAM_METRICS_URL": f"http://127.0.0.1:{server.metrics_port}/metrics",
    }


def test_blocks_are_found() -> None:
    assert len(PYTHON_BLOCKS) >= 5  # README, codec, inference-integration, sparse, operator-guide ...
    assert SMOKE_MARK in [m for _, m, _ in fenced_blocks(ROOT / "docs" / "operator-guide.md", "bash")]


@pytest.mark.parametrize("code", PYTHON_BLOCKS)
async def test_python_example(code: str, server: KVStreamServer, tmp_path: Path) -> None:
    code_rc, out = await _run([sys.executable, "-c", code], _env(server), tmp_path)
    assert code_rc == 0, out[-4000:]


async def test_operator_guide_session(server: KVStreamServer, model_path: Path, tmp_path: Path) -> None:
    blocks = [c for _, m, c in fenced_blocks(ROOT / "docs" / "operator-guide.md", "bash") if m == SMOKE_MARK]
    assert blocks
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kvctl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kvstore.kvctl "$@"\n')
    (bindir / "python").symlink_to(sys.executable)
    (bindir / "kvctl").chmod(0o755)
    env = _env(server)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    script = "\n".join(blocks).replace(MODEL_IN_DOCS, str(model_path))
    work = tmp_path / "work"
    work.mkdir()
    code, out = await _run(["bash", "-e", "-c", script], env, work)
    assert code == 0, out[-4000:]
    assert "0 bad" in out and '"pinned": true' in out and "lookup hit rate" in out
