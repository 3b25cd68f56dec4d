"""A fake Hugging Face cache for offline Hub tests, in huggingface_hub's own layout.

    cache = FakeHubCache(tmp_path / "hub", monkeypatch)       # sets HF_HUB_CACHE, HF_HUB_OFFLINE=1
    sha = cache.add("model", "acme/tiny", {"config.json": path, ...}, refs=("main",))

``<type>s--<owner>--<name>/blobs/<sha256>`` holds each file once, ``snapshots/<commit>/<path>``
links to it (relative symlinks, as huggingface_hub writes them) and ``refs/<ref>`` names the
commit, so ``huggingface_hub.snapshot_download(local_files_only=True)`` finds it like a real
download. No tree listing is written (as in caches from huggingface_hub < 1.x).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import pytest

Content = Union[Path, str, bytes]


class FakeHubCache:
    """See the module docstring."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, offline: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("HF_HUB_CACHE", str(self.root))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")

    def storage(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s--{repo_id.replace('/', '--')}"

    def add(self, repo_type: str, repo_id: str, files: Mapping[str, Content], *, commit: str | None = None,
            refs: Sequence[str] = ("main",)) -> str:
        """Adds a snapshot of ``files`` (repo path -> file to copy, text or bytes); returns its commit."""
        blobs = {path: _bytes(content) for path, content in files.items()}
        commit = commit or hashlib.sha1(repr(sorted(blobs.items())).encode()).hexdigest()
        storage = self.storage(repo_type, repo_id)
        for path, data in blobs.items():
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = storage / "snapshots" / commit / path
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
        for ref in refs:
            ref_file = storage / "refs" / ref
            ref_file.parent.mkdir(parents=True, exist_ok=True)
            ref_file.write_text(commit)
        return commit


def _bytes(content: Content) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, Path):
        return content.read_bytes()
    return content.encode()


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file of a local folder, by name (e.g. a tests/fixtures/hf model)."""
    return {p.name: p for p in Path(folder).iterdir() if p.is_file()}
