"""A tokenizer for a synthetic task, built in code and saved as a Hugging Face folder.

    tokenizer = vocab.build(task, folder)      # writes tokenizer.json + tokenizer_config.json
    tokenizer.encode("12+7=", add_special_tokens=False)

The vocabulary is <pad> (0), <eos> (1), <unk> (2), then the task's symbols: single
characters for character-level tasks (a regex pre-tokenizer isolates each
character; the Fuse decoder joins them back), whole words for word-level ones
(whitespace pre-tokenizer; decoding joins words with spaces). No BOS is added.
There is no chat template: the pipeline's data are plain-text rows, which
prefjax.data renders as prompt + response + EOS, exactly the token layout
supervised fine-tuning and sampling use here. The saved folder loads with
prefjax.models.tokenizer.load_tokenizer, and the SFT checkpoint carries a copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from prefjax.models.tokenizer import Tokenizer, load_tokenizer
from prefjax.quickstart.tasks import Task

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = (PAD, EOS, UNK)


def backend(task: Task) -> tokenizers.Tokenizer:
    """The `tokenizers` object for the task's symbols (see the module docstring)."""
    symbols = task.symbols()
    if len(set(symbols)) != len(symbols):
        raise ValueError(f"task {task.name!r}: its symbols repeat: {symbols}")
    if task.level == "char" and any(len(s) != 1 for s in symbols):
        raise ValueError(f"task {task.name!r} is character-level but has multi-character symbols")
    vocab = {token: i for i, token in enumerate([*SPECIALS, *symbols])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    if task.level == "char":
        tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()
    elif task.level == "word":
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        raise ValueError(f"task {task.name!r}: level must be 'char' or 'word', got {task.level!r}")
    tok.add_special_tokens(list(SPECIALS))
    return tok


def build(task: Task, folder: str | Path) -> Tokenizer:
    """Writes the task's tokenizer.json and tokenizer_config.json to `folder` and loads them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend(task).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD, "eos_token": EOS,
              "unk_token": UNK, "model_max_length": 512, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return load_tokenizer(folder)
