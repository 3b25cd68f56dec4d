"""Where a named builder's files come from: the manual directory if it holds them, else the web.

Every named builder lists its files relative to the dataset's Hugging Face repository. If
``DownloadConfig(manual_dir=...)`` points at a folder with that layout (a plain copy without the
``.gz`` suffix is accepted too), those files are used and nothing is downloaded; tests use this
with small fixture files. Otherwise the files are downloaded from ``base_url``.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import tensorflow_datasets as tfds

INSTRUCTIONS = ("Optional. Without a manual directory the files are downloaded. To use local copies "
                "instead, put them in the manual directory under their repository paths: {paths}")


def _manual_dir(dl_manager: tfds.download.DownloadManager) -> str | None:
    try:
        return os.fspath(dl_manager.manual_dir)
    except AssertionError:  # tfds: no manual dir configured, or it is missing/empty
        return None


def _local_copy(folder: str, relpath: str) -> str | None:
    for candidate in (relpath, relpath[:-3] if relpath.endswith(".gz") else None):
        if candidate and os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def resolve_files(dl_manager: tfds.download.DownloadManager, base_url: str,
                  files: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """{split: [repo-relative paths]} -> {split: [local paths]}: manual copies, else downloads."""
    folder = _manual_dir(dl_manager)
    if folder is not None:
        found = {split: [_local_copy(folder, rel) for rel in rels] for split, rels in files.items()}
        missing = [rel for split, rels in files.items()
                   for rel, path in zip(rels, found[split]) if path is None]
        if missing:
            raise FileNotFoundError(f"manual directory {folder} lacks {missing} (expected repository paths, "
                                    "optionally without .gz)")
        return {split: [str(p) for p in paths] for split, paths in found.items()}
    urls = {split: [f"{base_url}/{rel}" for rel in rels] for split, rels in files.items()}
    downloaded = dl_manager.download(urls)
    return {split: [os.fspath(p) for p in paths] for split, paths in downloaded.items()}
