"""Where each prefjax parameter lives in a Hugging Face state dict, and how its axes map.

Hugging Face stores Linear weights as [out, in] with heads flattened into the
output dimension; prefjax stores einsum kernels ([in, out...], heads as their
own axes). Each `TensorMapping` knows the Hugging Face name and shape of one
parameter and converts lazily in both directions: `to_prefjax` only reshapes
and transposes (numpy views), so indexing the result with a shard's slice
reads just that slice from a memory-mapped checkpoint. No permutation of the
rotary dimensions is needed: transformers' Llama-family models use the same
half-split RoPE convention as prefjax.

A reward model (transformers' `*ForSequenceClassification`) has every decoder
tensor except `lm_head.weight`, plus `score.weight` [L, D] (no bias): the
transpose of prefjax's reward head [D, L]. `reward_model_config` is the config
its decoder is built from, `reward_head_mapping` the head's mapping.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from prefjax.models.config import ModelConfig

ParamPath = tuple  # e.g. ("layers", 3, "attn", "q")
SCORE_WEIGHT = "score.weight"


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    path: ParamPath
    hf_name: str
    hf_shape: tuple[int, ...]
    to_prefjax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def tensor_mappings(cfg: ModelConfig) -> list[TensorMapping]:
    """Every parameter of `cfg`'s model with its Hugging Face counterpart."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    maps = [TensorMapping(("embedding",), "model.embed_tokens.weight", (v, d), _same, _same),
            TensorMapping(("final_norm", "scale"), "model.norm.weight", (d,), _same, _same)]
    if not cfg.tie_embeddings:
        maps.append(TensorMapping(("lm_head",), "lm_head.weight", (v, d), _transpose, _transpose))

    def heads_in(heads: int) -> tuple[Callable, Callable]:
        # HF [heads*h, d] <-> prefjax [d, heads, h]
        return (lambda w: w.reshape(heads, h, d).transpose(2, 0, 1),
                lambda k: k.transpose(1, 2, 0).reshape(heads * h, d))

    def heads_out() -> tuple[Callable, Callable]:
        # HF o_proj [d, n*h] <-> prefjax [n, h, d]
        return (lambda w: w.reshape(d, n, h).transpose(1, 2, 0),
                lambda k: k.transpose(2, 0, 1).reshape(d, n * h))

    def bias(heads: int) -> tuple[Callable, Callable]:
        return (lambda b: b.reshape(heads, h), lambda b: b.reshape(heads * h))

    # Gemma 2 calls the pre-MLP norm pre_feedforward_layernorm and uses
    # post_attention_layernorm for its extra post-attention norm.
    mlp_norm = "pre_feedforward_layernorm" if cfg.post_norms else "post_attention_layernorm"
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}."
        layer = ("layers", i)
        entries = [
            (("attn_norm", "scale"), "input_layernorm.weight", (d,), (_same, _same)),
            (("mlp_norm", "scale"), f"{mlp_norm}.weight", (d,), (_same, _same)),
            (("attn", "q"), "self_attn.q_proj.weight", (n * h, d), heads_in(n)),
            (("attn", "k"), "self_attn.k_proj.weight", (kv * h, d), heads_in(kv)),
            (("attn", "v"), "self_attn.v_proj.weight", (kv * h, d), heads_in(kv)),
            (("attn", "o"), "self_attn.o_proj.weight", (d, n * h), heads_out()),
            (("mlp", "gate"), "mlp.gate_proj.weight", (f, d), (_transpose, _transpose)),
            (("mlp", "up"), "mlp.up_proj.weight", (f, d), (_transpose, _transpose)),
            (("mlp", "down"), "mlp.down_proj.weight", (d, f), (_transpose, _transpose)),
        ]
        if cfg.qkv_bias:
            entries += [
                (("attn", "q_bias"), "self_attn.q_proj.bias", (n * h,), bias(n)),
                (("attn", "k_bias"), "self_attn.k_proj.bias", (kv * h,), bias(kv)),
                (("attn", "v_bias"), "self_attn.v_proj.bias", (kv * h,), bias(kv)),
            ]
        if cfg.qk_norm:
            entries += [
                (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", (h,), (_same, _same)),
                (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", (h,), (_same, _same)),
            ]
        if cfg.post_norms:
            entries += [
                (("post_attn_norm", "scale"), "post_attention_layernorm.weight", (d,), (_same, _same)),
                (("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight", (d,), (_same, _same)),
            ]
        for path, name, shape, (to_prefjax, to_hf) in entries:
            maps.append(TensorMapping(layer + path, hf + name, shape, to_prefjax, to_hf))
    return maps


def is_ignorable(hf_name: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors that carry no weights prefjax needs.

    Rotary inverse-frequency buffers (older Llama exports) are recomputed from
    the config, and a tied model's lm_head.weight duplicates the embedding.
    """
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True
    return cfg.tie_embeddings and hf_name == "lm_head.weight"


def reward_model_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with no LM head: the decoder of a reward model has no lm_head parameter.

    prefjax's Transformer creates lm_head exactly when embeddings are untied, so a
    tied config is the smallest change that drops it; the unembedding a tied model
    would use is never read by a reward model (its head is `score.weight`).
    """
    return cfg if cfg.tie_embeddings else cfg.replace(tie_embeddings=True)


def reward_head_mapping(cfg: ModelConfig, num_labels: int) -> TensorMapping:
    """Hugging Face `score.weight` [L, D] <-> prefjax's reward head [D, L]."""
    return TensorMapping(("reward_head",), SCORE_WEIGHT, (num_labels, cfg.hidden_size), _transpose, _transpose)
