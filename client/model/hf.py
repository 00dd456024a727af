"""Hugging Face ``transformers`` integration: run kvstream caches in ``LlamaForCausalLM``.

kvstream's canonical cache layout is ``[layers, 2, tokens, kv_heads, head_dim]`` (index 0 = keys after
RoPE, 1 = values). A ``transformers`` ``DynamicCache`` holds, per layer, keys and values of shape
``[batch, kv_heads, tokens, head_dim]``; the converters here move between the two (batch 1).

Key layouts. llama2.c (and Meta's original Llama code) rotates *interleaved* pairs ``(x[2i], x[2i+1])``;
HF Llama rotates *halves* ``(x[i], x[i + head_dim/2])``. A llama2.c checkpoint becomes an HF model by
permuting the rows of ``wq``/``wk`` inside every head (``llama2c_to_hf``), and then the HF model's
post-RoPE keys are the llama2.c keys with the same per-head permutation of the head dimension. Values
are not rotated, so they are identical. ``llama2c_kv_to_hf`` / ``hf_kv_to_llama2c`` convert a cache
from one runtime's key layout to the other's; see ``docs/inference-integration.md`` for which layout a
stored context should use.

Needs the optional ``transformers`` dependency (the ``hf`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import DynamicCache, LlamaForCausalLM
from transformers import LlamaConfig as HFLlamaConfig
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from client.model.llama2c import Llama2c, rope_angles


def rope_half_perm(head_dim: int) -> torch.Tensor:
    """Head-dim index map from interleaved-pair RoPE to rotate-half RoPE, ``[head_dim]`` int64.

    ``hf[..., j] == interleaved[..., perm[j]]``: ``perm = [0, 2, 4, ..., 1, 3, 5, ...]``. For
    ``head_dim > 4`` it is *not* its own inverse; ``torch.argsort(perm)`` maps back.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_keys(kv: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"expected kv [layers, 2, tokens, kv_heads, head_dim], got {tuple(kv.shape)}")
    out = kv.clone()
    out[:, 0] = kv[:, 0].index_select(-1, index.to(kv.device))
    return out


def llama2c_kv_to_hf(kv: torch.Tensor) -> torch.Tensor:
    """llama2.c (interleaved-RoPE) key layout -> HF (rotate-half) key layout; values are copied as is.

    ``kv``: ``[layers, 2, tokens, kv_heads, head_dim]``, any dtype/device; returns a new tensor of the
    same shape, dtype and device.
    """
    return _permute_keys(kv, rope_half_perm(kv.shape[-1]))


def hf_kv_to_llama2c(kv: torch.Tensor) -> torch.Tensor:
    """HF (rotate-half) key layout -> llama2.c (interleaved-RoPE) key layout; inverse of ``llama2c_kv_to_hf``.

    ``kv``: ``[layers, 2, tokens, kv_heads, head_dim]``; returns a new tensor of the same shape and dtype.
    """
    return _permute_keys(kv, torch.argsort(rope_half_perm(kv.shape[-1])))


def _rows_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows ``[n_heads * head_dim, dim]`` of a q/k projection head by head so that its
    output comes out in rotate-half order (the standard llama2.c/Meta -> HF export permutation)."""
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, head_dim, -1)[:, rope_half_perm(head_dim)].reshape(w.shape)


class Float64RotaryEmbedding(LlamaRotaryEmbedding):
    """HF Llama rotary embedding whose angles ``position * inv_freq`` are computed in float64.

    Stock HF forms the angles in float32, which loses up to ~``position * 2**-24`` rad (7.6e-6 rad at
    position 255: up to 2e-4 logit differences on ``stories260K``). The reference ``Llama2c`` forms them in
    float64 (``rope_angles``); with this module the two runtimes produce bitwise-equal layer-0 keys.
    Only the ``"default"`` RoPE type is supported.
    """

    def __init__(self, config: HFLlamaConfig) -> None:
        params = config.rope_parameters
        theta = params.get("rope_theta") if isinstance(params, dict) else None
        if theta is None or params is None or params.get("rope_type", "default") != "default":
            raise ValueError(f"only default RoPE with a rope_theta is supported, got {params!r}")
        super().__init__(config)
        self.theta = float(theta)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` ``[batch, T]`` -> ``(cos, sin)``, each ``[batch, T, head_dim]``, ``x``'s dtype."""
        head_dim = 2 * self.inv_freq.numel()
        cos, sin = rope_angles(position_ids.reshape(-1).cpu(), head_dim, self.theta)
        shape = (*position_ids.shape, head_dim)
        # rotate-half layout: the same frequency serves dims i and i + head_dim/2
        cos = torch.cat([cos, cos], dim=-1).view(shape).to(device=x.device, dtype=x.dtype)
        sin = torch.cat([sin, sin], dim=-1).view(shape).to(device=x.device, dtype=x.dtype)
        return cos, sin


