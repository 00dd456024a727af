"""``kvctl du`` (logical bytes per namespace / model / level) and ``kvctl verify`` (re-read and decode).

``verify`` streams every chunk of each named context through ``StreamContext`` once per stored level,
from storage (``StreamStart.from_storage``: past the front end's hot-chunk cache), checks the end-to-end
xxh3 of every blob, decodes it (which checks the codec checksum) and checks its shape, dtype and that it
is finite. A chunk the server cannot serve (its envelope failed verification, it is missing, its record
is corrupt) ends the stream early; verify reports it and resumes after it.

Which contexts: ``--all`` walks every context of the namespace (``List``, then ``GetContext`` for each
context's token ids); or one context by its token ids (``--tokens`` / ``--tokens-file``); or the
documents a preload stored (``--docs`` with the same model flags: they are tokenized and windowed exactly
as ``kvctl preload`` does, without running the model).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import torch

import codec
from kvstore.keys import ModelKey, chunk_hashes
from kvstore.rpc import pb, pb_grpc
from kvstore.wire import model_from_pb, model_to_pb

if TYPE_CHECKING:
    from kvstore.kvctl import Connection

_FATAL = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


# ----- du ---------------------------------------------------------------------------------------


def disk_usage(infos_by_ns: dict[str, Sequence[pb.ContextInfo]]) -> list[dict[str, Any]]:
    """Rows ``{namespace, model_id, contexts, pinned, tokens, level_bytes, total_bytes}`` per model.

    Bytes are logical: a chunk shared by several contexts counts once per context (``kvctl stat`` gives
    the physical usage after dedup).
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for ns, infos in infos_by_ns.items():
        for info in infos:
            row = rows.setdefault(
                (ns, info.model.model_id),
                {"namespace": ns, "model_id": info.model.model_id, "contexts": 0, "pinned": 0, "tokens": 0,
                 "level_bytes": defaultdict(int), "total_bytes": 0},
            )  # fmt: skip
            row["contexts"] += 1
            row["pinned"] += int(info.pinned)
            row["tokens"] += info.num_tokens
            for lv in info.level_bytes:
                row["level_bytes"][str(lv.level)] += lv.size_bytes
            row["total_bytes"] += info.total_bytes
    out = [rows[k] for k in sorted(rows)]
    for row in out:
        row["level_bytes"] = dict(sorted(row["level_bytes"].items()))
    return out


def cmd_du(args: argparse.Namespace, client: Any) -> None:
    from kvstore.kvctl import _emit, _human_bytes

    namespaces = [ns for ns in (args.namespace or "default").split(",") if ns]
    limit = args.limit or 2**32 - 1  # the server's own default would cap at 1000 contexts
    rows = disk_usage({ns: client.ls(args.model or "", namespace=ns, limit=limit) for ns in namespaces})
    if args.json:
        _emit(args, rows, "du")
        return
    levels = sorted({lv for r in rows for lv in r["level_bytes"]}, key=int)
    table = [
        {
            "namespace": r["namespace"],
            "model": r["model_id"],
            "contexts": r["contexts"],
            "pinned": r["pinned"],
            "tokens": r["tokens"],
            **{f"L{lv}": _human_bytes(r["level_bytes"].get(lv, 0)) for lv in levels},
            "total": _human_bytes(r["total_bytes"]),
        }
        for r in rows
    ]
    _emit(args, table, "logical bytes per model (shared chunks count per context; `kvctl stat`: physical)")


# ----- verify -----------------------------------------------------------------------------------


@dataclass
class BadChunk:
    chunk: int
    level: int | None  # None: the chunk record itself (every level)
    reason: str


@dataclass
class ContextCheck:
    """Verification result of one context."""

    name: str
    context_id: str
    chunks: int
    levels: list[int] = field(default_factory=list)
    checked: int = 0  # (chunk, level) blobs read, verified and decoded
    bad: list[BadChunk] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "context_id": self.context_id,
            "chunks": self.chunks,
            "levels": self.levels,
            "checked": self.checked,
            "bad": [{"chunk": b.chunk, "level": b.level, "reason": b.reason} for b in self.bad],
        }


