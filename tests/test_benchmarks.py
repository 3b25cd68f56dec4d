"""Benchmark scripts still run (at toy size); their numbers are never asserted."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_loss_step_time_prints_a_row_per_loss():
    from prefjax import losses

    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loss_step_time.py"), "--batch", "8", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=True, cwd=ROOT,
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "loss" not in line]
    assert len(rows) == len(losses.names()), result.stdout


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                            capture_output=True, text=True, timeout=300, check=True, cwd=ROOT)
    return result.stdout


def test_logprobs_memory_prints_a_table():
    out = _run("logprobs_memory.py", "--shapes", "1x16x64,2x12x50", "--dim", "8", "--chunk", "4",
               "--vocab-chunk", "16", "--repeats", "1")
    assert "|" in out


def test_train_step_benchmark_prints_a_row_per_setting():
    out = _run("train_step.py", "--models", "tiny", "--strategies", "frozen", "none", "--accum", "1", "2",
               "--steps", "1", "--batch", "2", "--length", "16")
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 4, out


def test_attention_kernel_benchmark_prints_a_row_per_shape():
    out = _run("attention_kernel.py", "--shapes", "2x70x2x1x16,1x40x2x2x32", "--impls", "fused,flash,blocked,xla",
               "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("| 2x70") or line.startswith("| 1x40")]
    assert len(rows) == 2, out


def test_xla_path_memory_prints_a_row_per_variant():
    out = _run("xla_path_memory.py", "--sizes", "tiny", "--pairs", "2", "--length", "32")
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 4 and "attention_impl=xla" in out, out


@pytest.mark.slow
def test_decode_vs_generate_prints_a_row_per_batch(tmp_path):
    # transformers' side needs torch: skipped here (--hf-python ""), the row says so.
    out = _run("decode_vs_generate.py", "--size", "tiny", "--batch", "2", "--prompt-len", "4", "--new-tokens",
               "3", "--repeats", "1", "--hf-python", "", "--copy-mib", "8", "--matmul-flops", "1e7",
               "--root", str(tmp_path))
    rows = [line for line in out.splitlines() if line.startswith("| 2 ")]
    assert len(rows) == 1 and "unavailable: skipped" in out and "memory traffic per decode step" in out, out


def _trl_python() -> str:
    """An interpreter with trl for the online benchmark's TRL side (PREFJAX_TRL_PYTHON), or ""."""
    import os

    python = os.environ.get("PREFJAX_TRL_PYTHON", "")
    return python if python and pathlib.Path(python).is_file() else ""


@pytest.mark.slow
def test_online_step_benchmark_prints_the_table(tmp_path):
    python = _trl_python()
    trl = ["--trl-rows", "no-gc", "--trl-python", python] if python else ["--trl-rows", "", "--no-agreement"]
    # --prompts 8: the suite runs with 8 fake CPU devices (conftest), and the batch is split over them.
    out = _run("online_step.py", "--size", "tiny", "--prompts", "8", "--prompt-len", "4", "--new-tokens", "3",
               "--steps", "2", "--trl-steps", "2", "--root", str(tmp_path), *trl)
    assert "| prefjax online_dpo (float32) |" in out and "prefjax step breakdown" in out, out
    assert "| 8B bf16" in out, out
    if python:
        assert "| TRL no-gc" in out and "grad norm prefjax" in out, out
