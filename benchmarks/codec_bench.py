"""Size / quality / speed benchmark of the KV codec against simple baselines, all in one process.

    python -m benchmarks.codec_bench --json out.json \
        [--plot docs/codec_size_quality.png] [--doc docs/codec.md]

Sizes: real stories260K KV (fp16, 256-token chunks) and a synthetic Llama-8B-shaped chunk
``[32, 2, 256, 8, 128]`` (per-channel offsets, outlier key channels, AR(1) over tokens). Quality: for each
of ``--contexts`` sampled stories, the first 448 tokens' KV is encoded (chunks of 256 + 192 tokens) and
decoded; then the next 16 tokens run on it and are compared with a dense full-precision prefill (KL,
top-1), a 16-token greedy continuation is compared, and per-layer attention outputs of the model's real
queries over the decoded context are compared with the exact ones. Speed: single thread, median of
``--repeats``, fp16-equivalent MB/s (``numel * 2 / seconds``).

LMCache baseline: with ``--lmcache-python PY`` (a venv with ``lmcache``, see
benchmarks/lmcache_baseline.py) the same chunks go through LMCache's CacheGen CPU serde in a subprocess
and are measured like the other methods; speed is measured in the same run on the same synthetic chunk,
and ``vs_lmcache`` gives ours/LMCache ratios. If LMCache cannot run, the reason is recorded and the
bench goes on without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import codec
from client.model import Llama2c

PREFIX, EVAL, GREEDY, CHUNK = 448, 16, 16, 256
Method = Callable[[torch.Tensor], tuple[torch.Tensor, int]]  # fp16 chunk -> (decoded, stored bytes)
LMCACHE = "lmcache_cachegen"
DRIVER = Path(__file__).with_name("lmcache_baseline.py")


class LMCacheBaseline:
    """LMCache's CacheGen serde run by ``benchmarks/lmcache_baseline.py`` in another interpreter.

    :meth:`prepare` encodes/decodes a batch of fp16 chunks in one subprocess (one import + JIT); the
    instance is then a :data:`Method` that answers for those chunks. ``error`` says why it is off.
    """

    def __init__(self, python: str | None) -> None:
        self.python = python
        self.error: str | None = None if python else "not requested (no --lmcache-python)"
        self._cache: dict[bytes, tuple[torch.Tensor, int]] = {}

    @staticmethod
    def _key(kv: torch.Tensor) -> bytes:
        data = kv.half().contiguous().view(torch.int16).numpy().tobytes()
        return hashlib.blake2b(repr(tuple(kv.shape)).encode() + data, digest_size=16).digest()

    def prepare(self, chunks: list[torch.Tensor], repeats: int = 0) -> list[dict]:
        """Run the driver on ``chunks`` (fp16 ``[L, 2, T, H, D]``); returns its per-chunk stats."""
        if self.error or not chunks:
            return []
        assert self.python is not None
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, c in enumerate(chunks):
                paths += [f"{tmp}/in{i}.npy", f"{tmp}/out{i}.npy"]
                np.save(paths[-2], c.half().numpy())
            try:
                proc = subprocess.run([self.python, str(DRIVER), *paths, "--repeats", str(repeats)],
                                      capture_output=True, text=True, timeout=3600, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                self.error = f"driver did not run: {e}"
                return []
            if proc.returncode != 0:
                self.error = f"driver exit {proc.returncode}: {proc.stderr.strip()[-800:]}"
                return []
            stats = json.loads(proc.stdout.strip().splitlines()[-1])
            for i, (c, st) in enumerate(zip(chunks, stats, strict=True)):
                self._cache[self._key(c)] = (torch.from_numpy(np.load(f"{tmp}/out{i}.npy")), st["bytes"])
        return stats

    def __call__(self, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        dec, nbytes = self._cache[self._key(kv)]
        return dec.to(kv.dtype), nbytes


def int8_per_token(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Symmetric int8 with one fp16 scale per (layer, K/V, token)."""
    x = kv.float()
    scale = (x.abs().amax(dim=(-1, -2), keepdim=True) / 127).half().float().clamp_min(1e-8)
    q = torch.round(x / scale).clamp(-127, 127)
    return (q * scale).to(kv.dtype), kv.numel() + scale.numel() * 2


