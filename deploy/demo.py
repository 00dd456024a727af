"""The main job, end to end on the embedded default store (no Redis needed).

1. start ``kvstore serve`` (embedded on-disk store) as a child process;
2. sample a context from the real model ``stories260K`` and prefill it: its KV cache
   ``[layers, 2, tokens, kv_heads, head_dim]`` in float16;
3. store it through gRPC at every codec level (worker A);
4. fetch it back through gRPC (worker B) at every level, continue the
   model from the fetched cache and compare the next-token logits with worker A's own cache.

Exit code 0 only if the lossless round trip is bit-exact and reproduces the logits exactly.
Run: ``make demo`` (or ``python -m deploy.demo --help``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

import codec
from client import KVCacheClient
from client.model import Llama2c, default_model_path
from deploy.launch import ServerProcess
from kvstore.keys import ModelKey


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_path()), help="llama2.c checkpoint")
    ap.add_argument("--tokens", type=int, default=448, help="context length (full chunks are stored)")
    ap.add_argument("--chunk-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--backend", default=None, help="backend URL (default: kvstore's embedded default)")
    ap.add_argument("--fresh", action="store_true", help="use a throwaway embedded store in a temp dir")
    args = ap.parse_args(argv)
    console = Console(width=max(Console().width, 110))

    model = Llama2c.from_file(args.model)
    ids = model.sample(args.tokens + 1, seed=args.seed)  # +1: the token whose logits we compare
    context, nxt = ids[:-1], ids[-1]
    n_full = (len(context) // args.chunk_tokens) * args.chunk_tokens
    context = context[:n_full]
    kv = model.forward(context).kv.to(torch.float16)
    ref_logits = model.forward([nxt], past_kv=kv).logits[-1]  # worker A continues from its own cache
    key = ModelKey("stories260K", chunk_tokens=args.chunk_tokens, dtype="float16")

    with tempfile.TemporaryDirectory(prefix="kvstream-demo-") as tmp:
        backend = f"embedded://{tmp}/store" if args.fresh else args.backend
        with ServerProcess(backend) as server:
            console.print(
                f"[bold]kvstore serve[/] on {server.address} (backend: {backend or 'embedded default'})"
            )
            with KVCacheClient(server.address) as worker_a:
                t = time.perf_counter()
                put = worker_a.store(key, context, kv, name=f"demo-seed{args.seed}")
                console.print(
                    f"worker A stored {put.stored_tokens} tokens in {put.stored_chunks} chunks x "
                    f"{len(codec.LEVELS)} levels: {put.bytes_written} new bytes, {put.dedup_chunks} chunks "
                    f"already stored ({time.perf_counter() - t:.2f}s)"
                )
            with KVCacheClient(server.address) as worker_b:
                rows, ok = [], True
                for level in codec.LEVELS:
                    res = worker_b.fetch(key, context + [nxt], level=level)
                    if res.kv is None or res.prefix_tokens != n_full:
                        console.print(f"[red]level {level}: fetched {res.prefix_tokens}/{n_full} tokens[/]")
                        return 1
                    logits = model.forward([nxt], past_kv=res.kv).logits[-1]
                    kl = torch.nn.functional.kl_div(
                        logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="sum"
                    ).item()
                    nbytes = sum(c.nbytes for c in res.chunks)
                    exact_kv = bool(torch.equal(res.kv, kv))
                    max_dlogit = (logits - ref_logits).abs().max().item()
                    if level == codec.LOSSLESS:
                        ok &= exact_kv and max_dlogit == 0.0
                    rows.append(
                        (
                            level,
                            nbytes,
                            kv.numel() * 2 / nbytes,
                            exact_kv,
                            max_dlogit,
                            kl,
                            int(logits.argmax()) == int(ref_logits.argmax()),
                            res.seconds,
                        )
                    )
    table = Table(title="worker B: fetched KV -> next-token logits vs worker A")
    for col in (
        "level",
        "bytes",
        "x fp16",
        "KV bit-exact",
        "max |Δlogit|",
        "KL (nats)",
        "same top-1",
        "fetch s",
    ):
        table.add_column(col, justify="right")
    for lvl, nb, ratio, exact, dl, kl, top1, secs in rows:
        name = {codec.LOSSLESS: f"{lvl} lossless", codec.DEFAULT_LEVEL: f"{lvl} default"}.get(lvl, str(lvl))
        table.add_row(
            name, f"{nb:,}", f"{ratio:.2f}", str(exact), f"{dl:.2e}", f"{kl:.2e}", str(top1), f"{secs:.3f}"
        )
    console.print(table)
    console.print(
        "[green]OK[/]: lossless round trip is bit-exact and reproduces the logits"
        if ok
        else "[red]FAIL[/]: lossless round trip differs"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