def llama2c_to_hf(
    model: Llama2c | str | os.PathLike[str] | None = None, attn_implementation: str = "sdpa"
) -> LlamaForCausalLM:
    """Build a float32 ``LlamaForCausalLM`` (eval mode, CPU) computing the same function as a ``Llama2c``.

    ``model`` is a loaded ``Llama2c`` or a path to a llama2.c ``.bin`` (default: the shared
    ``stories260K.bin``). No download: the config is built from the checkpoint header and the weights are
    copied by hand, with ``wq``/``wk`` rows permuted per head for HF's rotate-half RoPE. The classifier is
    tied to the embedding when the checkpoint shares them. RoPE angles are computed in float64
    (``Float64RotaryEmbedding``) like ``Llama2c``'s; the cos/sin tables themselves stay float32.
    """
    src = model if isinstance(model, Llama2c) else Llama2c.from_file(model)
    c = src.config
    w = dict(src.named_buffers(remove_duplicate=False))  # keep w_cls when it aliases tok_emb
    tied = bool(torch.equal(w["w_cls"], w["tok_emb"]))
    config = HFLlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = LlamaForCausalLM(config).float()
    hf.set_attn_implementation(attn_implementation)
    hf.model.rotary_emb = Float64RotaryEmbedding(config)
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": w["tok_emb"],
        "model.norm.weight": w["rms_final"],
        "lm_head.weight": w["w_cls"],
    }
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": w["rms_att"][i],
            p + "post_attention_layernorm.weight": w["rms_ffn"][i],
            p + "self_attn.q_proj.weight": _rows_to_rotate_half(w["wq"][i], c.n_heads),
            p + "self_attn.k_proj.weight": _rows_to_rotate_half(w["wk"][i], c.n_kv_heads),
            p + "self_attn.v_proj.weight": w["wv"][i],
            p + "self_attn.o_proj.weight": w["wo"][i],
            p + "mlp.gate_proj.weight": w["w1"][i],
            p + "mlp.up_proj.weight": w["w3"][i],
            p + "mlp.down_proj.weight": w["w2"][i],
        }
    # strict: every parameter of the HF model must come from the checkpoint (no random leftovers)
    hf.load_state_dict({k: v.detach().clone().float() for k, v in state.items()}, strict=True)
    if tied:
        hf.tie_weights()
    return hf.eval()


def kv_to_dynamic_cache(
    kv: torch.Tensor,
    config: PreTrainedConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> DynamicCache:
    """Canonical ``kv`` ``[layers, 2, tokens, kv_heads, head_dim]`` -> a batch-1 ``DynamicCache``.

    Each layer gets keys/values ``[1, kv_heads, tokens, head_dim]`` (copies, cast to ``dtype`` and moved
    to ``device`` when given). The keys must already be in the consuming model's layout (for an HF model
    converted from llama2.c, apply ``llama2c_kv_to_hf`` first). With ``config`` the shape is checked
    against the model and the cache layers follow its layer types.
    """
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"expected kv [layers, 2, tokens, kv_heads, head_dim], got {tuple(kv.shape)}")
    if config is not None:
        text = config.get_text_config(decoder=True)
        want = (
            text.num_hidden_layers,
            text.num_key_value_heads,
            getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        )
        got = (kv.shape[0], kv.shape[3], kv.shape[4])
        if got != want:
            raise ValueError(f"kv (layers, kv_heads, head_dim) = {got}, model expects {want}")
    kv = kv.to(device=device, dtype=dtype)
    cache = DynamicCache(config=config)
    for layer in range(kv.shape[0]):
        keys = kv[layer, 0].transpose(0, 1).unsqueeze(0)  # [T, H, D] -> [1, H, T, D]
        values = kv[layer, 1].transpose(0, 1).unsqueeze(0)
        cache.update(keys, values, layer)
    return cache


