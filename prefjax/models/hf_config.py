"""Hugging Face config.json <-> ModelConfig.

`from_hf_config` reads the fields transformers' Llama, Mistral, Qwen2, Qwen3,
Gemma and Gemma 2 configs use (both the transformers 5 layout, with RoPE under
"rope_parameters", and the older top-level "rope_theta"/"rope_scaling"), and
refuses anything that would make prefjax's network differ from the checkpoint's
(an unsupported RoPE type, biases prefjax has no parameter for, bidirectional
attention) with an error naming the file and field. `to_hf_config` writes a
config.json that transformers loads back into the same architecture.

Reward models are transformers' `*ForSequenceClassification` folders: the same
decoder fields plus num_labels, id2label/label2id and pad_token_id, which
`read_reward_fields` reads and `reward_config_fields` writes (with prefjax's
optional "prefjax_reward_normalization": {"mean": [L], "std": [L]}).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

from prefjax.models.config import ModelConfig

# model_type -> (prefjax family, transformers class name, default tie_word_embeddings)
_FAMILIES = {
    "llama": ("llama", "LlamaForCausalLM", False),
    "mistral": ("mistral", "MistralForCausalLM", False),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
    "gemma": ("gemma", "GemmaForCausalLM", True),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", True),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
# prefjax family -> transformers' sequence-classification (reward model) class
_REWARD_ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
}
REWARD_ARCHITECTURE_SUFFIX = "ForSequenceClassification"
NORMALIZATION_FIELD = "prefjax_reward_normalization"
_SUPPORTED_ROPE = ("default", "linear", "llama3")


class HFConfigError(ValueError):
    """A config.json prefjax cannot reproduce exactly; the message names file and field."""


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json as a dict, with a clear error when missing or malformed."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Hugging Face config.json not found")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFConfigError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise HFConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def from_hf_config(config: dict[str, Any], source: str = "config.json", **overrides: Any) -> ModelConfig:
    """The ModelConfig of a Hugging Face config dict; `overrides` set prefjax-only
    fields (param_dtype, dtype, remat, attention_impl, attention_block_size)."""
    reader = _Fields(config, source)
    model_type = reader.get("model_type", str)
    if model_type not in _FAMILIES:
        raise HFConfigError(f"{source}: field model_type={model_type!r} is not supported; "
                            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    family, _, tie_default = _FAMILIES[model_type]
    hidden = reader.get("hidden_size", int)
    heads = reader.get("num_attention_heads", int)
    gemma = family in ("gemma", "gemma2")

    reader.refuse_true("mlp_bias", "prefjax's MLP has no biases")
    reader.refuse_true("use_bidirectional_attention", "prefjax's decoders are causal")
    if family != "qwen2":
        # Llama's attention_bias also biases o_proj, which prefjax has no parameter for.
        reader.refuse_true("attention_bias", "prefjax has q/k/v biases only for Qwen2")

    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=reader.get("vocab_size", int),
        hidden_size=hidden,
        intermediate_size=reader.get("intermediate_size", int),
        num_layers=reader.get("num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=reader.get("num_key_value_heads", int, default=heads),
        head_dim=reader.get("head_dim", int, default=None) or hidden // heads,
        norm_eps=reader.get("rms_norm_eps", float, default=1e-6),
        max_position_embeddings=reader.get("max_position_embeddings", int, default=8192),
        tie_embeddings=reader.get("tie_word_embeddings", bool, default=tie_default),
        activation=_activation(reader, gemma),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        norm_offset=gemma,
        scale_embeddings=gemma,
    )
    fields.update(_rope(reader))
    fields.update(_sliding(reader, family, fields["num_layers"]))
    if family == "gemma2":
        fields.update(
            post_norms=True,
            attn_logit_softcap=reader.get("attn_logit_softcapping", float, default=None),
            final_logit_softcap=reader.get("final_logit_softcapping", float, default=None),
            query_pre_attn_scalar=reader.get("query_pre_attn_scalar", float, default=None),
        )
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise HFConfigError(f"{source}: {err}") from None


class _Fields:
    """Typed access to config fields with errors that name the file and field."""

    def __init__(self, config: dict[str, Any], source: str):
        self.config, self.source = config, source

    def get(self, name: str, kind: type, default: Any = ...) -> Any:
        value = self.config.get(name, default)
        if value is ...:
            raise HFConfigError(f"{self.source}: required field {name!r} is missing")
        if value is None or value is default:
            return value
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise HFConfigError(f"{self.source}: field {name}={value!r} should be a {kind.__name__}")
        return value

    def refuse_true(self, name: str, why: str) -> None:
        if self.config.get(name):
            raise HFConfigError(f"{self.source}: field {name}={self.config[name]!r} is not supported ({why})")


def _activation(reader: _Fields, gemma: bool) -> str:
    # Gemma 2 names it hidden_activation; Gemma 1 checkpoints say "gelu" but were
    # trained with the tanh approximation, which transformers also uses for them.
    name = reader.config.get("hidden_activation") or reader.config.get("hidden_act") or "silu"
    field = "hidden_activation" if reader.config.get("hidden_activation") else "hidden_act"
    if name == "silu" and not gemma:
        return "silu"
    if gemma and name in ("gelu_pytorch_tanh", "gelu_new", "gelu"):
        return "gelu_tanh"
    raise HFConfigError(f"{reader.source}: field {field}={name!r} is not supported for this family "
                        f"({'gelu_pytorch_tanh' if gemma else 'silu'} is)")


def _rope(reader: _Fields) -> dict[str, Any]:
    params = reader.config.get("rope_parameters")
    field = "rope_parameters"
    if params is None:  # transformers 4 layout
        params = dict(reader.config.get("rope_scaling") or {})
        field = "rope_scaling"
        if "rope_theta" in reader.config:
            params.setdefault("rope_theta", reader.config["rope_theta"])
    if not isinstance(params, dict):
        raise HFConfigError(f"{reader.source}: field {field}={params!r} should be an object")
    params = dict(params)
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in _SUPPORTED_ROPE:
        raise HFConfigError(f"{reader.source}: field {field}.rope_type={kind!r} is not supported; "
                            f"supported: {', '.join(_SUPPORTED_ROPE)}")
    theta = float(params.pop("rope_theta", 10_000.0))
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling=None)
    needed = ("factor",) if kind == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in needed if k not in params]
    if missing:
        raise HFConfigError(f"{reader.source}: field {field} ({kind}) lacks {', '.join(missing)}")
    scaling = {"rope_type": kind, **{k: params[k] for k in needed}}
    return dict(rope_theta=theta, rope_scaling=scaling)


def _sliding(reader: _Fields, family: str, num_layers: int) -> dict[str, Any]:
    config = reader.config
    window = config.get("sliding_window")
    if family in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
        window = None
    if window is None:
        return dict(sliding_window=None, sliding_layers="none")
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise HFConfigError(f"{reader.source}: field layer_types has {len(layer_types)} entries "
                                f"for num_hidden_layers={num_layers}")
        unknown = set(layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise HFConfigError(f"{reader.source}: field layer_types has unsupported {sorted(unknown)}")
        sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    elif family == "gemma2":
        sliding = tuple(range(0, num_layers, 2))
    elif family in ("qwen2", "qwen3"):
        # Qwen's layers from max_window_layers on use the window.
        sliding = tuple(range(config.get("max_window_layers", num_layers), num_layers))
    else:
        sliding = tuple(range(num_layers))
    return dict(sliding_window=int(window), sliding_layers=_layers_pattern(sliding, num_layers))


def _layers_pattern(sliding: tuple[int, ...], num_layers: int) -> Any:
    if not sliding:
        return "none"
    if sliding == tuple(range(num_layers)):
        return "all"
    if sliding == tuple(range(0, num_layers, 2)):
        return "even"
    return sliding


def to_hf_config(cfg: ModelConfig, *, torch_dtype: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    """A config.json dict that transformers builds the same network from.

    `extra` adds fields such as bos_token_id / eos_token_id / pad_token_id.
    """
    model_type = next(t for t, (family, _, _) in _FAMILIES.items() if family == cfg.family)
    _, architecture, _ = _FAMILIES[model_type]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", "default") != "default":
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "dtype": torch_dtype or cfg.param_dtype,
    }
    config["hidden_activation" if cfg.family == "gemma2" else "hidden_act"] = (
        "gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else "silu")
    if cfg.family in ("llama", "gemma", "gemma2", "qwen3"):
        config["attention_bias"] = False
    window_layers = [cfg.layer_window(i) is not None for i in range(cfg.num_layers)]
    if cfg.family in ("mistral", "gemma2", "qwen2", "qwen3") or any(window_layers):
        if cfg.family in ("llama", "gemma") and any(window_layers):
            raise ValueError(f"transformers' {cfg.family} models have no sliding window; "
                             f"sliding_window={cfg.sliding_window} cannot be exported")
        config["sliding_window"] = cfg.sliding_window if any(window_layers) else None
        if cfg.family in ("qwen2", "qwen3"):
            config["use_sliding_window"] = any(window_layers)
            config["max_window_layers"] = cfg.num_layers
        if cfg.family == "mistral" and any(window_layers) and not all(window_layers):
            raise ValueError("transformers' Mistral applies its window to every layer; "
                             f"sliding_layers={cfg.sliding_layers!r} cannot be exported")
        if cfg.family in ("gemma2", "qwen2", "qwen3"):
            config["layer_types"] = ["sliding_attention" if w else "full_attention" for w in window_layers]
    if cfg.family == "gemma2":
        config["attn_logit_softcapping"] = cfg.attn_logit_softcap
        config["final_logit_softcapping"] = cfg.final_logit_softcap
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        # transformers validates this field as an int.
        config["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
    config.update(extra)
    return config


# ---------------------------------------------------------------------------
# Reward models (*ForSequenceClassification)
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RewardFields:
    """The config.json fields of a reward model beyond its decoder's."""

    labels: tuple[str, ...]           # id2label in id order; len = num_labels
    pad_token_id: Optional[int]       # None when config.json has none
    normalization: Optional[dict[str, list[float]]]  # {"mean": [L], "std": [L]} or None


