"""``kvctl``: operator CLI for a kvstream server (put, get, fetch, lookup, ls, stat, rm, pin, unpin;
preload, du, verify, top in ``kvstore/preload.py``, ``admin.py``, ``top.py``).

KV files are ``.npy`` arrays ``[layers, 2, tokens, kv_heads, head_dim]``; token ids come from
``--tokens 1,2,3`` or ``--tokens-file F`` (whitespace-separated integers). Human tables by default,
``--json`` for scripts. Every failure prints one line ``kvctl: error: <reason>`` on stderr and exits
2 (usage / bad input) or 1 (server or connection error).

Secured servers (``kvstore serve --auth-tokens/--tls-*``): every subcommand takes ``--token`` or
``--token-file`` and ``--tls-ca``, ``--tls-cert`` + ``--tls-key`` (env ``KVSTREAM_TOKEN``,
``KVSTREAM_CLIENT_TLS_CA``, ``KVSTREAM_CLIENT_TLS_CERT``, ``KVSTREAM_CLIENT_TLS_KEY``), turned into one
``Connection`` by ``connection(args)``. Commands are called as ``fn(args, client)``;
``args.connection`` is that ``Connection``, for commands that open channels of their own (``verify``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

if TYPE_CHECKING:
    import grpc

    from client import KVCacheClient

DEFAULT_SERVER = "127.0.0.1:50551"
EXIT_SERVER = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command line or input file (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        print(f"kvctl: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


# ----- connection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    """How kvctl reaches the server: front-end addresses, per-request timeout, and the security settings
    matching ``kvstore serve --auth-tokens / --tls-cert / --tls-client-ca``.

    ``token`` is sent as ``authorization: Bearer <token>``; ``tls_ca`` (PEM path) turns TLS on and verifies
    the server against that CA; ``tls_cert`` + ``tls_key`` present a client certificate (mutual TLS). The
    token is left out of ``repr`` so it cannot end up in a log line or an error message.
    """

    addresses: list[str]
    namespace: str = "default"
    timeout: float = 30.0
    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def tls(self) -> bool:
        """True when the channels use TLS (a CA or a client certificate was given)."""
        return self.tls_ca is not None or self.tls_cert is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the bearer token (empty without one), for raw stubs on ``channel()``."""
        return () if self.token is None else (("authorization", f"Bearer {self.token}"),)

    def client(self) -> KVCacheClient:
        """A blocking ``client.KVCacheClient`` with these settings (it adds the token to every call)."""
        from client import KVCacheClient

        return KVCacheClient(
            self.addresses, namespace=self.namespace, timeout=self.timeout, token=self.token,
            tls_ca=self.tls_ca, tls_cert=self.tls_cert, tls_key=self.tls_key,
        )  # fmt: skip

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking gRPC channel to ``address``: TLS when configured, else plaintext. The token is not
        attached here: pass ``metadata=self.metadata`` on each call."""
        import grpc

        if not self.tls:
            return grpc.insecure_channel(address, options=list(options))
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read_opt(self.tls_ca),
            private_key=_read_opt(self.tls_key),
            certificate_chain=_read_opt(self.tls_cert),
        )
        return grpc.secure_channel(address, creds, options=list(options))


def _read_opt(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _pem(path: str | None, flag: str) -> str | None:
    """``path`` after checking it is a readable PEM file (so a typo fails now, as a usage error, rather
    than as an opaque handshake failure on the first request)."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot read: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise UsageError(f"{flag} {path}: not a PEM file")
    return path