def dynamic_cache_to_kv(cache: DynamicCache) -> torch.Tensor:
    """A batch-1 ``DynamicCache`` -> canonical ``[layers, 2, tokens, kv_heads, head_dim]`` (cache's dtype).

    Keys stay in the model's layout (HF rotate-half for ``llama2c_to_hf`` models; see
    ``hf_kv_to_llama2c``).
    """
    per_layer = []
    for i, layer in enumerate(cache.layers):
        # linear-attention / KV-sharing layers have no keys: getattr keeps those a clear ValueError
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.dim() != 4:
            raise ValueError(f"cache layer {i} holds no keys/values")
        if keys.shape[0] != 1:
            raise ValueError(f"only batch 1 caches convert, layer {i} has batch {keys.shape[0]}")
        per_layer.append(torch.stack([keys[0].transpose(0, 1), values[0].transpose(0, 1)]))
    if not per_layer:
        raise ValueError("empty cache")
    return torch.stack(per_layer)


@torch.no_grad()
def prefill_kv(
    model: LlamaForCausalLM, token_ids: Sequence[int] | torch.Tensor, past_kv: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``token_ids`` ``[T]`` through ``model`` after an optional cache ``past_kv`` ``[L, 2, P, H, D]``.

    Returns ``(kv, logits)``: the extended cache ``[L, 2, P + T, kv_heads, head_dim]`` in the model's dtype
    and key layout, and ``logits`` ``[T, vocab]`` float32 on the model's device.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=model.device).reshape(1, -1)
    cache = (
        kv_to_dynamic_cache(past_kv, model.config, dtype=model.dtype, device=model.device)
        if (past_kv is not None)
        else DynamicCache(config=model.config)
    )
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    return dynamic_cache_to_kv(out.past_key_values), out.logits[0].float()


@torch.no_grad()
def generate_with_cache(
    model: LlamaForCausalLM,
    past_kv: torch.Tensor | DynamicCache | None,
    last_token_id: int,
    max_new_tokens: int,
) -> list[int]:
    """Greedy continuation of ``max_new_tokens`` ids from a cache of the prefix and the token after it.

    ``past_kv`` is a canonical ``[layers, 2, P, kv_heads, head_dim]`` cache in the model's key layout (any
    dtype: it is cast to the model's), a ``DynamicCache`` (extended in place) or ``None`` (``P = 0``).
    ``last_token_id`` sits at position ``P``; the returned ids are those at positions
    ``P+1 ... P+max_new_tokens``.
    """
    if isinstance(past_kv, DynamicCache):
        cache = past_kv
    elif past_kv is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = kv_to_dynamic_cache(past_kv, model.config, dtype=model.dtype, device=model.device)
    out: list[int] = []
    tok = last_token_id
    for _ in range(max_new_tokens):
        ids = torch.tensor([[tok]], dtype=torch.long, device=model.device)
        res = model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache = res.past_key_values
        tok = int(res.logits[0, -1].argmax())
        out.append(tok)
    return out


@torch.no_grad()
def fill_recompute(
    model: LlamaForCausalLM,
    kv: torch.Tensor,
    token_ids: Sequence[int] | torch.Tensor,
    ranges: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Prefill the token ranges ``[start, end)`` a fetch marked ``recompute`` (their KV slots are zero).

    ``kv`` ``[L, 2, P, kv_heads, head_dim]`` is the fetched prefix in the model's key layout and
    ``token_ids`` its ``P`` (or more) tokens. Each range is prefilled after the cache before it; slots after
    a range stay as fetched (causality: they never depended on the missing slots' values, only on the
    tokens). Ranges are filled in ascending order (a later range may
    attend to an earlier one's slots). Returns a new tensor in ``kv``'s dtype.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    out = kv.clone()
    for start, end in sorted(ranges):
        if not 0 <= start < end <= out.shape[2]:
            raise ValueError(f"recompute range [{start}, {end}) outside the {out.shape[2]}-token prefix")
        past = out[:, :, :start] if start else None
        filled, _ = prefill_kv(model, ids[start:end], past)
        out[:, :, start:end] = filled[:, :, start:end].to(out.dtype)
    return out
