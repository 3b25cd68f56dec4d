"""Sweeps: expanding sweep(add) into named runs, errors that point at the add() line, finished-run
detection, the collector's table and plot, and a real two-run sweep that skips finished runs."""

from __future__ import annotations

import importlib.util
import itertools
import json
import shlex
from pathlib import Path

import pytest

from launch import collect, run_status, sweep

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "sweep_tiny_dpo.py"


def _config_module():
    spec = importlib.util.spec_from_file_location("sweep_tiny_dpo_under_test", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sweep_config_expands_to_loss_by_beta_with_keys_that_exist():
    module = _config_module()
    config, runs = sweep.expand(str(CONFIG))
    product = list(itertools.product(module.LOSSES, module.BETAS))
    assert len(product) >= 4  # loss x beta, and small
    assert [r.name for r in runs] == [f"loss_name={l},loss.beta={b}" for l, b in product]
    assert [r.flags() for r in runs] == [[f"--config.loss_name={l}", f"--config.loss.beta={b}"] for l, b in product]
    assert "beta" in config.loss and config.job == "train"  # the swept nested key exists when locked
    assert config.total_steps == module._tiny_dpo().get_config().total_steps  # tiny_dpo's config underneath


def _write(tmp_path, body: str) -> str:
    path = tmp_path / "cfg.py"
    path.write_text('"""A test sweep."""\nimport ml_collections\n\n\ndef get_config():\n'
                    '    return ml_collections.ConfigDict(dict(total_steps=5, lr=0.1, name="a", '
                    'loss=dict(beta=0.1)))\n\n\n' + body)
    return str(path)


def _line_of(path: str, text: str) -> int:
    return next(i for i, line in enumerate(Path(path).read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize("body, needle, message", [
    ("def sweep(add):\n    add(lr=0.2)\n    add(loss__bta=0.3)\n", "loss__bta", r"no key 'loss.bta' \(config.loss has: beta\)"),
    ("def sweep(add):\n    add(name=3)\n", "name=3", r"add\(name=3\).*cannot be casted"),
    ("def sweep(add):\n    add(lr=0.2)\n    add(lr=0.2)\n", "add(lr=0.2)", "repeats the run added at line"),
    ("def sweep(add):\n    add(loss=1.0)\n", "loss=1.0", "'loss' is a group of keys"),
    ("def sweep(add):\n    add(lrr=1.0)\n", "lrr=1.0", "has: loss, lr, name, total_steps"),
])
def test_bad_sweeps_name_the_file_and_the_add_line(tmp_path, body, needle, message):
    path = _write(tmp_path, body)
    with pytest.raises(sweep.SweepError, match=message) as err:
        sweep.expand(path)
    lines = [i for i, line in enumerate(Path(path).read_text().splitlines(), 1) if needle in line]
    assert str(err.value).startswith(f"{path}:{lines[-1]}:")


def test_a_config_without_sweep_or_runs_is_an_error(tmp_path):
    with pytest.raises(sweep.SweepError, match="defines no sweep"):
        sweep.expand(_write(tmp_path, ""))
    with pytest.raises(sweep.SweepError, match="added no runs"):
        sweep.expand(_write(tmp_path, "def sweep(add):\n    pass\n"))
    with pytest.raises(sweep.SweepError, match="no such config file"):
        sweep.expand(str(tmp_path / "nope.py"))


def test_values_names_selection_and_expected_steps(tmp_path):
    path = _write(tmp_path, "def sweep(add):\n    add(lr=0.5, name='x/y z')\n"
                            "    add(total_steps=9, **{'loss.beta': 1})\n")
    config, runs = sweep.expand(path)
    assert [r.name for r in runs] == ["lr=0.5,name=x_y_z", "total_steps=9,loss.beta=1"]
    assert runs[0].flags() == ["--config.lr=0.5", "--config.name=x/y z"]
    assert [r.name for r in sweep.select(runs, ["loss__beta=1"])] == [runs[1].name]
    assert sweep.select(runs, ["lr=0.25"]) == []
    with pytest.raises(sweep.SweepError, match="expected key=value"):
        sweep.select(runs, ["lr"])
    assert sweep.expected_total_steps(config, runs[0], []) == 5
    assert sweep.expected_total_steps(config, runs[0], ["--config.total_steps=7"]) == 7
    assert sweep.expected_total_steps(config, runs[1], ["--config.total_steps=7"]) == 9  # the run's own wins
    assert sweep.format_value(True) == "true" and sweep.format_value((1, 2)) == "(1, 2)"


def test_dry_run_prints_one_prefjax_command_per_run(tmp_path, capsys):
    base = tmp_path / "sweep"
    assert sweep.main([f"--config={CONFIG}", f"--workdir={base}", "--only=loss_name=ipo", "--dry_run", "--",
                       "--config.total_steps=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    betas = _config_module().BETAS
    assert [c[1:] for c in commands] == [
        ["-m", "prefjax.main", f"--config={CONFIG}", "--config.total_steps=2", "--config.loss_name=ipo",
         f"--config.loss.beta={b}", f"--workdir={base}/loss_name=ipo,loss.beta={b}"] for b in betas]
    assert not base.exists()  # a dry run writes nothing


def test_tpu_mode_ships_once_then_runs_each_on_the_pod(capsys):
    assert sweep.main([f"--config={CONFIG}", "--workdir=sweeps/a", "--mode=tpu", "--tpu_name=pod", "--tpu_zone=z",
                       "--tpu_bucket=gs://b", "--dry_run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    n = len(sweep.expand(str(CONFIG))[1])
    assert [c[4] if c[0] == "gcloud" else "pack" for c in commands] == ["pack", "scp"] + ["ssh"] * n
    first = commands[2][7]
    assert "--workdir sweeps/a/loss_name=dpo,loss.beta=0.1" in first and "--total_steps 20" in first
    assert "--config.loss_name=dpo --config.loss.beta=0.1" in first and "--worker=all" in commands[2]


def _fake_run(workdir: Path, steps: list[int], summary: dict | None) -> None:
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps))
    if summary is not None:
        (workdir / "summary.json").write_text(json.dumps(summary))


def test_finished_means_summary_at_the_expected_step_and_not_preempted(tmp_path):
    _fake_run(tmp_path / "done", [1, 2], {"step": 2, "preempted": False, "final/loss": 0.5})
    _fake_run(tmp_path / "preempted", [1], {"step": 1, "preempted": True})
    _fake_run(tmp_path / "partial", [1], None)
    assert run_status.is_finished(tmp_path / "done", 2)
    assert not run_status.is_finished(tmp_path / "done", 3)  # asked for more steps since
    assert not run_status.is_finished(tmp_path / "preempted", 1)
    assert not run_status.is_finished(tmp_path / "partial", 1)
    assert not run_status.is_finished(tmp_path / "absent", 1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{\n oops")
    with pytest.raises(ValueError, match=r"bad/summary.json:2: not valid JSON"):
        run_status.is_finished(tmp_path / "bad", 1)


def test_collector_without_a_manifest_reads_names_and_partial_runs(tmp_path):
    _fake_run(tmp_path / "lr=0.1,opt=adam", [1, 2], {"step": 2, "final/loss": 0.25, "eval/loss": 0.5})
    _fake_run(tmp_path / "lr=0.2,opt=adam", [1, 2, 3], None)
    _fake_run(tmp_path / "lr=0.1,opt=sgd", [1, 2], {"step": 2, "final/loss": 0.75, "preempted": True})
    (tmp_path / "not_a_run").mkdir()
    results = collect.collect(tmp_path)
    by_name = {r.name: r for r in results}
    assert sorted(by_name) == ["lr=0.1,opt=adam", "lr=0.1,opt=sgd", "lr=0.2,opt=adam"]
    partial = by_name["lr=0.2,opt=adam"]
    assert (partial.status, partial.step, partial.metrics["final/loss"]) == ("partial", 3, 1.0 / 3)
    assert by_name["lr=0.1,opt=sgd"].status == "preempted"
    text = collect.table(results).splitlines()
    assert text[0].split() == ["lr", "opt", "status", "step", *collect.DEFAULT_METRICS, "eval/loss"]
    assert text[2].split()[:5] == ["0.1", "adam", "finished", "2", "0.25"]
    assert text[2].split()[-1] == "0.5" and text[3].split()[-1] == "-"
    assert text[4].split()[:5] == ["0.2", "adam", "partial", "3", "0.3333"]
    png = tmp_path / "lr.png"
    collect.plot(results, "lr", "final/loss", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a swept key"):
        collect.plot(results, "beta", "final/loss")
    assert collect.main([str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_a_real_two_run_sweep_names_runs_skips_finished_ones_and_collects(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    base = tmp_path / "sweep"
    argv = [f"--config={CONFIG}", f"--workdir={base}", "--only=loss_name=dpo", "--",
            "--config.total_steps=2", "--config.data.max_len=32", "--config.data.batch_size=4",
            "--config.optimizer.warmup_steps=0", "--config.checkpoint.export_hf=false", "--config.peak_flops=1e12"]
    assert sweep.main(argv) == 0
    first = capsys.readouterr().out
    betas = _config_module().BETAS
    names = [f"loss_name=dpo,loss.beta={b}" for b in betas]
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == sorted(names)
    summaries = {n: json.loads((base / n / "summary.json").read_text()) for n in names}
    for name, summary in summaries.items():
        assert summary["step"] == 2 and not summary["preempted"]
        config = json.loads((base / name / "config.json").read_text())
        assert config["loss"]["beta"] == float(name.rsplit("=", 1)[1]) and config["loss_name"] == "dpo"
    # The collector's table, printed at the end, holds each run's summary values.
    table = first[first.index("loss_name  loss.beta"):].splitlines()
    for row, name in zip(table[2:], names):
        cells = row.split()
        assert cells[:4] == ["dpo", name.rsplit("=", 1)[1], "finished", "2"]
        assert cells[4] == f"{summaries[name]['final/loss']:.4g}"
    assert summaries[names[0]]["final/loss"] != summaries[names[1]]["final/loss"]  # beta changed the run

    mtimes = {n: (base / n / "summary.json").stat().st_mtime_ns for n in names}
    assert sweep.main(argv) == 0  # rerun: everything finished
    second = capsys.readouterr().out
    assert second.count("finished (2 steps), skipped") == len(names)
    assert {n: (base / n / "summary.json").stat().st_mtime_ns for n in names} == mtimes
    assert collect.table(collect.collect(base)) in second


def test_a_sweep_sets_any_hyperparameter_of_each_runs_loss_as_the_command_line_does(tmp_path):
    """loss.* keys follow prefjax.main: any hyperparameter of the run's loss (here simpo's gamma, which
    the file does not list); a name the loss lacks is refused with a did-you-mean."""
    path = tmp_path / "cfg.py"
    path.write_text('"""A test sweep."""\nimport ml_collections\n\n\ndef get_config():\n'
                    '    return ml_collections.ConfigDict(dict(loss_name="dpo", loss=dict(beta=0.1)))\n\n\n'
                    'def sweep(add):\n    add(loss_name="simpo", loss__gamma=0.5)\n')
    _, runs = sweep.expand(str(path))
    assert [r.flags() for r in runs] == [["--config.loss_name=simpo", "--config.loss.gamma=0.5"]]
    path.write_text(path.read_text().replace("loss__gamma", "loss__gama"))
    with pytest.raises(sweep.SweepError, match=r"no key 'loss.gama': loss 'simpo' has no hyperparameter gama \(did you mean gamma\?\); "
                                                 r"its hyperparameters \(paper defaults\): beta=2.0, gamma="):
        sweep.expand(str(path))


def test_a_sweep_refuses_a_loss_hyperparameter_outside_its_domain_naming_the_add_line(tmp_path):
    """The trainer's value check (config_lib.check_loss_hparams) runs when the sweep is expanded, not
    when the run starts: IPO divides by beta."""
    path = tmp_path / "cfg.py"
    path.write_text('"""A test sweep."""\nimport ml_collections\n\n\ndef get_config():\n'
                    '    return ml_collections.ConfigDict(dict(loss_name="dpo", loss=dict(beta=0.1)))\n\n\n'
                    'def sweep(add):\n    add(loss_name="ipo", loss__beta=0.5)\n'
                    '    add(loss_name="ipo", loss__beta=0.0)\n')
    with pytest.raises(sweep.SweepError) as err:
        sweep.expand(str(path))
    assert str(err.value) == (f"{path}:11: loss.beta=0.0: loss 'ipo' needs beta > 0 (it divides by it: the IPO "
                              "target is 1/(2*beta)); set a positive value")
