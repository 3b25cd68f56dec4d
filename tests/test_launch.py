"""Launchers: exact dry-run commands for TPU pods and SLURM, the TPU bootstrap and the sbatch
script executed against fake cluster tools, and a real two-process run on one machine."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from launch import local, slurm, tpu_pod, tpu_worker

ROOT = Path(__file__).resolve().parent.parent
POD = ["--name=pod1", "--zone=us-central2-b", "--project=proj", "--dry_run"]
WHERE = ["--zone=us-central2-b", "--project=proj"]
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]


def _dry_run(capsys, module, argv) -> list[list[str]]:
    """The printed commands (comments dropped), each split back into argv."""
    assert module.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


# --------------------------------------------------------------------------- TPU pods

def test_tpu_create_delete_status_logs_print_the_gcloud_commands(capsys):
    create = _dry_run(capsys, tpu_pod, ["create", *POD, "--accelerator_type=v4-32",
                                         "--version=tpu-ubuntu2204-base", "--spot"])
    assert create == [[*GCLOUD, "create", "pod1", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
                       "--spot", *WHERE]]
    preemptible = _dry_run(capsys, tpu_pod, ["create", *POD, "--accelerator_type=v5litepod-16", "--version=v",
                                              "--preemptible"])
    assert "--preemptible" in preemptible[0] and "--spot" not in preemptible[0]
    assert _dry_run(capsys, tpu_pod, ["delete", *POD]) == [[*GCLOUD, "delete", "pod1", "--quiet", *WHERE]]
    status = _dry_run(capsys, tpu_pod, ["status", *POD])
    assert status[0] == [*GCLOUD, "describe", "pod1", "--format=value(state)", *WHERE]
    assert status[1][:7] == [*GCLOUD, "ssh", "pod1", "--worker=all"] and "pgrep -af prefjax.main" in status[1][7]
    logs = _dry_run(capsys, tpu_pod, ["logs", *POD, "--follow", "--worker=3", "--workdir=runs/a"])
    assert logs == [[*GCLOUD, "ssh", "pod1", "--worker=3", "--command=tail -n 100 -f ~/prefjax-logs/a.log", *WHERE]]


def test_tpu_run_ships_the_checkout_and_starts_the_bootstrap_on_every_worker(capsys):
    main_args = ["--config=configs/tiny_dpo.py", "--config.loss_name=ipo",
                 "--config.data.source=/mnt/x/my data.jsonl"]
    pack, scp, ssh = _dry_run(capsys, tpu_pod, ["run", *POD, "--bucket=gs://bkt/exp", "--workdir=dpo1",
                                                 "--total_steps=100", "--", *main_args])
    assert pack == [sys.executable, "-m", "launch.tpu_pod", "pack", "--out=/tmp/prefjax-pod1.tar.gz"]
    assert scp == [*GCLOUD, "scp", "/tmp/prefjax-pod1.tar.gz", "pod1:~/prefjax.tar.gz", "--worker=all", *WHERE]
    assert ssh[:7] == [*GCLOUD, "ssh", "pod1", "--worker=all"] and ssh[8:] == WHERE
    remote = ssh[7].removeprefix("--command=")
    # The remote shell unpacks, then starts the bootstrap detached, logging per run.
    assert remote.startswith("rm -rf ~/prefjax && mkdir -p ~/prefjax ~/prefjax-logs && "
                             "tar -xzf ~/prefjax.tar.gz -C ~/prefjax && cd ~/prefjax && (setsid nohup bash ")
    boot = shlex.split(remote.split("(setsid nohup ", 1)[1].split(" > ", 1)[0])
    assert boot == ["bash", "launch/bootstrap_tpu.sh", "--workdir", "dpo1", "--venv", "~/prefjax-venv", "--port",
                    "8476", "--bucket", "gs://bkt/exp", "--mount", "/mnt/prefjax", "--total_steps", "100", "--",
                    *main_args]
    assert remote.endswith("> ~/prefjax-logs/dpo1.log 2>&1 < /dev/null &)")


def test_tpu_relaunch_recreates_then_runs_in_order(capsys):
    commands = _dry_run(capsys, tpu_pod, ["relaunch", *POD, "--accelerator_type=v4-8", "--version=v", "--spot",
                                          "--workdir=/abs/run", "--foreground", "--", "--config=configs/tiny_dpo.py"])
    verbs = [c[4] if c[0] == "gcloud" else "pack" for c in commands]
    assert verbs == ["describe", "delete", "create", "pack", "scp", "ssh"]
    remote = commands[-1][7]
    assert "{ set -o pipefail; bash launch/bootstrap_tpu.sh --workdir /abs/run" in remote
    assert remote.endswith("2>&1 | tee ~/prefjax-logs/run.log; }")


FAKE_GCLOUD = """#!/bin/bash
# Fake gcloud: logs each call; describe prints the state in $FAKE_TPU_STATE (none: the VM is missing).
echo "$*" >> "$FAKE_GCLOUD_LOG"
if [[ "$4" == describe ]]; then [[ -n "$FAKE_TPU_STATE" ]] && echo "$FAKE_TPU_STATE" || exit 1; fi
"""


@pytest.mark.parametrize("state, verbs", [
    ("PREEMPTED", ["describe", "delete", "create", "scp", "ssh"]),
    ("", ["describe", "create", "scp", "ssh"]),
    ("READY", ["describe", "scp", "ssh"]),
    ("CREATING", ["describe"]),
])
def test_relaunch_acts_on_the_pod_state(tmp_path, monkeypatch, capsys, state, verbs):
    (tmp_path / "gcloud").write_text(FAKE_GCLOUD)
    (tmp_path / "gcloud").chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
    monkeypatch.setenv("FAKE_TPU_STATE", state)
    monkeypatch.chdir(ROOT)  # the pack step runs `python -m launch.tpu_pod pack`
    argv = ["relaunch", "--name=pod1", "--zone=z", "--accelerator_type=v4-8", "--version=v",
            f"--tarball={tmp_path / 'code.tar.gz'}", "--workdir=r", "--", "--config=configs/tiny_dpo.py"]
    if state == "CREATING":
        with pytest.raises(SystemExit):
            tpu_pod.main(argv)
        assert "pod1 is CREATING; wait until it is READY" in capsys.readouterr().err
    else:
        assert tpu_pod.main(argv) == 0
        assert (tmp_path / "code.tar.gz").stat().st_size > 0
    assert [line.split()[3] for line in log.read_text().splitlines()] == verbs


@pytest.mark.parametrize("argv, message", [
    (["run", *POD, "--workdir=a"], "prefjax.main arguments after --"),
    (["run", *POD, "--workdir=a", "--bucket=bkt", "--", "--config=c.py"], "must start with gs://"),
    (["run", *POD, "--workdir=a", "--", "--config=c.py", "--workdir=b"], "tpu_pod's --workdir"),
    (["create", *POD, "--accelerator_type=v4-8"], "--version"),
    (["create", *POD, "--accelerator_type=v4-8", "--version=v", "--spot", "--preemptible"], "one of --spot"),
])
def test_tpu_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        tpu_pod.main(argv)
    assert message in capsys.readouterr().err


def test_pack_ships_the_checkout_without_caches(tmp_path):
    out = tmp_path / "code.tar.gz"
    count = tpu_pod.pack(str(out))
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert len(names) == count
    assert {"launch/bootstrap_tpu.sh", "prefjax/main.py", "requirements.txt", "pyproject.toml"} <= names
    assert not any(part in (".git", "__pycache__") for n in names for part in Path(n).parts)


@pytest.mark.parametrize("endpoints", ["10.0.0.1,10.0.0.2,10.0.0.3", "w-0:0:10.0.0.1,w-1:1:10.0.0.2,w-2:2:10.0.0.3"])
def test_tpu_worker_flags_from_either_metadata_format(endpoints):
    assert tpu_worker.distributed_flags("2", endpoints, port=1234) == [
        "--config.distributed.coordinator_address=10.0.0.1:1234",
        "--config.distributed.num_processes=3", "--config.distributed.process_id=2"]
    assert tpu_worker.distributed_flags("0", "10.0.0.9") == []  # one host: no jax.distributed
    with pytest.raises(ValueError, match="outside the 3 workers"):
        tpu_worker.distributed_flags("3", endpoints)
    with pytest.raises(ValueError, match="cannot read entry"):
        tpu_worker.distributed_flags("0", "a:b,c")


def _bootstrap(tmp_path, *args, venv_ready=True, worker="1", endpoints="w0:0:10.1.0.1,w1:1:10.1.0.2"):
    """Runs the real bootstrap script in its dry-run mode with a fake home and metadata."""
    venv = tmp_path / "venv"
    if venv_ready:
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").symlink_to(sys.executable)
        wanted = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes())
        (venv / ".prefjax-requirements").write_text(wanted.hexdigest() + "\n")
    env = dict(os.environ, HOME=str(tmp_path / "home"), PREFJAX_BOOTSTRAP_DRY_RUN="1",
               PREFJAX_TPU_WORKER_NUMBER=worker, PREFJAX_TPU_WORKER_ENDPOINTS=endpoints)
    done = subprocess.run(["bash", str(ROOT / "launch" / "bootstrap_tpu.sh"), "--venv", str(venv), *args],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines(), venv


def test_bootstrap_installs_when_missing_then_runs_with_distributed_flags(tmp_path):
    lines, venv = _bootstrap(tmp_path, "--workdir", "exp/run1", "--", "--config=configs/tiny_dpo.py",
                             "--config.loss_name=a b", venv_ready=False)
    commands = [shlex.split(line) for line in lines if not line.startswith("[bootstrap")]
    # python3 -m venv, or uv's Python when the image's python3 is older than 3.11
    assert [c for c in commands if c[-2:] == ["venv", str(venv)] or c[-1:] == [str(venv)]] in (
        [["python3", "-m", "venv", str(venv)]], [["uv", "venv", "--seed", "--python", "3.12", str(venv)]])
    installs = [c for c in commands if c[1:4] == ["-m", "pip", "install"]]
    assert [c[0] for c in installs] == [f"{venv}/bin/python"] * 3
    assert "jax[tpu]>=0.10.2" in installs[1] and installs[2][-3:] == ["--no-deps", "-e", "."]
    data = tmp_path / "home" / "prefjax-data"
    assert commands[-2] == ["mkdir", "-p", f"{data}/data", f"{data}/tfds", f"{data}/jax_cache",
                            f"{data}/runs/exp/run1"]
    assert commands[-1] == ["exec", f"{venv}/bin/python", "-m", "prefjax.main", "--config=configs/tiny_dpo.py",
                            "--config.loss_name=a b", f"--workdir={data}/runs/exp/run1",
                            "--config.distributed.coordinator_address=10.1.0.1:8476",
                            "--config.distributed.num_processes=2", "--config.distributed.process_id=1"]


def test_bootstrap_with_a_ready_venv_mounts_the_bucket_and_skips_finished_runs(tmp_path):
    lines, venv = _bootstrap(tmp_path, "--workdir", "r", "--bucket", "gs://bkt/sub/dir", "--mount",
                             str(tmp_path / "mnt"), "--port", "9999", "--", "--config=c.py", endpoints="10.0.0.1")
    commands = [shlex.split(line) for line in lines if not line.startswith("[bootstrap")]
    assert not any("pip" in c for c in commands)  # the stamp matches: nothing to install
    assert ["gcsfuse", "--implicit-dirs", "--only-dir", "sub/dir", "bkt", str(tmp_path / "mnt")] in commands
    # A single host: no distributed flags.
    assert commands[-1] == ["exec", f"{venv}/bin/python", "-m", "prefjax.main", "--config=c.py",
                            f"--workdir={tmp_path / 'mnt'}/runs/r"]
    finished = tmp_path / "done"
    finished.mkdir()
    (finished / "summary.json").write_text(json.dumps({"step": 7, "preempted": False}))
    lines, _ = _bootstrap(tmp_path / "again", "--workdir", str(finished), "--total_steps", "7", "--", "--config=c.py")
    assert "already finished 7 steps; skipping" in lines[-1]
    lines, _ = _bootstrap(tmp_path / "more", "--workdir", str(finished), "--total_steps", "8", "--", "--config=c.py")
    assert lines[-1].startswith("exec ")


# --------------------------------------------------------------------------- SLURM

def test_slurm_dry_run_prints_the_script_and_sbatch(capsys, tmp_path):
    workdir = tmp_path / "run"
    assert slurm.main(["--dry_run", "--nodes=2", "--gpus_per_node=4", "--partition=gpu", "--requeue",
                       f"--workdir={workdir}", "--", "--config=configs/tiny_dpo.py", "--config.loss_name=ipo"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"# {workdir}/prefjax.sbatch:" and lines[1] == "#!/bin/bash"
    assert lines[-1] == f"sbatch {workdir}/prefjax.sbatch"
    for directive in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--requeue",
                      f"--output={workdir}/%x-%j.out", "--signal=TERM@120"):
        assert f"#SBATCH {directive}\n" in out
    assert 'COORDINATOR_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk \'NR == 1\')"' in out
    assert 'export JAX_COORDINATOR_ADDRESS="${COORDINATOR_HOST}:$((61440 + SLURM_JOB_ID % 4096))"' in out
    assert "srun --kill-on-bad-exit=1 bash -c '" in out
    for flag in ('--config.distributed.coordinator_address="$JAX_COORDINATOR_ADDRESS"',
                 '--config.distributed.num_processes="$SLURM_NTASKS"',
                 '--config.distributed.process_id="$SLURM_PROCID"'):
        assert flag in out
    assert not workdir.exists()  # a dry run writes nothing


FAKE_SRUN = """#!/bin/bash
# Fake srun: runs the command once per task of the allocation, with SLURM's per-task variables.
shift  # --kill-on-bad-exit=1
total=$((SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE))
for ((i = 0; i < total; i++)); do
  SLURM_NTASKS=$total SLURM_PROCID=$i SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) "$@" || exit 1
