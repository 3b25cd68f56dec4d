"""Commands that a launcher either runs or, in dry-run mode, prints exactly.

Every launcher builds `Command`s and hands them to one `Executor`, so the dry-run output
is, by construction, the list of commands a real launch runs (tests compare it).

    ex = Executor(dry_run=True)
    ex.run(Command(["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", "--zone=z", "--quiet"]))
    # prints: gcloud compute tpus tpu-vm delete pod --zone=z --quiet
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO


@dataclasses.dataclass(frozen=True)
class Command:
    """argv plus the environment variables it adds."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None):
        object.__setattr__(self, "argv", tuple(str(a) for a in argv))
        object.__setattr__(self, "env", tuple((env or {}).items()))

    def render(self) -> str:
        """The command as one line a POSIX shell runs the same way (env assignments first)."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        return f"{prefix} {shlex.join(self.argv)}" if prefix else shlex.join(self.argv)

    def environment(self) -> dict[str, str]:
        """os.environ with this command's additions."""
        return {**os.environ, **dict(self.env)}


class Executor:
    """Runs commands (dry_run=False) or prints them to `out` (dry_run=True)."""

    def __init__(self, dry_run: bool = False, out: TextIO | None = None):
        self.dry_run = dry_run
        self.out = out if out is not None else sys.stdout

    def note(self, text: str) -> None:
        """A comment line: printed as `# text` so dry-run output stays a runnable script."""
        for line in text.splitlines():
            print(f"# {line}", file=self.out, flush=True)

    def run(self, command: Command, check: bool = True) -> int:
        """Prints (dry run) or runs the command; returns its exit status (0 in a dry run)."""
        if self.dry_run:
            print(command.render(), file=self.out, flush=True)
            return 0
        completed = _run(list(command.argv), command, capture=False)
        if check and completed.returncode != 0:
            raise subprocess.CalledProcessError(completed.returncode, command.render())
        return completed.returncode

    def output(self, command: Command) -> str | None:
        """A query's stdout, or None when it fails; a dry run prints the query and returns None."""
        if self.dry_run:
            print(command.render(), file=self.out, flush=True)
            return None
        completed = _run(list(command.argv), command, capture=True)
        return completed.stdout if completed.returncode == 0 else None


def _run(argv: list[str], command: Command, capture: bool) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, env=command.environment(), check=False, capture_output=capture, text=capture)
    except FileNotFoundError:
        raise SystemExit(f"error: {argv[0]} is not installed or not on PATH (needed for: {command.render()})") from None