def connection(args: argparse.Namespace) -> Connection:
    """The ``Connection`` of ``--server``, ``--namespace``, ``--timeout``, ``--token`` / ``--token-file`` and
    ``--tls-ca`` / ``--tls-cert`` / ``--tls-key`` (environment defaults already applied by the parser);
    raises ``UsageError`` for incomplete settings or unreadable files. Messages never include the token."""
    if args.token_file is not None:
        where = f"--token-file {args.token_file}"
        try:
            token: str | None = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise UsageError(f"{where}: cannot read: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{where}: not a text file") from None
    else:
        token, where = args.token or None, "--token / $KVSTREAM_TOKEN"  # empty = unset, as for the TLS files
    if token is not None and (not token or any(c.isspace() or not c.isprintable() for c in token)):
        # Whitespace or control characters cannot go into an HTTP/2 header, and usually mean a wrong file.
        raise UsageError(f"{where}: expected one token: non-empty, one line, no spaces")
    # An empty value ("--tls-ca ''") unsets its environment default.
    ca, cert, key = args.tls_ca or None, args.tls_cert or None, args.tls_key or None
    if (cert is None) != (key is None):
        raise UsageError(
            "--tls-cert and --tls-key (or $KVSTREAM_CLIENT_TLS_CERT / $KVSTREAM_CLIENT_TLS_KEY) go together: "
            "give both or neither"
        )
    addresses = [a.strip() for a in args.server.split(",") if a.strip()]
    if not addresses:
        raise UsageError("--server / $KVSTREAM_SERVER: no address (host:port[,host:port...])")
    return Connection(
        addresses=addresses,
        namespace=args.namespace or "default",
        timeout=args.timeout,
        token=token,
        tls_ca=_pem(ca, "--tls-ca"),
        tls_cert=_pem(cert, "--tls-cert"),
        tls_key=_pem(key, "--tls-key"),
    )


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """``--server``, ``--timeout`` and the security flags, with their ``KVSTREAM_*`` environment defaults.
    Every kvctl subcommand inherits them; ``connection(args)`` validates them."""

    def env(name: str) -> str | None:
        return os.environ.get(name) or None  # exported but empty = unset

    parser.add_argument(
        "--server",
        default=os.environ.get("KVSTREAM_SERVER", DEFAULT_SERVER),
        help="host:port, or several comma-separated (env KVSTREAM_SERVER)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument(
        "--token",
        default=env("KVSTREAM_TOKEN"),
        help="bearer token for --auth-tokens servers (env KVSTREAM_TOKEN)",
    )
    secret.add_argument("--token-file", help="file holding the bearer token (surrounding whitespace ignored)")
    parser.add_argument(
        "--tls-ca",
        default=env("KVSTREAM_CLIENT_TLS_CA"),
        help="CA (PEM) to verify the server: enables TLS (env KVSTREAM_CLIENT_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        default=env("KVSTREAM_CLIENT_TLS_CERT"),
        help="client certificate (PEM) for mutual TLS (env KVSTREAM_CLIENT_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        default=env("KVSTREAM_CLIENT_TLS_KEY"),
        help="client private key (PEM) for --tls-cert (env KVSTREAM_CLIENT_TLS_KEY)",
    )


# ----- inputs -----------------------------------------------------------------------------------


def parse_tokens(args: argparse.Namespace) -> list[int]:
    """Token ids from ``--tokens`` or ``--tokens-file``; raises ``UsageError``."""
    from kvstore.keys import InvalidKeyError, token_array

    if args.tokens is not None and args.tokens_file is not None:
        raise UsageError("give --tokens or --tokens-file, not both")
    if args.tokens is not None:
        text, where = args.tokens.replace(",", " "), "--tokens"
    elif args.tokens_file is not None:
        try:
            text, where = Path(args.tokens_file).read_text(), args.tokens_file
        except OSError as e:
            raise UsageError(f"cannot read {args.tokens_file}: {e.strerror}") from None
    else:
        raise UsageError("token ids needed: --tokens 1,2,3 or --tokens-file FILE")
    try:
        ids = [int(t) for t in text.split()]
    except ValueError as e:
        raise UsageError(f"{where}: token ids must be integers ({e})") from None
    if not ids:
        raise UsageError(f"{where}: no token ids")
    try:
        return token_array(ids).tolist()
    except InvalidKeyError as e:
        raise UsageError(f"{where}: {e}") from None


def model_key(args: argparse.Namespace, required: bool = True) -> Any:
    """The ``ModelKey`` of the flags. Refs by name / context id only use the namespace, so the model may be
    left out there (a placeholder id fills the spec)."""
    from kvstore.keys import InvalidKeyError, ModelKey

    if not args.model and required:
        raise UsageError("--model is required for this command")
    try:
        return ModelKey(
            model_id=args.model or "any",
            namespace=args.namespace or "default",
            revision=args.revision,
            dtype=args.dtype,
            chunk_tokens=args.chunk_tokens,
        )
    except InvalidKeyError as e:
        raise UsageError(str(e)) from None


