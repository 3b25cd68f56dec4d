"""``hf:<owner>/<name>[@revision][:<config>]``: a Hub dataset's files of one config and split.

    paths = hub.data_files("hf:HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    paths = hub.data_files("hf:Anthropic/hh-rlhf@main:harmless-base", "test")   # a config

returns local paths (in huggingface_hub's cache) that prefjax.data.sources reads with
``from_files`` like any local file. Files, not the ``datasets`` package: that package is not a
dependency, is heavy (it pulls its own Arrow cache, fsspec, multiprocess, ...) and would convert
every dataset into its own cache before we read it; the Hub already serves the same data as
plain parquet/JSONL files, and huggingface_hub (prefjax's one Hub dependency) downloads exactly
the files one split needs, with its cache, token and offline mode (prefjax.hub_download).

Which files hold a config's split, following the Hub's conventions:

1. The README.md ``configs:`` block, when present: each config's ``data_files`` (a glob, a list
   of globs = the "train" split, or ``[{split, path}]``), ``data_dir``, and ``default: true``.
2. Otherwise the layout: data files at the top or under ``data/`` are the default config; a
   top-level folder holding data files is a config (``<config>/<split>-*.parquet``, and the
   refs/convert/parquet layout ``<config>/[partial-]<split>/0000.parquet``, reached with
   ``@refs/convert/parquet``). A file's split is its name without shard suffixes
   (``train-00000-of-00002.parquet``, ``test.jsonl``, ``dev_0.json.gz`` -> train, test, dev), or
   its folder for numbered shards. "validation"/"valid"/"val"/"dev" and "test"/"eval"/"testing"
   stand for each other when the exact name is absent. When a split has files in several
   formats (parquet and jsonl exports of the same rows), parquet wins, then jsonl, json, csv.

Data files: ``.parquet``, ``.jsonl``, ``.ndjson``, ``.json``, ``.csv``, ``.tsv`` (text ones also
``.gz``). Offline, only the files already in the cache can be listed, and errors say so.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import huggingface_hub
from huggingface_hub import metadata_load
from huggingface_hub.utils import HFValidationError, validate_repo_id

from prefjax import hub_download
from prefjax.data import sources
from prefjax.data.sources import HUB_PREFIX as PREFIX
FORMAT_ORDER = ("parquet", "jsonl", "json", "csv", "tsv")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
             ".csv": "csv", ".tsv": "tsv"}
# JSON files a dataset repo holds that are metadata, not rows.
_METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
_ALIASES = ({"validation", "valid", "val", "dev"}, {"test", "testing", "eval", "evaluation"})
_SHARD_SUFFIX = re.compile(r"(?:[-_.]\d+(?:-of-\d+)?)+$")
README = "README.md"
FORM = "'hf:<owner>/<name>[@revision][:<config>]'"


class HubDatasetError(hub_download.HubError):
    """An hf: source whose files cannot be found; the message names the key and what was found."""


@dataclasses.dataclass(frozen=True)
class DatasetId:
    repo_id: str
    revision: Optional[str]
    config: Optional[str]

    def __str__(self) -> str:
        return (PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")
                + (f":{self.config}" if self.config else ""))


def parse(spec: str, key: str = "data.source") -> DatasetId:
    """``hf:owner/name[@revision][:config]`` -> DatasetId; HubDatasetError naming ``key`` otherwise."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    # The config follows the last ":"; revisions such as refs/convert/parquet hold no ":".
    head, sep, config = body.rpartition(":")
    if not sep:
        head, config = body, ""
    repo_id, at, revision = head.partition("@")
    valid = repo_id.count("/") == 1 and not (at and not revision) and not (sep and not config)
    if valid:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            valid = False
    if not valid or re.search(r"\s", revision + config):
        raise HubDatasetError(f"{key}={spec!r}: not a Hub dataset id; the form is {FORM}")
    return DatasetId(repo_id, revision or None, config or None)


def data_files(spec: str, split: str, *, key: str = "data.source") -> list[str]:
    """Local paths of the data files of ``spec``'s config and ``split`` (a plain split name)."""
    return _resolve(spec, split, key)[1]


def identity(spec: str, split: str, *, key: str = "data.source") -> str:
    """``spec`` and ``split`` (may be sliced) with the revision replaced by the commit the files come
    from (for fingerprints: a branch name moves, a commit does not)."""
    commit, _ = _resolve(spec, sources.parse_split(split)[0], key)
    return f"{dataclasses.replace(parse(spec, key), revision=commit)}|{split}"


_resolved: dict[tuple, tuple[str, list[str]]] = {}


