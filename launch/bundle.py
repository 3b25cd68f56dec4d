"""What a remote launch ships: this checkout, plus a config file that lives outside it.

    files = checkout_files()                                  # what git tracks or would track
    main_args, extra = ship_config(["--config=/home/me/exp.py:ipo", "--config.total_steps=9"])
    # main_args == ["--config=_shipped/exp.py:ipo", "--config.total_steps=9"]
    # extra == {"_shipped/exp.py": "/home/me/exp.py"}
    pack("/tmp/code.tar.gz", extra=extra)

The workers run prefjax.main from the unpacked bundle, so a `--config` path must name a
file inside it. A config that is not part of the checkout (outside the repository, or
ignored by git) is packed under `_shipped/` and its argument rewritten to that path; a
config that does not exist here is refused before anything is copied. Only the config
file itself is shipped: modules it imports must be in the checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED_DIR = "_shipped"  # folder in the bundle that holds config files from outside the checkout
_EXCLUDED_PARTS = {".git", "__pycache__", ".venv", ".ci-venv", ".pytest_cache", ".hypothesis", "workdirs"}
_CONFIG_FLAG = re.compile(r"^--?config(=|$)")


class ConfigFileError(ValueError):
    """A --config argument whose file cannot be shipped; the message names it."""


def checkout_files(repo: Path = REPO) -> list[str]:
    """Relative paths to ship: what git tracks or would track (else every file but caches)."""
    try:
        listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], check=True, capture_output=True).stdout
        names = [n for n in listed.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
    # A file deleted but still tracked is listed by git: ship what exists.
    return sorted(n for n in names if (repo / n).is_file() and not _EXCLUDED_PARTS & set(Path(n).parts))


def pack(out: str, repo: Path = REPO, extra: Mapping[str, str] | None = None) -> int:
    """Writes the checkout, and `extra` (name in the bundle -> local file), to a .tar.gz; returns the file count."""
    files = checkout_files(repo)
    extra = dict(extra or {})
    with tarfile.open(out, "w:gz") as tar:
        for name in files:
            tar.add(repo / name, arcname=name, recursive=False)
        for name, local in sorted(extra.items()):
            tar.add(local, arcname=name, recursive=False)
    return len(files) + len(extra)


def _config_position(main_args: Sequence[str]) -> tuple[int, str] | None:
    """(index of the argument holding the --config value, that value), or None without --config."""
    for i, arg in enumerate(main_args):
        match = _CONFIG_FLAG.match(arg)
        if match and match.group(1) == "=":
            return i, arg[match.end():]
        if match and i + 1 < len(main_args):  # --config FILE
            return i + 1, main_args[i + 1]
    return None


def ship_config(main_args: Sequence[str], repo: Path = REPO, cwd: Path | None = None,
                shipped: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(main_args with --config pointing inside the bundle, {name in the bundle: local file} to add).

    A config path is read relative to `cwd` (default: the current directory), as the launcher's
    user typed it; a relative path that exists only under the repository is already in the
    bundle. `shipped` is the checkout's file list (default: checkout_files(repo)).
    """
    args = list(main_args)
    found = _config_position(args)
    if found is None:
        return args, {}
    index, value = found
    path_text, colon, config_arg = value.partition(":")
    cwd = Path.cwd() if cwd is None else cwd
    local = (cwd / path_text).resolve()
    if not local.is_file():
        if not Path(path_text).is_absolute() and (repo / path_text).is_file():
            local = (repo / path_text).resolve()
        else:
            raise ConfigFileError(f"--config={value}: no such file {local} (give a path relative to the current "
                                  "directory, e.g. configs/tiny_dpo.py, or an absolute one)")
    repo = repo.resolve()
    if local.is_relative_to(repo):
        relative = local.relative_to(repo).as_posix()
        if relative in set(checkout_files(repo) if shipped is None else shipped):
            args[index] = _with_value(args[index], value, relative + colon + config_arg)
            return args, {}
    name = f"{SHIPPED_DIR}/{local.name}"
    args[index] = _with_value(args[index], value, name + colon + config_arg)
    return args, {name: os.fspath(local)}


def _with_value(arg: str, old: str, new: str) -> str:
    """`arg` (either "--config=OLD" or the bare value OLD) with the value replaced."""
    return arg[: len(arg) - len(old)] + new if arg.endswith(old) and arg != old else new
