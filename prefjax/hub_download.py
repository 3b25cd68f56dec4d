"""Hugging Face Hub repositories into huggingface_hub's cache, once per host.

    folder = hub_download.snapshot("owner/name", revision="main", repo_type="model",
                                   allow_patterns=["config.json", "*.safetensors"], what="model.hf_folder='owner/name'")

Everything goes through ``huggingface_hub.snapshot_download``: its cache layout
(``models--owner--name/{refs,snapshots,blobs}``), its token (``HF_TOKEN`` or ``hf auth login``)
and its offline mode. ``HF_HUB_CACHE`` (or ``HF_HOME``) and ``HF_HUB_OFFLINE`` are read when a
download is asked for, not when huggingface_hub was imported, so a process (a notebook, a test)
that sets them later is still honoured.

One download per host: processes that share a cache folder (the processes of a multi-host job
on one host, or unrelated jobs) take a file lock in the cache before downloading. The first one
downloads; a process that waited on the lock while another one refreshed the same revision and
files reads the cache offline instead of asking the Hub again. A file lock rather than a JAX
collective: it needs no ``jax.distributed`` set-up, also serialises unrelated processes, and
the operating system releases it when its holder dies, so a crashed downloader never leaves the
others waiting. While waiting, a line is logged every ``WAIT_LOG_SECONDS``.

Failures become :class:`HubError` (a ValueError) with one line naming ``what`` (the config key
and value) and what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Sequence

import filelock
import huggingface_hub
from huggingface_hub import constants
from huggingface_hub import utils as errors  # the exception classes, here in every version since 0.24
from huggingface_hub.file_download import repo_folder_name

logger = logging.getLogger(__name__)

WAIT_LOG_SECONDS = 30.0
LOCK_FOLDER = ".prefjax_locks"  # inside the cache folder; huggingface_hub's own locks live in ".locks"


try:  # huggingface_hub >= 1.x tells an incomplete cached snapshot apart; older versions return it as is
    from huggingface_hub.errors import IncompleteSnapshotError as _INCOMPLETE
except ImportError:
    class _INCOMPLETE(Exception):  # type: ignore[no-redef]  # never raised
        pass


class HubError(ValueError):
    """A Hub repository that cannot be had; the message names the config key and what to do."""


def _is_true(value: str) -> bool:
    # The spellings huggingface_hub accepts for its boolean environment variables.
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """HF_HUB_OFFLINE as it is now (falling back to huggingface_hub's value read at its import)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return _is_true(value)
    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    """huggingface_hub's cache folder as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    folder = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not folder and os.environ.get("HF_HOME"):
        folder = os.path.join(os.environ["HF_HOME"], "hub")
    return os.path.expanduser(os.path.expandvars(folder or constants.HF_HUB_CACHE))


def snapshot(repo_id: str, *, revision: str | None, repo_type: str, allow_patterns: Sequence[str],
             what: str) -> str:
    """The local snapshot folder of ``repo_id`` at ``revision`` holding the files ``allow_patterns``
    match (fnmatch patterns, as huggingface_hub takes them); downloads what the cache lacks."""
    cache = cache_dir()
    if offline():
        return _download(repo_id, revision, repo_type, allow_patterns, cache, what, local_only=True)
    folder = os.path.join(cache, LOCK_FOLDER)
    os.makedirs(folder, exist_ok=True)
    name = _request_name(repo_id, revision, repo_type, allow_patterns)
    marker = os.path.join(folder, name + ".done")
    asked = time.time()
    with _hold(filelock.FileLock(os.path.join(folder, name + ".lock")), repo_id):
        if _refreshed_since(marker, asked):
            # Another process on this host fetched exactly this while we waited: read its result offline.
            try:
                return _download(repo_id, revision, repo_type, allow_patterns, cache, what, local_only=True)
            except HubError:
                pass  # e.g. the cache was cleaned in between: ask the Hub ourselves
        result = _download(repo_id, revision, repo_type, allow_patterns, cache, what, local_only=False)
        with open(marker, "w", encoding="utf-8") as f:
            json.dump({"time": time.time(), "folder": result}, f)
        return result


def _request_name(repo_id: str, revision: str | None, repo_type: str, allow_patterns: Sequence[str]) -> str:
    # One lock per repository; one freshness marker per (revision, files) asked for, so a
    # tokenizer-only fetch never lets a later weights fetch skip the Hub.
    request = json.dumps([revision, sorted(allow_patterns)])
    return f"{repo_folder_name(repo_id=repo_id, repo_type=repo_type)}.{hashlib.sha256(request.encode()).hexdigest()[:12]}"


def _refreshed_since(marker: str, since: float) -> bool:
    try:
        with open(marker, encoding="utf-8") as f:
            return float(json.load(f)["time"]) >= since
    except (OSError, ValueError, KeyError, TypeError):
        return False


class _hold:  # pylint: disable=invalid-name
    """Acquires ``lock``, logging every WAIT_LOG_SECONDS while another process holds it."""

    def __init__(self, lock: filelock.BaseFileLock, repo_id: str):
        self.lock, self.repo_id = lock, repo_id

    def __enter__(self) -> None:
        waited = 0.0
        while True:
            try:
                self.lock.acquire(timeout=WAIT_LOG_SECONDS)
                return
            except filelock.Timeout:
                waited += WAIT_LOG_SECONDS
                logger.warning("waiting %.0f s for another process on this host to finish downloading %s "
                               "(lock %s)", waited, self.repo_id, self.lock.lock_file)

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _download(repo_id: str, revision: str | None, repo_type: str, allow_patterns: Sequence[str], cache: str,
              what: str, *, local_only: bool) -> str:
    """snapshot_download with its failures turned into one-line HubErrors."""
    kind = "dataset" if repo_type == "dataset" else "model"
    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return huggingface_hub.snapshot_download(
            repo_id, repo_type=repo_type, revision=revision, cache_dir=cache, allow_patterns=list(allow_patterns),
            local_files_only=local_only)
    except errors.GatedRepoError as err:
        raise HubError(f"{what}: the Hub {kind} {repo_id} is gated: accept its terms on "
                       f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo_id} and log in "
                       "(hf auth login, or set HF_TOKEN)") from err
    except errors.RepositoryNotFoundError as err:
        raise HubError(f"{what}: no {kind} {repo_id} on the Hub (or it is private: log in with hf auth login "
                       "or set HF_TOKEN)") from err
    except errors.RevisionNotFoundError as err:
        raise HubError(f"{what}: the Hub {kind} {repo_id} has no revision {revision!r}") from err
    except _INCOMPLETE as err:
        raise HubError(f"{what}: the cached copy of {at} in {cache} is incomplete; download it again with network "
                       "access (unset HF_HUB_OFFLINE)") from err
    except errors.LocalEntryNotFoundError as err:
        if local_only or offline() or isinstance(err.__cause__, errors.OfflineModeIsEnabled):
            raise HubError(f"{what}: {at} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
                           f"download it first (hf download {repo_id}{' --repo-type dataset' if kind == 'dataset' else ''}"
                           f"{f' --revision {revision}' if revision else ''}) or unset HF_HUB_OFFLINE") from err
        raise HubError(f"{what}: the Hub could not be reached and {at} is not in the Hugging Face cache "
                       f"({cache}): check the network connection") from err
    except errors.HfHubHTTPError as err:
        raise HubError(f"{what}: the Hub refused {at}: {str(err).splitlines()[0]}") from err