class Verifier:
    """Streams chunks over blocking gRPC channels (independent of the asyncio client's loop), with the
    token and TLS settings of ``conn``."""

    def __init__(self, conn: Connection) -> None:
        opts = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
        self.channels = [conn.channel(a, opts) for a in conn.addresses]
        self.timeout = conn.timeout
        self.metadata = conn.metadata

    def close(self) -> None:
        for ch in self.channels:
            ch.close()

    def _call(self, fn: Any) -> Any:
        """``fn(stub)`` on the first front end that is up (any front end serves any request)."""
        from client import KVStreamError

        last: grpc.RpcError | None = None
        for ch in self.channels:
            try:
                return fn(pb_grpc.KVStreamStub(ch))
            except grpc.RpcError as e:
                last = e
                if e.code() not in _FATAL:
                    break  # the request itself failed: another front end would answer the same
        assert last is not None
        raise KVStreamError(last.code(), last.details() or "") from None  # kvctl prints it in one line

    def check(self, model: ModelKey, token_ids: Sequence[int], name: str = "") -> ContextCheck:
        """Verify the context of ``token_ids``: every stored level of every chunk."""
        hashes = chunk_hashes(model, token_ids)
        spec = model_to_pb(model)
        ids = pb.TokenIds(ids=list(token_ids))
        out = ContextCheck(name, hashes[-1].hex() if hashes else "", len(hashes))
        res = self._call(
            lambda s: s.Lookup(
                pb.LookupRequest(model=spec, token_ids=ids), timeout=self.timeout, metadata=self.metadata
            )
        )
        found = len(res.chunks)
        if found < len(hashes):
            out.bad.append(
                BadChunk(found, None, "chunk record missing or corrupt (later chunks unreachable)")
            )
        stored = [{lv.level for lv in c.levels} for c in res.chunks]
        out.levels = sorted(set().union(*stored)) if stored else []
        for level in out.levels:
            start = 0
            while start < found:
                start = self._stream(model, spec, ids, level, start, found, stored, out)
        out.bad.sort(key=lambda b: (b.chunk, -1 if b.level is None else b.level))
        return out

    def _stream(
        self, model: ModelKey, spec: pb.ModelSpec, ids: pb.TokenIds, level: int, start: int, found: int,
        stored: list[set[int]], out: ContextCheck,
    ) -> int:  # fmt: skip
        """Stream chunks ``start..`` at ``level``; returns where to resume (``found`` when done)."""
        from client.api import KVStreamError, _BlobAssembler

        req = pb.StreamContextRequest(
            start=pb.StreamStart(
                model=spec,
                token_ids=ids,
                start_chunk=start,
                policy=pb.LEVEL_POLICY_FIXED,
                level=level,
                from_storage=True,  # check what is stored, not the front end's cached copies
            )
        )
        expect, asm = start, _BlobAssembler()
        try:
            stream = self._call(
                lambda s: s.StreamContext(iter([req]), timeout=self.timeout, metadata=self.metadata)
            )
            for resp in stream:
                kind = resp.WhichOneof("msg")
                if kind == "trailer":
                    if resp.trailer.truncated and expect < found:
                        if level in stored[expect]:
                            out.bad.append(BadChunk(expect, level, resp.trailer.reason))
                        return expect + 1
                    return found
                if kind != "chunk" or resp.chunk.sidecar:
                    continue
                msg = resp.chunk
                if msg.recompute:
                    out.bad.append(BadChunk(msg.chunk_index, level, "server asked for a recompute"))
                    expect = msg.chunk_index + 1
                    continue
                blob = asm.add(msg)
                if blob is None:
                    continue
                expect = msg.chunk_index + 1
                if msg.level != level:
                    continue  # the chunk lacks this level; the server sent another one
                problem = _check_blob(blob, model)
                if problem:
                    out.bad.append(BadChunk(msg.chunk_index, level, problem))
                else:
                    out.checked += 1
        except KVStreamError as e:  # end-to-end checksum or part order broken in transit
            out.bad.append(BadChunk(expect, level, e.message))
            return expect + 1
        except grpc.RpcError as e:
            if e.code() in _FATAL:
                raise KVStreamError(e.code(), e.details() or "") from None
            out.bad.append(BadChunk(expect, level, f"{e.code().name}: {e.details()}"))
            return expect + 1
        return found


