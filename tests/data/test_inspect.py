"""python -m prefjax.data.inspect: counts, histograms, truncation/drop rates, padding waste and
examples rendered with their masks, on a JSONL file of canonical examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prefjax.data import inspect as data_inspect
from prefjax.data.pipeline import DataConfig
from prefjax.data.tokenize import tokenize_example
from prefjax.models.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent.parent
QWEN = ROOT / "tests" / "fixtures" / "hf" / "qwen2"
WORDS = "the small model reads a short sentence and predicts the next word".split()


def _examples():
    pairs = [
        {
            "kind": "pair",
            "format": "chat",
            "prompt": [{"role": "user", "content": " ".join(WORDS[: 1 + i])}],
            "chosen": [{"role": "assistant", "content": " ".join(WORDS[i:])}],
            "rejected": [{"role": "assistant", "content": "no"}],
            "weight": 1.0,
        }
        for i in range(5)
    ]
    unpaired = [
        {
            "kind": "unpaired",
            "format": "text",
            "prompt": [{"role": "user", "content": "Hello world!"}],
            "completion": [{"role": "assistant", "content": " How are you today?"}],
            "label": bool(i),
        }
        for i in range(2)
    ]
    return pairs + unpaired


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in _examples()))
    return path


def test_report_counts_rates_and_masks(jsonl, capsys):
    tok = load_tokenizer(QWEN)
    max_len = 90  # drops pairs 1-3 (91-92 tokens), keeps pairs 0 and 4
    lengths = [
        max(tokenize_example(ex, tok).sequence_length(k) for k in range(2 if ex["kind"] == "pair" else 1))
        for ex in data_inspect.read_jsonl(jsonl)
    ]
    want_dropped = sum(n > max_len for n in lengths)
    assert 0 < want_dropped < 7
    assert (
        data_inspect.main(
            [
                str(jsonl),
                "--tokenizer",
                str(QWEN),
                "--max_len",
                str(max_len),
                "--response_mode",
                "drop",
                "--batch_size",
                "4",
                "--show",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "examples: 7  kinds: {'pair': 5, 'unpaired': 2}  formats: {'chat': 5, 'text': 2}" in out
    assert f"{want_dropped} dropped ({want_dropped / 7:.1%})" in out
    assert "prompt: n=7" in out and "response: n=12" in out  # 5 pairs x 2 + 2 unpaired
    assert out.count("⟦") >= 4  # two examples shown, two responses each
    # the first example's chosen response is scored exactly: its text plus <|im_end|>
    assert "⟦" + " ".join(WORDS) + "<|im_end|>⟧" in out
    assert "⟦no<|im_end|>⟧" in out
    assert "<|im_start|>assistant\n⟦" in out  # the generation prompt is outside the brackets
    assert "waste" in out


def test_padding_waste_matches_a_direct_count(jsonl):
    tok = load_tokenizer(QWEN)
    examples = data_inspect.read_jsonl(jsonl)[:5]  # the pairs
    config = DataConfig.from_mapping({"batch_size": 2, "max_len": 256, "buckets": None})
    report = data_inspect.inspect_examples(examples, tok, config, show=0)
    real = sum(tokenize_example(ex, tok).sequence_length(k) for ex in examples for k in range(2))
    slots = 3 * 2 * 2 * 256  # 3 batches of 2 examples x 2 rows x 256
    assert report.padding["real_tokens"] == real and report.padding["slots"] == slots
    assert report.padding["filler_examples"] == 1
    assert report.padding["padding_waste"] == pytest.approx(1 - real / slots)
    assert len(report.prompt_lengths) == 5 and len(report.sequence_lengths) == 10


def test_packed_report_says_rows_needed(jsonl, capsys):
    data_inspect.main(
        [
            str(jsonl),
            "--tokenizer",
            str(QWEN),
            "--max_len",
            "256",
            "--pack",
            "--row_length",
            "512",
            "--show",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert "packed rows needed per batch: max" in out


def test_render_mask_brackets_scored_runs():
    tok = load_tokenizer(QWEN)
    ids = tok.encode("user: hi\nassistant: Paris is the capital.", add_special_tokens=False)
    mask = np.zeros(len(ids))
    split = len(tok.encode("user: hi\nassistant:", add_special_tokens=False))
    mask[split:] = 1
    text = data_inspect.render_mask(tok, ids, mask)
    assert text == tok.decode(ids[:split]) + "⟦" + tok.decode(ids[split:]) + "⟧"
    assert data_inspect.render_mask(tok, ids, mask, color=True).count("\033[32m") == 1


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_examples()[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        data_inspect.read_jsonl(path)


def test_raw_files_and_missing_specs_go_through_load_source():
    fixtures = Path(__file__).parent.parent / "fixtures" / "data"
    raw = data_inspect.load_examples(str(fixtures / "pairs_text.csv"))
    assert len(raw) > 0 and all(ex["kind"] == "pair" for ex in raw)
    with pytest.raises((FileNotFoundError, ValueError)):
        data_inspect.load_examples("no/such/file.jsonl")


def test_command_line(jsonl):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefjax.data.inspect",
            str(jsonl),
            "--tokenizer",
            str(QWEN),
            "--template",
            "none",
            "--show",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "examples: 7" in result.stdout and "⟦" in result.stdout
