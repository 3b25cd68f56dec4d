"""Cloud TPU VM pods: create, run prefjax on every worker, status, logs, delete.

    P="--name=my-pod --zone=us-central2-b"
    python -m launch.tpu_pod create $P --accelerator_type=v4-32 --version=tpu-ubuntu2204-base --spot
    python -m launch.tpu_pod run $P --bucket=gs://my-bucket --workdir=dpo-run1 -- \\
        --config=configs/tiny_dpo.py --config.total_steps=1000
    python -m launch.tpu_pod logs $P --follow
    python -m launch.tpu_pod status $P
    python -m launch.tpu_pod relaunch $P --accelerator_type=v4-32 --version=tpu-ubuntu2204-base --spot \\
        --bucket=gs://my-bucket --workdir=dpo-run1 -- --config=configs/tiny_dpo.py --config.total_steps=1000
    python -m launch.tpu_pod delete $P

`run` packs this checkout (the files git tracks or would track, plus a --config file from
outside it: launch/bundle.py), copies it to every worker, and starts launch/bootstrap_tpu.sh
there through `gcloud compute tpus tpu-vm ssh --worker=all`: the bootstrap makes the
environment if missing, mounts the bucket, sets up jax.distributed and runs `python -m
prefjax.main ARGS --workdir=...`. By default the run is detached from the ssh session
(setsid nohup, output to the log file, stdin from /dev/null), so a dropped connection does
not stop it. Each run logs to its own file on each worker,
~/prefjax-logs/<workdir>@<UTC start time>.log, created with noclobber so that two runs never
share one; `--foreground` streams worker output too and waits for the end.

Spot/preemptible pods: the trainer saves a checkpoint on SIGTERM, the VM then goes to the
PREEMPTED state. `relaunch` recreates the pod when it is missing or not READY and runs
the same command again: with the workdir in the bucket, the run resumes from its latest
checkpoint. Every command takes `--dry_run`, which prints the exact commands instead.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

from launch import bundle
from launch import main_args as main_args_lib
from launch.shell import Command, Executor

REMOTE_CODE = "~/prefjax"  # the checkout on each worker (replaced by every `run`)
REMOTE_LOGS = "~/prefjax-logs"
DEFAULT_VENV = "~/prefjax-venv"


def _label(workdir: str) -> str:
    """The workdir as a shell-safe file-name stem: its path with every other character made _.

    "@" is never in it: it separates the label from the start time in a log name.
    """
    return re.sub(r"[^A-Za-z0-9._=-]", "_", workdir.strip("/")).strip("_") or "run"


def log_file(workdir: str, started: datetime.datetime) -> str:
    """A run's log on each worker: ~/prefjax-logs/<workdir label>@<UTC start, to the second>.log."""
    stamp = started.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{REMOTE_LOGS}/{_label(workdir)}@{stamp}.log"


def _newest_log(pattern: str) -> str:
    """Remote shell: the newest log matching `pattern` into $log, or a message and exit 1."""
    return (f'log="$(ls -t {pattern} 2>/dev/null | head -n 1)"; '
            f'[ -n "$log" ] || {{ echo "no log matches {pattern}"; exit 1; }}; ')


