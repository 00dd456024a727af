"""Chunk keys are stable and salted; envelopes reject every kind of damage."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvstore.envelope import CorruptRecord, Envelope, Kind, open_envelope, seal
from kvstore.keys import InvalidKeyError, ModelKey, chunk_hashes

MODEL = ModelKey("stories260K", chunk_tokens=4)


def test_chain_dedups_shared_prefixes_and_ignores_partial_tail() -> None:
    a = chunk_hashes(MODEL, list(range(10)))  # 2 full chunks, tail of 2 ignored
    b = chunk_hashes(MODEL, [*range(8), 99, 98, 97, 96])
    assert len(a) == 2 and len(b) == 3
    assert a == b[:2]
    assert len(set(a + b)) == 3


def test_any_token_change_changes_every_later_key() -> None:
    a = chunk_hashes(MODEL, list(range(12)))
    b = chunk_hashes(MODEL, [0, 1, 2, 3, 4, 5, 6, 77, 8, 9, 10, 11])
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]


@pytest.mark.parametrize(
    "other",
    [
        ModelKey("stories260K", chunk_tokens=4, namespace="tenant-b"),
        ModelKey("stories260K", chunk_tokens=4, revision="r2"),
        ModelKey("stories260K", chunk_tokens=4, dtype="bfloat16"),
        ModelKey("other-model", chunk_tokens=4),
    ],
)
def test_every_salt_field_separates_key_spaces(other: ModelKey) -> None:
    assert chunk_hashes(MODEL, range(8)) != chunk_hashes(other, range(8))


def test_keys_are_identical_across_processes_and_hash_seeds() -> None:
    code = (
        "from kvstore.keys import ModelKey, chunk_hashes; "
        "print(chunk_hashes(ModelKey('m', chunk_tokens=2), range(6))[-1].hex())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "1", "12345")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == chunk_hashes(ModelKey("m", chunk_tokens=2), range(6))[-1].hex()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model_id": ""},
        {"model_id": "a b"},
        {"model_id": "m", "dtype": "int4"},
        {"model_id": "m", "chunk_tokens": 0},
        {"model_id": "m", "kv_layout": "BHTD"},
        {"model_id": "m", "namespace": ""},
    ],
)
def test_bad_model_specs_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidKeyError):
        ModelKey(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("ids", [[-1, 2], [2**32], [[1, 2]], [1.5]])
def test_bad_token_ids_are_rejected(ids: list[object]) -> None:
    with pytest.raises(InvalidKeyError):
        chunk_hashes(MODEL, ids)  # type: ignore[arg-type]


def test_envelope_round_trip_and_damage() -> None:
    env = Envelope(Kind.CHUNK, "stories260K", b"payload" * 100, codec_id=1, level=2)
    rec = seal("k1", env)
    assert open_envelope("k1", rec, expect=Kind.CHUNK) == env
    with pytest.raises(CorruptRecord, match="another key"):
        open_envelope("k2", rec)
    with pytest.raises(CorruptRecord, match="expected"):
        open_envelope("k1", rec, expect=Kind.MANIFEST)
    for cut in (0, 10, len(rec) - 1):
        with pytest.raises(CorruptRecord):
            open_envelope("k1", rec[:cut])
    for pos in range(0, len(rec), 37):
        damaged = bytearray(rec)
        damaged[pos] ^= 0x40
        with pytest.raises(CorruptRecord):
            open_envelope("k1", bytes(damaged))
