"""LMCache CacheGen (CPU path) baseline driver; runs INSIDE a separate venv that has ``lmcache``.

    /tmp/lmc-venv/bin/python benchmarks/lmcache_baseline.py IN.npy OUT.npy [IN2.npy OUT2.npy ...] \
        [--repeats 5] [--model-name NAME]

Each ``IN.npy`` is one fp16 chunk ``[layers, 2, tokens, kv_heads, head_dim]`` (our layout). It is handed to
LMCache's v1 ``CreateSerde("cachegen")`` serializer/deserializer in its KV_2LTD layout
``[2, layers, tokens, kv_heads * head_dim]``; on a CPU-only torch they run LMCache's numba fallback.
``OUT.npy`` receives the decoded chunk (fp16, our layout) for quality measurements; the last stdout
line is a JSON list with, per chunk, the serialized size and the single-thread encode/decode speed
(fp16-equivalent MB/s, median of ``--repeats`` after a warm-up; ``--repeats 0`` skips timing). All
chunks run in one process so LMCache's import and numba JIT are paid once. It imports nothing from
kvstream so it runs in LMCache's own environment.

Bins: for a model name in LMCache's own table (e.g. ``meta-llama/Llama-3.1-8B-Instruct``) its config is
used; for any other name LMCache would read the HF config, which needs the network, so we apply the
rule its fallback applies to the layer count (< 10 layers: 32 bins everywhere; otherwise 32 key bins in
layers 0-9, 32 value bins in layers 0-1, 16 bins elsewhere).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def _bins_config(n_layers: int, model_name: str):  # type: ignore[no-untyped-def]
    from lmcache.storage_backend.serde.cachegen_basics import QuantizationSpec
    from lmcache.v1.storage_backend.naive_serde.cachegen_basics import CacheGenConfig

    try:
        cfg = CacheGenConfig.from_model_name(model_name)
        if cfg.nlayers == n_layers:
            return cfg, "lmcache table"
    except ValueError:
        pass
    if n_layers < 10:
        spec = [QuantizationSpec(start_layer=0, end_layer=n_layers, bins=32)]
        return CacheGenConfig(nlayers=n_layers, kspecs=spec, vspecs=list(spec)), "fallback rule (<10 layers)"
    return CacheGenConfig(
        nlayers=n_layers,
        kspecs=[QuantizationSpec(start_layer=0, end_layer=10, bins=32),
                QuantizationSpec(start_layer=10, end_layer=n_layers, bins=16)],
        vspecs=[QuantizationSpec(start_layer=0, end_layer=2, bins=32),
                QuantizationSpec(start_layer=2, end_layer=n_layers, bins=16)],
    ), "fallback rule (>=10 layers)"


def run_chunk(kv: torch.Tensor, repeats: int, model_name: str) -> tuple[torch.Tensor, dict]:
    """Serialize + deserialize ``kv`` fp16 ``[layers, 2, tokens, heads, head_dim]`` with LMCache's
    CacheGen serde; returns (decoded fp16 in the same layout, stats)."""
    import lmcache
    from lmcache.storage_backend.serde.cachegen_basics import CacheGenGPUEncoderOutput
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.naive_serde import CreateSerde

    n_layers, _, t, h, d = kv.shape
    cfg, bins_source = _bins_config(n_layers, model_name)
    meta = LMCacheMetadata(model_name="test_model", world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=torch.float16, kv_shape=(n_layers, 2, t, h, d))
    ser, deser = CreateSerde("cachegen", meta, LMCacheEngineConfig.from_defaults(chunk_size=t))
    for obj in (ser, deser):  # same bins on both sides, built by the serde's own helpers
        obj.cachegen_config = cfg
        obj.key_bins = obj.make_key_bins(cfg)
        obj.value_bins = obj.make_value_bins(cfg)
    lt = kv.permute(1, 0, 2, 3, 4).reshape(2, n_layers, t, h * d).contiguous()  # KV_2LTD
    mobj = TensorMemoryObj(
        raw_data=lt,
        metadata=MemoryObjMetadata(shape=lt.shape, dtype=lt.dtype, address=-1, phy_size=lt.numel() * 2,
                                   ref_count=-1, fmt=MemoryFormat.KV_2LTD),
        parent_allocator=None,
    )
    blob = ser.serialize(mobj)
    out = deser.deserialize(blob)
    enc_t, dec_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        blob = ser.serialize(mobj)
        t1 = time.perf_counter()
        out = deser.deserialize(blob)
        dec_t.append(time.perf_counter() - t1)
        enc_t.append(t1 - t0)
    dec = out.tensor.reshape(2, n_layers, t, h, d).permute(1, 0, 2, 3, 4).to(torch.float16).contiguous()
    parts = CacheGenGPUEncoderOutput.from_bytes(blob.byte_array)
    mb = kv.numel() * 2 / 1e6
    stats = {
        "lmcache_version": getattr(lmcache, "__version__", "unknown"),
        "device_type": str(lmcache.torch_device_type),
        "bins": bins_source,
        "bytes": len(blob.byte_array),
        "bitstream_bytes": sum(int(c.bytestream_lengths.sum()) for c in parts.data_chunks),
        "cdf_bytes": parts.cdf.numel() * parts.cdf.element_size(),
        "encode_MBps": mb / statistics.median(enc_t) if enc_t else None,
        "decode_MBps": mb / statistics.median(dec_t) if dec_t else None,
        "repeats": repeats,
    }
    return dec, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="IN.npy OUT.npy pairs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model-name", default="meta-llama/Llama-3.1-8B-Instruct")
    args = ap.parse_args()
    if len(args.paths) % 2:
        ap.error("paths must be IN.npy OUT.npy pairs")
    torch.set_num_threads(1)
    results = []
    for inp, outp in zip(args.paths[::2], args.paths[1::2], strict=True):
        dec, stats = run_chunk(torch.from_numpy(np.load(inp)).half(), args.repeats, args.model_name)
        np.save(outp, dec.numpy())
        results.append(stats)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