def ttl_seconds(text: str) -> float:
    """``--ttl`` values: a finite number of seconds in [1, 2**32 - 1] (argparse turns the ValueError into
    a usage error)."""
    value = float(text)
    if not 1 <= value <= 2**32 - 1:
        raise ValueError(text)
    return value


def load_kv(path: str, dtype: str) -> Any:
    """``[layers, 2, tokens, kv_heads, head_dim]`` tensor of ``dtype`` from an ``.npy`` file.

    The file may hold another float dtype (it is cast, with a note on stderr); values must be finite
    after the cast (``kvctl verify`` flags non-finite chunks, and a silent fp32 -> fp16 overflow would
    store inf).
    """
    import torch

    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
        raise UsageError(f"cannot load {path}: {e or 'empty file'}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise UsageError(f"{path}: expected one array (.npy), got an archive of {len(arr.files)}")
    if arr.ndim != 5 or arr.shape[1] != 2:
        raise UsageError(
            f"{path}: expected [layers, 2, tokens, kv_heads, head_dim], got shape {list(arr.shape)}"
        )
    if arr.dtype not in (np.float16, np.float32, np.float64):
        raise UsageError(f"{path}: expected a float16/32/64 array, got {arr.dtype}")
    src = torch.from_numpy(np.ascontiguousarray(arr))
    kv = src.to(getattr(torch, dtype))
    if bad := int((~torch.isfinite(kv)).sum()):
        overflowed = int((torch.isfinite(src) & ~torch.isfinite(kv)).sum())
        why = f"exceed the range of --dtype {dtype}" if overflowed == bad else "are not finite (inf/nan)"
        raise UsageError(f"{path}: {bad} values {why}")
    if kv.dtype != src.dtype:
        print(f"kvctl: note: {path} holds {arr.dtype}, stored as --dtype {dtype}", file=sys.stderr)
    return kv


def _ref(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments naming a context for the client (token ids, ``--context-id`` or ``--name``)."""
    given = [x is not None for x in (args.context_id, args.name)] + [
        args.tokens is not None or args.tokens_file is not None
    ]
    if sum(given) != 1:
        raise UsageError("name the context with exactly one of --name, --context-id, --tokens/--tokens-file")
    if args.context_id is not None:
        try:
            cid = bytes.fromhex(args.context_id)
        except ValueError:
            raise UsageError("--context-id must be hex") from None
        return {"context_id": cid}
    if args.name is not None:
        return {"name": args.name}
    if not args.model:  # the chunk hashes of token ids are salted with the model spec
        raise UsageError("--model is required to name a context by its token ids")
    return {"token_ids": parse_tokens(args)}


# ----- output -----------------------------------------------------------------------------------


def _context_dict(info: Any) -> dict[str, Any]:
    return {
        "context_id": info.context_id.hex(),
        "name": info.name,
        "namespace": info.model.namespace,
        "model_id": info.model.model_id,
        "revision": info.model.revision,
        "dtype": info.model.dtype,
        "chunk_tokens": info.model.chunk_tokens,
        "num_chunks": info.num_chunks,
        "num_tokens": info.num_tokens,
        "level_bytes": {str(lv.level): lv.size_bytes for lv in info.level_bytes},
        "total_bytes": info.total_bytes,
        "pinned": info.pinned,
        "ttl_seconds": info.ttl_seconds,
        "created_unix": info.created_unix,
        "metadata": dict(info.metadata),
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _emit(args: argparse.Namespace, data: dict[str, Any] | list[dict[str, Any]], title: str) -> None:
    """Print ``data`` as JSON (``--json``) or as a rich table (a list = rows, a dict = key/value pairs)."""
    if args.json:
        print(json.dumps(data, indent=None, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    if isinstance(data, dict):
        table.add_column("field")
        table.add_column("value")
        for k, v in data.items():
            table.add_row(k, str(v))
    else:
        cols = list(data[0]) if data else ["(none)"]
        for c in cols:
            table.add_column(c)
        for row in data:
            table.add_row(*(str(row[c]) for c in cols))
    Console(width=160).print(table)


# ----- commands ---------------------------------------------------------------------------------


def cmd_put(args: argparse.Namespace, client: Any) -> None:
    import codec

    model = model_key(args)
    ids = parse_tokens(args)
    kv = load_kv(args.kv, model.dtype)
    full = len(ids) // model.chunk_tokens * model.chunk_tokens
    if full == 0:
        raise UsageError(f"{len(ids)} token ids make no full chunk of {model.chunk_tokens}")
    if kv.shape[2] < full:
        raise UsageError(f"{args.kv} holds {kv.shape[2]} tokens, the token ids need {full}")
    levels = _levels(args.levels) if args.levels else codec.LEVELS
    t0 = time.perf_counter()
    res = client.store(
        model, ids, kv[:, :, :full], levels=levels, pin=args.pin, ttl=args.ttl, name=args.name or ""
    )
    _emit(
        args,
        {
            "context_id": res.context_id.hex(),
            "stored_chunks": res.stored_chunks,
            "stored_tokens": res.stored_tokens,
            "bytes_written": res.bytes_written,
            "dedup_chunks": res.dedup_chunks,
            "seconds": round(time.perf_counter() - t0, 4),
        },
        "put",
    )


def _levels(text: str) -> list[int]:
    import codec

    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--levels {text!r}: use comma-separated integers") from None
    bad = [lv for lv in levels if lv not in codec.LEVELS]
    if bad or not levels:
        raise UsageError(f"--levels {text!r}: levels are {list(codec.LEVELS)}")
    return levels


def cmd_get(args: argparse.Namespace, client: Any) -> None:
    import torch

    model = model_key(args)
    res = client.fetch(model, parse_tokens(args), level=args.level)
    if res.kv is None:
        raise LookupError("no stored prefix for these token ids")
    kv = res.kv.cpu()
    # numpy has no bfloat16: such caches are written as float32 (exact).
    arr = (kv.float() if kv.dtype == torch.bfloat16 else kv).numpy()
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"  # what np.save writes
    try:
        np.save(out, arr, allow_pickle=False)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror}") from None
    _emit(
        args,
        {
            "out": out,
            "prefix_tokens": res.prefix_tokens,
            "chunks": len(res.chunks),
            "levels": sorted({c.level for c in res.chunks}),
            "bytes": sum(c.nbytes for c in res.chunks),
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "truncated": res.truncated,
            "reason": res.reason,
            "seconds": round(res.seconds, 4),
        },
        "get",
    )


def cmd_fetch(args: argparse.Namespace, client: Any) -> None:
    """Fetch the stored prefix (adaptive with ``--slo``) and report what each chunk cost; keeps no KV."""
    import codec

    if args.slo is not None and not args.slo > 0:
        raise UsageError("--slo must be a positive number of seconds")
    if args.max_level is not None and (args.slo is None or args.max_level not in codec.LEVELS):
        raise UsageError(f"--max-level needs --slo and one of the levels {list(codec.LEVELS)}")
    res = client.fetch(
        model_key(args),
        parse_tokens(args),
        slo=args.slo,
        level=args.level,
        max_level=args.max_level,
        recompute_tokens_per_second=args.recompute_tps,
        bandwidth_hint_bps=args.bandwidth_hint_mbit * 1e6 / 8 if args.bandwidth_hint_mbit else None,
    )
    if res.kv is None and not res.recompute:
        raise LookupError("no stored prefix for these token ids")
    chunks = [
        {
            "chunk": c.index,
            "level": "recompute" if c.recompute else c.level,
            "bytes": c.nbytes,
            "recv_ms": round(c.recv_seconds * 1e3, 2),
            "decode_ms": round(c.decode_seconds * 1e3, 2),
        }
        for c in res.chunks
    ]
    summary: dict[str, Any] = {
        "prefix_tokens": res.prefix_tokens,
        "chunks": len(res.chunks),
        "seconds": round(res.seconds, 4),
        "slo": args.slo,
        "slo_met": None if args.slo is None else res.seconds <= args.slo,
        "bytes": sum(c.nbytes for c in res.chunks),
        "levels": [c["level"] for c in chunks],
        "recompute": [list(r) for r in res.recompute],
        "truncated": res.truncated,
        "reason": res.reason,
    }
    if args.json:
        _emit(args, {**summary, "chunk_reports": chunks} if args.report else summary, "fetch")
        return
    _emit(args, summary, "fetch")
    if args.report:
        _emit(args, chunks, "per-chunk report")


def cmd_lookup(args: argparse.Namespace, client: Any) -> None:
    res = client.lookup(model_key(args), parse_tokens(args))
    if args.json:
        _emit(
            args,
            {
                "prefix_chunks": res.prefix_chunks,
                "prefix_tokens": res.prefix_tokens,
                "chunk_tokens": res.chunk_tokens,
                "chunks": [
                    {
                        "index": c.index,
                        "hash": c.hash.hex(),
                        "tokens": [c.token_start, c.token_end],
                        "levels": {str(lv.level): lv.size_bytes for lv in c.levels},
                        "sidecars": list(c.sidecars),
                    }
                    for c in res.chunks
                ],
            },
            "lookup",
        )
        return
    rows = [
        {
            "chunk": c.index,
            "tokens": f"{c.token_start}-{c.token_end}",
            "hash": c.hash.hex()[:16],
            "levels": " ".join(f"L{lv.level}:{_human_bytes(lv.size_bytes)}" for lv in c.levels),
        }
        for c in res.chunks
    ]
    _emit(args, rows, f"prefix: {res.prefix_chunks} chunks / {res.prefix_tokens} tokens")


def cmd_ls(args: argparse.Namespace, client: Any) -> None:
    infos = client.ls(args.model or "", namespace=args.namespace or "default", limit=args.limit)
    rows = [_context_dict(i) for i in infos]
    if args.json:
        _emit(args, rows, "contexts")
        return
    _emit(
        args,
        [
            {
                "context_id": r["context_id"][:16],
                "name": r["name"],
                "model": r["model_id"],
                "tokens": r["num_tokens"],
                "chunks": r["num_chunks"],
                "size": _human_bytes(r["total_bytes"]),
                "pinned": r["pinned"],
                "ttl": "-" if r["ttl_seconds"] < 0 else f"{r['ttl_seconds']:.0f}s",
            }
            for r in rows
        ],
        f"contexts in {args.namespace or 'default'}",
    )


def cmd_stat(args: argparse.Namespace, client: Any) -> None:
    s = client.stat(args.namespace or "")
    _emit(
        args,
        {
            "backend": s.backend,
            "used_bytes": s.used_bytes,
            "capacity_bytes": s.capacity_bytes,
            "keys": s.keys,
            "contexts": s.contexts,
            "pinned_contexts": s.pinned_contexts,
            "evictions": s.evictions,
        },
        "stat",
    )


def cmd_rm(args: argparse.Namespace, client: Any) -> None:
    res = client.delete(model_key(args, required=False), **_ref(args))
    _emit(args, {"deleted": res.deleted, "chunks_freed": res.chunks_freed}, "rm")


def cmd_pin(args: argparse.Namespace, client: Any) -> None:
    fn = client.pin if args.command == "pin" else client.unpin
    res = fn(model_key(args, required=False), **_ref(args))
    _emit(args, {"pinned": res.pinned, "chunks": res.chunks}, args.command)


# ----- parser and main --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    add_connection_args(common)
    common.add_argument("--namespace", help='namespace (default: "default"; stat: the whole store)')
    common.add_argument("--model", help="model id (salts the chunk keys)")
    common.add_argument("--revision", default="")
    common.add_argument("--chunk-tokens", type=int, default=256)
    common.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    common.add_argument("--json", action="store_true", help="machine-readable output")

    tokens = _Parser(add_help=False)
    tokens.add_argument("--tokens", help="comma-separated token ids")
    tokens.add_argument("--tokens-file", help="file of whitespace-separated token ids")

    ref = _Parser(add_help=False, parents=[tokens])
    ref.add_argument("--name", help="context name")
    ref.add_argument("--context-id", help="context id (hex)")

    parser = _Parser(prog="kvctl", description="Operate a kvstream server.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("put", parents=[common, tokens], help="encode and store a KV cache (.npy)")
    p.add_argument("kv", help=".npy [layers, 2, tokens, kv_heads, head_dim]")
    p.add_argument("--levels", help="comma-separated codec levels (default: all)")
    p.add_argument("--pin", action="store_true")
    p.add_argument("--ttl", type=ttl_seconds, help="seconds (default: the server's)")
    p.add_argument("--name")
    p.set_defaults(fn=cmd_put)
    p = sub.add_parser("get", parents=[common, tokens], help="fetch the stored prefix into a .npy")
    p.add_argument("out", help="output .npy path")
    p.add_argument("--level", type=int, default=0, help="codec level (nearest stored one if absent)")
    p.set_defaults(fn=cmd_get)
    p = sub.add_parser("fetch", parents=[common, tokens], help="fetch the stored prefix, report per chunk")
    p.add_argument("--slo", type=float, help="seconds: adaptive levels to meet it (default: fixed --level)")
    p.add_argument("--level", type=int, help="fixed codec level without --slo (default: the codec's)")
    p.add_argument("--max-level", type=int, help="with --slo: coarsest level accepted (else recompute/miss)")
    p.add_argument("--recompute-tps", type=float, default=0.0, help="local prefill tokens/s: allow recompute")
    p.add_argument("--bandwidth-hint-mbit", type=float, help="first bandwidth estimate for --slo")
    p.add_argument("--report", action="store_true", help="per-chunk level, bytes and timing")
    p.set_defaults(fn=cmd_fetch)
    p = sub.add_parser("lookup", parents=[common, tokens], help="longest stored prefix")
    p.set_defaults(fn=cmd_lookup)
    p = sub.add_parser("ls", parents=[common], help="list contexts of the namespace")
    p.add_argument("--limit", type=int, default=0)
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("stat", parents=[common], help="store usage")
    p.set_defaults(fn=cmd_stat)
    for name, fn, text in (
        ("rm", cmd_rm, "delete a context"),
        ("pin", cmd_pin, "pin a context (no TTL)"),
        ("unpin", cmd_pin, "restore a context's TTL"),
    ):
        p = sub.add_parser(name, parents=[common, ref], help=text)
        p.set_defaults(fn=fn)
    from kvstore import admin, preload, top  # operator workflow: preload, du, verify, top

    preload.add_parser(sub, [common])
    admin.add_parsers(sub, common, tokens)
    top.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``kvctl``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.chunk_tokens < 1:
        return _fail("--chunk-tokens must be >= 1", EXIT_USAGE)
    import grpc

    from client import KVStreamError

    try:
        args.connection = connection(args)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    client = args.connection.client() if getattr(args, "needs_client", True) else None
    try:
        args.fn(args, client)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    except KVStreamError as e:
        code = EXIT_USAGE if e.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_SERVER
        hint = _hint(e.code, e.message, args.connection)
        return _fail(f"{e.code.name.lower().replace('_', ' ')}: {e.message}{hint}", code)
    except LookupError as e:
        return _fail(str(e), EXIT_SERVER)
    except ValueError as e:  # input the client library rejected (e.g. a KV dtype / shape it cannot encode)
        return _fail(str(e), EXIT_USAGE)
    finally:
        if client is not None:
            client.close()
    return 0


def _hint(code: grpc.StatusCode, message: str, conn: Connection) -> str:
    """A suggestion to append to a server error that the connection settings may explain ("" if none)."""
    import grpc

    if code == grpc.StatusCode.UNAUTHENTICATED and conn.token is None:
        return " (no token given: --token, --token-file or $KVSTREAM_TOKEN)"
    if code != grpc.StatusCode.UNAVAILABLE or not ("Socket closed" in message or "andshake" in message):
        return ""
    # The TCP connection opened, then the peer hung up or the TLS handshake failed: most often the client's
    # TLS settings do not match the server's.
    if not conn.tls:
        return " (is it a TLS server? then give --tls-ca)"
    if conn.tls_cert is None:
        return " (check --tls-ca; a mutual-TLS server also needs --tls-cert/--tls-key)"
    return " (check --tls-ca, --tls-cert and --tls-key)"


def _fail(message: str, code: int) -> int:
    print(f"kvctl: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    # `python -m kvstore.kvctl`: run the kvstore.kvctl module's main, so that subcommands importing
    # kvstore.kvctl raise the same UsageError class main catches (not a __main__ twin).
    from kvstore.kvctl import main as _main

    sys.exit(_main())
