"""benchmarks/compare_trl_tunix.py: prefjax's part runs at toy size; foreign frameworks never install here."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from compare import table, workload  # noqa: E402


def test_prefjax_row_and_unavailable_row(tmp_path):
    # An empty --venv-root with --no-install: TRL must come back as an "unavailable" row, not a crash.
    out_json = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_trl_tunix.py"), "--frameworks", "prefjax,trl",
         "--sizes", "tiny", "--seq", "32", "--steps", "2", "--pairs", "2", "--no-install",
         "--venv-root", str(tmp_path / "venvs"), "--workdir", str(tmp_path / "work"), "--json", str(out_json)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(ln.startswith("| prefjax | tiny |") and "unavailable" not in ln for ln in lines), result.stdout
    assert any(ln.startswith("| trl | tiny |") and "unavailable: no ready venv" in ln for ln in lines), result.stdout
    assert not (tmp_path / "venvs" / "trl").exists()
    rows = {r["framework"]: r for r in json.loads(out_json.read_text())}
    prefjax = rows["prefjax"]
    # At step 1 the policy is the reference, so every DPO logit is 0 and the loss is -log sigmoid(0).
    assert math.isclose(prefjax["losses"][0], math.log(2.0), rel_tol=1e-6)
    assert len(prefjax["step_times"]) == 2 and prefjax["peak_rss"] > 2**20
    assert prefjax["startup_seconds"] >= prefjax["compile_seconds"] > 0
    # The shared weights folder is a Hugging Face folder that every framework can read.
    folder = pathlib.Path(next(iter((tmp_path / "work").glob("tiny-*"))))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_pairs_share_the_prompt_and_avoid_special_ids():
    prompt, chosen, rejected = workload.make_pairs(3, 9, 50, seed=1)
    assert [len(prompt[0]), len(chosen[0]), len(rejected[0])] == [4, 5, 5]
    assert min(min(x) for x in prompt + chosen + rejected) >= 3
    assert chosen != rejected


def _row(fw, loss, step=0.5):
    return dict(framework=fw, size="tiny", seq=8, pairs=4, params=10, losses=[loss], step_seconds=step,
                peak_rss=2**20, startup_seconds=1.0)


def test_loss_check_flags_a_mismatch_and_ratios_are_to_prefjax():
    rows = [_row("prefjax", 0.6931), _row("trl", 0.69312, step=1.0), _row("tunix", 0.70),
            dict(framework="x", size="tiny", seq=8, pairs=4, params=10, error="no wheel")]
    text, ok = table.loss_check(rows, tol=1e-4, logp_rtol=1e-4)
    assert not ok and "MISMATCH" in text and text.count(" ok") == 1
    speed = table.speed_table(rows)
    trl_line = next(ln for ln in speed.splitlines() if ln.startswith("| trl"))
    assert "| 4 (0.50x) |" in trl_line  # 4 pairs / 1.0 s against prefjax's 4 / 0.5 s
    assert "unavailable: no wheel" in speed


def test_mfu_and_memory_columns_follow_the_row_numbers():
    rows = [dict(_row("prefjax", 0.6931, step=2.0), model_flops=4e9, peak_flops=1e10, required_bytes=2**30,
                 required_text="params 1 + ... = 1,024.0 MiB", xla_peak_bytes=2**29 * 3),
            dict(_row("trl", 0.6931, step=4.0), model_flops=4e9, peak_flops=1e10, required_bytes=2**30,
                 required_text="params 1 + ... = 1,024.0 MiB", peak_rss=2**31)]
    speed = table.speed_table(rows).splitlines()
    assert "MFU (%)" in speed[0]
    assert "| 20.0 |" in speed[2]  # 4 GFLOP / 2 s / 10 GFLOP/s
    assert "| 10.0 (0.50x) |" in speed[3]
    memory = table.memory_table(rows).splitlines()
    assert "| 1,536.0 | 1.50x |" in memory[2]  # XLA peak 1.5 GiB over 1 GiB required
    assert memory[3].endswith("| 2,048 | 2.00x |") and "| - | - |" in memory[3]


def test_bfloat16_cell_with_a_given_interpreter_and_merged_tables(tmp_path):
    # --python runs a framework with an interpreter that is already there (PYTHONPATH kept): here
    # this one, which has no TRL, so TRL's row names the missing module rather than a venv.
    out_json = tmp_path / "rows.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_trl_tunix.py"), "--frameworks", "prefjax,trl",
         "--sizes", "tiny", "--seq", "32", "--steps", "2", "--pairs", "2", "--no-install", "--dtype", "bfloat16",
         "--attention", "blocked", "--python", f"trl={sys.executable}", "--loss-tol", "1e-2",
         "--venv-root", str(tmp_path / "venvs"), "--workdir", str(tmp_path / "work"), "--json", str(out_json)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = {r["framework"]: r for r in json.loads(out_json.read_text())}
    assert "No module named" in rows["trl"]["error"] and not (tmp_path / "venvs" / "trl").exists()
    prefjax = rows["prefjax"]
    assert prefjax["dtype"] == "bfloat16" and "attention blocked" in prefjax["version"]
    assert math.isclose(prefjax["losses"][0], math.log(2.0), abs_tol=1e-2)
    # bf16 activations: the arithmetic counts 2 bytes per saved activation value.
    f32 = workload.model_config("tiny", 32)
    from prefjax.models import memory_budget

    need_f32 = memory_budget.preference_step_memory(f32, 2 * 2 * 32)
    need_bf16 = memory_budget.preference_step_memory(f32.replace(dtype="bfloat16"), 2 * 2 * 32)
    assert need_bf16.activations * 2 == need_f32.activations and prefjax["required_bytes"] == need_bf16.total
    # The table tool prints the same tables from the JSON rows of separate invocations.
    merged = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare" / "table.py"), str(out_json),
                             "--loss-tol", "1e-2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout.count("| prefjax | tiny |") == 3 and "unavailable: ModuleNotFoundError" in merged.stdout


def test_python_option_must_name_a_framework():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_trl_tunix.py"),
                             "--python", "torch=/usr/bin/python3"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown framework ['torch']" in result.stderr


def test_accelerator_memory_replaces_rss_in_the_tables():
    row = dict(_row("prefjax", 0.6931), device_peak_bytes=3 * 2**30, required_bytes=2**30,
               required_text="... = 1,024.0 MiB")
    assert table.derived(row)["peak memory (MiB)"] == 3 * 1024
    assert table.memory_table([row]).splitlines()[2].endswith("| 3,072 | 3.00x |")