class TpuPod:
    """The gcloud commands for one TPU VM (a pod slice: one or more workers)."""

    def __init__(self, name: str, zone: str, project: str = ""):
        if not name or not zone:
            raise ValueError("a TPU VM needs --name and --zone")
        self.name, self.zone, self.project = name, zone, project

    def _gcloud(self, verb: str, *args: str) -> list[str]:
        where = [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *where]

    def create(self, accelerator_type: str, version: str, spot: bool = False,
               preemptible: bool = False) -> Command:
        if not accelerator_type or not version:
            raise ValueError("create needs --accelerator_type (e.g. v4-32) and --version (e.g. tpu-ubuntu2204-base)")
        if spot and preemptible:
            raise ValueError("choose one of --spot and --preemptible")
        flags = [f"--accelerator-type={accelerator_type}", f"--version={version}"]
        flags += ["--spot"] if spot else ["--preemptible"] if preemptible else []
        return Command(self._gcloud("create", self.name, *flags))

    def describe_state(self) -> Command:
        return Command(self._gcloud("describe", self.name, "--format=value(state)"))

    def delete(self) -> Command:
        return Command(self._gcloud("delete", self.name, "--quiet"))

    def ssh(self, remote_command: str, worker: str = "all") -> Command:
        return Command(self._gcloud("ssh", self.name, f"--worker={worker}", f"--command={remote_command}"))

    def scp_to_all(self, local: str, remote: str) -> Command:
        return Command(self._gcloud("scp", local, f"{self.name}:{remote}", "--worker=all"))

    def run(self, main_args: Sequence[str], *, workdir: str, tarball: str, bucket: str = "",
            mount: str = "/mnt/prefjax", venv: str = DEFAULT_VENV, port: int = 8476,
            total_steps: int | None = None, foreground: bool = False,
            started: datetime.datetime | None = None) -> list[Command]:
        """Pack the checkout, copy it to every worker, start the bootstrap on every worker.

        A --config file outside the checkout is packed too (launch/bundle.py). `started`
        (default: now) names the log file.
        """
        if not workdir:
            raise ValueError("run needs --workdir (relative: under the bucket's runs/, or ~/prefjax-data/runs/)")
        if bucket and not bucket.startswith("gs://"):
            raise ValueError(f"--bucket={bucket!r} must start with gs://")
        main_args, extra = bundle.ship_config(main_args)
        boot = ["bash", "launch/bootstrap_tpu.sh", "--workdir", workdir, "--venv", venv, "--port", str(port)]
        boot += ["--bucket", bucket, "--mount", mount] if bucket else []
        boot += ["--total_steps", str(total_steps)] if total_steps is not None else []
        # ~ must stay unquoted for the remote shell to expand it.
        boot_line = " ".join(a if a.startswith("~/") else shlex.quote(a) for a in boot)
        boot_line += " -- " + shlex.join(main_args)
        log = log_file(workdir, started or datetime.datetime.now(datetime.UTC))
        # The log is created first with noclobber: if another run already wrote this name, the
        # ssh command fails ("cannot overwrite existing file") instead of mixing two runs' output.
        claim = f"(set -C; : > {log})"
        if foreground:
            start = f"{{ set -o pipefail; {boot_line} 2>&1 | tee -a {log}; }}"
        else:
            # Detached from the ssh session: its own session (setsid, so no SIGHUP from sshd),
            # nohup, output only to the log and no stdin, in a backgrounded subshell so that
            # ssh returns at once. `logs` reads the file.
            start = f"(setsid nohup {boot_line} >> {log} 2>&1 < /dev/null &)"
        remote = (f"rm -rf {REMOTE_CODE} && mkdir -p {REMOTE_CODE} {REMOTE_LOGS} && "
                  f"tar -xzf ~/prefjax.tar.gz -C {REMOTE_CODE} && cd {REMOTE_CODE} && {claim} && {start}")
        add = [arg for name, local in sorted(extra.items()) for arg in ("--add", local, name)]
        return [Command([sys.executable, "-m", "launch.tpu_pod", "pack", f"--out={tarball}", *add]),
                self.scp_to_all(tarball, "~/prefjax.tar.gz"),
                self.ssh(remote)]

    def status(self) -> Command:
        """The prefjax processes on each worker, and the last line of the newest log."""
        return self.ssh("pgrep -af prefjax.main || echo 'no prefjax.main process'; "
                        f'log="$(ls -t {REMOTE_LOGS}/*.log 2>/dev/null | head -n 1)"; '
                        '[ -z "$log" ] || { echo "$log:"; tail -n 1 "$log"; }')

    def logs(self, worker: str = "0", lines: int = 100, follow: bool = False, workdir: str = "") -> Command:
        """Tail the newest log on a worker: of that workdir's runs, or of any run."""
        pattern = f"{REMOTE_LOGS}/{_label(workdir)}@*.log" if workdir else f"{REMOTE_LOGS}/*.log"
        return self.ssh(_newest_log(pattern) + f'echo "== $log"; tail -n {lines}{" -f" if follow else ""} "$log"',
                        worker=worker)


def _pod_state(pod: TpuPod, executor: Executor) -> str | None:
    """READY, PREEMPTED, ... or None when the pod does not exist (or in a dry run)."""
    out = executor.output(pod.describe_state())
    return out.strip() if out else None


GONE_STATES = ("PREEMPTED", "TERMINATED", "STOPPED")  # a VM in these states is deleted and recreated