def _resolve(spec: str, split: str, key: str) -> tuple[str, list[str]]:
    """(commit, local paths), remembered per process: later look-ups neither list the Hub again
    nor see a branch that moved meanwhile."""
    memo = (hub_download.cache_dir(), hub_download.offline(), spec, split)
    if memo in _resolved:
        return _resolved[memo]
    dataset = parse(spec, key)
    what = f"{key}={spec!r}"
    snapshot = _snapshot(dataset.repo_id, dataset.revision, [README], what)
    commit = os.path.basename(os.path.dirname(snapshot))
    listing = _listing(dataset.repo_id, commit, snapshot)
    meta = _readme_metadata(snapshot, what)
    try:
        chosen = pick_files(listing, meta, dataset.config, split)
    except HubDatasetError as err:
        where = " (offline: only the files in the Hugging Face cache were looked at)" if hub_download.offline() else ""
        raise HubDatasetError(f"{what}: {err}{where}") from None
    # By commit: the same snapshot the README and the listing came from, even if the branch moved.
    folder = _snapshot(dataset.repo_id, commit, [glob.escape(path) for path in chosen], what)
    _resolved[memo] = (commit, [os.path.join(folder, path) for path in chosen])
    return _resolved[memo]


def _snapshot(repo_id: str, revision: Optional[str], patterns: Sequence[str], what: str) -> str:
    # The snapshot folder's path always ends in snapshots/<commit>, whichever files it holds.
    folder = hub_download.snapshot(repo_id, revision=revision, repo_type="dataset", allow_patterns=patterns,
                                   what=what)
    return os.path.join(folder, "")


def _listing(repo_id: str, commit: str, snapshot: str) -> list[str]:
    """The repository's files at ``commit``: the tree huggingface_hub cached when it fetched the
    README, else the Hub's listing (online), else the files present in the cached snapshot."""
    try:  # huggingface_hub >= 2.x caches the tree listing snapshot_download fetched
        from huggingface_hub import get_cached_repo_tree  # pylint: disable=import-outside-toplevel
        from huggingface_hub.errors import CachedRepoTreeNotFoundError  # pylint: disable=import-outside-toplevel
    except ImportError:
        pass
    else:
        try:
            tree = get_cached_repo_tree(repo_id, repo_type="dataset", revision=commit,
                                        cache_dir=hub_download.cache_dir())
            return sorted(f.path for f in tree)
        except CachedRepoTreeNotFoundError:
            pass
    if not hub_download.offline():
        return sorted(huggingface_hub.HfApi().list_repo_files(repo_id, repo_type="dataset", revision=commit))
    found = []
    for root, _, names in os.walk(snapshot):
        found += [os.path.relpath(os.path.join(root, n), snapshot).replace(os.sep, "/") for n in names]
    return sorted(found)


def _readme_metadata(snapshot: str, what: str) -> Optional[Mapping[str, Any]]:
    path = os.path.join(snapshot, README)
    if not os.path.isfile(path):
        return None
    try:
        return metadata_load(path)
    except Exception as err:  # yaml errors: the card's front matter is the repo's, report it plainly
        raise HubDatasetError(f"{what}: cannot read the configs in its {README} ({err})") from err


# ---------------------------------------------------------------------------------------------
# Choosing files (pure: a listing in, repository paths out)
# ---------------------------------------------------------------------------------------------

def data_format(path: str) -> Optional[str]:
    """The reader for a repository path, or None when it is not a data file."""
    name = path.rsplit("/", 1)[-1]
    if name in _METADATA_FILES or any(part.startswith(".") for part in path.split("/")):
        return None
    base = name[:-3] if name.endswith(".gz") else name
    fmt = _SUFFIXES.get(os.path.splitext(base)[1].lower())
    return None if fmt == "parquet" and name.endswith(".gz") else fmt


def pick_files(listing: Sequence[str], meta: Optional[Mapping[str, Any]], config: Optional[str],
               split: str) -> list[str]:
    """Repository paths of ``config``'s ``split`` (module docstring); HubDatasetError saying what
    configs/splits/files there are when there is no match."""
    configs = (meta or {}).get("configs")
    if configs:
        return _from_readme(listing, configs, config, split)
    return _from_layout(listing, config, split)


