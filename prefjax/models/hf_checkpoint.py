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
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from prefjax import sharding
from prefjax.models import hf_config, hf_layout, params as params_lib, safetensors_format, tree_paths
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
    tensors = CheckpointTensors(folder)
    _, shapes, _ = params_lib.abstract(cfg)
    shardings = params_lib.param_shardings(cfg, mesh, rules) if mesh is not None else None
    mappings = hf_layout.tensor_mappings(cfg)
    available = set(tensors.names())
    missing = [m.hf_name for m in mappings if m.hf_name not in available]
    if missing:
        raise CheckpointError(f"{Path(folder)}: the checkpoint lacks {len(missing)} tensor(s) that a "
                              f"{cfg.family} model with this config.json needs, e.g. {missing[:5]}")
    unused = sorted(available - {m.hf_name for m in mappings})
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
    folder = Path(folder)
    mappings = hf_layout.tensor_mappings(cfg)
    out_dtype = None if dtype is None else np.dtype(jax.numpy.dtype(dtype))
    entries = []
    for m in mappings:
        leaf = tree_paths.get(params, m.path)
        entry_dtype = out_dtype or np.dtype(leaf.dtype)
        entries.append(safetensors_format.TensorToWrite(
            m.hf_name, m.hf_shape, entry_dtype, lambda leaf=leaf, m=m, t=entry_dtype: _to_hf(leaf, m, t)))
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
        config = to_config_json(cfg, dtype, copy_from, extra_config)
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
    return hf_config.to_hf_config(cfg, torch_dtype=dtype or cfg.param_dtype, **carried, **(extra_config or {}))

def _to_hf(leaf: jax.Array, m: hf_layout.TensorMapping, dtype: np.dtype) -> np.ndarray:
    if jax.process_count() > 1 and not leaf.is_fully_addressable:
        host = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    else:
        host = np.asarray(jax.device_get(leaf))
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

