"""Launchers: exact dry-run commands for TPU pods and SLURM, the TPU bootstrap and the sbatch
script executed against fake cluster tools, the remote start command executed (detached from
the session, one log per run), config files from outside the checkout, launch/README.md's
examples in dry-run mode, and a real two-process run on one machine."""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from launch import bundle, local, slurm, tpu_pod, tpu_worker

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
    assert logs[0][:7] == [*GCLOUD, "ssh", "pod1", "--worker=3"] and logs[0][8:] == WHERE
    # The newest of that workdir's logs (one per run), followed.
    assert logs[0][7].startswith('--command=log="$(ls -t ~/prefjax-logs/runs_a@*.log 2>/dev/null | head -n 1)"')
    assert logs[0][7].endswith('tail -n 100 -f "$log"')


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
    log = re.search(r"~/prefjax-logs/dpo1@\d{8}T\d{6}Z\.log", remote).group(0)
    assert remote.startswith("rm -rf ~/prefjax && mkdir -p ~/prefjax ~/prefjax-logs && "
                             "tar -xzf ~/prefjax.tar.gz -C ~/prefjax && cd ~/prefjax && "
                             f"(set -C; : > {log}) && (setsid nohup bash ")
    boot = shlex.split(remote.split("(setsid nohup ", 1)[1].split(" >> ", 1)[0])
    assert boot == ["bash", "launch/bootstrap_tpu.sh", "--workdir", "dpo1", "--venv", "~/prefjax-venv", "--port",
                    "8476", "--bucket", "gs://bkt/exp", "--mount", "/mnt/prefjax", "--total_steps", "100", "--",
                    *main_args]
    assert remote.endswith(f">> {log} 2>&1 < /dev/null &)")


def test_tpu_relaunch_recreates_then_runs_in_order(capsys):
    commands = _dry_run(capsys, tpu_pod, ["relaunch", *POD, "--accelerator_type=v4-8", "--version=v", "--spot",
                                          "--workdir=/abs/run", "--foreground", "--", "--config=configs/tiny_dpo.py"])
    verbs = [c[4] if c[0] == "gcloud" else "pack" for c in commands]
    assert verbs == ["describe", "delete", "create", "pack", "scp", "ssh"]
    remote = commands[-1][7]
    assert "{ set -o pipefail; bash launch/bootstrap_tpu.sh --workdir /abs/run" in remote
    assert re.search(r"2>&1 \| tee -a ~/prefjax-logs/abs_run@\d{8}T\d{6}Z\.log; }$", remote)


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
    count = bundle.pack(str(out))
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert len(names) == count
    assert {"launch/bootstrap_tpu.sh", "prefjax/main.py", "requirements.txt", "pyproject.toml"} <= names
    assert not any(part in (".git", "__pycache__") for n in names for part in Path(n).parts)


# ------------------------------------------------------ config files, log files, detached runs

def test_a_config_from_outside_the_checkout_is_packed_and_its_argument_rewritten(tmp_path, capsys):
    config = tmp_path / "my experiment.py"
    config.write_text('"""An experiment kept outside the repository."""\n')
    pack, _, ssh = _dry_run(capsys, tpu_pod, ["run", *POD, "--workdir=w", f"--tarball={tmp_path / 'code.tar.gz'}",
                                              "--", f"--config={config}:ipo", "--config.total_steps=3"])
    assert pack[-3:] == ["--add", str(config), "_shipped/my experiment.py"]
    boot = shlex.split(ssh[7].split("(setsid nohup ", 1)[1].split(" >> ", 1)[0])
    assert boot[-3:] == ["--", "--config=_shipped/my experiment.py:ipo", "--config.total_steps=3"]
    # The printed pack command, run, puts the file where the rewritten argument points.
    assert tpu_pod.main(pack[3:]) == 0
    with tarfile.open(tmp_path / "code.tar.gz") as tar:
        assert tar.extractfile("_shipped/my experiment.py").read() == config.read_bytes()
        assert "launch/bootstrap_tpu.sh" in tar.getnames()


