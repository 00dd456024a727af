"""``kvctl preload``: prefill documents with a local model and store their KV caches, pinned.

Documents are files or directories (searched recursively for ``*.ids``, ``*.txt``, ``*.md``):

* a file whose content is only whitespace-separated integers is a **token-id document** (``*.ids`` files
  must be; the ids must be below the model's vocabulary size) and is used as is;
* any other file is **text**. With ``--hf-model`` the model directory's own tokenizer encodes it. A
  llama2.c checkpoint (``--model-file``) ships no tokenizer, so text goes through the **byte-level
  fallback** of sentencepiece vocabularies trained with ``byte_fallback`` (llama2.c's tokenizers are):
  ``[BOS=1] + [3 + b for b in text.encode("utf-8")]`` (ids 3..258 are the byte pieces ``<0x00>``..
  ``<0xFF>``). That is a valid token sequence for the model, just longer than the merged-piece one.

Windows. A model attends to at most ``max_context`` positions, so a document is cut into windows of
``W = (max_context // chunk_tokens) * chunk_tokens`` tokens (whole chunks); window ``k`` holds tokens
``[k*W, (k+1)*W)`` and is prefilled from position 0 as a context of its own (name ``SOURCE:k``). The tail
of a document that does not fill a whole chunk is not stored (counted in ``tokens_dropped``).

Resumable: keys are content-addressed, so before any prefill each window is looked up; a window whose
every chunk is committed at every requested level and whose context exists is skipped (and pinned if it
is not yet). Parallel (``--workers N``): window ``i`` is encoded and uploaded on worker threads while
window ``i+1`` prefills on the calling thread (the codec and gRPC release the GIL for most of their time; at
most ``N + 1`` encoded windows are held in memory). That pays off when the prefill runs on an accelerator
or the upload is network-bound; with a CPU prefill on 2 cores the threads only contend (16 windows of 512
tokens of stories260K over loopback: 1.2-1.6 s serial, 1.3-3.4 s with one worker), so the default is 0.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

BOS_ID = 1
BYTE_OFFSET = 3  # sentencepiece byte_fallback: ids 0..2 are <unk> <s> </s>, then <0x00>..<0xFF>
DOC_SUFFIXES = (".ids", ".txt", ".md")
SPARSE_BACKENDS = ("shadowkv", "pqcache", "clusterkv")  # --sparse: indexes built from the KV alone
_NAME_BAD = re.compile(r"[^A-Za-z0-9._/@:+-]")


class DocumentError(ValueError):
    """An unreadable or invalid document, or a model source that cannot be used (kvctl exits 2)."""


# ----- model sources ----------------------------------------------------------------------------


class ModelSource(Protocol):
    """What preload needs from a model; weights load lazily, on the first ``prefill``."""

    model_id: str
    max_context: int
    vocab_size: int
    kv_values_per_token: int  # layers * 2 * kv_heads * head_dim

    def tokenize(self, text: str) -> list[int]: ...

    def prefill(self, token_ids: Sequence[int]) -> torch.Tensor:
        """KV cache ``[layers, 2, len(token_ids), kv_heads, head_dim]`` float32 of a prefill from 0."""
        ...


class Llama2cSource:
    """A llama2.c checkpoint run by ``client.model.Llama2c``; text uses the byte-level fallback."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                header = f.read(28)
        except OSError as e:
            raise DocumentError(f"cannot read model {path}: {e.strerror}") from None
        if len(header) != 28:
            raise DocumentError(f"{path}: not a llama2.c checkpoint (short header)")
        dim, _hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", header)
        if min(dim, layers, heads, kv_heads, seq_len) <= 0 or dim % heads:
            raise DocumentError(f"{path}: not a llama2.c checkpoint (header {header.hex()})")
        self.model_id = self.path.stem
        self.max_context = seq_len
        self.vocab_size = abs(vocab)
        self.kv_values_per_token = layers * 2 * kv_heads * (dim // heads)
        self._model: Any = None

    def tokenize(self, text: str) -> list[int]:
        if self.vocab_size < BYTE_OFFSET + 256:
            raise DocumentError(
                f"vocabulary of {self.vocab_size} has no byte pieces: give token-id files for this model"
            )
        return [BOS_ID, *(BYTE_OFFSET + b for b in text.encode("utf-8"))]

    def prefill(self, token_ids: Sequence[int]) -> torch.Tensor:
        if self._model is None:
            from client.model import Llama2c

            self._model = Llama2c.from_file(self.path)
        return self._model.forward(list(token_ids)).kv


class HFSource:
    """A local ``transformers`` causal-LM directory (no download); text uses its tokenizer if it has one."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoConfig

        self.path = Path(path)
        try:
            cfg = AutoConfig.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DocumentError(f"cannot load a transformers config from {path}: {e}") from None
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.model_id = self.path.resolve().name
        self.max_context = int(cfg.max_position_embeddings)
        self.vocab_size = int(cfg.vocab_size)
        self.kv_values_per_token = cfg.num_hidden_layers * 2 * kv_heads * head_dim
        self._model: Any = None
        self._tokenizer: Any = None

    def tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise DocumentError(
                    f"{self.path} has no usable tokenizer ({e}): give token-id files"
                ) from None
        return list(self._tokenizer(text)["input_ids"])

    def prefill(self, token_ids: Sequence[int]) -> torch.Tensor:
        from client.model.hf import prefill_kv

        if self._model is None:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True).eval()
        kv, _ = prefill_kv(self._model, token_ids)
        return kv.float().cpu()


def open_source(model_file: str | None, hf_model: str | None) -> ModelSource:
    """The model source of ``--model-file`` (llama2.c) or ``--hf-model`` (exactly one)."""
    if (model_file is None) == (hf_model is None):
        raise DocumentError("give exactly one of --model-file (llama2.c .bin) or --hf-model (directory)")
    return Llama2cSource(model_file) if model_file is not None else HFSource(hf_model or "")


# ----- documents and windows ----------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    source: str  # path as given, or relative to the directory it was found in
    token_ids: list[int]


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, start + len(token_ids))`` of one document: whole chunks, prefilled from 0."""

    source: str
    index: int
    start: int
    token_ids: list[int]

    @property
    def name(self) -> str:
        """Context name ``SOURCE:index`` (characters outside the allowed set become ``_``)."""
        return _NAME_BAD.sub("_", f"{self.source}:{self.index}")[-200:]


def find_documents(paths: Iterable[str]) -> list[tuple[str, Path]]:
    """``(source name, path)`` of every document: files as given, directories searched recursively."""
    out: list[tuple[str, Path]] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DOC_SUFFIXES)
            out += [(f"{p.name}/{f.relative_to(p).as_posix()}", f) for f in found]
        elif p.is_file():
            out.append((p.name if p.is_absolute() else p.as_posix(), p))
        else:
            raise DocumentError(f"no such file or directory: {arg}")
    if not out:
        raise DocumentError(f"no documents ({', '.join(DOC_SUFFIXES)}) found in {' '.join(paths)}")
    return out


