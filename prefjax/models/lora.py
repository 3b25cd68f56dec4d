"""LoRA adapters on prefjax's pure-dict parameters, without touching the model code.

A targeted kernel W with input axes I and output axes O gets two factors,
A [*I, r] and B [r, *O], and the model runs on the effective kernel

    W_eff = W + scale * tensordot(A, B)         scale = alpha / r  (alpha / sqrt(r) with rslora)

Keeping each factor's non-rank axes in the kernel's own layout means they
inherit the kernel's logical axes (A of q is ["embed", rank], B of q is
[rank, "heads", "head_dim"]), so adapters shard like the weights they adapt;
the rank axis is replicated.

    lcfg = LoraConfig(rank=8, alpha=16.0)
    adapters = init_lora(params, lcfg, jax.random.key(0))            # B = 0: no change yet
    policy = apply_lora(params, adapters, lcfg)                      # inside the jitted step
    reference = apply_lora(params, adapters, lcfg, enabled=False)    # the base weights, no copy
    grads = jax.grad(lambda ad: loss(apply_lora(params, ad, lcfg)))(adapters)   # base stays frozen

Which kernels are targetable, and how their axes split into input/output, is
an explicit table (`_KERNELS`), not a guess from shapes. Dropout on the LoRA
branch is not offered: it needs the unmerged x @ A @ B form, while this module
works on merged weights so that the model code stays unaware of LoRA.
`export_peft` writes a Hugging Face PEFT adapter folder (a causal LM, or with
task_type="SEQ_CLS" a LoRA reward model whose head is saved as the `score` module).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prefjax import sharding
from prefjax.models import safetensors_format, tree_paths
from prefjax.models.config import ModelConfig
from prefjax.models.dtypes import dtype_of

Array = jax.Array
Params = dict[Any, Any]

ATTENTION_TARGETS = (r"layers/\d+/attn/(q|k|v|o)$",)
MLP_TARGETS = (r"layers/\d+/mlp/(gate|up|down)$",)
ALL_LINEAR_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
INITS = ("kaiming", "gaussian")

@dataclasses.dataclass(frozen=True)
class _Kind:
    """How a kernel's axes split: the first `n_in` are inputs, the rest outputs."""

    n_in: int
    hf_name: str  # the Hugging Face module path, "{i}" standing for the layer index
    embedding: bool = False  # vocab-sized matrices need LoraConfig.allow_embeddings

# Keyed by the '/'-joined path with the layer index replaced by "*".
_KERNELS: dict[str, _Kind] = {
    "layers/*/attn/q": _Kind(1, "model.layers.{i}.self_attn.q_proj"),
    "layers/*/attn/k": _Kind(1, "model.layers.{i}.self_attn.k_proj"),
    "layers/*/attn/v": _Kind(1, "model.layers.{i}.self_attn.v_proj"),
    "layers/*/attn/o": _Kind(2, "model.layers.{i}.self_attn.o_proj"),
    "layers/*/mlp/gate": _Kind(1, "model.layers.{i}.mlp.gate_proj"),
    "layers/*/mlp/up": _Kind(1, "model.layers.{i}.mlp.up_proj"),
    "layers/*/mlp/down": _Kind(1, "model.layers.{i}.mlp.down_proj"),
    "embedding": _Kind(1, "model.embed_tokens", embedding=True),
    "lm_head": _Kind(1, "lm_head", embedding=True),
}
_LAYER_INDEX = re.compile(r"^layers/(\d+)/")

