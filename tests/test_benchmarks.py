"""Benchmark scripts still run (at toy size); their numbers are never asserted."""

from __future__ import annotations

import pathlib
import subprocess
import sys

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