def read_document(source: str, path: Path, model: ModelSource) -> Document:
    """Token ids of one document (token-id file or text, see the module docstring)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DocumentError(f"cannot read {path}: {e}") from None
    words = text.split()
    if not words:
        raise DocumentError(f"{path}: empty document")
    if all(w.isdigit() for w in words):
        ids = [int(w) for w in words]
        bad = [i for i in ids if i >= model.vocab_size]
        if bad:
            raise DocumentError(f"{path}: token id {bad[0]} >= vocabulary size {model.vocab_size}")
        return Document(source, ids)
    if path.suffix == ".ids":
        raise DocumentError(f"{path}: .ids files hold whitespace-separated non-negative integers only")
    return Document(source, model.tokenize(text))


def split_windows(doc: Document, chunk_tokens: int, max_context: int) -> tuple[list[Window], int]:
    """Windows of whole chunks no longer than ``max_context``; returns ``(windows, tokens dropped)``."""
    width = max_context // chunk_tokens * chunk_tokens
    if width == 0:
        raise DocumentError(f"--chunk-tokens {chunk_tokens} is larger than the model's context {max_context}")
    ids = doc.token_ids
    usable = len(ids) // chunk_tokens * chunk_tokens
    windows = [
        Window(doc.source, k, start, ids[start : min(start + width, usable)])
        for k, start in enumerate(range(0, usable, width))
    ]
    return windows, len(ids) - usable


def plan_windows(
    paths: Iterable[str], model: ModelSource, chunk_tokens: int
) -> tuple[list[Window], int, int]:
    """Every window of the documents under ``paths``: ``(windows, documents, tokens dropped)``."""
    found = find_documents(paths)
    windows: list[Window] = []
    dropped = 0
    origin: dict[str, Path] = {}  # context name of a document's first window -> its file
    for source, path in found:
        # Compared as stored: /a/doc.txt and /b/doc.txt, or "a b.txt" and "a_b.txt", would share names
        # and the second would take the first's contexts.
        first = Window(source, 0, 0, []).name
        if first in origin:
            raise DocumentError(
                f"{origin[first]} and {path} would both be stored as {first.rsplit(':', 1)[0]!r}; pass them "
                "by relative path (the name keeps it) or rename one"
            )
        origin[first] = path
        w, d = split_windows(read_document(source, path, model), chunk_tokens, model.max_context)
        windows += w
        dropped += d
    return windows, len(found), dropped


# ----- the preload pipeline -----------------------------------------------------------------------


@dataclass
class PreloadSummary:
    """What a preload did. ``level_bytes`` covers every window of the set (stored now or before)."""

    documents: int = 0
    windows: int = 0
    windows_skipped: int = 0
    tokens: int = 0
    tokens_dropped: int = 0
    level_bytes: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    fp16_bytes: int = 0
    bytes_written: int = 0
    pinned: bool = True
    prefill_seconds: float = 0.0
    encode_seconds: float = 0.0
    upload_seconds: float = 0.0
    wall_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``compression`` is fp16 bytes / stored bytes per level."""
        return {
            "documents": self.documents,
            "windows": self.windows,
            "windows_stored": self.windows - self.windows_skipped,
            "windows_skipped": self.windows_skipped,
            "tokens": self.tokens,
            "tokens_dropped": self.tokens_dropped,
            "fp16_bytes": self.fp16_bytes,
            "level_bytes": {str(lv): n for lv, n in sorted(self.level_bytes.items())},
            "compression": {
                str(lv): round(self.fp16_bytes / n, 3) for lv, n in sorted(self.level_bytes.items()) if n
            },
            "bytes_written": self.bytes_written,
            "pinned": self.pinned,
            "seconds": {
                "prefill": round(self.prefill_seconds, 4),
                "encode": round(self.encode_seconds, 4),
                "upload": round(self.upload_seconds, 4),
                "wall": round(self.wall_seconds, 4),
            },
        }


