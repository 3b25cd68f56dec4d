"""The online benchmark's workload: a word-level tokenizer, a random Llama with it, and prompts.

Both prefjax and TRL load the same Hugging Face folder (compare/workload.py's "small" size, 5.2M
parameters, with a tokenizer added so that samples can be decoded for the reward function) and
read the same prompts: `prompt_len` random words each, which the word-level tokenizer maps
one-to-one to token ids (no BOS, no chat template, so both frameworks see the same ids).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from compare import workload

# quickstart.vocab puts <pad>, <eos>, <unk> at 0, 1, 2; the words follow, so "w<i>" has id i.
FIRST_WORD = 3


@dataclasses.dataclass(frozen=True)
class _Words:
    """The duck-typed task quickstart.vocab.backend reads: a name, a level and the symbols."""

    vocab_size: int
    name: str = "bench-words"
    level: str = "word"

    def symbols(self) -> list[str]:
        return [f"w{i}" for i in range(FIRST_WORD, self.vocab_size)]


def make_model_folder(size: str, seq: int, root: Path, seed: int = 0) -> tuple[Path, int]:
    """The size's random Llama plus the word tokenizer, saved once as an HF folder; (folder, #params)."""
    from prefjax import models
    from prefjax.models import hf_checkpoint
    from prefjax.quickstart import vocab

    cfg = workload.model_config(size, seq)
    folder = root / f"online-{size}-{cfg.max_position_embeddings}-seed{seed}"
    if not (folder / "config.json").is_file():
        import jax

        vocab.build(_Words(cfg.vocab_size), folder / "tokenizer")
        with jax.default_device(jax.devices("cpu")[0]):
            _, params = models.init_params(cfg, seed=seed)
        hf_checkpoint.save(folder, cfg, params, dtype="float32", copy_from=folder / "tokenizer",
                           extra_config=dict(eos_token_id=1, pad_token_id=0))
    return folder, cfg.num_params


def write_prompts(path: Path, count: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[str]:
    """`count` prompts of `prompt_len` random words as JSONL rows {"prompt": ...}; returns the texts."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_WORD, vocab_size, (count, prompt_len))
    texts = [" ".join(f"w{i}" for i in row) for row in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts), encoding="utf-8")
    return texts