@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get adapters, and their rank, scale and initialisation.

    Attributes:
      rank: r, the inner dimension of A [*in, r] and B [r, *out].
      alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).
      targets: regular expressions searched (re.search) in '/'-joined parameter
        paths such as "layers/3/attn/q"; every pattern must match at least one
        targetable kernel and nothing else.
      init: A's initialisation; "kaiming" is PEFT's default (uniform with
        bound 1/sqrt(fan_in), torch's nn.Linear init), "gaussian" is
        normal(0, 1/r). B always starts at zero, so a new adapter is a no-op.
      rslora: rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023).
      allow_embeddings: let targets match the input embedding and lm_head.
      dtype: storage dtype of A and B.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_LINEAR_TARGETS
    init: str = "kaiming"
    rslora: bool = False
    allow_embeddings: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            raise ValueError("LoraConfig.targets is a tuple of patterns, not one string")
        object.__setattr__(self, "targets", tuple(self.targets))
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if not self.targets:
            problems.append("targets is empty")
        if self.init not in INITS:
            problems.append(f"init {self.init!r} is not one of {INITS}")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"target {pattern!r} is not a valid regular expression ({err})")
        if problems:
            raise ValueError("invalid LoraConfig: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

# ---------------------------------------------------------------------------
# Paths and target selection

def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

def _leaves(tree: Params, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(key tuple, leaf) for every leaf of a nested dict, in sorted key order."""
    for key in sorted(tree, key=lambda k: (isinstance(k, str), k)):
        value = tree[key]
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value

def _kind_of(path: str) -> Optional[_Kind]:
    return _KERNELS.get(_LAYER_INDEX.sub("layers/*/", path))

def _why_not_targetable(path: str, cfg: LoraConfig) -> Optional[str]:
    """None if `path` may carry an adapter under `cfg`, else the reason it may not."""
    kind = _kind_of(path)
    if kind is None:
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "scale":
            return "it is a norm scale"
        if leaf.endswith("bias"):
            return "it is a bias"
        targetable = ", ".join(_KERNELS)
        return f"it is not a LoRA-targetable kernel (targetable: {targetable})"
    if kind.embedding and not cfg.allow_embeddings:
        return "it is a vocabulary matrix (pass LoraConfig(allow_embeddings=True) to adapt it)"
    return None

def target_paths(params: Params, cfg: LoraConfig) -> list[tuple]:
    """Key tuples of the kernels `cfg.targets` select in `params` (arrays or shapes).

    Raises ValueError when a pattern matches no parameter, or matches one that
    cannot carry an adapter (norm scales, biases, embeddings unless allowed).
    """
    keyed = [(keys, _path_str(keys)) for keys, _ in _leaves(params)]
    selected = []
    for pattern in cfg.targets:
        hits = [(keys, path) for keys, path in keyed if re.search(pattern, path)]
        if not hits:
            examples = ", ".join(path for _, path in keyed[:6])
            raise ValueError(f"LoRA target {pattern!r} matches no parameter; "
                             f"paths look like: {examples}, ...")
        for keys, path in hits:
            reason = _why_not_targetable(path, cfg)
            if reason is not None:
                raise ValueError(f"LoRA target {pattern!r} matches {path!r}, but {reason}")
            if keys not in selected:
                selected.append(keys)
    return sorted(selected, key=lambda keys: [(isinstance(k, str), k) for k in keys])

def _adapter_items(adapters: Params, prefix: tuple = ()) -> Iterator[tuple[tuple, dict[str, Any]]]:
    """(kernel key tuple, {"a", "b"}) for every adapter in the nested dict."""
    for key, value in adapters.items():
        if isinstance(value, dict) and set(value) == {"a", "b"} and not isinstance(value["a"], dict):
            yield prefix + (key,), value
        elif isinstance(value, dict):
            yield from _adapter_items(value, prefix + (key,))
        else:
            raise ValueError(f"adapter tree has a stray leaf at {_path_str(prefix + (key,))!r}")

def _split_shape(path: str, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    kind = _kind_of(path)
    if kind is None or len(shape) <= kind.n_in:
        raise ValueError(f"{path!r} with shape {tuple(shape)} is not a LoRA-targetable kernel")
    return tuple(shape[: kind.n_in]), tuple(shape[kind.n_in:])

# ---------------------------------------------------------------------------
# Creation, logical axes, sharding

def abstract_lora(params: Params, cfg: LoraConfig) -> Params:
    """ShapeDtypeStructs of the adapters `init_lora` would create for `params`."""
    dtype = dtype_of(cfg.dtype)
    flat = {}
    for keys in target_paths(params, cfg):
        ins, outs = _split_shape(_path_str(keys), tree_paths.get(params, keys).shape)
        flat[keys] = {"a": jax.ShapeDtypeStruct(ins + (cfg.rank,), dtype),
                      "b": jax.ShapeDtypeStruct((cfg.rank,) + outs, dtype)}
    return tree_paths.nest(flat)

def lora_logical_axes(params: Params, base_axes: Params, cfg: LoraConfig) -> Params:
    """Logical axes of the adapters: A keeps the kernel's input axes, B its output axes.

    `base_axes` is the model's logical-axes tree (`models.abstract(model_cfg)[2]`);
    the rank axis is None, i.e. replicated.
    """
    flat = {}
    for keys in target_paths(params, cfg):
        axes = tuple(tree_paths.get(base_axes, keys))
        n_in = _kind_of(_path_str(keys)).n_in
        flat[keys] = {"a": axes[:n_in] + (None,), "b": (None,) + axes[n_in:]}
    return tree_paths.nest(flat)

def lora_shardings(params: Params, base_axes: Params, cfg: LoraConfig, mesh: Mesh,
                   rules: Optional[sharding.Rules] = None) -> Params:
    """NamedSharding per adapter factor, from the inherited logical axes and the rules."""
    axes = lora_logical_axes(params, base_axes, cfg)
    return sharding.tree_shardings(mesh, abstract_lora(params, cfg), axes, rules)

def _init_factor_a(key: Array, path: str, shape: tuple[int, ...], cfg: LoraConfig) -> Array:
    if cfg.init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / cfg.rank
    # torch's kaiming_uniform_(a=sqrt(5)) on a [r, fan_in] weight, as PEFT does:
    # bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in). A vocabulary
    # matrix is indexed by one-hot tokens, so its fan-in is 1.
    fan_in = 1 if _kind_of(path).embedding else math.prod(shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

def init_lora(params: Params, cfg: LoraConfig, rng: Array, *, mesh: Optional[Mesh] = None,
              base_axes: Optional[Params] = None, rules: Optional[sharding.Rules] = None) -> Params:
    """Fresh adapters {"a": A, "b": 0} for every kernel `cfg.targets` selects.

    `params` may hold arrays or ShapeDtypeStructs (only shapes are read). Each
    adapter's key is derived from its path, so adding a target leaves the other
    adapters' values unchanged. With `mesh` (and the model's `base_axes`) the
    factors are created directly in their shards.
    """
    if mesh is not None and base_axes is None:
        raise ValueError("init_lora with a mesh needs base_axes (models.abstract(model_cfg)[2])")
    shapes = abstract_lora(params, cfg)
    out_shardings = None if mesh is None else lora_shardings(params, base_axes, cfg, mesh, rules)

    def create() -> Params:
        flat = {}
        for keys, spec in _adapter_items(shapes):
            path = _path_str(keys)
            key = jax.random.fold_in(rng, zlib.crc32(path.encode()))
            a = _init_factor_a(key, path, spec["a"].shape, cfg).astype(spec["a"].dtype)
            flat[keys] = {"a": a, "b": jnp.zeros(spec["b"].shape, spec["b"].dtype)}
        return tree_paths.nest(flat)

    if mesh is None:
        return create()  # op by op: no compilation per call for small adapter sets
    return jax.jit(create, out_shardings=out_shardings)()

# ---------------------------------------------------------------------------
# Applying, merging

def lora_delta(adapter: dict[str, Array], cfg: LoraConfig) -> Array:
    """scale * A @ B in float32, shaped like the kernel ([*in, *out])."""
    a = adapter["a"].astype(jnp.float32)
    b = adapter["b"].astype(jnp.float32)
    # HIGHEST: TPUs would otherwise multiply float32 in bfloat16 passes, and
    # unmerge(merge(W)) should give W back to float32 rounding.
    return cfg.scale * jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)

def _map_adapted(params: Params, adapters: Params, fn: Callable[[Array, dict[str, Array]], Array]) -> Params:
    """A copy of `params` with fn(kernel, adapter) at every adapted kernel; other leaves shared."""
    flat = dict(_adapter_items(adapters))

    def rebuild(node: Params, prefix: tuple) -> Params:
        out = {}
        for key, value in node.items():
            keys = prefix + (key,)
            if isinstance(value, dict):
                out[key] = rebuild(value, keys)
            elif keys in flat:
                out[key] = fn(value, flat.pop(keys))
            else:
                out[key] = value
        return out

    result = rebuild(params, ())
    if flat:
        missing = ", ".join(_path_str(keys) for keys in flat)
        raise ValueError(f"adapters for parameters that do not exist: {missing}")
    return result

def _check_shapes(kernel: Array, adapter: dict[str, Array], cfg: LoraConfig) -> None:
    a, b = adapter["a"].shape, adapter["b"].shape
    if a[-1] != cfg.rank or b[0] != cfg.rank or tuple(a[:-1]) + tuple(b[1:]) != tuple(kernel.shape):
        raise ValueError(f"adapter shapes A {a}, B {b} do not fit kernel {kernel.shape} at rank {cfg.rank}")

def _add(sign: float, cfg: LoraConfig) -> Callable[[Array, dict[str, Array]], Array]:
    def fn(kernel: Array, adapter: dict[str, Array]) -> Array:
        _check_shapes(kernel, adapter, cfg)
        # Summed in float32 and stored back in the kernel's dtype, so the result
        # is a drop-in replacement for the base params (same dtypes, same jit signature).
        return (kernel.astype(jnp.float32) + sign * lora_delta(adapter, cfg)).astype(kernel.dtype)

    return fn

def apply_lora(params: Params, adapters: Params, cfg: LoraConfig, *, enabled: bool = True) -> Params:
    """The effective params W + scale * A @ B (call inside the jitted forward).

    With enabled=False the base `params` themselves are returned: the reference
    model of a LoRA run, without a second copy of the weights. Differentiating
    the forward with respect to `adapters` alone trains only the adapters.
    """
    if not enabled:
        return params
    return _map_adapted(params, adapters, _add(1.0, cfg))

def merge(params: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """Params with the adapters folded in (for inference or export); same dtypes as `params`.

    The same arithmetic as apply_lora; named for the permanent use.
    """
    return apply_lora(params, adapters, cfg)

def unmerge(merged: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """Inverse of `merge`: the base params back, up to float rounding."""
    return _map_adapted(merged, adapters, _add(-1.0, cfg))

# ---------------------------------------------------------------------------
# Export

def describe(adapters: Params, cfg: LoraConfig) -> dict[str, Any]:
    """A JSON-able description of adapters: the config plus each adapter's path and shapes."""
    return {
        "format": "prefjax-lora",
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "scale": cfg.scale,
        "rslora": cfg.rslora,
        "init": cfg.init,
        "targets": list(cfg.targets),
        "allow_embeddings": cfg.allow_embeddings,
        "dtype": cfg.dtype,
        "paths": {
            _path_str(keys): {"a": list(ad["a"].shape), "b": list(ad["b"].shape)}
            for keys, ad in _adapter_items(adapters)
        },
    }

def config_from_description(description: dict[str, Any]) -> LoraConfig:
    """The LoraConfig a `describe` output was made with."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in description.items() if k in fields})

def adapters_only(adapters: Params, cfg: LoraConfig) -> tuple[Params, dict[str, Any]]:
    """(adapters as host numpy arrays, JSON-able description): what to save for a LoRA run."""
    return jax.device_get(adapters), describe(adapters, cfg)

def peft_tensors(adapters: Params) -> dict[str, np.ndarray]:
    """PEFT state-dict names -> arrays in PEFT's layout (A [r, in], B [out, r]).

    Our A [*in, r] and B [r, *out] act on einsum kernels [in, out], while
    Hugging Face stores Linear weights as [out, in] with the head axes
    flattened (n * head_dim + h), which is our row-major flattening; so
    lora_A = A.reshape(in, r).T and lora_B = B.reshape(r, out).T.
    """
    tensors = {}
    for keys, ad in _adapter_items(jax.device_get(adapters)):
        path = _path_str(keys)
        kind = _kind_of(path)
        if kind is None:
            raise ValueError(f"no Hugging Face name for the adapter at {path!r}")
        layer = _LAYER_INDEX.match(path)
        module = "base_model.model." + kind.hf_name.format(i=layer.group(1) if layer else "")
        a, b = np.asarray(ad["a"]), np.asarray(ad["b"])
        rank = a.shape[-1]
        a_hf = np.ascontiguousarray(a.reshape(-1, rank).T)
        b_hf = np.ascontiguousarray(b.reshape(rank, -1).T)
        if path == "embedding":
            # PEFT's Embedding layer keeps bare parameters (no ".weight"), A [r, vocab], B [embed, r].
            tensors[module + ".lora_embedding_A"] = a_hf
            tensors[module + ".lora_embedding_B"] = b_hf
        else:
            tensors[module + ".lora_A.weight"] = a_hf
            tensors[module + ".lora_B.weight"] = b_hf
    return tensors

def _peft_target_modules(adapters: Params, model_cfg: ModelConfig) -> Any:
    """Module names (every layer covered) or an exact full-match regex (a subset of layers)."""
    names = {}
    for keys, _ in _adapter_items(adapters):
        path = _path_str(keys)
        layer = _LAYER_INDEX.match(path)
        names[path] = _kind_of(path).hf_name.format(i=layer.group(1) if layer else "")
    short = sorted({name.rsplit(".", 1)[-1] for name in names.values()})
    every_layer = {
        _kind_of(path).hf_name.format(i=i)
        for path in names for i in range(model_cfg.num_layers) if _LAYER_INDEX.match(path)
    } | {name for path, name in names.items() if not _LAYER_INDEX.match(path)}
    if set(names.values()) == every_layer:
        return short
    # PEFT full-matches a string target_modules against module names.
    return "(" + "|".join(re.escape(name) for name in sorted(names.values())) + ")"

PEFT_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
# PEFT saves a modules_to_save copy under the module's own name in the base model.
PEFT_SCORE_WEIGHT = "base_model.model.score.weight"


def export_peft(adapters: Params, lora_cfg: LoraConfig, model_cfg: ModelConfig, folder: str, *,
                base_model_name_or_path: Optional[str] = None, task_type: str = "CAUSAL_LM",
                reward_head: Optional[Array] = None) -> dict[str, tuple[int, ...]]:
    """Writes a Hugging Face PEFT adapter: adapter_config.json + adapter_model.safetensors.

    task_type "CAUSAL_LM": loadable with `PeftModel.from_pretrained(hf_model, folder)` on the
    *ForCausalLM checkpoint the base params came from. "SEQ_CLS" (a LoRA reward model):
    `reward_head` [D, L] is saved as the fully trained `score` module (modules_to_save),
    and the adapter loads onto that checkpoint opened with
    AutoModelForSequenceClassification(num_labels=L, pad_token_id=...). Returns {tensor name: shape}.
    """
    if task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"export_peft: task_type={task_type!r} is not one of {PEFT_TASK_TYPES}")
    if (task_type == "SEQ_CLS") != (reward_head is not None):
        raise ValueError("export_peft: task_type='SEQ_CLS' needs reward_head=[hidden_size, num_labels], "
                         "and only it takes one")
    if model_cfg.tie_embeddings and _get_or_none(adapters, ("embedding",)) is not None:
        # In PEFT an adapter on tied embed_tokens changes the input lookup only;
        # here the tied matrix is also the unembedding, so the two would differ.
        raise ValueError("cannot export an embedding adapter of a tied-embedding model to PEFT")
    tensors = peft_tensors(adapters)
    if reward_head is not None:
        head = np.asarray(jax.device_get(reward_head))
        if head.ndim != 2 or head.shape[0] != model_cfg.hidden_size:
            raise ValueError(f"export_peft: reward_head has shape {list(head.shape)}; expected "
                             f"[hidden_size={model_cfg.hidden_size}, num_labels]")
        tensors[PEFT_SCORE_WEIGHT] = np.ascontiguousarray(head.T)  # Linear layout [L, D]
    alpha = int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else lora_cfg.alpha
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "use_rslora": lora_cfg.rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": _peft_target_modules(adapters, model_cfg),
        "modules_to_save": ["score"] if task_type == "SEQ_CLS" else None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    safetensors_format.write(os.path.join(folder, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    return {name: tuple(t.shape) for name, t in tensors.items()}

def _get_or_none(tree: Params, keys: tuple) -> Any:
    try:
        return tree_paths.get(tree, keys)
    except (KeyError, TypeError):
        return None