def relaunch(pod: TpuPod, executor: Executor, create: Command, run: Sequence[Command]) -> None:
    """Recreate the pod if it is missing or preempted, then run (a workdir in the bucket resumes).

    A pod in a transitional state (CREATING, RESTARTING, ...) is left alone: an error says to retry.
    """
    state = _pod_state(pod, executor)
    if executor.dry_run:
        executor.note(f"if the state above is one of {', '.join(GONE_STATES)} (delete first) or the pod "
                      "does not exist (create only); READY goes straight to the run:")
    elif state not in (None, "READY", *GONE_STATES):
        raise ValueError(f"TPU VM {pod.name} is {state}; wait until it is READY (or delete it) and retry")
    if executor.dry_run or state in GONE_STATES:
        executor.run(pod.delete())
    if executor.dry_run or state != "READY":
        executor.run(create)
    for command in run:
        executor.run(command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    pod = argparse.ArgumentParser(add_help=False)
    pod.add_argument("--name", required=True, help="TPU VM name")
    pod.add_argument("--zone", required=True)
    pod.add_argument("--project", default="", help="default: gcloud's configured project")
    pod.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--accelerator_type", default="", help="e.g. v4-32, v5litepod-16")
    create.add_argument("--version", default="", help="TPU software version, e.g. tpu-ubuntu2204-base")
    create.add_argument("--spot", action="store_true")
    create.add_argument("--preemptible", action="store_true")
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--workdir", required=True,
                     help="absolute, or relative to <bucket mount or ~/prefjax-data>/runs")
    run.add_argument("--bucket", default="", help="gs://BUCKET[/PATH] mounted on every worker (workdirs, data)")
    run.add_argument("--mount", default="/mnt/prefjax")
    run.add_argument("--venv", default=DEFAULT_VENV)
    run.add_argument("--port", type=int, default=8476, help="jax.distributed coordinator port on worker 0")
    run.add_argument("--total_steps", type=int, default=None, help="skip the run if its workdir finished this many")
    run.add_argument("--tarball", default="",
                     help="local path of the packed checkout (default: /tmp/prefjax-NAME.tar.gz)")
    run.add_argument("--foreground", action="store_true", help="stream output and wait, instead of nohup")
    main_args_lib.add(run)
    sub.add_parser("create", parents=[pod, create], help="create the TPU VM")
    sub.add_parser("run", parents=[pod, run], help="run prefjax.main on every worker")
    sub.add_parser("relaunch", parents=[pod, create, run], help="recreate if preempted or missing, then run")
    sub.add_parser("status", parents=[pod], help="state of the VM and of prefjax on each worker")
    logs = sub.add_parser("logs", parents=[pod], help="tail a worker's run log")
    logs.add_argument("--worker", default="0", help="worker index, or all")
    logs.add_argument("--lines", type=int, default=100)
    logs.add_argument("--follow", action="store_true")
    logs.add_argument("--workdir", default="", help="that run's log (default: every log)")
    sub.add_parser("delete", parents=[pod], help="delete the TPU VM")
    packer = sub.add_parser("pack", help="write this checkout to a .tar.gz (used by run)")
    packer.add_argument("--out", required=True)
    packer.add_argument("--add", nargs=2, action="append", default=[], metavar=("LOCAL", "NAME"),
                        help="also pack the file LOCAL as NAME (a config from outside the checkout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.action == "pack":
        extra = {name: local for local, name in args.add}
        print(f"packed {bundle.pack(args.out, extra=extra)} files into {args.out}")
        return 0
    executor = Executor(dry_run=args.dry_run)
    try:
        pod = TpuPod(args.name, args.zone, args.project)
        if args.action in ("run", "relaunch"):
            main_args = main_args_lib.parse(parser, args.main_args)
            if any(a.startswith("--workdir") for a in main_args):
                parser.error("give the workdir as tpu_pod's --workdir (before --), not as a prefjax.main argument")
            run = pod.run(main_args, workdir=args.workdir, tarball=args.tarball or f"/tmp/prefjax-{args.name}.tar.gz",
                          bucket=args.bucket, mount=args.mount, venv=args.venv, port=args.port,
                          total_steps=args.total_steps, foreground=args.foreground)
        if args.action == "create":
            executor.run(pod.create(args.accelerator_type, args.version, args.spot, args.preemptible))
        elif args.action == "run":
            for command in run:
                executor.run(command)
            if not args.foreground and not args.dry_run:
                print(f"started; follow with: python -m launch.tpu_pod logs --name={args.name} "
                      f"--zone={args.zone} --workdir={shlex.quote(args.workdir)} --follow")
        elif args.action == "relaunch":
            relaunch(pod, executor, pod.create(args.accelerator_type, args.version, args.spot, args.preemptible), run)
        elif args.action == "status":
            state = _pod_state(pod, executor)
            if not args.dry_run:
                print(f"{args.name}: {state or 'not found'}")
            if args.dry_run or state == "READY":
                executor.run(pod.status(), check=False)
        elif args.action == "logs":
            executor.run(pod.logs(args.worker, args.lines, args.follow, args.workdir), check=False)
        elif args.action == "delete":
            executor.run(pod.delete())
    except ValueError as err:
        parser.error(str(err))
    except subprocess.CalledProcessError as err:
        print(f"error: command failed with exit status {err.returncode}: {err.cmd}", file=sys.stderr)
        return err.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
