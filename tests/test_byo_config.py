"""configs/byo_qwen_ultrafeedback_lora.py, the README's bring-your-own example: its test variant
trains and exports on the fixtures, the real one validates (no download) and names the Hub model
and dataset, and the README's computed time per step follows from the config and the FLOP count."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prefjax import train
from prefjax.models.config import get_preset
from prefjax.train import config_lib, metrics
from prefjax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "byo_qwen_ultrafeedback_lora.py"
README = (ROOT / "README.md").read_text()
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (prefjax.train.metrics' datasheet table)
ASSUMED_MFU = 0.4


def _module():
    spec = importlib.util.spec_from_file_location("byo_config_under_test", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_config_names_the_hub_model_and_dataset_and_validates():
    config = _module().get_config()
    assert config.model.hf_folder == "Qwen/Qwen2.5-0.5B-Instruct"
    assert config.data.source == config.data.eval_source == "hf:trl-lib/ultrafeedback_binarized"
    assert (config.data.split, config.data.eval_split) == ("train", "test")
    assert config.lora.enabled and config.reference.kind == "auto" and config.loss_name == "dpo"
    assert config.model.dtype == config.model.param_dtype == "bfloat16"
    config_lib.validate(config, num_devices=1)  # one accelerator; nothing is downloaded
    config_lib.validate(config, num_devices=8)  # the micro-batch of 8 also splits over 8 devices


def test_the_config_refuses_an_unknown_argument():
    with pytest.raises(ValueError, match="takes no argument or 'test', got 'tset'"):
        _module().get_config("tset")


def test_the_test_variant_trains_and_exports(tmp_path):
    config = _module().get_config("test")
    assert Path(config.model.hf_folder).is_dir() and Path(config.data.source).is_file()
    summary = train.run(config, str(tmp_path))
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    # Fresh adapters: the policy equals its reference (the LoRA base), so the first DPO loss is log 2.
    np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-4)
    assert np.isfinite(losses[1]) and losses[1] != losses[0]
    assert summary["step"] == 2 and not summary["preempted"] and summary["exported"]
    assert (tmp_path / "hf_export" / "model.safetensors").is_file()
    assert (tmp_path / "hf_adapters" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "hf_export" / "config.json").read_text())["model_type"] == "qwen2"


def test_the_readme_time_per_step_is_the_flop_count_of_this_config():
    config = _module().get_config()
    # The qwen2.5-0.5b preset is Qwen2.5-0.5B-Instruct's config.json (checked here against the
    # published numbers: 24 layers, hidden 896, MLP 4864, 14 heads, 2 key/value heads, tied embeddings).
    model = get_preset("qwen2.5-0.5b")
    assert (model.num_layers, model.hidden_size, model.intermediate_size, model.num_heads, model.num_kv_heads,
            model.vocab_size, model.tie_embeddings) == (24, 896, 4864, 14, 2, 151_936, True)
    rows = config.data.batch_size * 2  # chosen and rejected
    flops = metrics.preference_step_flops(model, rows * config.data.max_len, config.data.max_len,
                                          reference_forward=True)
    seconds = flops / (ASSUMED_MFU * H100_BF16_PEAK)
    section = README.split("## Bring your own model and data", 1)[1].split("\n## ", 1)[0]
    assert "computed, not measured" in section
    assert f"{flops:.3g} FLOPs" in section, f"{flops:.3g}"
    assert f"{seconds:.2f} s per step" in section, f"{seconds:.2f}"
    # The README's command prints what the README says it prints.
    command = re.search(r"```bash\n(python -c .*?)\n# (.*?)\n```", section, re.DOTALL)
    runnable = shlex.quote(sys.executable) + command.group(1).removeprefix("python")  # this environment's python
    done = subprocess.run(["bash", "-c", runnable], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == command.group(2) == (f"{flops:.3g} FLOPs per step, {seconds:.2f} s per step "
                                                       "at 40% MFU on one H100")
