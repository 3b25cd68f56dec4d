"""Import and export Hugging Face checkpoint folders.

    ckpt = hf_checkpoint.load("path/to/Qwen2.5-0.5B", mesh=mesh)     # born sharded
    hidden, _ = models.apply(ckpt.graphdef, ckpt.params, tokens)
    hf_checkpoint.save("out/", ckpt.cfg, ckpt.params, copy_from=ckpt.folder)

Import reads config.json (prefjax.models.hf_config), then each tensor of
model.safetensors or of a sharded index (model.safetensors.index.json) through
a memory map: every device's shard is sliced out of the mapped file by
`jax.make_array_from_callback`, so a process reads only the bytes of its own
shards and never holds a full host copy of the model. The tokenizer comes
from the same folder and must fit the model's embedding.

Export writes config.json and safetensors files (split at `max_shard_bytes`,
with an index, like transformers' `save_pretrained`) one tensor at a time:
each parameter is gathered, converted to Hugging Face layout and written
before the next is fetched. Importing an export gives back bit-identical
parameters. Every process must call `save` (gathering is collective); only
process 0 writes.

Reward models are transformers' `*ForSequenceClassification` folders:

    rm = hf_checkpoint.load_reward_model("path/to/rm")       # no lm_head param
    hidden, _ = models.apply(rm.graphdef, rm.params, tokens)  # rewards: hidden @ rm.head
    hf_checkpoint.save_reward_model("out/", rm.cfg, rm.params, rm.head, labels=rm.labels,
                                    pad_token_id=rm.pad_token_id, copy_from=rm.folder)

`save_reward_model` also takes a causal policy's params (its lm_head is
dropped) and a fresh head, which is how a trained reward model is exported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from prefjax import sharding
from prefjax.models import hf_config, hf_layout, safetensors_format, tree_paths
from prefjax.models import params as params_lib
from prefjax.models.config import ModelConfig
from prefjax.models.tokenizer import Tokenizer, check_fits_model, load_tokenizer

Params = dict[str, Any]
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files besides the weights that a model folder carries and an export copies along.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

class CheckpointError(ValueError):
    """A checkpoint folder that does not hold exactly the model its config describes."""


class NotARewardModelError(CheckpointError):
    """A causal-LM folder given where a reward model (*ForSequenceClassification) is needed."""


class RewardHeadError(CheckpointError):
    """A reward head (score.weight) whose shape disagrees with num_labels / hidden_size or the labels."""


class PadTokenError(CheckpointError):
    """A reward model without a usable pad id (missing, out of range, or equal to EOS)."""

class CheckpointTensors:
    """A folder's tensors by name, across model.safetensors or a sharded index."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._files: dict[str, safetensors_format.SafetensorsFile] = {}
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.is_file():
            self._owner = self._read_index(index)
        elif single.is_file():
            self._owner = {name: SINGLE_FILE for name in self._file(SINGLE_FILE).names()}
        else:
            present = sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []
            hint = " (pytorch_model.bin checkpoints are not read: convert them to safetensors)" if any(
                p.endswith(".bin") for p in present) else ""
            raise FileNotFoundError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}. "
                                    f"Files in the folder: {present}")

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{index}: not valid JSON: {err}") from None
        except (KeyError, TypeError):
            raise CheckpointError(f"{index}: field 'weight_map' is missing") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: field 'weight_map' must map tensor names to file names")
        for name, filename in weight_map.items():
            if name not in self._file(filename, referenced_by=index):
                raise CheckpointError(f"{index}: weight_map says {name!r} is in {filename}, "
                                      f"but {self.folder / filename} has no such tensor")
        return dict(weight_map)

    def _file(self, filename: str, referenced_by: Optional[Path] = None) -> safetensors_format.SafetensorsFile:
        if filename not in self._files:
            path = self.folder / filename
            if not path.is_file() and referenced_by is not None:
                raise FileNotFoundError(f"{referenced_by}: weight_map refers to {filename}, which is missing")
            self._files[filename] = safetensors_format.SafetensorsFile(path)
        return self._files[filename]

    def names(self) -> list[str]:
        return list(self._owner)

    def where(self, name: str) -> Path:
        return self.folder / self._owner[name]

    def array(self, name: str) -> np.ndarray:
        """Memory-mapped view of tensor `name` (no bytes read until indexed)."""
        return self._file(self._owner[name]).array(name)

