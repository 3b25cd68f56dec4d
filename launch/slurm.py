"""SLURM GPU clusters: an sbatch script that starts prefjax with one process per GPU or per node.

    python -m launch.slurm --nodes=2 --gpus_per_node=8 --per=gpu --workdir=/shared/runs/dpo1 \\
        --partition=gpu --time=12:00:00 -- --config=configs/tiny_dpo.py --config.total_steps=1000

renders launch/slurm_job.sbatch.template into <log_dir>/<job_name>.sbatch (log_dir: the
workdir unless given; the job's output goes there too) and submits it with sbatch
(`--dry_run` prints the script and the sbatch command instead). In the job,
the first node of SLURM_JOB_NODELIST is the jax.distributed coordinator, and each srun
task passes `--config.distributed.{coordinator_address,num_processes,process_id}` from
SLURM_NTASKS and SLURM_PROCID.

- `--per=gpu`: nodes x gpus_per_node processes, each driving one GPU (JAX_LOCAL_DEVICE_IDS
  = SLURM_LOCALID). `--per=node`: one process per node driving all its GPUs.
- The port defaults to jax's own SLURM choice (61440 + job id % 4096), computed in the job.
- `--requeue`: a preempted job goes back to the queue; the rerun resumes from the workdir,
  which must be on a filesystem every node shares.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from launch import main_args as main_args_lib
from launch.shell import Command, Executor

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "slurm_job.sbatch.template"
DEFAULT_PORT = "$((61440 + SLURM_JOB_ID % 4096))"  # what jax's SlurmCluster picks


def render(template: str, values: dict[str, str]) -> str:
    """Fills {{name}} placeholders; a missing or unused value is an error naming it."""
    wanted = set(re.findall(r"\{\{(\w+)\}\}", template))
    if wanted - set(values):
        raise ValueError(f"{TEMPLATE}: no value for {sorted(wanted - set(values))}")
    if set(values) - wanted:
        raise ValueError(f"{TEMPLATE}: has no placeholder for {sorted(set(values) - wanted)}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def sbatch_script(main_args: Sequence[str], *, workdir: str, nodes: int = 1, gpus_per_node: int = 8,
                  per: str = "gpu", job_name: str = "prefjax", time: str = "24:00:00", cpus_per_task: int = 0,
                  partition: str = "", account: str = "", requeue: bool = False, port: int | None = None,
                  venv: str = "", log_dir: str = "", repo: Path = REPO) -> str:
    """The sbatch script for one prefjax run."""
    if per not in ("gpu", "node"):
        raise ValueError(f"--per={per!r}: choose gpu (one process per GPU) or node (one per node)")
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes={nodes} and --gpus_per_node={gpus_per_node} must be >= 1")
    if not workdir:
        raise ValueError("--workdir is required (on a filesystem every node shares)")
    if any(a.startswith("--workdir") for a in main_args):
        raise ValueError("give the workdir as launch.slurm's --workdir, not as a prefjax.main argument")
    tasks_per_node = gpus_per_node if per == "gpu" else 1
    if per == "gpu":
        local_ids = '"$SLURM_LOCALID"'
        layout = f"{nodes} node(s) x {gpus_per_node} processes, one per GPU"
    else:
        local_ids = ",".join(str(i) for i in range(gpus_per_node))
        layout = f"{nodes} node(s) x 1 process driving {gpus_per_node} GPUs"
    extra = [f"#SBATCH --partition={partition}"] if partition else []
    extra += [f"#SBATCH --account={account}"] if account else []
    extra += ["#SBATCH --requeue"] if requeue else []
    cpus = cpus_per_task or (8 if per == "gpu" else 8 * gpus_per_node)
    quote = shlex.quote
    return render(TEMPLATE.read_text(), {
        "layout": layout, "job_name": job_name, "nodes": str(nodes), "tasks_per_node": str(tasks_per_node),
        "gpus_per_node": str(gpus_per_node), "cpus_per_task": str(cpus), "time": time,
        "log_dir": quote(log_dir or workdir), "extra_sbatch": "\n".join(extra), "repo": quote(str(repo)),
        "venv": quote(venv or str(repo / ".venv")), "port": str(port) if port else DEFAULT_PORT, "per": per,
        "local_device_ids": local_ids, "main_args": shlex.join(main_args), "workdir": quote(workdir),
    })


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="python -m launch.slurm [options] -- MAIN_ARGS")
    parser.add_argument("--workdir", required=True, help="the run's workdir, on a shared filesystem")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per GPU or per node")
    parser.add_argument("--job_name", default="prefjax")
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--cpus_per_task", type=int, default=0, help="0: 8 per GPU the task drives")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--requeue", action="store_true", help="requeue when preempted (the run resumes)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: from the job id)")
    parser.add_argument("--venv", default="", help="virtual environment (default: REPO/.venv; made if missing)")
    parser.add_argument("--log_dir", default="", help="where the script and job output go (default: the workdir)")
    parser.add_argument("--dry_run", action="store_true", help="print the script and the sbatch command")
    main_args_lib.add(parser)
    args = parser.parse_args(argv)
    main_args = main_args_lib.parse(parser, args.main_args)
    log_dir = Path(args.log_dir or args.workdir)
    try:
        script = sbatch_script(main_args, workdir=args.workdir, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                               per=args.per, job_name=args.job_name, time=args.time,
                               cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account,
                               requeue=args.requeue, port=args.port, venv=args.venv, log_dir=str(log_dir))
    except ValueError as err:
        parser.error(str(err))
    path = log_dir / f"{args.job_name}.sbatch"
    executor = Executor(dry_run=args.dry_run)
    if args.dry_run:
        executor.note(f"{path}:")
        print(script, end="")
    else:
        log_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
    executor.run(Command(["sbatch", str(path)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
