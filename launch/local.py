"""Several prefjax processes on one machine, over fake CPU devices: a multi-host run in miniature.

    python -m launch.local --num_processes=2 --devices_per_process=1 -- \\
        --config=configs/tiny_dpo.py --workdir=/tmp/mp --config.data.batch_size=4

Each process gets `XLA_FLAGS=--xla_force_host_platform_device_count=D` (other XLA flags
are kept), `JAX_PLATFORMS=cpu`, and the flags that make prefjax.main call
`jax.distributed.initialize` with a coordinator on 127.0.0.1. Output lines are prefixed
with the process id. Every process is watched: when any one fails, a line on stderr names it and
its exit code at once ("launch.local: process 1 exited with -9 (SIGKILL); stopping the others")
and the others are stopped. On their own they would last until jax noticed: up to
config.distributed.heartbeat_timeout_seconds mid-run, and jax's 300 s initialisation timeout
for a peer that died before connecting. `--dry_run` prints the commands.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from launch import main_args as main_args_lib
from launch.shell import Command

_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xla_flags(devices_per_process: int, inherited: str = "") -> str:
    """`inherited` XLA flags with the host device count set to `devices_per_process`."""
    kept = _DEVICE_COUNT.sub("", inherited).split()
    return " ".join([f"--xla_force_host_platform_device_count={devices_per_process}", *kept])


def commands(main_args: Sequence[str], *, num_processes: int, devices_per_process: int, port: int,
             python: str = sys.executable, inherited_xla_flags: str = "") -> list[Command]:
    """One `python -m prefjax.main` command per process, with its environment."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes} and devices_per_process={devices_per_process} must be >= 1")
    env = {"XLA_FLAGS": xla_flags(devices_per_process, inherited_xla_flags), "JAX_PLATFORMS": "cpu"}
    return [Command([python, "-m", "prefjax.main", *main_args,
                     f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                     f"--config.distributed.num_processes={num_processes}",
                     f"--config.distributed.process_id={i}"], env=env)
            for i in range(num_processes)]


def dry_run_script(cmds: Sequence[Command]) -> str:
    """The commands as a shell script that starts them together and waits for all."""
    return "".join(f"{c.render()} &\n" for c in cmds) + "wait\n"


def _relay(stream, index: int, out: TextIO, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        with lock:
            out.write(f"[{index}] {raw.decode(errors='replace')}")
            out.flush()


def _describe(code: int) -> str:
    """An exit code as the shell's user reads it: -9 is 'killed by SIGKILL'."""
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM to every live process, SIGKILL to those still alive `grace` seconds later."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(cmds: Sequence[Command], *, timeout: float = 600.0, out: TextIO | None = None,
        notices: TextIO | None = None, poll_seconds: float = 0.1) -> list[int]:
    """Starts every command, relays their output to `out`, returns their exit codes.

    Every process is polled each round, so whichever fails first is seen within `poll_seconds`:
    a line naming it goes to `notices` (stderr) at once, and the rest are stopped (SIGTERM, then
    SIGKILL after 1 s: without the failed process they can neither train nor save, since every
    checkpoint is collective). At the timeout all are stopped, with 10 s to save on SIGTERM.
    Codes of stopped processes are negative signal numbers (124 for the timeout, as `timeout(1)`).
    """
    out = out if out is not None else sys.stdout
    notices = notices if notices is not None else sys.stderr
    lock = threading.Lock()
    procs = [subprocess.Popen(list(c.argv), env=c.environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for c in cmds]
    relays = [threading.Thread(target=_relay, args=(p.stdout, i, out, lock), daemon=True)
              for i, p in enumerate(procs)]
    for t in relays:
        t.start()

    def notice(message: str) -> None:
        with lock:
            notices.write(f"launch.local: {message}\n")
            notices.flush()

    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        codes = [p.poll() for p in procs]  # a list, not any(): every process is polled every round
        failed = [f"process {i} exited with {_describe(code)}"
                  for i, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            notice(", ".join(failed) + ("; stopping the others" if None in codes else ""))
            _stop(procs, grace=1.0)
            break
        if None not in codes:
            break
        if time.monotonic() > deadline:
            timed_out = True
            notice(f"still running after {timeout:g} s (--timeout); stopping every process")
            _stop(procs, grace=10.0)
            break
        time.sleep(poll_seconds)
    for t in relays:
        t.join(timeout=5)
    codes = [p.returncode for p in procs]
    return [124 if timed_out and c < 0 else c for c in codes]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="python -m launch.local [options] -- MAIN_ARGS")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before every process is stopped")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    main_args_lib.add(parser, "arguments of python -m prefjax.main, after --")
    args = parser.parse_args(argv)
    main_args = main_args_lib.parse(parser, args.main_args, "-- --config=configs/tiny_dpo.py --workdir=DIR")
    cmds = commands(main_args, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                    port=args.port or free_port(), inherited_xla_flags=os.environ.get("XLA_FLAGS", ""))
    if args.dry_run:
        print(dry_run_script(cmds), end="")
        return 0
    codes = run(cmds, timeout=args.timeout)  # it names the first failure as it happens
    return max((abs(c) for c in codes), default=0)


if __name__ == "__main__":
    sys.exit(main())
