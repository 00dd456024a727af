"""transformers integration: llama2.c -> HF conversion, DynamicCache conversion, key layouts, generation."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaForCausalLM  # noqa: E402

from client.model import Llama2c, default_model_path  # noqa: E402
from client.model.hf import (  # noqa: E402
    dynamic_cache_to_kv,
    fill_recompute,
    generate_with_cache,
    hf_kv_to_llama2c,
    kv_to_dynamic_cache,
    llama2c_kv_to_hf,
    llama2c_to_hf,
    prefill_kv,
    rope_half_perm,
)

pytestmark = pytest.mark.skipif(not default_model_path().exists(), reason="stories260K.bin not available")

# float32 noise between two attention implementations over 5 layers (measured 5e-5 .. 9e-5 on 256-token
# contexts, seeds 0-5); a wrong RoPE permutation or weight mapping gives differences of order 1-10.
LOGIT_ATOL = 1e-4
KV_ATOL = 5e-5


@pytest.fixture(scope="module")
def l2c() -> Llama2c:
    return Llama2c.from_file()


@pytest.fixture(scope="module")
def hf(l2c: Llama2c) -> LlamaForCausalLM:
    return llama2c_to_hf(l2c, attn_implementation="eager")


@pytest.fixture(scope="module")
def context(l2c: Llama2c) -> list[int]:
    return l2c.sample(256, seed=0)


def greedy_full_recompute_hf(model: LlamaForCausalLM, ids: list[int], n: int) -> list[int]:
    """Greedy decoding that re-runs the whole sequence every step (no cache at all)."""
    seq = list(ids)
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids) :]


def greedy_full_recompute_l2c(model: Llama2c, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model.forward(seq).logits[-1].argmax()))
    return seq[len(ids) :]


def test_config_and_tied_weights(hf: LlamaForCausalLM, l2c: Llama2c) -> None:
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 5, 8, 4)
    assert (c.head_dim, c.vocab_size, c.intermediate_size, c.max_position_embeddings) == (8, 512, 172, 512)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in hf.parameters())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_logits_match_llama2c(l2c: Llama2c, context: list[int], impl: str) -> None:
    model = llama2c_to_hf(l2c, attn_implementation=impl)
    ref = l2c.forward(context)
    kv, logits = prefill_kv(model, context)
    assert logits.shape == (256, 512)
    assert (logits - ref.logits).abs().max().item() < LOGIT_ATOL
    assert kv.shape == (5, 2, 256, 4, 8)


def test_weight_mapping_is_not_vacuous(l2c: Llama2c, context: list[int]) -> None:
    """Without the per-head RoPE permutation the HF model computes something else."""
    model = llama2c_to_hf(l2c, attn_implementation="eager")
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data.copy_(l2c.wq[layer.self_attn.layer_idx])
        layer.self_attn.k_proj.weight.data.copy_(l2c.wk[layer.self_attn.layer_idx])
    _, logits = prefill_kv(model, context[:64])
    assert (logits - l2c.forward(context[:64]).logits).abs().max().item() > 0.1


def test_layout_permutation_roundtrip_and_not_identity() -> None:
    perm = rope_half_perm(8)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    kv = torch.randn(3, 2, 7, 4, 8)
    to_hf = llama2c_kv_to_hf(kv)
    assert torch.equal(hf_kv_to_llama2c(to_hf), kv)
    assert torch.equal(llama2c_kv_to_hf(hf_kv_to_llama2c(kv)), kv)
    assert torch.equal(to_hf[:, 1], kv[:, 1])  # values untouched
    assert torch.equal(to_hf[:, 0], kv[:, 0][..., perm])
    assert not torch.equal(to_hf[:, 0], kv[:, 0])
    # head_dim 8: the map is a 4-cycle pair, not an involution, so the directions must not be confused
    assert not torch.equal(llama2c_kv_to_hf(to_hf), kv)
    # head_dim 4 happens to be an involution
    kv4 = torch.randn(1, 2, 3, 2, 4)
    assert torch.equal(llama2c_kv_to_hf(llama2c_kv_to_hf(kv4)), kv4)
    assert llama2c_kv_to_hf(kv.half()).dtype == torch.float16


def test_layout_maps_llama2c_keys_to_hf_keys(hf: LlamaForCausalLM, l2c: Llama2c, context: list[int]) -> None:
    ref = l2c.forward(context).kv
    kv, _ = prefill_kv(hf, context)
    # layer 0 sees identical inputs in both runtimes: the mapping is bitwise exact there
    assert torch.equal(llama2c_kv_to_hf(ref)[0], kv[0])
    assert torch.equal(hf_kv_to_llama2c(kv)[0], ref[0])
    # deeper layers carry float32 noise from the different attention kernels
    assert (llama2c_kv_to_hf(ref) - kv).abs().max().item() < KV_ATOL
    assert (hf_kv_to_llama2c(kv) - ref).abs().max().item() < KV_ATOL
    assert (ref[:, 0] - kv[:, 0]).abs().max().item() > 1.0  # layouts really differ


def test_dynamic_cache_roundtrip_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        kv = torch.randn(5, 2, 37, 4, 8, generator=gen).to(dtype)
        cache = kv_to_dynamic_cache(kv)
        assert isinstance(cache, DynamicCache)
        assert cache.get_seq_length() == 37
        assert cache.layers[2].keys.shape == (1, 4, 37, 8)
        assert torch.equal(cache.layers[2].keys[0, 3], kv[2, 0, :, 3])
        assert torch.equal(cache.layers[4].values[0, 1], kv[4, 1, :, 1])
        back = dynamic_cache_to_kv(cache)
        assert back.dtype == dtype
        assert torch.equal(back, kv)
        kv[0, 0, 0, 0, 0] += 1  # the cache holds copies
        assert not torch.equal(dynamic_cache_to_kv(cache), kv)


def test_dynamic_cache_checks_shape_against_config(hf: LlamaForCausalLM) -> None:
    cache = kv_to_dynamic_cache(
        torch.zeros(5, 2, 3, 4, 8, dtype=torch.float16), hf.config, dtype=torch.float32
    )
    assert cache.layers[0].keys.dtype == torch.float32
    with pytest.raises(ValueError, match="model expects"):
        kv_to_dynamic_cache(torch.zeros(4, 2, 3, 4, 8), hf.config)
    with pytest.raises(ValueError, match="expected kv"):
        kv_to_dynamic_cache(torch.zeros(5, 3, 4, 8))
    batched = DynamicCache()
    batched.update(torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8), 0)
    with pytest.raises(ValueError, match="batch 1"):
        dynamic_cache_to_kv(batched)


def test_hf_generation_from_llama2c_cache_matches_full_recompute(
    hf: LlamaForCausalLM, l2c: Llama2c, context: list[int]
) -> None:
    prefix, last = context[:127], context[127]
    expected = greedy_full_recompute_hf(hf, context[:128], 12)
    # a cache produced by the *other* runtime, converted to the HF key layout
    kv = llama2c_kv_to_hf(l2c.forward(prefix).kv)
    assert generate_with_cache(hf, kv, last, 12) == expected
    # a cache produced by HF itself, passed as a DynamicCache
    own, _ = prefill_kv(hf, prefix)
    assert generate_with_cache(hf, kv_to_dynamic_cache(own, hf.config), last, 12) == expected
    # same tokens as the reference runtime
    assert expected == greedy_full_recompute_l2c(l2c, context[:128], 12)


def test_llama2c_generation_from_hf_cache_matches_full_recompute(
    hf: LlamaForCausalLM, l2c: Llama2c, context: list[int]
) -> None:
    prefix, last = context[:200], context[200]
    kv, _ = prefill_kv(hf, prefix)
    expected = greedy_full_recompute_l2c(l2c, context[:201], 12)
    assert l2c.greedy(hf_kv_to_llama2c(kv), last, 12) == expected
    # the unconverted layout must not silently work
    assert l2c.greedy(kv, last, 12) != expected


def test_prefill_after_past_matches_single_prefill(hf: LlamaForCausalLM, context: list[int]) -> None:
    full_kv, full_logits = prefill_kv(hf, context[:96])
    head_kv, _ = prefill_kv(hf, context[:64])
    kv, logits = prefill_kv(hf, context[64:96], head_kv)
    assert kv.shape == full_kv.shape
    assert (kv - full_kv).abs().max().item() < 1e-5
    assert (logits - full_logits[64:]).abs().max().item() < 1e-4


def test_fill_recompute_restores_zeroed_slots(hf: LlamaForCausalLM, context: list[int]) -> None:
    ids = context[:192]
    kv, _ = prefill_kv(hf, ids)
    holes = kv.clone()
    ranges = [(64, 128), (0, 32)]
    for s, e in ranges:
        holes[:, :, s:e] = 0
    fixed = fill_recompute(hf, holes, ids, ranges)
    assert (fixed - kv).abs().max().item() < 1e-5
    assert torch.equal(fixed[:, :, 128:], kv[:, :, 128:])  # untouched outside the ranges
    with pytest.raises(ValueError, match="outside"):
        fill_recompute(hf, holes, ids, [(180, 200)])
