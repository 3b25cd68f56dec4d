"""``model.hf_folder`` / ``data.tokenizer``: a local folder, or a Hub model id resolved to one.

    hub.resolve("Qwen/Qwen2.5-0.5B-Instruct")            # -> Resolved(folder=<cache snapshot>, commit=...)
    hub.resolve("Qwen/Qwen2.5-0.5B-Instruct@v1.0")       # a branch, tag or commit sha
    hub.resolve("checkpoints/sft")                        # an existing folder wins over an id

Only the files prefjax reads are fetched (``MODEL_FILES``: config.json, generation_config.json,
the safetensors weights and their index, the tokenizer files; ``TOKENIZER_FILES`` leaves the
weights out). Never ``*.bin``, ``*.pt``, ``*.msgpack`` or ``*.h5``: prefjax reads none of them,
and pickled weights run code when loaded. ``tokenizer.model`` (SentencePiece) is not fetched
either: prefjax.models.tokenizer reads tokenizer.json alone.

Downloads go through prefjax.hub_download (huggingface_hub's cache, token and offline mode; one
download per host). Results are remembered per process, so the trainer's later look-ups (the
reference-cache fingerprint, the export's tokenizer copy) neither download again nor see a
moved branch: ``Resolved.identity`` names the commit that was loaded.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Optional

from huggingface_hub.utils import HFValidationError, validate_repo_id

from prefjax import hub_download
from prefjax.models import hf_checkpoint

# What hf_checkpoint.load reads: one file or an index and its shards (named as transformers writes them).
WEIGHT_FILES = (hf_checkpoint.SINGLE_FILE, hf_checkpoint.INDEX_FILE, "model-*-of-*.safetensors")
TOKENIZER_FILES = ("config.json", *hf_checkpoint.COMPANION_FILES)
MODEL_FILES = (*WEIGHT_FILES, *TOKENIZER_FILES)
ID_FORM = "a Hub model id 'owner/name' or 'owner/name@revision'"

HubError = hub_download.HubError
_resolved: dict[tuple, "Resolved"] = {}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where a model name points: ``folder`` on disk; for a Hub id also the repo and commit."""

    folder: str
    repo_id: Optional[str] = None
    revision: Optional[str] = None  # as asked ("main" when none was given)
    commit: Optional[str] = None  # the snapshot's commit sha

    @property
    def identity(self) -> str:
        """What the folder's contents depend on: ``owner/name@<commit>`` for a Hub id (not the
        moving branch name), else the folder path."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id else self.folder


def parse_id(name: str, key: str = "model.hf_folder") -> tuple[str, Optional[str]]:
    """``(repo_id, revision or None)`` of ``owner/name[@revision]``; HubError naming ``key`` otherwise."""
    repo_id, _, revision = name.partition("@")
    valid = repo_id.count("/") == 1 and (revision or "@" not in name) and not re.search(r"\s", revision)
    if valid:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            valid = False
    if not valid:
        raise HubError(f"{key}={name!r}: no such folder, and not {ID_FORM}")
    return repo_id, revision or None


def resolve(name: str, *, key: str = "model.hf_folder", weights: bool = True) -> Resolved:
    """The local folder for ``name`` (a folder, or a Hub id downloaded into the cache).

    ``weights=False`` fetches the tokenizer and config files only (``data.tokenizer``).
    """
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return Resolved(folder=path)
    if os.path.exists(path):
        raise HubError(f"{key}={name!r} is a file; give the folder holding config.json and the weights")
    repo_id, revision = parse_id(name, key)
    patterns = MODEL_FILES if weights else TOKENIZER_FILES
    memo = (hub_download.cache_dir(), hub_download.offline(), repo_id, revision, patterns)
    if memo not in _resolved:
        folder = hub_download.snapshot(repo_id, revision=revision, repo_type="model", allow_patterns=patterns,
                                       what=f"{key}={name!r} (not a local folder)")
        _resolved[memo] = Resolved(folder=folder, repo_id=repo_id, revision=revision or "main",
                                   commit=Path(folder).name)
    return _resolved[memo]


def local_folder(name: str, *, key: str = "model.hf_folder", weights: bool = True) -> str:
    """``resolve(...).folder``: what to hand to hf_checkpoint.load or load_tokenizer."""
    return resolve(name, key=key, weights=weights).folder


def identity(name: str, *, key: str = "model.hf_folder", weights: bool = True) -> str:
    """``resolve(...).identity``: for fingerprints (a Hub id's commit, not its branch name)."""
    return resolve(name, key=key, weights=weights).identity
