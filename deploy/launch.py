"""Start ``kvstore serve`` as a foreground child process and wait until it is ready.

Used by the demo, the tests and the local cluster launcher. The server is never daemonized: the caller
owns the process and must ``stop()`` it (or use it as a context manager), which waits for it to exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so launchers' ``finally`` blocks stop what they started."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A ``kvstore serve`` child process on ``host:port`` with the given backend URL."""

    def __init__(
        self,
        backend: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float = 60.0,
        module: str = "kvstore",
    ) -> None:
        """``module`` is run as ``python -m module serve --listen host:port ...`` (benchmarks start
        stand-in servers this way)."""
        self.host = host
        self.port = port or free_port(host)
        self.address = f"{host}:{self.port}"
        argv = [sys.executable, "-m", module, "serve", "--listen", self.address, *extra_args]
        if backend:
            argv += ["--backend", backend]
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        # The log goes to a file, not a pipe: an unread pipe would block a chatty server.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the process
            prefix="kvstore-serve-", suffix=".log", delete=False
        )

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log.name, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail().strip()
                raise RuntimeError(f"kvstore serve exited with {self.proc.returncode}: {tail}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"kvstore serve did not listen on {self.address} within {self.ready_timeout}s")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait (SIGKILL after ``timeout``); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        """Remove the log file (after ``stop``)."""
        os.unlink(self.log.name)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.cleanup()