def fp8(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    return kv.to(torch.float8_e4m3fn).to(kv.dtype), kv.numel()


def fp16(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    return kv.half(), kv.numel() * 2


def level_method(level: int) -> Method:
    def run(kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        blob = codec.encode(kv, level)
        return codec.decode(blob), len(blob)

    return run


def methods(lmc: LMCacheBaseline | None = None) -> dict[str, Method]:
    out: dict[str, Method] = {"fp16": fp16, "int8_per_token": int8_per_token, "fp8_e4m3": fp8,
                              "zstd_fp16": level_method(codec.LOSSLESS)}
    out.update({f"level{lv}": level_method(lv) for lv in codec.LEVELS if lv != codec.LOSSLESS})
    if lmc is not None and lmc.error is None:
        out[LMCACHE] = lmc
    return out


def synthetic_llama_chunk(seed: int = 0, layers: int = 32, tokens: int = 256, heads: int = 8,
                          head_dim: int = 128) -> torch.Tensor:
    """fp16 ``[layers, 2, tokens, heads, head_dim]`` with channel offsets, outlier key channels, AR(1)."""
    g = torch.Generator().manual_seed(seed)
    c = heads * head_dim
    offset = torch.randn(layers, 2, 1, c, generator=g) * 0.5
    scale = torch.exp(torch.randn(layers, 2, 1, c, generator=g) * 0.3)
    outlier = torch.zeros(layers, 2, 1, c)
    for layer in range(layers):
        outlier[layer, 0, 0, torch.randint(0, c, (6,), generator=g)] = 1.0
    scale = scale * (1 + 9 * outlier)
    offset = offset + 5 * outlier * torch.sign(torch.randn(layers, 2, 1, c, generator=g))
    noise = torch.randn(layers, 2, tokens, c, generator=g)
    x = torch.empty_like(noise)
    x[:, :, 0] = noise[:, :, 0]
    rho = 0.7
    for t in range(1, tokens):
        x[:, :, t] = rho * x[:, :, t - 1] + math.sqrt(1 - rho**2) * noise[:, :, t]
    return (offset + scale * x).reshape(layers, 2, tokens, heads, head_dim).half()


def size_stats(chunks: list[torch.Tensor], lmc: LMCacheBaseline | None = None) -> dict[str, dict[str, float]]:
    """Bytes per method over ``chunks``; ratios vs fp16 and int8; side-info share for codec levels."""
    res: dict[str, dict[str, float]] = {}
    numel = sum(c.numel() for c in chunks)
    int8_bytes = sum(int8_per_token(c)[1] for c in chunks)
    for name, fn in methods(lmc).items():
        total, side = 0, 0
        for c in chunks:
            if name.startswith("level") or name == "zstd_fp16":
                lv = codec.LOSSLESS if name == "zstd_fp16" else int(name[5:])
                blob = codec.encode(c, lv)
                info = codec.inspect(blob)
                total += len(blob)
                side += info.nbytes - info.payload_len  # header + params + checksum
            else:
                total += fn(c)[1]
        res[name] = {"bytes": total, "x_vs_fp16": numel * 2 / total, "x_vs_int8": int8_bytes / total,
                     "bits_per_value": 8 * total / numel}
        if side:
            res[name]["side_info_frac"] = side / total
    return res


def timing(kv: torch.Tensor, repeats: int, lmc_stats: list[dict]) -> dict[str, dict[str, float]]:
    """Single-thread encode/decode MB/s (fp16-equivalent, median of ``repeats``) per level, plus
    LMCache's figures measured by its driver on the same chunk in this run."""
    mb = kv.numel() * 2 / 1e6
    out = {}
    for lv in codec.LEVELS:
        codec.decode(codec.encode(kv, lv))  # warm up (numba cache load)
        enc, dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            blob = codec.encode(kv, lv)
            t1 = time.perf_counter()
            codec.decode(blob)
            dec.append(time.perf_counter() - t1)
            enc.append(t1 - t0)
        out[f"level{lv}"] = {"encode_MBps": mb / statistics.median(enc),
                             "decode_MBps": mb / statistics.median(dec)}
    if lmc_stats:
        out[LMCACHE] = {k: lmc_stats[0][k] for k in ("encode_MBps", "decode_MBps")}
    return out


def attention_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q ``[E, Hq, D]``, k/v ``[P, Hkv, D]`` -> ``[E, Hq, D]`` (GQA, no mask: queries follow the context)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    att = torch.softmax(torch.einsum("ehd,phd->hep", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("hep,phd->ehd", att, v)


def synthetic_quality(kv: torch.Tensor, lmc: LMCacheBaseline | None = None) -> dict[str, dict[str, float]]:
    """Errors on the synthetic chunk ``kv`` fp16 ``[L, 2, T, H, D]``, which has no model: relative L2
    error of keys and of values, and the attention-output error with the chunk's own keys as queries
    (same channel structure, outlier channels included; all T tokens attend to all T), mean over layers."""
    x = kv.float()
    out = {}
    for name, fn in methods(lmc).items():
        y = fn(kv)[0].float()
        errs = [float((attention_out(x[layer, 0], y[layer, 0], y[layer, 1]) - ref).norm() / ref.norm())
                for layer in range(x.shape[0])
                for ref in [attention_out(x[layer, 0], x[layer, 0], x[layer, 1])]]
        out[name] = {"key_rel_l2": float((y[:, 0] - x[:, 0]).norm() / x[:, 0].norm()),
                     "value_rel_l2": float((y[:, 1] - x[:, 1]).norm() / x[:, 1].norm()),
                     "attn_self_keys": float(np.mean(errs))}
    return out


def quality(model: Llama2c, n_contexts: int,
            lmc: LMCacheBaseline | None = None) -> dict[str, dict[str, float]]:
    contexts = []
    for seed in range(n_contexts):
        ids = model.sample(PREFIX + EVAL + 1, 1000 + seed)
        contexts.append((ids, model.forward(ids[: PREFIX + EVAL], return_queries=True)))
    chunks = [[r.kv[:, :, :PREFIX].half()[:, :, a : a + CHUNK] for a in range(0, PREFIX, CHUNK)]
              for _, r in contexts]
    if lmc is not None:
        lmc.prepare([c for cs in chunks for c in cs])
    acc: dict[str, dict[str, list[float]]] = {name: {"kl": [], "top1": [], "greedy": [], "attn": [],
                                                     "attn_max_layer": []} for name in methods(lmc)}
    for (ids, ref), parts_in in zip(contexts, chunks, strict=True):
        assert ref.queries is not None
        exact = ref.kv[:, :, :PREFIX]
        ref_lp = torch.log_softmax(ref.logits[PREFIX:], dim=-1)
        ref_greedy = model.greedy(exact, ids[PREFIX], GREEDY)
        for name, fn in methods(lmc).items():
            parts = [fn(c)[0] for c in parts_in]
            dec = torch.cat(parts, dim=2).float()
            lp = torch.log_softmax(model.forward(ids[PREFIX : PREFIX + EVAL], past_kv=dec).logits, dim=-1)
            a = acc[name]
            a["kl"].append(float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean()))
            a["top1"].append(float((ref_lp.argmax(-1) == lp.argmax(-1)).float().mean()))
            got = model.greedy(dec, ids[PREFIX], GREEDY)
            a["greedy"].append(sum(x == y for x, y in zip(got, ref_greedy, strict=True)) / GREEDY)
            errs = []
            for layer in range(exact.shape[0]):
                q = ref.queries[layer, PREFIX:]
                o = attention_out(q, exact[layer, 0], exact[layer, 1])
                o2 = attention_out(q, dec[layer, 0], dec[layer, 1])
                errs.append(float((o2 - o).norm() / o.norm()))
            a["attn"].append(float(np.mean(errs)))
            a["attn_max_layer"].append(max(errs))
    return {name: {k: float(np.mean(v)) for k, v in a.items()} for name, a in acc.items()}


def vs_lmcache(res: dict) -> dict[str, dict[str, float]]:
    """Ours / LMCache per codec level: speed (>1 = faster), size (x vs fp16; >1 = smaller), errors
    (<1 = better), all from this run (size > 1 means our blob is that many times smaller)."""
    out: dict[str, dict[str, float]] = {}
    real, synth, qual, speed = res["size_real"], res["size_synthetic_llama8b"], res["quality"], res["speed"]
    for name in (n for n in real if n.startswith("level")):
        r: dict[str, float] = {}
        if LMCACHE in speed:
            r["encode_speed"] = speed[name]["encode_MBps"] / speed[LMCACHE]["encode_MBps"]
            r["decode_speed"] = speed[name]["decode_MBps"] / speed[LMCACHE]["decode_MBps"]
        if LMCACHE in synth:
            r["size_synth"] = synth[name]["x_vs_fp16"] / synth[LMCACHE]["x_vs_fp16"]
        if LMCACHE in real:
            r["size_real"] = real[name]["x_vs_fp16"] / real[LMCACHE]["x_vs_fp16"]
        sq = res["quality_synthetic_llama8b"]
        if LMCACHE in sq:
            r["attn_err_synth"] = sq[name]["attn_self_keys"] / sq[LMCACHE]["attn_self_keys"]
        if LMCACHE in qual:
            r["attn_err"] = qual[name]["attn"] / qual[LMCACHE]["attn"]
            r["kl"] = qual[name]["kl"] / max(qual[LMCACHE]["kl"], 1e-12)
        out[name] = r
    return out


def markdown(res: dict) -> str:
    real, synth, qual, speed = res["size_real"], res["size_synthetic_llama8b"], res["quality"], res["speed"]
    sq = res["quality_synthetic_llama8b"]
    lines = [
        f"Measured by `python -m benchmarks.codec_bench` ({res['contexts']} contexts, stories260K; "
        "speed on one core, synthetic Llama-8B-shaped chunk, median of repeats).",
        "",
        "| method | x vs fp16 (real) | x vs int8 (real) | side info | x vs fp16 (8B synth) "
        "| attn err (8B synth) | mean KL (nats) | top-1 | greedy-16 | attn err (mean / worst layer) "
        "| enc MB/s | dec MB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in (n for n in real if n in qual and n in synth):
        side = real[name].get("side_info_frac")
        sp = speed.get(name if name != "zstd_fp16" else "level0", {})
        lines.append(
            f"| {name} | {real[name]['x_vs_fp16']:.2f} | {real[name]['x_vs_int8']:.2f} | "
            f"{'' if side is None else f'{100 * side:.1f} %'} | {synth[name]['x_vs_fp16']:.2f} | "
            f"{100 * sq[name]['attn_self_keys']:.2f} % | "
            f"{qual[name]['kl']:.4f} | {qual[name]['top1']:.3f} | {qual[name]['greedy']:.3f} | "
            f"{100 * qual[name]['attn']:.2f} % / {100 * qual[name]['attn_max_layer']:.2f} % | "
            f"{sp.get('encode_MBps', float('nan')):.0f} | {sp.get('decode_MBps', float('nan')):.0f} |"
        )
    lines += ["", f"DEFAULT_LEVEL = {codec.DEFAULT_LEVEL}."]
    if res["lmcache"]["error"]:
        lines += ["", f"LMCache baseline not measured: {res['lmcache']['error']}"]
    else:
        lines += [
            "",
            f"`{LMCACHE}` = LMCache {res['lmcache']['version']} CacheGen serde on CPU "
            "(benchmarks/lmcache_baseline.py), same chunks, same run. Ours / LMCache:",
            "",
            "| level | encode speed | decode speed | size (real) | size (8B synth) | attn err (real) "
            "| attn err (8B synth) | KL (real) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in res["vs_lmcache"].items():
            cells = [f"{r[k]:.2f}x" if k in r else "" for k in
                     ("encode_speed", "decode_speed", "size_real", "size_synth", "attn_err", "attn_err_synth",
                      "kl")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real, qual = res["size_real"], res["quality"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "kl", "mean next-token KL (nats)"),
                           (axes[1], "attn", "mean attention-output rel. error")):
        for name in real:
            is_level = name.startswith("level")
            ax.scatter(real[name]["x_vs_fp16"], max(qual[name][key], 1e-7), marker="o" if is_level else "s",
                       color="tab:blue" if is_level else "tab:red")
            ax.annotate(name, (real[name]["x_vs_fp16"], max(qual[name][key], 1e-7)), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
        levels = [n for n in real if n.startswith("level")]
        ax.plot([real[n]["x_vs_fp16"] for n in levels], [max(qual[n][key], 1e-7) for n in levels],
                color="tab:blue")
        ax.set_yscale("log")
        ax.set_xlabel("size ratio vs fp16 (stories260K, 256-token chunks)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("kvstream codec: size vs quality (blue = codec levels, red = baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    block = f"{begin}\n{table}\n{end}"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S) \
        if begin in text else text + "\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="write results here")
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--plot", help="write a size-vs-quality PNG here")
    ap.add_argument("--doc", help="replace the bench table in this Markdown file (e.g. docs/codec.md)")
    ap.add_argument("--lmcache-python", help="python of a venv with lmcache (e.g. /tmp/lmc-venv/bin/python)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = Llama2c.from_file()
    real_chunks = []
    for seed in range(4):
        ids = model.sample(512, 2000 + seed)
        kv = model.forward(ids).kv.half()
        real_chunks += [kv[:, :, :CHUNK], kv[:, :, CHUNK : 2 * CHUNK]]
    synth = synthetic_llama_chunk()
    lmc = LMCacheBaseline(args.lmcache_python)
    lmc_synth = lmc.prepare([synth], repeats=args.repeats)
    lmc.prepare(real_chunks)
    res = {
        "contexts": args.contexts,
        "default_level": codec.DEFAULT_LEVEL,
        "speed": timing(synth, args.repeats, lmc_synth),
        "quality": quality(model, args.contexts, lmc),
        "size_real": size_stats(real_chunks, lmc),
        "size_synthetic_llama8b": size_stats([synth], lmc),
        "quality_synthetic_llama8b": synthetic_quality(synth, lmc),
    }
    res["lmcache"] = {"error": lmc.error, "synthetic_chunk": lmc_synth,
                      "version": lmc_synth[0]["lmcache_version"] if lmc_synth else None}
    res["vs_lmcache"] = vs_lmcache(res)
    Path(args.json).write_text(json.dumps(res, indent=2))
    table = markdown(res)
    print(table)
    if args.plot:
        plot(res, args.plot)
    if args.doc:
        update_doc(Path(args.doc), table)
    return res


if __name__ == "__main__":
    main()
