"""The one workload every framework runs: model sizes, the shared HF weights folder and the batch.

The orchestrator (running in prefjax's environment) initialises a random Llama once per size,
exports it with prefjax.models.hf_checkpoint.save, and draws one batch of preference pairs
(prompt = first half of the sequence, chosen and rejected = second half, no padding so every
framework sees exactly the same tokens). Each runner gets a Job as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

# (hidden, intermediate, layers, heads, kv heads, head dim, vocab): performance.md's sizes, plus large.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, vocab_size=1024),
    "small": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4,
                  head_dim=32, vocab_size=4096),
    "medium": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4,
                   head_dim=64, vocab_size=8192),
    # 125M parameters (GPT-2-small scale, Llama layout): the largest size measured on the 2-core CPU.
    "large": dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4,
                  head_dim=64, vocab_size=32000),
    # 1.1B parameters (TinyLlama's shape: 22 layers, GQA 32/4, untied 32k vocabulary): the GPU table.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
               head_dim=64, vocab_size=32000),
}


@dataclasses.dataclass
class Job:
    """One (size, seq) cell: what every runner needs, nothing framework-specific."""

    size: str
    model_dir: str
    seq: int
    pairs: int
    steps: int
    warmup: int
    lr: float
    beta: float
    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    num_params: int = 0
    pad_id: int = 0
    # "float32", or "bfloat16": bf16 compute over float32 master weights where the framework
    # has that (prefjax's dtype, TRL's autocast); Tunix's bf16 is bf16 parameters.
    dtype: str = "float32"
    attention: str = ""  # prefjax's attention_impl ("" = its default for the backend)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self)), encoding="utf-8")


def model_config(size: str, seq: int) -> Any:
    """prefjax ModelConfig of a named size (a plain Llama with untied embeddings)."""
    from prefjax import models  # imported late: the module's other parts need only numpy

    if size not in SIZES:
        raise ValueError(f"--sizes: unknown size {size!r}; choose from {sorted(SIZES)}")
    # rope_theta 1e6: Tunix 0.1.7's Llama3 attention calls apply_rope without the config's
    # rope_theta and always uses its default 1_000_000; with that value all three frameworks
    # compute the same function (with Llama 2's 10_000 Tunix's log-probs differ by ~1e-3).
    return models.get_preset("llama2-tiny", max_position_embeddings=max(2048, seq), rope_theta=1_000_000.0,
                             **SIZES[size])


def make_model_folder(size: str, seq: int, root: Path, seed: int = 0) -> tuple[Path, int]:
    """Random weights saved once as an HF folder (reused when present); returns (folder, #params)."""
    from prefjax import models
    from prefjax.models import hf_checkpoint

    cfg = model_config(size, seq)
    folder = root / f"{size}-{cfg.max_position_embeddings}-theta{cfg.rope_theta:g}-seed{seed}"
    if not (folder / "config.json").is_file():
        import jax

        # Initialised on the host, so that an accelerator stays free for the runners.
        with jax.default_device(jax.devices("cpu")[0]):
            _, params = models.init_params(cfg, seed=seed)
        hf_checkpoint.save(folder, cfg, params, dtype="float32",
                           extra_config=dict(bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return folder, cfg.num_params


def make_pairs(pairs: int, seq: int, vocab_size: int, seed: int = 0) -> tuple[list, list, list]:
    """Random prompt/chosen/rejected token ids; ids avoid 0..2 (pad/bos/eos) so no framework strips them."""
    if seq < 4:
        raise ValueError(f"--seq {seq}: need at least 4 tokens (prompt and response halves)")
    rng = np.random.default_rng(seed)
    p = seq // 2
    r = seq - p
    draw = lambda n: rng.integers(3, vocab_size, (pairs, n)).tolist()  # noqa: E731
    return draw(p), draw(r), draw(r)


def make_job(size: str, seq: int, pairs: int, steps: int, warmup: int, lr: float, beta: float,
             root: Path, dtype: str = "float32", attention: str = "") -> Job:
    folder, n = make_model_folder(size, seq, root)
    prompt, chosen, rejected = make_pairs(pairs, seq, SIZES[size]["vocab_size"])
    return Job(size=size, model_dir=str(folder), seq=seq, pairs=pairs, steps=steps, warmup=warmup, lr=lr,
               beta=beta, prompt=prompt, chosen=chosen, rejected=rejected, num_params=n, dtype=dtype,
               attention=attention)
