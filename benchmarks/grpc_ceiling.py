"""A storage-free stand-in front end: the ceiling of a Python gRPC fetch path on this host.

Serves ``StreamContext`` for the synthetic contexts of ``benchmarks.soak`` (rebuilt from the same seed)
straight from memory: no lookup, no storage read, no verification, no policy; one message per blob with
its xxh3, as ``kvstore serve`` sends a one-part blob. ``benchmarks.scaling_bench`` runs the same load
against it to show how much of the front end's cost is gRPC itself::

    python -m benchmarks.grpc_ceiling serve --listen 127.0.0.1:50600 [--contexts 8 --chunks 8 --seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import uvloop

from benchmarks.soak import CHANNEL_OPTS, Context, make_contexts
from kvstore.rpc import pb, pb_grpc


class MemoryStreamer(pb_grpc.KVStreamServicer):
    """``StreamContext`` of whole contexts at level 0 from a dict of token ids -> blobs."""

    def __init__(self, contexts: Sequence[Context]) -> None:
        self.contexts = {tuple(c.ids): c for c in contexts}

    async def StreamContext(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async for request in request_iterator:
            ctx = self.contexts.get(tuple(request.start.token_ids.ids))
            break
        else:
            ctx = None
        if ctx is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown context")
            return
        yield pb.StreamContextResponse(header=pb.StreamHeader(prefix_chunks=len(ctx.blobs)))
        for i, (blob, digest) in enumerate(zip(ctx.blobs, ctx.digests, strict=True)):
            chunk = pb.ChunkData(chunk_index=i, total_size=len(blob), data=blob, xxh3_64=digest, last=True)
            yield pb.StreamContextResponse(chunk=chunk)
        yield pb.StreamContextResponse(trailer=pb.StreamTrailer(verified_chunks=len(ctx.blobs)))


async def serve(listen: str, contexts: Sequence[Context]) -> None:
    server = grpc.aio.server(options=CHANNEL_OPTS)
    pb_grpc.add_KVStreamServicer_to_server(MemoryStreamer(contexts), server)
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["serve"])
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    contexts = make_contexts(args.contexts, args.chunks, args.seed)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.listen, contexts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
