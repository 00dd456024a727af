"""Host-side storage of offloaded tensors and an overlapping prefetcher.

:class:`Prefetcher` runs fetches on a worker thread pool so that fetching layer ``i+1``'s data (an index,
the values of selected chunks) overlaps the compute of layer ``i``. On CUDA each fetched host tensor is
copied to the device on a dedicated copy stream and an event is recorded (the ShadowKV pattern); waiting
for a ticket makes the *current* stream wait on that event instead of blocking the host. On CPU the
thread pool alone gives the overlap, which is what the tests exercise with an injected slow fetch.

The fetch function is pluggable (:data:`FetchFn`): the default reads a local :class:`HostStore`; a remote
implementation can issue ranged requests to the service for rows that are not local.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

FetchFn = Callable[[int, str, torch.Tensor], torch.Tensor]
"""``fetch(layer, name, rows) -> tensor``: ``rows`` is ``[S, n]`` int64 row ids along dim 1 of the stored
``[S, N, ...]`` tensor (``-1`` = padding, any content may come back for it); returns ``[S, n, ...]`` on the
host (CPU; pinned when the consumer is on CUDA)."""


class HostStore:
    """Offloaded per-layer tensors ``[S, N, ...]`` (S = heads) in host memory, pinned for CUDA consumers.

    An entry may hold only rows ``first_row ..`` of its tensor: in the remote-backed mode the rows backed by
    the stored context are served by the kvstream service, and only rows the node made itself (ClusterKV's
    absorbed generated tokens) live here.
    """

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin
        self._data: dict[tuple[int, str], torch.Tensor] = {}
        self._first: dict[tuple[int, str], int] = {}

    def put(self, layer: int, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Hold ``tensor`` ``[S, n, ...]`` as rows ``first_row .. first_row + n`` of ``(layer, name)``."""
        t = tensor.detach().to("cpu").contiguous()
        self._data[(layer, name)] = t.pin_memory() if self.pin else t
        self._first[(layer, name)] = first_row

    def append(self, layer: int, name: str, tensor: torch.Tensor, first_row: int) -> None:
        """Add rows ``tensor`` ``[S, n, ...]`` as rows ``first_row ..`` of ``(layer, name)``, right after the
        rows held (or as the first rows held: earlier ones are served elsewhere)."""
        key = (layer, name)
        if key not in self._data:
            self.put(layer, name, tensor, first_row)
            return
        end = self._first[key] + self._data[key].shape[1]
        if first_row != end:
            raise ValueError(f"{key}: rows {first_row}.. do not follow the held rows (which end at {end})")
        self.put(layer, name, torch.cat([self._data[key], tensor.detach().to("cpu")], 1), self._first[key])

    def get(self, layer: int, name: str) -> torch.Tensor:
        """The held rows of ``(layer, name)`` (from :meth:`first_row` on)."""
        return self._data[(layer, name)]

    def first_row(self, layer: int, name: str) -> int:
        return self._first[(layer, name)]

    def items(self) -> list[tuple[tuple[int, str], torch.Tensor]]:
        """``((layer, name), held rows)`` of every entry."""
        return list(self._data.items())

    def fetch(self, layer: int, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Gather ``rows`` ``[S, n]`` of ``(layer, name)`` (int64; ``-1`` = padding, reads the first row)."""
        src = self._data[(layer, name)]
        r = (rows.to("cpu") - self._first[(layer, name)]).clamp(min=0)
        out = src[torch.arange(r.shape[0])[:, None], r]  # row gather (much faster than torch.gather on CPU)
        return out.pin_memory() if self.pin else out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._data.values())


class Ticket:
    """A pending fetch; :meth:`result` returns its tensors on the prefetcher's device."""

    def __init__(self, future: Future[tuple[list[torch.Tensor], torch.cuda.Event | None]], owner: Prefetcher):
        self._future = future
        self._owner = owner

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        tensors, event = self._future.result()
        self._owner._add_wait(time.perf_counter() - t0)
        if event is not None:
            current = torch.cuda.current_stream(self._owner.device)
            current.wait_event(event)
            for t in tensors:  # the copies were allocated on the copy stream
                t.record_stream(current)
        return tensors


class Prefetcher:
    """Overlaps fetches with compute: a thread pool on CPU, plus a copy stream and events on CUDA.

    ``workers=0`` runs every fetch inline at submit time (no overlap; same results).
    """

    def __init__(self, device: torch.device | str = "cpu", workers: int = 2) -> None:
        self.device = torch.device(device)
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kv-prefetch") if workers else None
        )
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._lock = threading.Lock()
        self.wait_s = 0.0  # host time spent blocked in Ticket.result (a perfect overlap keeps it ~0)
        self.submitted = 0

    def _add_wait(self, dt: float) -> None:
        with self._lock:
            self.wait_s += dt

    def _run(
        self, fn: Callable[[], Sequence[torch.Tensor]]
    ) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        host = list(fn())
        if self._stream is None:
            return [t.to(self.device) for t in host], None
        with torch.cuda.stream(self._stream):
            dev = [(t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True) for t in host]
            event = torch.cuda.Event()
            event.record(self._stream)
        return dev, event

    def submit(self, fn: Callable[[], Sequence[torch.Tensor]]) -> Ticket:
        """Schedule ``fn`` (returns host tensors) and return a :class:`Ticket` for its device copies."""
        self.submitted += 1
        fut: Future[tuple[list[torch.Tensor], torch.cuda.Event | None]]
        if self._pool is None:
            fut = Future()
            fut.set_result(self._run(fn))
        else:
            fut = self._pool.submit(self._run, fn)
        return Ticket(fut, self)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
