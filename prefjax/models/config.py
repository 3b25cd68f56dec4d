"""ModelConfig: every architectural switch of the decoder family, and named presets.

One decoder implementation covers Llama 2/3/3.1-3.3, Mistral, Qwen2/2.5, Qwen3,
Gemma and Gemma 2; the families differ only in the switches below (norm
offset, activation, biases, QK-norm, soft-caps, sliding windows, embedding
scaling, tied embeddings, RoPE scaling). Presets are looked up by name
(`get_preset("llama3-tiny")`); `from_hf_config` (prefjax.models.hf_config)
builds a config from a Hugging Face config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
ATTENTION_IMPLS = (None, "fused", "blocked", "flash", "xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Attributes:
      family: one of FAMILIES (used for checkpoint name mapping and reports).
      vocab_size, hidden_size, intermediate_size, num_layers: the usual sizes.
      num_heads, num_kv_heads, head_dim: attention shape (GQA when kv < heads).
      rope_theta: RoPE base frequency.
      rope_scaling: None, or a dict with "rope_type" in {"linear", "llama3"} and
        its parameters ("factor"; llama3 also "low_freq_factor",
        "high_freq_factor", "original_max_position_embeddings").
      norm_eps: RMSNorm epsilon.
      norm_offset: Gemma's RMSNorm multiplies by (1 + w) instead of w.
      activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
      qkv_bias: biases on the q/k/v projections (Qwen2).
      qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Qwen3).
      tie_embeddings: the unembedding is the transposed input embedding.
      scale_embeddings: multiply embeddings by sqrt(hidden_size) (Gemma).
      post_norms: Gemma 2's extra norms after attention and after the MLP.
      attn_logit_softcap, final_logit_softcap: c * tanh(x / c) caps (Gemma 2).
      query_pre_attn_scalar: attention scale is this**-0.5 (Gemma 2) instead
        of head_dim**-0.5.
      sliding_window: window size for layers that use one, or None.
      sliding_layers: which layers use the window: "all", "none", "even"
        (Gemma 2: layers 0, 2, 4, ...), or an explicit tuple of layer indices.
      max_position_embeddings: informational (longest trained context).
      param_dtype, dtype: parameter storage and compute dtypes ("float32",
        "bfloat16").
      remat: rematerialisation policy per layer, one of REMAT_POLICIES.
      attention_impl: None (on CPU "fused" for float32 when the C++ kernel
        builds, else "blocked" up to 512 tokens and "flash" beyond; jax's
        choice elsewhere), "fused" (prefjax's C++ flash-attention kernel for
        XLA:CPU, prefjax.models.cpu.fused_attention), "blocked" (prefjax's einsum attention
        in causal query blocks that skip the masked upper triangle), "flash"
        (tiled online-softmax attention with a recomputing backward), "xla" or "cudnn" (passed to
        jax.nn.dot_product_attention; soft-capped attention uses prefjax's own
        einsum path because those kernels have no soft-cap), or "splash"
        (TPU Pallas splash kernel for forwards without a KV cache; rows must be
        right-padded or packed with positions counting up per segment).
      attention_block_size: queries (and keys) per block of the "blocked" and
        "flash" implementations; None = their measured defaults (64, 128).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    rope_scaling: Optional[dict[str, Any]] = None
    norm_eps: float = 1e-6
    norm_offset: bool = False
    activation: str = "silu"
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    scale_embeddings: bool = False
    post_norms: bool = False
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    query_pre_attn_scalar: Optional[float] = None
    sliding_window: Optional[int] = None
    sliding_layers: Any = "none"
    max_position_embeddings: int = 8192
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention_impl: Optional[str] = None
    attention_block_size: Optional[int] = None

    def __post_init__(self) -> None:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.activation not in ("silu", "gelu_tanh"):
            problems.append(f"activation {self.activation!r} is not 'silu' or 'gelu_tanh'")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.attention_block_size is not None and self.attention_block_size < 1:
            problems.append(f"attention_block_size {self.attention_block_size} must be positive")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ("linear", "llama3", "default"):
            problems.append(f"rope_scaling type {self.rope_scaling.get('rope_type')!r} is not supported "
                            "(supported: default, linear, llama3)")
        if self.sliding_layers not in ("all", "none", "even") and not isinstance(self.sliding_layers, tuple):
            problems.append(f"sliding_layers {self.sliding_layers!r} must be 'all', 'none', 'even' or a tuple")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def __hash__(self) -> int:
        # rope_scaling is a dict, so the generated hash would fail; hashing by value
        # (the repr covers every field) lets configs, and graphdefs holding them, be
        # static jit arguments.
        return hash(repr(self))

    def layer_window(self, layer: int) -> Optional[int]:
        """The sliding window of layer `layer`, or None for full attention."""
        if self.sliding_window is None or self.sliding_layers == "none":
            return None
        if self.sliding_layers == "all":
            return self.sliding_window
        if self.sliding_layers == "even":
            return self.sliding_window if layer % 2 == 0 else None
        return self.sliding_window if layer in self.sliding_layers else None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * h
        norms = d * (4 if self.post_norms else 2)
        per_layer = attn + 3 * d * f + norms
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed + d


def _tiny(family: str, **overrides: Any) -> ModelConfig:
    base = dict(
        family=family, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
    )
    base.update(overrides)
    return ModelConfig(**base)


_GEMMA = dict(norm_offset=True, activation="gelu_tanh", tie_embeddings=True, scale_embeddings=True)
_GEMMA2 = dict(_GEMMA, post_norms=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
               sliding_layers="even")
_LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    # Tiny presets: every family's switches at test size.
    "llama2-tiny": _tiny("llama", norm_eps=1e-5),
    "llama3-tiny": _tiny("llama", norm_eps=1e-5, rope_theta=500_000.0,
                         rope_scaling=dict(_LLAMA3_SCALING, original_max_position_embeddings=64)),
    "mistral-tiny": _tiny("mistral", norm_eps=1e-5, sliding_window=16, sliding_layers="all"),
    "qwen2-tiny": _tiny("qwen2", qkv_bias=True, rope_theta=1_000_000.0),
    "qwen2-tiny-tied": _tiny("qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1_000_000.0),
    "qwen3-tiny": _tiny("qwen3", qk_norm=True, rope_theta=1_000_000.0),
    "gemma-tiny": _tiny("gemma", **_GEMMA),
    "gemma2-tiny": _tiny("gemma2", sliding_window=16, query_pre_attn_scalar=16.0, **_GEMMA2),
    # Real sizes, for shape/FLOP arithmetic and abstract initialisation.
    "llama3-8b": ModelConfig(
        family="llama", vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500_000.0, norm_eps=1e-5,
        rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131_072),
    "qwen2.5-0.5b": ModelConfig(
        family="qwen2", vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1_000_000.0, qkv_bias=True,
        tie_embeddings=True, max_position_embeddings=32_768),
    "gemma2-2b": ModelConfig(
        family="gemma2", vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_layers=26,
        num_heads=8, num_kv_heads=4, head_dim=256, sliding_window=4096, query_pre_attn_scalar=256.0,
        max_position_embeddings=8192, **_GEMMA2),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name`, with optional field overrides; unknown names list the presets."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; presets are: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