def _is_stored(
    client: Any, model: Any, window: Window, levels: Sequence[int], pin: bool, sidecars: Sequence[str] = ()
) -> Any:
    """The lookup result if ``window`` is fully stored at ``levels`` as a context, with ``sidecars`` on its
    last chunk (pinning it if asked), else None. A prefix shared with a longer context has its chunks but
    no manifest: not stored."""
    import grpc

    from client import KVStreamError

    n_chunks = len(window.token_ids) // model.chunk_tokens
    res = client.lookup(model, window.token_ids)
    if (
        res.prefix_chunks < n_chunks
        or any(not set(levels) <= {lv.level for lv in c.levels} for c in res.chunks[:n_chunks])
        or not set(sidecars) <= set(res.chunks[n_chunks - 1].sidecars)
    ):
        return None
    try:
        info = client.get_context(model, window.token_ids)
    except KVStreamError as e:
        if e.code == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    if pin and not info.pinned:
        client.pin(model, window.token_ids)
    return res


def preload(
    client: Any,
    model: Any,
    source: ModelSource,
    windows: Sequence[Window],
    *,
    levels: Sequence[int],
    pin: bool = True,
    ttl: float | None = None,
    workers: int = 0,
    sparse: Sequence[str] = (),
    on_window: Callable[[Window, bool], None] | None = None,
) -> PreloadSummary:
    """Store every window's KV cache at ``levels`` through ``client`` (a ``KVCacheClient``).

    ``model`` is the ``ModelKey``; the prefill output (float32) is cast to ``model.dtype`` before encoding.
    ``workers`` threads encode and upload while the next window prefills (0 = all on this thread).
    ``sparse`` names sparse-recall backends whose index is built per window and stored as sidecar
    ``sparse.<backend>`` of its last chunk (``client.sparse.service``; counted in the encode time).
    ``on_window(window, skipped)`` is called as each window completes. Returns the summary (documents and
    tokens_dropped are left to the caller).
    """
    import codec

    if sparse:
        from client.sparse.service import build_sidecars, sidecar_name

    dtype = getattr(torch, model.dtype)
    summary = PreloadSummary(windows=len(windows), pinned=pin)
    t_start = time.perf_counter()

    def encode_and_store(
        window: Window, kv: torch.Tensor
    ) -> tuple[Window, dict[int, int], int, float, float]:
        t0 = time.perf_counter()
        blobs = codec.encode_context(kv, model.chunk_tokens, levels)
        sidecars = build_sidecars(model, window.token_ids, kv, sparse) if sparse else None
        t1 = time.perf_counter()
        res = client.store(
            model,
            window.token_ids,
            blobs=blobs,
            sidecars=sidecars,
            pin=pin,
            ttl=ttl,
            name=window.name,
            metadata={"source": window.source, "window": str(window.index), "start": str(window.start)},
        )
        sizes: dict[int, int] = defaultdict(int)
        for per_level in blobs:
            for lv, b in per_level.items():
                sizes[lv] += len(b)
        return window, sizes, res.bytes_written, t1 - t0, time.perf_counter() - t1

    def collect(done: tuple[Window, dict[int, int], int, float, float]) -> None:
        window, sizes, written, enc_s, up_s = done
        for lv, n in sizes.items():
            summary.level_bytes[lv] += n
        summary.bytes_written += written
        summary.encode_seconds += enc_s
        summary.upload_seconds += up_s
        if on_window is not None:
            on_window(window, False)

    pending: list[Future[tuple[Window, dict[int, int], int, float, float]]] = []
    with ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="preload") as pool:
        for window in windows:
            summary.tokens += len(window.token_ids)
            summary.fp16_bytes += len(window.token_ids) * source.kv_values_per_token * 2
            stored = _is_stored(
                client, model, window, levels, pin, [sidecar_name(b) for b in sparse] if sparse else ()
            )
            if stored is not None:
                for c in stored.chunks:
                    for lv in c.levels:
                        if lv.level in levels:
                            summary.level_bytes[lv.level] += lv.size_bytes
                summary.windows_skipped += 1
                if on_window is not None:
                    on_window(window, True)
                continue
            t0 = time.perf_counter()
            kv = source.prefill(window.token_ids).to(dtype)
            summary.prefill_seconds += time.perf_counter() - t0
            if workers <= 0:
                collect(encode_and_store(window, kv))
                continue
            pending.append(pool.submit(encode_and_store, window, kv))
            while len(pending) > workers:  # bound the encoded windows held in memory
                collect(pending.pop(0).result())
        for fut in pending:
            collect(fut.result())
    summary.wall_seconds = time.perf_counter() - t_start
    return summary


