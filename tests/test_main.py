"""`python -m prefjax.main` on user mistakes: each ends in one or two lines on stderr naming the
file/key and what to do, exit status 1, the traceback only with --verbose. They all fail before
anything is compiled (a few seconds each, mostly importing jax). Also: the loss switch end to end."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = "configs/tiny_dpo.py"
QWEN2 = "tests/fixtures/hf/qwen2"
MISSPELLED_FILE = """
from prefjax.train import config_lib

def get_config():
    config = config_lib.trainer_config()
    config.data.max_lenght = 256
    return config
"""


def _main(*args, workdir, timeout=120):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    command = [sys.executable, "-m", "prefjax.main", *args, f"--workdir={workdir}"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args, expected", [
    ((f"--config={TINY}", "--config.data.source=/nonexistent/pairs.jsonl", f"--config.model.hf_folder={QWEN2}"),
     ["error: data.source: /nonexistent/pairs.jsonl: no such file"]),
    (("--config={file}",),
     ["error: {file}: unknown key data.max_lenght (did you mean data.max_len?)",
      "every key, its default and meaning: configs/README.md"]),
    ((f"--config={TINY}", "--config.data.max_lenght=256"),
     ["error: command line: unknown key data.max_lenght (did you mean data.max_len?)",
      "every key, its default and meaning: configs/README.md"]),
    ((f"--config={TINY}", "--config.loss_name=simpp"),
     ["error: --config.loss_name='simpp' is not a registered loss (did you mean simpo?); registered: "]),
    ((f"--config={TINY}", "--config.loss.betta=0.5"),
     ["error: --config.loss: loss 'dpo' has no hyperparameter betta (did you mean beta?); its hyperparameters "
      "(paper defaults): beta=0.1, label_smoothing=0.0"]),
    ((f"--config={TINY}", "--config.mesh.tensor=3"),
     ["error: mesh {'data': -1, 'fsdp': 1, 'tensor': 3} does not fit 2 devices"]),
    ((f"--config={TINY}", "--config.data.max_prompt_len=100"),
     ["error: data.max_prompt_len=100 must be below data.max_len=64 (prompt + one response fit in max_len); "
      "lower it or raise data.max_len"]),
    ((f"--config={TINY}", "--config.grad_accum=3"),
     ["error: data.batch_size=8 must be a multiple of grad_accum=3"]),
    (("--config=configs/no_such.py",), ["error: --config=configs/no_such.py: no such config file"]),
    ((f"--config={TINY}", "--config.loss_name=ipo", "--config.loss.beta=0"),
     ["note: loss_name dpo -> ipo: config.loss = {'beta': 0.0}",
      "error: config.loss.beta=0.0: loss 'ipo' needs beta > 0 (it divides by it: the IPO target is 1/(2*beta)); "
      "set a positive value"]),
], ids=["missing-data-file", "misspelled-file-key", "misspelled-override", "unknown-loss", "bad-loss-hparam",
        "mesh-does-not-fit", "prompt-longer-than-max-len", "batch-does-not-split",
        "missing-config-file", "loss-hparam-outside-its-domain"])
def test_a_user_mistake_is_one_or_two_lines(tmp_path, args, expected):
    config_file = tmp_path / "mine.py"
    config_file.write_text(MISSPELLED_FILE)
    args = [a.replace("{file}", str(config_file)) for a in args]
    result = _main(*args, workdir=tmp_path / "run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == len(expected), result.stderr
    for line, want in zip(lines, expected):
        assert line.startswith(want.replace("{file}", str(config_file))), (line, want)


def test_verbose_adds_the_traceback(tmp_path):
    result = _main(f"--config={TINY}", "--config.grad_accum=3", "--verbose", workdir=tmp_path)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert "ConfigError: data.batch_size=8 must be a multiple of grad_accum=3" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: data.batch_size=8 must be a multiple of grad_accum=3"


@pytest.mark.slow
def test_switching_the_loss_on_the_command_line_trains_the_new_loss_with_its_defaults(tmp_path):
    # ~25 s: one step of llama2-tiny and its export
    config_file = tmp_path / "dpo_frozen.py"
    config_file.write_text("from prefjax.train import config_lib\n\ndef get_config():\n"
                           "    c = config_lib.trainer_config()\n    c.loss.beta = 0.3\n"
                           "    c.reference.kind = 'frozen'\n    c.total_steps = 1\n    return c\n")
    result = _main(f"--config={config_file}", "--config.loss_name=simpo", "--config.loss.gamma=0.5",
                   "--config.data.max_prompt_len=None", workdir=tmp_path / "run", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == ["note: loss_name dpo -> simpo: config.loss = {'beta': 2.0, 'gamma': 0.5, 'label_smoothing': 0.0} "
                     "(simpo's paper defaults and the command line's; the file's {'beta': 0.3} dropped)",
                     "note: reference.kind 'frozen' -> 'auto' for simpo (it reads no reference)"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["loss_name"] == "simpo" and saved["loss"] == {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0}
    assert saved["reference"]["kind"] == "auto" and saved["data"]["max_prompt_len"] is None
    record = json.loads((tmp_path / "run" / "hf_export" / "prefjax_training.json").read_text())
    assert record == {"max_len": 64, "loss_name": "simpo", "base_model": "llama2-tiny"}


@pytest.mark.parametrize("args, expected", [
    (("--config.data.max_len=8",),
     "error: data.source='tests/fixtures/data/pairs_chat.jsonl': no example survives preprocessing: all 3 "
     "examples of one pass over the data were dropped: 3 with prompt + response over max_len=8"),
    (("--config.data.source=tests/fixtures/data/unpaired.jsonl",),
     "error: data.source='tests/fixtures/data/unpaired.jsonl' holds unpaired examples, but loss 'dpo' trains on "
     "pairs"),
], ids=["every-example-dropped", "unpaired-data-for-a-pair-loss"])
def test_data_that_cannot_train_ends_in_one_line(tmp_path, args, expected):
    """Mistakes found when the data is read (after the format note): one error line, no traceback."""
    result = _main(f"--config={TINY}", f"--config.model.hf_folder={QWEN2}",
                   "--config.data.source=tests/fixtures/data/pairs_chat.jsonl", *args, workdir=tmp_path / "run")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr


def test_notes_are_plain_lines(tmp_path):
    """The run's notes (the row format detected) print as plain lines, without absl's prefix, before the
    error that every prompt is over data.max_prompt_len."""
    result = _main(f"--config={TINY}", f"--config.model.hf_folder={QWEN2}",
                   "--config.data.source=tests/fixtures/data/pairs_chat.jsonl", "--config.data.max_len=128",
                   "--config.data.max_prompt_len=2", "--config.data.prompt_mode=drop", workdir=tmp_path / "run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert lines[0] == ("tests/fixtures/data/pairs_chat.jsonl: rows look like trl_pair (prompt + chosen + rejected); "
                        "set data.format to override")
    assert lines[-1].startswith("error: data.source='tests/fixtures/data/pairs_chat.jsonl': no example survives")
    assert "max_prompt_len=2" in lines[-1]


def test_a_quick_start_config_of_ones_own_is_checked_against_configs_quickstart(tmp_path):
    """A file for the quick-start job that starts from configs/quickstart.py and misspells a key."""
    mine = tmp_path / "my_quickstart.py"
    mine.write_text("import importlib.util, pathlib\n\n"
                    "def get_config():\n"
                    f"    spec = importlib.util.spec_from_file_location('qs', {str(ROOT / 'configs' / 'quickstart.py')!r})\n"
                    "    module = importlib.util.module_from_spec(spec)\n    spec.loader.exec_module(module)\n"
                    "    config = module.get_config()\n    config.sft.stepz = 10\n    return config\n")
    result = _main(f"--config={mine}", workdir=tmp_path / "run")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {mine}: unknown key sft.stepz (did you mean sft.steps?)",
        "the keys are those configs/quickstart.py sets"]
