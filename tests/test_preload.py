"""Operator workflow against a live server: kvctl preload (resumable, pinned), verify (and a corrupted
chunk), du / ls / stat JSON shapes, top --once --json; plus the pure helpers (windows, byte fallback,
metrics parsing).

The server runs on the test's event loop over a ``MemoryBackend`` the test holds, so a stored record can
be corrupted in place. kvctl runs in a subprocess (one per batch of commands, as in test_kvctl): this
process must not run a second grpc.aio loop (grpc/grpc#25364).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from kvstore.keys import ModelKey, chunk_hashes
from kvstore.preload import (
    BOS_ID,
    BYTE_OFFSET,
    Document,
    DocumentError,
    Llama2cSource,
    plan_windows,
    read_document,
    split_windows,
)
from kvstore.server import KVStreamServer
from kvstore.store import blob_key
from kvstore.top import parse_metrics, snapshot
from tests.support import free_port, kvctl, memory_server

CHUNK = 64
DOC_LENGTHS = {"d0.ids": 200, "d1.ids": 600, "d2.ids": 100}  # chunks: 3, 8 + 1 (2 windows), 1


@pytest.fixture
async def live() -> AsyncIterator[KVStreamServer]:
    async with memory_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "docs"
    root.mkdir()
    rng = np.random.default_rng(7)
    for name, n in DOC_LENGTHS.items():
        ids = [BOS_ID, *rng.integers(3, 512, n - 1).tolist()]
        (root / name).write_text(" ".join(map(str, ids)) + "\n")
    (root / "notes.md").write_text("Tom had a red ball. " * 4)  # 80 bytes + BOS: one chunk, 17 dropped
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


async def test_preload_verify_du_top(live: KVStreamServer, docs: Path, model_path: Path) -> None:
    model = ["--model-file", str(model_path), "--chunk-tokens", str(CHUNK)]
    first, again, ls, verify, other, other_ls, du, stat = await kvctl(
        live.address,
        ["preload", str(docs), *model, "--json", "--workers", "2"],
        ["preload", str(docs), *model, "--json"],
        ["ls", "--json"],
        ["verify", "--docs", str(docs), *model, "--json"],
        ["preload", str(docs / "d0.ids"), *model, "--namespace", "other", "--no-pin", "--levels", "0,4",
         "--json"],
        ["ls", "--json", "--namespace", "other"],
        ["du", "--json", "--namespace", "default,other"],
        ["stat", "--json"],
    )  # fmt: skip
    for code, _, err in (first, again, ls, verify, other, other_ls, du, stat):
        assert code == 0, err

    res = json.loads(first[1])
    assert (res["documents"], res["windows"], res["windows_skipped"]) == (4, 5, 0)
    assert res["tokens"] == 3 * 64 + 9 * 64 + 64 + 64 and res["tokens_dropped"] == 8 + 24 + 36 + 17
    assert sorted(res["level_bytes"]) == ["0", "1", "2", "3", "4"]
    assert res["fp16_bytes"] == res["tokens"] * 5 * 2 * 4 * 8 * 2
    sizes = [res["level_bytes"][lv] for lv in "01234"]
    assert sizes == sorted(sizes, reverse=True) and res["compression"]["4"] > 2  # higher level = smaller
    assert res["bytes_written"] == sum(sizes) and res["pinned"] is True

    res2 = json.loads(again[1])  # resumable: everything found by lookup, nothing prefilled or written
    assert (res2["windows_skipped"], res2["bytes_written"], res2["seconds"]["prefill"]) == (5, 0, 0.0)
    assert res2["level_bytes"] == res["level_bytes"]

    contexts = json.loads(ls[1])
    assert sorted(c["name"] for c in contexts) == [
        "docs/d0.ids:0", "docs/d1.ids:0", "docs/d1.ids:1", "docs/d2.ids:0", "docs/notes.md:0",
    ]  # fmt: skip
    assert all(c["pinned"] and c["ttl_seconds"] == -1 for c in contexts)
    assert all(c["metadata"]["source"].startswith("docs/") for c in contexts)

    ver = json.loads(verify[1])
    assert ver["ok"] is True and ver["bad_chunks"] == 0 and ver["checked"] == 14 * 5
    assert {c["name"]: c["chunks"] for c in ver["contexts"]}["docs/d1.ids:0"] == 8

    (row_default, row_other) = json.loads(du[1])
    assert row_default["namespace"] == "default" and row_default["model_id"] == "stories260K"
    assert (row_default["contexts"], row_default["pinned"], row_default["tokens"]) == (5, 5, res["tokens"])
    assert row_default["level_bytes"] == res["level_bytes"]
    assert row_default["total_bytes"] == sum(sizes)
    assert (row_other["namespace"], row_other["contexts"], row_other["pinned"]) == ("other", 1, 0)
    assert sorted(row_other["level_bytes"]) == ["0", "4"]
    st = json.loads(stat[1])
    assert set(st) == {"backend", "used_bytes", "capacity_bytes", "keys", "contexts", "pinned_contexts",
                       "evictions"}  # fmt: skip
    assert st["backend"] == "memory" and st["contexts"] == 6 and st["pinned_contexts"] == 5

    res = json.loads(other[1])
    assert sorted(res["level_bytes"]) == ["0", "4"] and res["pinned"] is False
    (ctx,) = json.loads(other_ls[1])
    assert ctx["pinned"] is False and ctx["ttl_seconds"] > 0

    # Corrupt one stored blob (chunk 3 of the first window of d1, level 2) in place: one byte flipped.
    ids = [int(t) for t in (docs / "d1.ids").read_text().split()][:512]
    h = chunk_hashes(ModelKey("stories260K", chunk_tokens=CHUNK), ids)[3]
    key = blob_key("default", h, 2)
    (raw,) = await live.backend.get_many([key])
    bad = bytearray(raw)
    bad[len(bad) // 2] ^= 0x40
    await live.backend.put(key, bytes(bad), None)

    metrics_url = f"http://127.0.0.1:{live.metrics_port}/metrics"
    (verify2, table, top, top_table, every, every_other) = await kvctl(
        live.address,
        ["verify", "--docs", str(docs), *model, "--json"],
        ["verify", "--docs", str(docs / "d1.ids"), *model],
        ["top", "--once", "--json", "--metrics-url", metrics_url, "--interval", "0.2"],
        ["top", "--once", "--metrics-url", metrics_url, "--interval", "0"],
        ["verify", "--all", "--json"],  # every context of the namespace, found via List + GetContext
        ["verify", "--all", "--namespace", "other", "--json"],
    )
    code, out, err = every
    assert code == 1 and err.startswith("kvctl: error: verify: 1 bad chunks in 1 contexts")
    ver = json.loads(out)
    assert len(ver["contexts"]) == 5 and ver["checked"] == 14 * 5 - 1
    assert [
        (c["name"], [(b["chunk"], b["level"]) for b in c["bad"]]) for c in ver["contexts"] if c["bad"]
    ] == [("docs/d1.ids:0", [(3, 2)])]
    code, out, err = every_other
    assert code == 0, err
    assert json.loads(out)["ok"] is True and json.loads(out)["checked"] > 0

    code, out, err = verify2
    assert code == 1 and err.startswith("kvctl: error: verify: 1 bad chunks in 1 contexts")
    ver = json.loads(out)
    assert ver["ok"] is False and ver["checked"] == 14 * 5 - 1
    (ctx,) = [c for c in ver["contexts"] if c["bad"]]
    assert ctx["name"] == "docs/d1.ids:0"
    assert [(b["chunk"], b["level"]) for b in ctx["bad"]] == [(3, 2)]
    assert table[0] == 1 and "bad chunks" in table[1] and "d1.ids:0" in table[1]

    code, out, err = top
    assert code == 0, err
    snap = json.loads(out)
    assert snap["corrupt_records"] >= 1 and snap["bytes_served"] > 0
    assert sorted(snap["level_mix"]) == ["0", "1", "2", "3", "4"]
    assert abs(sum(snap["level_mix"].values()) - 1) < 1e-3
    assert 0 < snap["lookup_hit_rate"] <= 1 and snap["requests"]["PutChunks"] == 6
    assert snap["rates"] is not None and snap["rates"]["seconds"] > 0
    assert top_table[0] == 0 and "lookup hit rate" in top_table[1] and "hot-chunk cache" in top_table[1]
    assert snap["hot_cache_bytes"] == 0  # verify read every blob past the cache without filling it


async def test_errors_are_one_line(
    live: KVStreamServer, docs: Path, model_path: Path, tmp_path: Path
) -> None:
    (tmp_path / "big.ids").write_text("1 2 999")
    no_model, big_id, no_target, dead_metrics = await kvctl(
        live.address,
        ["preload", str(docs)],
        ["preload", str(tmp_path / "big.ids"), "--model-file", str(model_path)],
        ["verify", "--model", "m"],
        ["top", "--once", "--json", "--metrics-url", f"http://127.0.0.1:{free_port()}/metrics"],
    )
    for (code, out, err), want_code, needle in (
        (no_model, 2, "--model-file"),
        (big_id, 2, "token id 999 >= vocabulary size 512"),
        (no_target, 2, "--docs"),
        (dead_metrics, 1, "unavailable: cannot scrape"),
    ):
        assert code == want_code and out == "", err
        assert err.startswith("kvctl: error: ") and needle in err and err.count("\n") == 1


# ----- helpers, no server --------------------------------------------------------------------------


def test_windows_are_whole_chunks_within_the_context() -> None:
    doc = Document("a.ids", list(range(1100)))
    windows, dropped = split_windows(doc, 64, 512)
    assert [(w.index, w.start, len(w.token_ids)) for w in windows] == [
        (0, 0, 512),
        (1, 512, 512),
        (2, 1024, 64),
    ]
    assert dropped == 1100 - 1088 and windows[2].token_ids[0] == 1024
    assert windows[1].name == "a.ids:1"
    assert split_windows(doc, 100, 512)[0][0].token_ids == list(range(500))  # 5 chunks of 100 fit in 512
    with pytest.raises(DocumentError):
        split_windows(doc, 1024, 512)


def test_two_documents_never_share_a_context_name(model_path: Path, tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "doc.ids").write_text(" ".join(["5"] * 64))
    src = Llama2cSource(model_path)
    with pytest.raises(DocumentError, match="both be stored as 'doc.ids'"):  # absolute paths: basenames
        plan_windows([str(tmp_path / "a" / "doc.ids"), str(tmp_path / "b" / "doc.ids")], src, 64)
    # Different files whose names only differ in characters a context name cannot hold.
    for name in ("x y.ids", "x_y.ids"):
        (tmp_path / "a" / name).write_text(" ".join(["5"] * 64))
    with pytest.raises(DocumentError, match="both be stored as 'a/x_y.ids'"):
        plan_windows([str(tmp_path / "a")], src, 64)


def test_text_uses_the_byte_fallback(model_path: Path, tmp_path: Path) -> None:
    src = Llama2cSource(model_path)
    assert (src.max_context, src.vocab_size, src.kv_values_per_token) == (512, 512, 5 * 2 * 4 * 8)
    (tmp_path / "t.txt").write_text("hé")
    doc = read_document("t.txt", tmp_path / "t.txt", src)
    assert doc.token_ids == [BOS_ID, *(BYTE_OFFSET + b for b in "hé".encode())]
    (tmp_path / "n.txt").write_text("5 6\n7")
    assert read_document("n.txt", tmp_path / "n.txt", src).token_ids == [5, 6, 7]  # ints: token ids
    (tmp_path / "x.ids").write_text("5 six")
    with pytest.raises(DocumentError, match="integers only"):
        read_document("x.ids", tmp_path / "x.ids", src)


_METRICS = """
# TYPE kvstream_requests counter
kvstream_requests_total{{method="Lookup",code="OK"}} {lookups}
kvstream_requests_total{{method="Lookup",code="NOT_FOUND"}} 1
kvstream_requests_total{{method="StreamContext",code="OK"}} 4
# TYPE kvstream_sent_bytes counter
kvstream_sent_bytes_total {sent}
# TYPE kvstream_sent_level_bytes counter
kvstream_sent_level_bytes_total{{level="1"}} 300
kvstream_sent_level_bytes_total{{level="4"}} 100
# TYPE kvstream_lookup_chunks counter
kvstream_lookup_chunks_total{{result="hit"}} 30
kvstream_lookup_chunks_total{{result="miss"}} 10
# TYPE kvstream_store_evictions gauge
kvstream_store_evictions 7
# TYPE kvstream_hot_cache_reads counter
kvstream_hot_cache_reads_total{{result="hit"}} 9
kvstream_hot_cache_reads_total{{result="miss"}} 3
# TYPE kvstream_hot_cache_bytes gauge
kvstream_hot_cache_bytes 4096
"""


def test_snapshot_from_metrics_text() -> None:
    prev = parse_metrics(_METRICS.format(lookups=9, sent=400), at=10.0)
    cur = parse_metrics(_METRICS.format(lookups=29, sent=1400), at=12.0)
    snap = snapshot(cur, prev)
    assert snap["lookup_hit_rate"] == 0.75 and snap["read_hit_rate"] is None
    assert snap["level_mix"] == {"1": 0.75, "4": 0.25} and snap["evictions"] == 7
    assert (snap["hot_cache_hit_rate"], snap["hot_cache_bytes"]) == (0.75, 4096)
    assert snap["requests"] == {"Lookup": 30, "StreamContext": 4} and snap["errors"] == 1
    assert snap["rates"]["requests_per_s"] == {"Lookup": 10.0, "StreamContext": 0.0}
    assert snap["rates"]["bytes_served_per_s"] == 500.0
    assert snapshot(cur)["rates"] is None