done
"""
FAKE_SCONTROL = """#!/bin/bash
# Fake scontrol: 'show hostnames LIST' for the list gpu[07-08].
[[ "$1 $2 $3" == "show hostnames gpu[07-08]" ]] && printf 'gpu07\\ngpu08\\n'
"""
FAKE_PYTHON = """#!/usr/bin/env python3
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "ids": os.environ["JAX_LOCAL_DEVICE_IDS"],
                  "coordinator": os.environ["JAX_COORDINATOR_ADDRESS"]}))
"""


@pytest.mark.parametrize("per, tasks_per_node", [("gpu", 2), ("node", 1)])
def test_slurm_script_runs_one_process_per_gpu_or_node_with_its_rank(tmp_path, per, tasks_per_node):
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    for path, text in ((bin_dir / "srun", FAKE_SRUN), (bin_dir / "scontrol", FAKE_SCONTROL),
                       (venv / "bin" / "python", FAKE_PYTHON)):
        path.write_text(text)
        path.chmod(0o755)
    main_args = ["--config=configs/tiny_dpo.py", "--config.data.source=/data/my file.jsonl"]
    script = slurm.sbatch_script(main_args, workdir="/shared/run 1", nodes=2, gpus_per_node=2, per=per,
                                 venv=str(venv), repo=tmp_path)
    (tmp_path / "job.sbatch").write_text(script)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_JOB_ID="5000", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE=str(tasks_per_node),
               SLURM_NTASKS=str(2 * tasks_per_node))  # what sbatch sets for the batch script
    done = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True, text=True, check=False,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    tasks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    total = 2 * tasks_per_node
    port = 61440 + 5000 % 4096
    assert len(tasks) == total
    for rank, task in enumerate(tasks):
        assert task["coordinator"] == f"gpu07:{port}"
        assert task["ids"] == (str(rank % tasks_per_node) if per == "gpu" else "0,1")
        assert task["argv"] == ["-m", "prefjax.main", *main_args, "--workdir=/shared/run 1",
                                f"--config.distributed.coordinator_address=gpu07:{port}",
                                f"--config.distributed.num_processes={total}",
                                f"--config.distributed.process_id={rank}"]


def test_slurm_refuses_bad_layouts():
    with pytest.raises(ValueError, match="--per='gpus'"):
        slurm.sbatch_script(["--config=c.py"], workdir="/w", per="gpus")
    with pytest.raises(ValueError, match="--workdir"):
        slurm.sbatch_script(["--config=c.py", "--workdir=/x"], workdir="/w")
    with pytest.raises(ValueError, match="no value for"):
        slurm.render("{{a}} {{b}}", {"a": "1"})


# --------------------------------------------------------------------------- local

def test_local_commands_and_dry_run(capsys):
    inherited = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    cmds = local.commands(["--config=c.py", "--workdir=/w"], num_processes=3, devices_per_process=2, port=4321,
                          python="py", inherited_xla_flags=inherited)
    for i, c in enumerate(cmds):
        assert dict(c.env) == {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                            "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
        assert list(c.argv) == ["py", "-m", "prefjax.main", "--config=c.py", "--workdir=/w",
                                "--config.distributed.coordinator_address=127.0.0.1:4321",
                                "--config.distributed.num_processes=3", f"--config.distributed.process_id={i}"]
    assert local.main(["--dry_run", "--port=4321", "--", "--config=c.py", "--workdir=/w"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[-1] == "wait"
    assert all(line.startswith("XLA_FLAGS=") and line.endswith(" &") for line in lines[:2])
    assert "--config.distributed.process_id=1 &" in lines[1]


def test_local_stops_the_others_when_one_process_fails(capsys):
    fail = local.Command([sys.executable, "-c", "import sys; print('bye'); sys.exit(3)"])
    hang = local.Command([sys.executable, "-c", "import time; time.sleep(120)"])
    start = time.monotonic()
    codes = local.run([fail, hang], timeout=100)
    assert codes[0] == 3 and codes[1] != 0
    assert time.monotonic() - start < 30
    assert "[0] bye" in capsys.readouterr().out


@pytest.mark.slow
def test_local_launch_of_two_trainer_processes(tmp_path, capsys):
    workdir = tmp_path / "run"
    code = local.main(["--num_processes=2", "--devices_per_process=1", "--timeout=300", "--",
                       f"--config={ROOT / 'configs' / 'tiny_dpo.py'}", f"--workdir={workdir}",
                       "--config.total_steps=3", "--config.data.max_len=32", "--config.data.batch_size=4",
                       "--config.mesh.data=-1", "--config.checkpoint.export_hf=false", "--config.peak_flops=1e12"])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 3 and not summary["preempted"]
    assert "[0] " in out and "[1] " in out  # both processes' output came through
    # Both processes joined one program: the global batch was split across them.
    assert json.loads((workdir / "config.json").read_text())["distributed"]["num_processes"] == 2