def _check_blob(blob: bytes, model: ModelKey) -> str:
    """Why a streamed blob is bad ("" = it decodes to a finite ``[L, 2, chunk_tokens, H, D]`` tensor)."""
    try:
        kv = codec.decode(blob)
    except codec.CodecError as e:
        return f"decode failed: {e}"
    if kv.shape[2] != model.chunk_tokens or kv.dtype != getattr(torch, model.dtype):
        return f"decoded {tuple(kv.shape)} {kv.dtype}, expected {model.chunk_tokens} tokens of {model.dtype}"
    if not bool(torch.isfinite(kv).all()):
        return "decoded values are not finite"
    return ""


def cmd_verify(args: argparse.Namespace, client: Any) -> None:
    from kvstore.kvctl import UsageError, _emit, model_key, parse_tokens
    from kvstore.preload import DocumentError, open_source, plan_windows

    has_tokens = args.tokens is not None or args.tokens_file is not None
    if has_tokens + bool(args.docs) + bool(args.all) != 1:
        raise UsageError(
            "name what to verify: --all (every context of the namespace), --tokens/--tokens-file "
            "(one context) or --docs DOC... with --model-file/--hf-model (the contexts a preload stored)"
        )
    targets: list[tuple[str, ModelKey, list[int]]]
    if args.all:
        namespace = args.namespace or "default"
        targets = []
        for info in client.ls(args.model or "", namespace=namespace, limit=2**32 - 1):  # 0 would mean 1000
            spec = model_from_pb(info.model)
            full = client.get_context(spec, context_id=info.context_id)
            targets.append((info.name or info.context_id.hex()[:16], spec, list(full.token_ids)))
    elif has_tokens:
        model = model_key(args)
        targets = [("", model, parse_tokens(args))]
    else:
        try:
            source = open_source(args.model_file, args.hf_model)
            args.model = args.model or source.model_id
            model = model_key(args)
            windows, _, _ = plan_windows(args.docs, source, model.chunk_tokens)
        except DocumentError as e:
            raise UsageError(str(e)) from None
        targets = [(w.name, model, w.token_ids) for w in windows]
    if any(len(ids) < m.chunk_tokens for _, m, ids in targets):
        raise UsageError("fewer token ids than one chunk")
    verifier = Verifier(args.connection)
    try:
        checks = [verifier.check(m, ids, name) for name, m, ids in targets]
    finally:
        verifier.close()
    bad = [(c, b) for c in checks for b in c.bad]
    if args.json:
        _emit(
            args,
            {
                "contexts": [c.as_dict() for c in checks],
                "checked": sum(c.checked for c in checks),
                "bad_chunks": len(bad),
                "ok": not bad,
            },
            "verify",
        )
    else:
        rows = [
            {
                "name": c.name or "-",
                "context_id": c.context_id[:16],
                "chunks": c.chunks,
                "levels": ",".join(map(str, c.levels)),
                "blobs ok": c.checked,
                "bad": len(c.bad),
            }
            for c in checks
        ]
        _emit(args, rows, f"verify: {sum(c.checked for c in checks)} blobs ok, {len(bad)} bad")
        if bad:
            _emit(
                args,
                [
                    {
                        "context": c.name or c.context_id[:16],
                        "chunk": b.chunk,
                        "level": "all" if b.level is None else b.level,
                        "reason": b.reason,
                    }
                    for c, b in bad
                ],  # fmt: skip
                "bad chunks",
            )
    if bad:
        raise LookupError(f"verify: {len(bad)} bad chunks in {len({c.context_id for c, _ in bad})} contexts")


def add_parsers(sub: Any, common: argparse.ArgumentParser, tokens: argparse.ArgumentParser) -> None:
    """Register ``du`` and ``verify`` on kvctl's subparsers."""
    from kvstore.preload import add_document_args

    p = sub.add_parser("du", parents=[common], help="logical bytes per namespace / model / level")
    p.add_argument("--limit", type=int, default=0, help="contexts per namespace (0 = all)")
    p.set_defaults(fn=cmd_du)
    p = sub.add_parser(
        "verify", parents=[common, tokens], help="re-read and decode every chunk at every level"
    )
    p.add_argument(
        "--docs", nargs="+", metavar="DOC", help="verify the windows `kvctl preload DOC...` stored"
    )
    p.add_argument(
        "--all", action="store_true", help="verify every context of the namespace (--model filters)"
    )
    add_document_args(p)
    p.set_defaults(fn=cmd_verify)