@dataclasses.dataclass
class HFCheckpoint:
    """A loaded folder: the architecture, the module structure, sharded params, tokenizer."""

    folder: Path
    cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: Params
    tokenizer: Optional[Tokenizer]

def load_config(folder: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a folder's config.json; overrides set param_dtype, dtype, remat, ..."""
    path = Path(folder) / "config.json"
    return hf_config.from_hf_config(hf_config.read_hf_config(path), str(path), **overrides)

def load(folder: str | os.PathLike, *, mesh: Optional[Mesh] = None, rules: Optional[sharding.Rules] = None,
         with_tokenizer: bool = True, **cfg_overrides: Any) -> HFCheckpoint:
    """Config, params (placed in their shards on `mesh`) and tokenizer of a Hugging Face folder."""
    folder = Path(folder)
    raw = hf_config.read_hf_config(folder / "config.json")
    if hf_config.is_reward_config(raw):
        raise CheckpointError(f"{folder / 'config.json'}: architectures {hf_config.architectures(raw)} is a "
                              "reward model (a score head, no LM head); load it with "
                              "hf_checkpoint.load_reward_model or prefjax.reward.load")
    cfg = load_config(folder, **cfg_overrides)
    tokenizer = None
    if with_tokenizer:
        tokenizer = load_tokenizer(folder)
        check_fits_model(tokenizer, cfg.vocab_size)
    graphdef, _, _ = params_lib.abstract(cfg)
    return HFCheckpoint(folder, cfg, graphdef, load_params(folder, cfg, mesh=mesh, rules=rules), tokenizer)

def load_params(folder: str | os.PathLike, cfg: ModelConfig, *, mesh: Optional[Mesh] = None,
                rules: Optional[sharding.Rules] = None) -> Params:
    """prefjax params from a folder's safetensors, streamed shard by shard.

    Raises CheckpointError on a missing tensor, a tensor of the wrong shape or
    dtype kind, or a tensor the architecture has no place for.
    """
    return _read_params(CheckpointTensors(folder), cfg, mesh, rules)


def _read_params(tensors: CheckpointTensors, cfg: ModelConfig, mesh: Optional[Mesh],
                 rules: Optional[sharding.Rules], read_elsewhere: frozenset[str] = frozenset()) -> Params:
    """The decoder params of `cfg` from `tensors`; `read_elsewhere` names tensors the caller reads itself."""
    folder = tensors.folder
    _, shapes, _ = params_lib.abstract(cfg)
    shardings = params_lib.param_shardings(cfg, mesh, rules) if mesh is not None else None
    mappings = hf_layout.tensor_mappings(cfg)
    available = set(tensors.names())
    missing = [m.hf_name for m in mappings if m.hf_name not in available]
    if missing:
        raise CheckpointError(f"{Path(folder)}: the checkpoint lacks {len(missing)} tensor(s) that a "
                              f"{cfg.family} model with this config.json needs, e.g. {missing[:5]}")
    unused = sorted(available - {m.hf_name for m in mappings} - read_elsewhere)
    unused = [name for name in unused if not hf_layout.is_ignorable(name, cfg)]
    if unused:
        raise CheckpointError(f"{Path(folder)}: the checkpoint has {len(unused)} tensor(s) this architecture "
                              f"has no parameter for (config.json may not match the weights), e.g. {unused[:5]}")
    flat: dict[tuple, jax.Array] = {}
    for m in mappings:
        abstract = tree_paths.get(shapes, m.path)
        target = shardings and tree_paths.get(shardings, m.path)
        flat[m.path] = _load_tensor(tensors, m, abstract, target)
    return tree_paths.nest(flat)

def _load_tensor(tensors: CheckpointTensors, m: hf_layout.TensorMapping, abstract: jax.ShapeDtypeStruct,
                 target: Optional[jax.sharding.Sharding]) -> jax.Array:
    stored = tensors.array(m.hf_name)
    where = f"{tensors.where(m.hf_name)}: tensor {m.hf_name!r}"
    if stored.shape != m.hf_shape:
        raise CheckpointError(f"{where} has shape {list(stored.shape)}, but config.json implies "
                              f"{list(m.hf_shape)}")
    if not np.issubdtype(stored.dtype, np.floating) and stored.dtype.kind != "V":
        raise CheckpointError(f"{where} has dtype {stored.dtype}; expected floating point weights")
    view = m.to_prefjax(stored)  # lazy: reshapes and transposes of the memory map
    dtype = abstract.dtype
    if target is None:
        target = SingleDeviceSharding(jax.devices()[0])
    # Each addressable device's callback copies only its own slice out of the map.
    return jax.make_array_from_callback(abstract.shape, target, lambda index: np.asarray(view[index], dtype=dtype))

def save(folder: str | os.PathLike, cfg: ModelConfig, params: Params, *, copy_from: Optional[str | os.PathLike] = None,
         dtype: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
         extra_config: Optional[dict[str, Any]] = None) -> list[str]:
    """Writes config.json + safetensors (sharded above `max_shard_bytes`) that transformers loads.

    copy_from: a folder whose tokenizer/generation files are copied along
      (usually the folder the model was imported from).
    dtype: cast weights on export ("bfloat16", "float32"); default keeps each
      parameter's dtype.
    extra_config: added to config.json (e.g. bos/eos/pad token ids); when
      `copy_from` has a config.json, its token-id fields are carried over.
    Returns the written file names. Collective: every process must call it.
    """
    entries = _entries(hf_layout.tensor_mappings(cfg), params, dtype)
    config = to_config_json(cfg, dtype, copy_from, extra_config)
    return _write_folder(Path(folder), entries, config, copy_from, max_shard_bytes)


def _entries(mappings: list[hf_layout.TensorMapping], tree: Params, dtype: Optional[str],
             ) -> list[safetensors_format.TensorToWrite]:
    """One lazily produced tensor per mapping (cast to `dtype`, else the leaf's own dtype)."""
    out_dtype = None if dtype is None else np.dtype(jax.numpy.dtype(dtype))
    entries = []
    for m in mappings:
        leaf = tree_paths.get(tree, m.path)
        entry_dtype = out_dtype or np.dtype(leaf.dtype)
        entries.append(safetensors_format.TensorToWrite(
            m.hf_name, m.hf_shape, entry_dtype, lambda leaf=leaf, m=m, t=entry_dtype: _to_hf(leaf, m, t)))
    return entries


def _write_folder(folder: Path, entries: list[safetensors_format.TensorToWrite], config: dict[str, Any],
                  copy_from: Optional[str | os.PathLike], max_shard_bytes: int) -> list[str]:
    """Safetensors (sharded with an index above max_shard_bytes), config.json and companion files."""
    groups = _split_into_files(entries, max_shard_bytes)
    writer = jax.process_index() == 0
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, group in groups:
        if writer:
            safetensors_format.write_stream(folder / filename, group, metadata={"format": "pt"})
        else:
            for entry in group:  # other processes still take part in each gather
                entry.produce()
        written.append(filename)
    if writer:
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                     "weight_map": {e.name: name for name, group in groups for e in group}}
            (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            written.append(INDEX_FILE)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        written.append("config.json")
        for name in COMPANION_FILES if copy_from is not None else ():
            source = Path(copy_from) / name
            if source.is_file():
                shutil.copyfile(source, folder / name)
                written.append(name)
    multihost_utils.sync_global_devices("prefjax.hf_checkpoint.save")
    return written

def to_config_json(cfg: ModelConfig, dtype: Optional[str], copy_from: Optional[str | os.PathLike],
                   extra_config: Optional[dict[str, Any]]) -> dict[str, Any]:
    carried: dict[str, Any] = {}
    source = None if copy_from is None else Path(copy_from) / "config.json"
    if source is not None and source.is_file():
        original = hf_config.read_hf_config(source)
        carried = {k: original[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in original}
    # extra_config wins over carried fields (a reward export sets its own pad_token_id).
    return hf_config.to_hf_config(cfg, torch_dtype=dtype or cfg.param_dtype, **{**carried, **(extra_config or {})})

def _to_hf(leaf: jax.Array, m: hf_layout.TensorMapping, dtype: np.dtype) -> np.ndarray:
    host = sharding.to_host(leaf)
    return np.ascontiguousarray(m.to_hf(host)).astype(dtype, copy=False)

def _split_into_files(entries: list[safetensors_format.TensorToWrite], max_bytes: int,
                      ) -> list[tuple[str, list[safetensors_format.TensorToWrite]]]:
    """Groups tensors into files of at most max_bytes (a bigger tensor gets its own file)."""
    groups: list[list[safetensors_format.TensorToWrite]] = [[]]
    size = 0
    for entry in sorted(entries, key=lambda e: e.name):
        if groups[-1] and size + entry.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    if len(groups) == 1:
        return [(SINGLE_FILE, groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", group) for i, group in enumerate(groups)]



# ---------------------------------------------------------------------------
# Reward models: transformers' *ForSequenceClassification folders
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class RewardCheckpoint:
    """A loaded reward model: a decoder without LM head and a linear head on its last token.

    cfg builds graphdef (it has no lm_head: see hf_layout.reward_model_config); head is
    [D, L] float32 (score.weight transposed); labels are id2label in order.
    """

    folder: Path
    cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: Params
    head: jax.Array
    labels: tuple[str, ...]
    pad_token_id: int
    normalization: Optional[dict[str, list[float]]]
    tokenizer: Optional[Tokenizer]


def is_reward_model_folder(folder: str | os.PathLike) -> bool:
    """True when the folder's config.json names a *ForSequenceClassification architecture."""
    path = Path(folder) / "config.json"
    return path.is_file() and hf_config.is_reward_config(hf_config.read_hf_config(path))


def load_reward_model(folder: str | os.PathLike, *, mesh: Optional[Mesh] = None,
                      rules: Optional[sharding.Rules] = None, with_tokenizer: bool = True,
                      **cfg_overrides: Any) -> RewardCheckpoint:
    """A reward model folder (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2; any num_labels).

    The decoder params are placed in their shards on `mesh` as `load` does (cfg_overrides
    set param_dtype, dtype, remat, ... as there); the head is replicated, float32.
    pad_token_id comes from config.json, else from the tokenizer.
    Raises NotARewardModelError for a causal-LM folder, RewardHeadError when
    score.weight does not match num_labels and hidden_size, PadTokenError when no pad
    id is known.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    raw = hf_config.read_hf_config(config_path)
    if not hf_config.is_reward_config(raw):
        raise NotARewardModelError(
            f"{config_path}: architectures {hf_config.architectures(raw)} is not a reward model: the folder has "
            "no score head (score.weight), only a language-model head. Train a reward model with "
            "loss_name=bradley_terry (ranked pairs) or rating_regression (rated rows), which exports a "
            "*ForSequenceClassification folder, or score with this policy and its reference as an implicit "
            "reward model (prefjax.reward.load_implicit)")
    fields = hf_config.read_reward_fields(raw, str(config_path))
    # cfg_overrides (param_dtype, dtype, remat, ...) as for `load`
    cfg = hf_layout.reward_model_config(hf_config.from_hf_config(raw, str(config_path), **cfg_overrides))
    tokenizer = None
    if with_tokenizer:
        tokenizer = load_tokenizer(folder)
        check_fits_model(tokenizer, cfg.vocab_size)
    pad = fields.pad_token_id if fields.pad_token_id is not None else (tokenizer and tokenizer.pad_token_id)
    if pad is None:
        no_tokenizer_pad = "the tokenizer has no pad token" if with_tokenizer else "no tokenizer was loaded"
        raise PadTokenError(
            f"{config_path}: no pad_token_id (and {no_tokenizer_pad}): "
            "transformers' *ForSequenceClassification finds each row's scored token as the last one that is "
            "not the pad id, so a reward model needs one. Set pad_token_id in config.json to a token id that "
            "is not an EOS id")
    tensors = CheckpointTensors(folder)
    mapping = hf_layout.reward_head_mapping(cfg, len(fields.labels))
    head = _read_head(tensors, mapping, fields, config_path, mesh)
    params = _read_params(tensors, cfg, mesh, rules, read_elsewhere=frozenset({mapping.hf_name}))
    graphdef, _, _ = params_lib.abstract(cfg)
    return RewardCheckpoint(folder, cfg, graphdef, params, head, fields.labels, int(pad),
                            fields.normalization, tokenizer)


def _read_head(tensors: CheckpointTensors, m: hf_layout.TensorMapping, fields: hf_config.RewardFields,
               config_path: Path, mesh: Optional[Mesh]) -> jax.Array:
    if m.hf_name not in tensors.names():
        raise RewardHeadError(f"{tensors.folder}: config.json names a sequence-classification model but the "
                              f"checkpoint has no {m.hf_name!r} tensor (the reward head)")
    stored = tensors.array(m.hf_name)
    where = f"{tensors.where(m.hf_name)}: tensor {m.hf_name!r}"
    if stored.shape != m.hf_shape:
        num_labels, hidden = m.hf_shape
        raise RewardHeadError(f"{where} has shape {list(stored.shape)}, but {config_path.name}'s "
                              f"num_labels={num_labels} and hidden_size={hidden} imply {list(m.hf_shape)} "
                              f"({config_path})")
    if not np.issubdtype(stored.dtype, np.floating) and stored.dtype.kind != "V":
        raise RewardHeadError(f"{where} has dtype {stored.dtype}; expected floating point weights")
    head = np.asarray(m.to_prefjax(stored), dtype=np.float32)
    target = SingleDeviceSharding(jax.devices()[0]) if mesh is None else sharding.replicated(mesh)
    return jax.device_put(head, target)


def save_reward_model(folder: str | os.PathLike, cfg: ModelConfig, params: Params, head: jax.Array, *,
                      labels: Sequence[str], pad_token_id: int, normalization: Optional[dict[str, Any]] = None,
                      copy_from: Optional[str | os.PathLike] = None, dtype: Optional[str] = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Writes the family's *ForSequenceClassification folder, which transformers loads.

    params: the decoder's (a causal policy's params do: lm_head, if any, is dropped).
    head: [D, L] reward head, written as score.weight [L, D] in `dtype` or its own dtype.
    labels: the L output names (id2label). pad_token_id: must not be an EOS id (transformers
      reads the last non-pad token). normalization: {"mean": [L], "std": [L]}, stored as
      config.json's "prefjax_reward_normalization".
    copy_from: a folder whose tokenizer files are copied and whose config.json's token ids and
      tie_word_embeddings are kept (pass the folder the model came from, so an import-export round
      trip keeps every config field). Collective like `save`.
    """
    folder = Path(folder)
    labels = tuple(labels)
    num_labels = _check_head(head, cfg, labels, folder)
    if normalization is not None:
        normalization = hf_config.check_normalization(_as_lists(normalization), num_labels,
                                                      f"{folder}: normalization")
    check_reward_pad_id(pad_token_id, cfg, copy_from, folder)
    decoder = hf_layout.reward_model_config(cfg)
    head_dtype = dtype or str(np.dtype(head.dtype))
    entries = (_entries(hf_layout.tensor_mappings(decoder), params, dtype)
               + _entries([hf_layout.reward_head_mapping(cfg, num_labels)], {"reward_head": head}, head_dtype))
    reward_fields = hf_config.reward_config_fields(cfg.family, labels, int(pad_token_id), normalization)
    config = to_config_json(cfg, dtype, copy_from, reward_fields)
    source = _source_config(copy_from)
    if "tie_word_embeddings" in source:
        # No LM head is written, so this field changes nothing in transformers; keeping the source's
        # value makes import -> export give back the same config.json fields.
        config["tie_word_embeddings"] = source["tie_word_embeddings"]
    return _write_folder(folder, entries, config, copy_from, max_shard_bytes)


def _check_head(head: Any, cfg: ModelConfig, labels: tuple[str, ...], folder: Path) -> int:
    shape = tuple(getattr(head, "shape", ()))
    if len(shape) != 2 or shape[0] != cfg.hidden_size or shape[1] < 1:
        raise RewardHeadError(f"{folder}: the reward head has shape {list(shape)}; expected "
                              f"[hidden_size={cfg.hidden_size}, num_labels] with num_labels >= 1")
    if len(labels) != shape[1]:
        raise RewardHeadError(f"{folder}: {len(labels)} label name(s) {list(labels)} for a reward head with "
                              f"{shape[1]} output(s); give one name per output")
    if len(set(labels)) != len(labels) or not all(isinstance(name, str) and name for name in labels):
        raise RewardHeadError(f"{folder}: label names must be distinct non-empty strings; got {list(labels)}")
    return shape[1]


def _as_lists(normalization: Any) -> Any:
    """Arrays (numpy, jax) in a normalization dict as float lists, for JSON; anything else unchanged."""
    if not isinstance(normalization, dict):
        return normalization
    return {k: np.asarray(v).tolist() if hasattr(v, "shape") else v for k, v in normalization.items()}


def _source_config(copy_from: Optional[str | os.PathLike]) -> dict[str, Any]:
    path = None if copy_from is None else Path(copy_from) / "config.json"
    return hf_config.read_hf_config(path) if path is not None and path.is_file() else {}


def _eos_ids(copy_from: Optional[str | os.PathLike]) -> set[int]:
    """EOS ids the source folder declares: config.json, generation_config.json and its tokenizer."""
    if copy_from is None:
        return set()
    ids = hf_config.eos_token_ids(_source_config(copy_from))
    generation = Path(copy_from) / "generation_config.json"
    if generation.is_file():
        ids |= hf_config.eos_token_ids(hf_config.read_hf_config(generation))
    if (Path(copy_from) / "tokenizer.json").is_file():
        eos = load_tokenizer(copy_from).eos_token_id
        if eos is not None:
            ids.add(eos)
    return ids


def check_reward_pad_id(pad_token_id: Any, cfg: ModelConfig, copy_from: Optional[str | os.PathLike],
                        where: str | os.PathLike) -> None:
    """Raises PadTokenError unless `pad_token_id` can be a reward model's pad id: set, a token id of
    `cfg`, and none of the EOS ids of `copy_from` (config.json, generation_config.json, tokenizer).

    `save_reward_model` runs it; a trainer can run it at start-up so that the export at the end of
    training cannot fail on it. `where` starts the message (the export folder).
    """
    folder = where
    if pad_token_id is None:
        raise PadTokenError(
            f"{folder}: no pad_token_id. transformers' *ForSequenceClassification scores each row at its last "
            "token that is not the pad id, so a reward model needs one: pass pad_token_id= a token id that is "
            "not an EOS id (the tokenizer's pad token, or an unused special token)")
    if not isinstance(pad_token_id, (int, np.integer)) or not 0 <= int(pad_token_id) < cfg.vocab_size:
        raise PadTokenError(f"{folder}: pad_token_id={pad_token_id!r} is not a token id in [0, {cfg.vocab_size})")
    eos = _eos_ids(copy_from)
    if int(pad_token_id) in eos:
        raise PadTokenError(
            f"{folder}: pad_token_id={int(pad_token_id)} is also an EOS id of {copy_from}. transformers' "
            "*ForSequenceClassification reads the score at the last token that is not the pad id, so it would "
            "read the token BEFORE the EOS, while prefjax trains and scores the reward at the EOS itself: "
            "transformers' scores would differ from prefjax's. Pass a pad_token_id that is not an EOS id "
            "(the tokenizer's pad token or another unused special token; if the tokenizer uses EOS as its pad, "
            "pick any other special token id)")