def test_ship_config_keeps_checkout_paths_and_packs_the_rest(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    for name in ("tracked.py", "ignored.py"):
        (repo / "configs" / name).write_text("")
    shipped = ["configs/tracked.py"]  # what git lists: ignored.py is not in the bundle
    assert bundle.ship_config(["--config=configs/tracked.py", "--config.x=1"], repo, cwd=repo, shipped=shipped) == (
        ["--config=configs/tracked.py", "--config.x=1"], {})
    # An absolute path into the checkout becomes relative (the workers' checkout is elsewhere),
    # and so does a relative path given from another directory; --config FILE works too.
    assert bundle.ship_config(["--config", str(repo / "configs/tracked.py:dpo")], repo, cwd=tmp_path,
                              shipped=shipped)[0] == ["--config", "configs/tracked.py:dpo"]
    assert bundle.ship_config(["--config=repo/configs/tracked.py"], repo, cwd=tmp_path,
                              shipped=shipped)[0] == ["--config=configs/tracked.py"]
    monkeypatch.chdir(tmp_path)  # a path relative to the repository, typed elsewhere, still works
    assert bundle.ship_config(["--config=configs/tracked.py"], repo, shipped=shipped)[0] == [
        "--config=configs/tracked.py"]
    assert bundle.ship_config(["--config=configs/ignored.py"], repo, cwd=repo, shipped=shipped) == (
        ["--config=_shipped/ignored.py"], {"_shipped/ignored.py": str((repo / "configs/ignored.py").resolve())})
    assert bundle.ship_config(["--config.total_steps=3"], repo, shipped=shipped) == (["--config.total_steps=3"], {})


def test_a_config_that_does_not_exist_is_refused_before_anything_is_copied(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tpu_pod.main(["run", *POD, "--workdir=w", "--", f"--config={tmp_path / 'nope.py'}:ipo"])
    err = capsys.readouterr().err
    assert f"--config={tmp_path / 'nope.py'}:ipo: no such file {tmp_path / 'nope.py'}" in err
    assert "gcloud" not in err


def test_log_files_are_per_run_never_shared():
    pod = tpu_pod.TpuPod("pod1", "z")
    when = datetime.datetime(2026, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)

    def log(workdir, started):
        remote = pod.run(["--config=configs/tiny_dpo.py"], workdir=workdir, tarball="t", started=started)[-1].argv[7]
        return re.search(r"~/prefjax-logs/\S+\.log", remote).group(0)

    assert log("exp/run1", when) == "~/prefjax-logs/exp_run1@20260501T120000Z.log"
    # Same basename in other folders, or the same workdir rerun (a resume) later: other files.
    names = {log("exp/run1", when), log("other/run1", when), log("/abs/exp/run1", when),
             log("exp/run1", when + datetime.timedelta(seconds=1))}
    assert len(names) == 4


def _fake_bundle(home: Path, bootstrap: str) -> None:
    """~/prefjax.tar.gz as `scp` leaves it on a worker, with `bootstrap` as launch/bootstrap_tpu.sh."""
    script = home / "src" / "launch" / "bootstrap_tpu.sh"
    script.parent.mkdir(parents=True)
    script.write_text(bootstrap)
    with tarfile.open(home / "prefjax.tar.gz", "w:gz") as tar:
        tar.add(script, arcname="launch/bootstrap_tpu.sh")


def _remote_start(workdir: str, started: datetime.datetime) -> str:
    """The command `run` hands to ssh, for a detached run."""
    return tpu_pod.TpuPod("pod1", "z").run(["--config=configs/tiny_dpo.py"], workdir=workdir, tarball="t",
                                           started=started)[-1].argv[7].removeprefix("--command=")


def test_a_detached_run_outlives_its_ssh_session(tmp_path):
    # The remote command runs as sshd would run it: a shell in its own session, stdout and
    # stderr on pipes. The session is then hung up and the pipes closed, as a dropped
    # connection does; the run must go on, in another session, writing only to its log.
    home = tmp_path / "home"
    _fake_bundle(home, 'sleep 1; echo "session $(ps -o sid= -p $$)"; echo "args $*"; sleep 1; echo finished\n')
    started = datetime.datetime(2026, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)
    shell = subprocess.Popen(["bash", "-c", _remote_start("exp/run1", started)], env=dict(os.environ, HOME=str(home)),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    assert shell.wait(timeout=30) == 0  # ssh returns at once: the run is in the background
    try:
        os.killpg(shell.pid, signal.SIGHUP)
    except ProcessLookupError:
        pass
    for pipe in (shell.stdin, shell.stdout, shell.stderr):
        pipe.close()
    log = home / "prefjax-logs" / "exp_run1@20260501T120000Z.log"
    deadline = time.monotonic() + 30
    while "finished" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = log.read_text().splitlines()
    assert lines[-1] == "finished", lines
    assert int(lines[0].split()[1]) != shell.pid  # setsid: not the ssh shell's session
    assert lines[1] == "args --workdir exp/run1 --venv " + str(home / "prefjax-venv") + \
        " --port 8476 -- --config=configs/tiny_dpo.py"


def test_a_second_run_with_the_same_log_name_is_refused(tmp_path):
    home = tmp_path / "home"
    _fake_bundle(home, "echo first run\n")
    env = dict(os.environ, HOME=str(home))
    started = datetime.datetime(2026, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)
    first = subprocess.run(["bash", "-c", _remote_start("r", started)], env=env, capture_output=True, text=True,
                           timeout=30, check=False)
    assert first.returncode == 0, first.stderr
    log = home / "prefjax-logs" / "r@20260501T120000Z.log"
    deadline = time.monotonic() + 30
    while not log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    second = subprocess.run(["bash", "-c", _remote_start("r", started)], env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert second.returncode != 0 and "cannot overwrite existing file" in second.stderr
    assert log.read_text() == "first run\n"  # the first run's log is untouched


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


def test_bootstrap_options_take_name_equals_value_too(tmp_path):
    lines, venv = _bootstrap(tmp_path, "--workdir=exp/r", f"--mount={tmp_path / 'm'}", "--port=7777",
                             "--", "--config=c.py", "--workdir=not/an/option")
    data = tmp_path / "home" / "prefjax-data"
    # After --, everything is prefjax.main's (even a --name=value the bootstrap also knows).
    assert shlex.split(lines[-1]) == ["exec", f"{venv}/bin/python", "-m", "prefjax.main", "--config=c.py",
                                      "--workdir=not/an/option", f"--workdir={data}/runs/exp/r",
                                      "--config.distributed.coordinator_address=10.1.0.1:7777",
                                      "--config.distributed.num_processes=2", "--config.distributed.process_id=1"]


@pytest.mark.parametrize("args, message", [
    (["--workdir"], "bootstrap_tpu.sh: option --workdir needs a value"),
    (["--workdir=r", "--bogus=1", "--", "--config=c.py"],
     "bootstrap_tpu.sh: unknown option --bogus (prefjax.main arguments go after --)"),
    (["--", "--config=c.py"], "bootstrap_tpu.sh: --workdir is required"),
])
def test_bootstrap_refuses_bad_options_in_one_line(tmp_path, args, message):
    done = subprocess.run(["bash", str(ROOT / "launch" / "bootstrap_tpu.sh"), *args], capture_output=True, text=True,
                          timeout=30, check=False, env=dict(os.environ, HOME=str(tmp_path)))
    assert done.returncode == 2 and done.stderr == message + "\n"


# --------------------------------------------------------------------------- launch/README.md

LAUNCH_README = (ROOT / "launch" / "README.md").read_text()


def test_the_readme_bootstrap_dry_run_works_as_written(tmp_path):
    example = re.search(r"`(PREFJAX_BOOTSTRAP_DRY_RUN=1 [^`]*bash launch/bootstrap_tpu.sh [^`]*)`",
                        LAUNCH_README).group(1)
    done = subprocess.run(["bash", "-c", example.replace("\n", " ")], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False, env=dict(os.environ, HOME=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    last = shlex.split(done.stdout.splitlines()[-1])
    assert last[:4] == ["exec", f"{tmp_path}/prefjax-venv/bin/python", "-m", "prefjax.main"]
    assert f"--workdir={tmp_path}/prefjax-data/runs/r" in last
    assert "--config.distributed.coordinator_address=10.0.0.1:8476" in last


def _readme_launcher_commands() -> list[list[str]]:
    """Every `python -m launch.X ...` line of launch/README.md's bash blocks, as argv, with $P expanded."""
    commands, variables = [], {}  # a variable set in one block is used in later ones, as in one shell
    for block in re.findall(r"```bash\n(.*?)```", LAUNCH_README, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 1 and re.fullmatch(r"\w+=.*", words[0]):
                name, _, value = words[0].partition("=")
                variables[name] = value
            elif words[:2] == ["python", "-m"] and words[2].startswith("launch.") and "..." not in words:
                expanded = [w for word in words for w in
                            (variables[word[1:]].split() if word.startswith("$") else [word])]
                commands.append(expanded[2:])
    return commands


def test_the_readme_launcher_examples_run_in_dry_run_mode(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README runs the launchers from the repository root
    commands = _readme_launcher_commands()
    ran = set()
    for module_name, *argv in commands:
        if module_name == "launch.collect":  # reads finished runs; it has no dry run
            continue
        position = 1 if module_name == "launch.tpu_pod" else 0  # after tpu_pod's action
        argv.insert(position, "--dry_run")
        module = importlib.import_module(module_name)
        assert module.main(argv) == 0, (module_name, argv)
        printed = capsys.readouterr().out
        assert printed.strip(), (module_name, argv)
        ran.add(module_name if module_name != "launch.tpu_pod" else f"{module_name} {argv[0]}")
    assert {"launch.local", "launch.slurm", "launch.sweep", "launch.tpu_pod create", "launch.tpu_pod run",
            "launch.tpu_pod logs", "launch.tpu_pod status", "launch.tpu_pod delete",
            "launch.tpu_pod relaunch"} <= ran


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


class _TimedText:
    """A text stream that keeps each write with the moment it was made."""

    def __init__(self):
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(t for _, t in self.writes)


# Dies by SIGKILL after saying when (time.monotonic is one clock for every process on Linux).
_VICTIM = ("import os, signal, time; time.sleep(0.5); print('dying at', time.monotonic(), flush=True); "
           "os.kill(os.getpid(), signal.SIGKILL)")
# Ignores SIGTERM, as a trainer busy saving might: only the launcher's SIGKILL stops it.
_SURVIVOR = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"


@pytest.mark.parametrize("victim", [0, 1])
def test_local_sees_whichever_process_dies_first_and_stops_the_rest(victim):
    cmds = [local.Command([sys.executable, "-c", _SURVIVOR]) for _ in range(3)]
    cmds[victim] = local.Command([sys.executable, "-c", _VICTIM])
    out, notices = _TimedText(), _TimedText()
    codes = local.run(cmds, timeout=100, out=out, notices=notices)
    returned = time.monotonic()
    died = float(re.search(rf"\[{victim}\] dying at (\S+)", out.text()).group(1))
    assert codes[victim] == -9
    assert [c for i, c in enumerate(codes) if i != victim] == [-9, -9]  # SIGTERM ignored, then SIGKILL
    # Named once, as soon as it was seen; the others stopped within the 1 s grace.
    assert notices.text() == f"launch.local: process {victim} exited with -9 (SIGKILL); stopping the others\n"
    assert notices.writes[0][0] - died < 1.0
    assert returned - died < 3.0


def test_local_returns_every_code_of_a_clean_run_and_stops_everyone_at_the_timeout():
    quick = [local.Command([sys.executable, "-c", f"import time; time.sleep({t})"]) for t in (0.3, 0, 0.6)]
    notices = _TimedText()
    assert local.run(quick, timeout=30, out=_TimedText(), notices=notices) == [0, 0, 0]
    assert notices.text() == ""
    sleepers = [local.Command([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    start = time.monotonic()
    assert local.run(sleepers, timeout=0.5, out=_TimedText(), notices=notices) == [124, 124]
    assert time.monotonic() - start < 5
    assert notices.text() == "launch.local: still running after 0.5 s (--timeout); stopping every process\n"


def _trainer_commands(workdir: Path, *extra: str) -> list[local.Command]:
    """The two processes launch.local would start for a long tiny run in `workdir`."""
    return local.commands([f"--config={ROOT / 'configs' / 'tiny_dpo.py'}", f"--workdir={workdir}",
                           "--config.total_steps=100000", "--config.data.max_len=32", "--config.data.batch_size=4",
                           "--config.checkpoint.export_hf=false", "--config.peak_flops=1e12", *extra],
                          num_processes=2, devices_per_process=1, port=local.free_port(),
                          inherited_xla_flags=os.environ.get("XLA_FLAGS", ""))


def _pid_of(*words: str) -> int | None:
    """The process whose command line holds every one of `words` (Linux /proc), if any."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone, or not a process
            continue
        if entry.name.isdigit() and all(w in argv for w in words):
            return int(entry.name)
    return None


def test_local_reports_a_dead_trainer_process_and_stops_the_other(tmp_path):
    workdir = tmp_path / "run"
    cmds = _trainer_commands(workdir)
    out, notices, codes = _TimedText(), _TimedText(), []
    launcher = threading.Thread(target=lambda: codes.extend(local.run(cmds, timeout=120, out=out, notices=notices)))
    launcher.start()
    deadline = time.monotonic() + 100
    # Process 1 speaks once jax.distributed has connected it; process 0 is then still setting up.
    while "[1] " not in out.text() and launcher.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = _pid_of(f"--workdir={workdir}", "--config.distributed.process_id=1")
    assert pid is not None, out.text()[-3000:]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    launcher.join(timeout=60)
    assert not launcher.is_alive()
    assert codes[1] == -9 and codes[0] != 0
    assert notices.text() == "launch.local: process 1 exited with -9 (SIGKILL); stopping the others\n"
    assert notices.writes[0][0] - killed < 1.0
    assert time.monotonic() - killed < 5.0


def test_init_distributed_passes_the_heartbeat_timeout_and_refuses_a_bad_one(monkeypatch):
    import jax  # pylint: disable=import-outside-toplevel

    from prefjax import main as prefjax_main  # pylint: disable=import-outside-toplevel
    from prefjax.train import config_lib  # pylint: disable=import-outside-toplevel

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    for var in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    config = config_lib.trainer_config()
    prefjax_main._init_distributed(config)  # one process on one host: no jax.distributed
    assert calls == []
    config.distributed.update(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                              heartbeat_timeout_seconds=7)
    prefjax_main._init_distributed(config)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    config.distributed.coordinator_address = ""
    prefjax_main._init_distributed(config)  # a TPU pod describes itself; the timeout is still ours
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
                      "heartbeat_timeout_seconds": 7}, {"heartbeat_timeout_seconds": 7}]
    for bad in (0, -3):
        config.distributed.heartbeat_timeout_seconds = bad
        with pytest.raises(config_lib.ConfigError) as info:
            prefjax_main._init_distributed(config)
        assert str(info.value) == (f"config.distributed.heartbeat_timeout_seconds={bad}: must be a whole number "
                                   "of seconds >= 1 (how long a process may go silent before the others stop; "
                                   "default 20)")
    assert len(calls) == 2


class _Trainers:
    """Two prefjax processes started directly (no launcher to stop one when the other dies), their
    output gathered line by line."""

    def __init__(self, cmds: list[local.Command]):
        self.procs = [subprocess.Popen(list(c.argv), env=c.environment(), cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT) for c in cmds]
        self.lines: list[list[str]] = [[] for _ in cmds]
        self.readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(len(cmds))]
        for t in self.readers:
            t.start()

    def _read(self, i: int) -> None:
        for raw in iter(self.procs[i].stdout.readline, b""):
            self.lines[i].append(raw.decode(errors="replace"))

    def output(self, i: int) -> str:
        return "".join(self.lines[i])

    def wait_for(self, pattern: str, i: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output(i), re.MULTILINE):
            assert time.monotonic() < deadline and all(p.poll() is None for p in self.procs), \
                f"no {pattern!r} from process {i}: " + "".join(self.output(j)[-2000:] for j in range(2))
            time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for t in self.readers:
            t.join(timeout=5)


@pytest.fixture(scope="module")
def _compile_cache(tmp_path_factory) -> Path:
    """One jax compilation cache for this module's trainer runs: the second compiles nothing."""
    return tmp_path_factory.mktemp("jax_compile_cache")


@pytest.mark.slow
@pytest.mark.parametrize("victim, named", [
    (1, "Task 1 heartbeat timeout"),  # process 0 hosts jax's coordination service: it names the silent task
    (0, "Either the leader task was preempted/died"),  # the others lose the service process 0 ran
])
def test_a_trainer_whose_peer_dies_exits_within_the_heartbeat_timeout_naming_it(tmp_path, monkeypatch,
                                                                                  _compile_cache, victim, named):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(_compile_cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    heartbeat = 5
    trainers = _Trainers(_trainer_commands(tmp_path / "run",
                                           f"--config.distributed.heartbeat_timeout_seconds={heartbeat}"))
    survivor = 1 - victim
    try:
        # Process 0 has its first step compiled: both are past start-up and into the training loop.
        trainers.wait_for(r"^compiled train step", 0, timeout=240)
        trainers.procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = trainers.procs[survivor].wait(timeout=heartbeat + 30)
        took = time.monotonic() - killed
    finally:
        trainers.stop()
    assert code != 0
    assert took < heartbeat + 10, took
    assert named in trainers.output(survivor), trainers.output(survivor)[-3000:]


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