# ----- kvctl subcommand ---------------------------------------------------------------------------


def add_document_args(p: argparse.ArgumentParser) -> None:
    """Arguments naming documents and the model that tokenizes / windows them (preload, verify --docs)."""
    p.add_argument("--model-file", help="llama2.c checkpoint (.bin), run by the built-in loader")
    p.add_argument("--hf-model", help="local transformers model directory (no download)")


def cmd_preload(args: argparse.Namespace, client: Any) -> None:
    """``kvctl preload DOC...``: see the module docstring."""
    import codec
    from kvstore.kvctl import UsageError, _emit, _human_bytes, _levels, model_key

    try:
        source = open_source(args.model_file, args.hf_model)
        args.model = args.model or source.model_id
        model = model_key(args)
        levels = _levels(args.levels) if args.levels else list(codec.LEVELS)
        windows, n_docs, dropped = plan_windows(args.documents, source, model.chunk_tokens)
    except DocumentError as e:
        raise UsageError(str(e)) from None
    if args.workers < 0:
        raise UsageError("--workers must be >= 0")
    sparse = [b for b in (args.sparse or "").split(",") if b]
    # ALISA's index needs the prefill queries, which the model sources do not return.
    if not set(sparse) <= set(SPARSE_BACKENDS):
        raise UsageError(f"--sparse: choose from {','.join(SPARSE_BACKENDS)}, got {args.sparse!r}")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    quiet = args.quiet or not console.is_terminal
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tokens]} tokens, {task.fields[skipped]} already stored"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    ) as progress:
        task = progress.add_task("preload", total=len(windows), tokens=0, skipped=0)
        done = [0, 0]  # tokens, windows skipped

        def advance(window: Window, skipped: bool) -> None:
            done[0] += len(window.token_ids)
            done[1] += int(skipped)
            progress.update(task, advance=1, tokens=done[0], skipped=done[1])

        summary = preload(
            client, model, source, windows, levels=levels, pin=args.pin, ttl=args.ttl,
            workers=args.workers, sparse=sparse, on_window=advance,
        )  # fmt: skip
    summary.documents, summary.tokens_dropped = n_docs, dropped
    data = summary.as_dict()
    if args.json:
        print(json.dumps(data, sort_keys=True))
        return
    secs = data["seconds"]
    _emit(
        args,
        {
            "documents": n_docs,
            "windows": f"{summary.windows} ({summary.windows_skipped} already stored)",
            "tokens": f"{summary.tokens} ({dropped} in partial chunks not stored)",
            "fp16 size": _human_bytes(summary.fp16_bytes),
            "bytes written": _human_bytes(summary.bytes_written),
            "pinned": args.pin,
            "seconds": f"{secs['wall']:.2f} (prefill {secs['prefill']:.2f}, encode {secs['encode']:.2f}, "
            f"upload {secs['upload']:.2f})",
        },
        "preload",
    )
    rows = [
        {
            "level": lv,
            "bytes": _human_bytes(n),
            "ratio vs fp16": f"{data['compression'].get(lv, 0):.2f}x",
            "bytes/token": f"{n / max(summary.tokens, 1):.1f}",
        }
        for lv, n in data["level_bytes"].items()
    ]
    _emit(args, rows, "stored bytes per level (the whole document set)")


def add_parser(sub: Any, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Register ``preload`` on kvctl's subparsers."""
    from kvstore.kvctl import ttl_seconds  # kvctl imports this module

    p = sub.add_parser(
        "preload", parents=list(parents), help="prefill documents locally and store them pinned"
    )
    p.add_argument("documents", nargs="+", help="files or directories (*.ids, *.txt, *.md)")
    add_document_args(p)
    p.add_argument("--levels", help="comma-separated codec levels (default: all)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="store with a TTL instead of pinning")
    p.add_argument("--ttl", type=ttl_seconds, help="seconds, with --no-pin (default: the server's)")
    p.add_argument(
        "--workers", type=int, default=0, help="encode/upload threads beside the prefill (default 0: serial)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (also off when stderr is no TTY)")
    p.add_argument(
        "--sparse",
        help=f"sparse-recall indexes to store per window (comma-separated: {','.join(SPARSE_BACKENDS)})",
    )
    p.set_defaults(fn=cmd_preload)
