"""python -m prefjax.reward.score_file: rows written back unchanged with their rewards (equal to
prefjax.reward.score's), a summary line, and one-line errors with exit code 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from prefjax import reward
from prefjax.models import hf_checkpoint
from prefjax.reward import score_file
from tests.reward import tiny_models

PAIRS = [{"prompt": "hello there", "chosen": " fine thanks", "rejected": " go away", "id": 7},
         {"prompt": "what is the time", "chosen": " noon", "rejected": " a cat", "id": 8, "extra": [1, 2]},
         {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hey"}],
          "rejected": [{"role": "assistant", "content": "no"}], "id": 9}]


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm")
    ck = tiny_models.fixture()
    hf_checkpoint.save_reward_model(folder, ck.cfg, ck.params, tiny_models.head(2), labels=tiny_models.LABELS,
                                    pad_token_id=3, copy_from=tiny_models.FIXTURE)
    return folder


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_get_a_reward_per_label_next_to_the_unchanged_rows(tmp_path, rm_folder, capsys):
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    out = tmp_path / "out" / "scored.jsonl"
    assert score_file.main(["--model", str(rm_folder), "--input", str(data), "--output", str(out),
                            "--batch-size", "3"]) == 0
    rows = _read_jsonl(out)
    assert [{k: v for k, v in r.items() if not k.startswith("reward")} for r in rows] == PAIRS[:2]
    rm = reward.load(str(rm_folder))
    chosen = reward.score(rm, [p["prompt"] for p in PAIRS[:2]], [p["chosen"] for p in PAIRS[:2]])
    rejected = reward.score(rm, [p["prompt"] for p in PAIRS[:2]], [p["rejected"] for p in PAIRS[:2]])
    for i, row in enumerate(rows):
        for l, label in enumerate(tiny_models.LABELS):
            assert row[f"reward_chosen_{label}"] == pytest.approx(chosen[i, l], rel=1e-5, abs=1e-6)
            assert row[f"reward_rejected_{label}"] == pytest.approx(rejected[i, l], rel=1e-5, abs=1e-6)
            assert row[f"reward_margin_{label}"] == pytest.approx(chosen[i, l] - rejected[i, l], rel=1e-5, abs=1e-5)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"{data}: scored 2 pair rows (4 responses)" in line and str(out) in line
    wins = np.mean(chosen[:, 0] > rejected[:, 0])
    assert f"mean reward helpfulness chosen {chosen[:, 0].mean():.4g}" in line and f"{wins:.1%}" in line


def test_implicit_reward_of_completion_rows(tmp_path):
    rows = [{"prompt": "hello there", "completion": " fine thanks", "label": True},
            {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hey"}],
             "label": False}]
    data = _write_jsonl(tmp_path / "completions.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    argv = ["--model", str(tiny_models.FIXTURE), "--reference", str(tiny_models.FIXTURE), "--beta", "0.1",
            "--input", str(data), "--output", str(out)]
    assert score_file.main(argv) == 0
    scored = _read_jsonl(out)
    assert [{k: v for k, v in r.items() if k != "reward"} for r in scored] == rows
    assert [r["reward"] for r in scored] == pytest.approx([0.0, 0.0], abs=1e-6)  # the policy is its own reference


def test_a_row_with_a_missing_field_exits_2_naming_file_line_and_field(tmp_path, rm_folder, capsys):
    bad = [PAIRS[0], {"prompt": "hi", "chosen": " hey", "id": 2}]
    data = _write_jsonl(tmp_path / "bad.jsonl", bad)
    out = tmp_path / "scored.jsonl"
    assert score_file.main(["--model", str(rm_folder), "--input", str(data), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") <= 1 and "Traceback" not in err
    assert f"{data}, line 2: field 'rejected': missing" in err
    assert not out.exists()


def test_a_row_longer_than_the_context_exits_2_naming_the_row(tmp_path, rm_folder, capsys):
    long = {"prompt": "hello " * 40, "chosen": " a", "rejected": " b"}
    data = _write_jsonl(tmp_path / "long.jsonl", [PAIRS[0], long])
    assert score_file.main(["--model", str(rm_folder), "--input", str(data), "--output",
                            str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{data}:2: prompt + chosen is" in err and "longer than the limit of 64" in err and "--max-len" in err


def test_unreadable_or_wrong_model_folders_exit_2(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:1])
    out = str(tmp_path / "o.jsonl")
    assert score_file.main(["--model", str(tmp_path / "nope"), "--input", str(data), "--output", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model='{tmp_path / 'nope'}': no such folder") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert score_file.main(["--model", str(tmp_path / "empty"), "--input", str(data), "--output", out]) == 2
    assert "config.json" in capsys.readouterr().err
    assert score_file.main(["--model", str(tiny_models.FIXTURE), "--input", str(data), "--output", out]) == 2
    err = capsys.readouterr().err
    assert "not a reward model" in err and "implicit" in err


def test_usage_errors_exit_2(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:1])
    with pytest.raises(SystemExit) as exit_:
        score_file.main(["--model", "m", "--reference", "r", "--input", str(data), "--output", "o.jsonl"])
    assert exit_.value.code == 2 and "--reference and --beta go together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        score_file.main(["--model", "m", "--input", str(data), "--output", str(data)])
    assert exit_.value.code == 2 and "--output is the input file" in capsys.readouterr().err


def test_module_runs_from_the_command_line(tmp_path):
    data = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}])
    result = subprocess.run([sys.executable, "-m", "prefjax.reward.score_file", "--model", str(tiny_models.FIXTURE),
                             "--reference", str(tiny_models.FIXTURE), "--beta", "0.1", "--input", str(data),
                             "--output", str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert str(data) in result.stderr