def _from_readme(listing: Sequence[str], configs: Any, config: Optional[str], split: str) -> list[str]:
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise HubDatasetError(f"its {README} 'configs:' block is not a list of mappings")
    names = [str(c.get("config_name", "default")) for c in configs]
    if config is None:
        defaults = [i for i, c in enumerate(configs) if c.get("default")]
        index = defaults[0] if defaults else (names.index("default") if "default" in names else
                                              0 if len(configs) == 1 else None)
        if index is None:
            raise HubDatasetError(f"it has several configs {names}: add ':<config>' (and no default is marked)")
    elif config in names:
        index = names.index(config)
    else:
        raise HubDatasetError(f"unknown config {config!r}; its configs: {names}")
    entry = configs[index]
    data_dir = str(entry.get("data_dir", "")).strip("/")
    patterns = _split_patterns(entry.get("data_files"))
    if patterns is None:  # no data_files: the layout rules inside data_dir
        inside = [p[len(data_dir) + 1:] for p in listing if p.startswith(data_dir + "/")] if data_dir else listing
        found = _from_layout(inside, None, split)
        return [f"{data_dir}/{p}" if data_dir else p for p in found]
    chosen_split = _match_split(split, patterns)
    if chosen_split is None:
        raise HubDatasetError(f"unknown split {split!r} of config {names[index]!r}; its splits: {sorted(patterns)}")
    globs = [f"{data_dir}/{g}" if data_dir else g for g in patterns[chosen_split]]
    chosen = [p for p in listing if any(_glob(g).fullmatch(p) for g in globs)]
    data = [p for p in chosen if data_format(p)]
    if not data:
        raise HubDatasetError(f"no parquet/jsonl/json/csv files match {globs} for split {chosen_split!r}"
                              + (f"; found {chosen[:5]}" if chosen else ""))
    return data


def _split_patterns(data_files: Any) -> Optional[dict[str, list[str]]]:
    """A config's data_files as {split: [glob, ...]} (a bare glob or list of globs is "train")."""
    if data_files is None:
        return None
    if isinstance(data_files, str):
        return {"train": [data_files]}
    if isinstance(data_files, list) and all(isinstance(x, str) for x in data_files):
        return {"train": list(data_files)}
    if isinstance(data_files, list) and all(isinstance(x, dict) for x in data_files):
        out: dict[str, list[str]] = {}
        for item in data_files:
            path = item.get("path", [])
            out.setdefault(str(item.get("split", "train")), []).extend([path] if isinstance(path, str) else path)
        return out
    if isinstance(data_files, dict):  # {split: glob or [globs]}, an older spelling
        return {str(s): [p] if isinstance(p, str) else list(p) for s, p in data_files.items()}
    raise HubDatasetError(f"its {README} data_files {data_files!r} is neither a glob, a list of globs nor "
                          "a list of {split, path}")


def _glob(pattern: str) -> re.Pattern:
    """The Hub's data_files globs: ``*`` within one path part, ``**`` across parts."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            out.append(pattern[i:end + 1] if end > 0 else re.escape("["))
            i = end + 1 if end > 0 else i + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _from_layout(listing: Sequence[str], config: Optional[str], split: str) -> list[str]:
    data = [p for p in listing if data_format(p)]
    if not data:
        shown = [p for p in listing if p not in (README, ".gitattributes")][:8]
        raise HubDatasetError("no parquet/jsonl/json/csv data files in the repository"
                              + (f"; found {shown}" if shown else " (it holds no files besides its README)"))
    default = [p for p in data if "/" not in p or p.startswith("data/")]
    folders = sorted({p.split("/", 1)[0] for p in data if "/" in p and not p.startswith("data/")})
    folder = None  # the config's folder, when the config is one
    if config is None and not default:
        if len(folders) > 1:
            raise HubDatasetError(f"it has several configs {folders}: add ':<config>'")
        folder = folders[0]
    elif config is not None and config in folders:
        folder = config
    elif config not in (None, "default") or not default:
        raise HubDatasetError(f"unknown config {config!r}; its configs: {(['default'] if default else []) + folders}")
    files = default if folder is None else [p for p in data if p.startswith(folder + "/")]
    by_split: dict[str, list[str]] = {}
    for path in files:
        by_split.setdefault(_split_of(path, strip=folder), []).append(path)
    chosen_split = _match_split(split, by_split)
    if chosen_split is None:
        raise HubDatasetError(f"unknown split {split!r}; its splits: {sorted(by_split)}")
    chosen = by_split[chosen_split]
    for fmt in FORMAT_ORDER:  # one format per split: the same rows are sometimes exported twice
        if any(data_format(p) == fmt for p in chosen):
            return [p for p in chosen if data_format(p) == fmt]
    return chosen


def _split_of(path: str, strip: Optional[str]) -> str:
    parts = path.split("/")
    if strip and parts[0] == strip:
        parts = parts[1:]
    if parts[0] == "data" and len(parts) > 1:
        parts = parts[1:]
    if len(parts) > 1:  # <split>/0000.parquet (refs/convert/parquet), partial-<split>/...
        folder = parts[-2]
        return folder[len("partial-"):] if folder.startswith("partial-") else folder
    stem = parts[-1]
    stem = stem[:-3] if stem.endswith(".gz") else stem
    stem = os.path.splitext(stem)[0]
    return _SHARD_SUFFIX.sub("", stem) or stem


def _match_split(split: str, available: Iterable[str]) -> Optional[str]:
    available = list(available)
    if split in available:
        return split
    for group in _ALIASES:
        if split in group:
            same = [s for s in available if s in group]
            if len(same) == 1:
                return same[0]
    return None