def architectures(config: dict[str, Any]) -> list[str]:
    """config.json's "architectures" (empty when absent or malformed)."""
    value = config.get("architectures")
    return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []


def is_reward_config(config: dict[str, Any]) -> bool:
    """True when config.json names a *ForSequenceClassification architecture."""
    return any(a.endswith(REWARD_ARCHITECTURE_SUFFIX) for a in architectures(config))


def reward_architecture(family: str) -> str:
    """transformers' sequence-classification class of a prefjax family."""
    return _REWARD_ARCHITECTURES[family]


def eos_token_ids(config: dict[str, Any]) -> set[int]:
    """eos_token_id of a config dict as a set (transformers allows an int or a list)."""
    value = config.get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool)}


def read_reward_fields(config: dict[str, Any], source: str = "config.json") -> RewardFields:
    """num_labels, id2label, pad_token_id and prefjax's normalisation of a reward config.json."""
    reader = _Fields(config, source)
    id2label = config.get("id2label")
    num_labels = reader.get("num_labels", int, default=None)
    if id2label is None:
        if num_labels is None:
            raise HFConfigError(f"{source}: a reward model needs field 'num_labels' or 'id2label'; neither is set")
        labels = tuple(f"LABEL_{i}" for i in range(num_labels))
    else:
        labels = _labels_from_id2label(id2label, source)
        if num_labels is not None and num_labels != len(labels):
            raise HFConfigError(f"{source}: field num_labels={num_labels} but id2label has {len(labels)} entries")
    if not labels:
        raise HFConfigError(f"{source}: a reward model needs num_labels >= 1")
    pad = reader.get("pad_token_id", int, default=None)
    normalization = config.get(NORMALIZATION_FIELD)
    if normalization is not None:
        normalization = check_normalization(normalization, len(labels), f"{source}: field {NORMALIZATION_FIELD}")
    return RewardFields(labels, pad, normalization)


def _labels_from_id2label(id2label: Any, source: str) -> tuple[str, ...]:
    if not isinstance(id2label, dict):
        raise HFConfigError(f"{source}: field id2label should be an object {{\"0\": name, ...}}")
    try:
        by_id = {int(k): v for k, v in id2label.items()}
    except ValueError:
        raise HFConfigError(f"{source}: field id2label has keys {sorted(id2label)}; they should be "
                            "0, 1, ..., num_labels - 1") from None
    if sorted(by_id) != list(range(len(by_id))) or not all(isinstance(v, str) for v in by_id.values()):
        raise HFConfigError(f"{source}: field id2label should map \"0\" .. \"{len(by_id) - 1}\" to names; "
                            f"got {id2label}")
    return tuple(by_id[i] for i in range(len(by_id)))


def check_normalization(normalization: Any, num_labels: int, where: str) -> dict[str, list[float]]:
    """{"mean": [L], "std": [L]} as float lists; std > 0 and every value finite."""
    if not isinstance(normalization, dict) or set(normalization) != {"mean", "std"}:
        raise HFConfigError(f"{where} should be {{\"mean\": [{num_labels} numbers], "
                            f"\"std\": [{num_labels} numbers]}}; got {normalization!r}")
    result = {}
    for key in ("mean", "std"):
        values = normalization[key]
        values = list(values) if isinstance(values, (list, tuple)) else None
        if values is None or len(values) != num_labels or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise HFConfigError(f"{where}: {key!r} should be {num_labels} finite number(s) (one per label); "
                                f"got {normalization[key]!r}")
        result[key] = [float(v) for v in values]
    if any(s <= 0 for s in result["std"]):
        raise HFConfigError(f"{where}: 'std' should be positive; got {result['std']}")
    return result


def reward_config_fields(family: str, labels: tuple[str, ...], pad_token_id: int,
                         normalization: Optional[dict[str, list[float]]]) -> dict[str, Any]:
    """The config.json fields that make a decoder config a reward model's."""
    fields: dict[str, Any] = {
        "architectures": [reward_architecture(family)],
        "num_labels": len(labels),
        "id2label": {str(i): name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
        "pad_token_id": pad_token_id,
        # transformers' training loss for float targets; BT scores and ratings are both regressions.
        "problem_type": "regression",
    }
    if normalization is not None:
        fields[NORMALIZATION_FIELD] = normalization
    return fields
