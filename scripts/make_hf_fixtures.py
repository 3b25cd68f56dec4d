"""Build tiny random Hugging Face decoder checkpoints (and reward models) with reference outputs.

prefjax's Hugging Face importer and JAX decoder models are tested against these
fixtures: for each family a float32 transformers model with random weights is saved
with ``save_pretrained`` (config.json, safetensors, generation_config.json), next to
a small BPE tokenizer trained here on an embedded corpus (tokenizer.json,
tokenizer_config.json with a family-style chat template) and ``expected.npz`` holding
the PyTorch logits for a fixed, right-padded batch. Nothing is downloaded.

Run from the repository root (needs torch and transformers, which prefjax itself
does not)::

    python scripts/make_hf_fixtures.py --out tests/fixtures/hf

With ``--reward`` it builds reward models instead (transformers'
``*ForSequenceClassification``: the decoder without ``lm_head`` plus ``score.weight``)
and their scores for right-padded, left-padded and unpadded rows::

    python scripts/make_hf_fixtures.py --reward --out tests/fixtures/hf_reward

Each folder's ``fixture.json`` records the family, the library versions, the
feature-ablation sensitivities (how far the logits move when a family feature such
as soft-capping is switched off, showing the fixture actually exercises it) and the
sha256 of every file. Rerunning with the same versions on the same machine
reproduces every file byte for byte: weights come from numpy's seeded generator,
torch runs single-threaded, and the npz archive is written with fixed timestamps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402

# ---------------------------------------------------------------------------
# Tokenizer corpus and chat templates
# ---------------------------------------------------------------------------

# Plain ASCII prose plus the words the chat templates use, so that rendered chats
# and round-trip test strings tokenize without <unk>.
CORPUS = (
    "The small model reads a short sentence and predicts the next word.",
    "A user asks a question and the assistant gives a helpful answer.",
    "Preference tuning compares a chosen response with a rejected response.",
    "The reference policy stays fixed while the trained policy moves.",
    "Hello world! How are you today? I am fine, thank you.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 and 10, 42, 100 appear in text.",
    "You are a helpful assistant. Answer the question in one line.",
    "system user assistant model tool: think, answer, explain, check.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a poem about the sea.\nThe sea is blue and the sky is wide.",
    "Translate this sentence into French: the cat sleeps on the mat.",
    "Long sequences are cut into pieces; short ones are padded on the right.",
    "Keys, queries and values meet in the attention layer of every block.",
    "Rotary position embeddings turn each pair of features by an angle.",
    "A sliding window lets a token see only its most recent neighbours.",
    "Soft-capping squashes large scores with tanh before the softmax.",
    "Tokens [x] (y) {z} <a> 'quoted' \"double\" - + * / = % & # @ _ ~ ^ | \\ `",
    "Good answers are short, correct and kind. Bad answers are long and wrong.",
    "Question: why is the sky blue?\nAnswer: light scatters in the air.",
    "The quick brown fox jumps over the lazy dog.\n\nThe end.",
)

# Family-style chat templates, written for these fixtures (simplified, not copies
# of the released ones): enough to exercise bos_token, add_generation_prompt,
# raise_exception, trim filters, whitespace control and extra template kwargs.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {{- message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}"
    "{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen3 style: no default system prompt; `enable_thinking=False` opens and closes an
# empty think block, as the released template does.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens (in id order, first ids), named roles and the chat template."""

    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    unk: str | None
    chat_template: str
    # True: the tokenizer.json post-processor prepends bos (as Llama/Gemma releases do).
    bos_in_post_processor: bool
    # None: no add_bos_token key in tokenizer_config.json; else that value is written.
    add_bos_token: bool | None = None
    # True: chat template saved as chat_template.jinja (transformers' newer layout).
    jinja_file: bool = False
    vocab_size: int = 200
    # "metaspace": SentencePiece-like BPE (Llama 2, Mistral, Gemma style);
    # "qwen_bytelevel": the byte-level pipeline that transformers' Qwen2Tokenizer rebuilds for
    # model_type qwen2 whatever tokenizer.json says, so the fixture must match it.
    style: str = "metaspace"


LLAMA3_TOKENS = TokenizerSpec(
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<unk>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>", unk="<unk>",
    chat_template=LLAMA3_TEMPLATE, bos_in_post_processor=True)
LLAMA2_TOKENS = TokenizerSpec(
    special_tokens=("<unk>", "<s>", "</s>", "<pad>"),
    bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
    chat_template=LLAMA2_TEMPLATE, bos_in_post_processor=False, add_bos_token=True)
MISTRAL_TOKENS = TokenizerSpec(
    special_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>"),
    bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
    chat_template=MISTRAL_TEMPLATE, bos_in_post_processor=True)
QWEN2_TOKENS = TokenizerSpec(
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
    chat_template=CHATML_TEMPLATE, bos_in_post_processor=False, add_bos_token=False,
    vocab_size=300, style="qwen_bytelevel")
QWEN3_TOKENS = TokenizerSpec(
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
    chat_template=QWEN3_TEMPLATE, bos_in_post_processor=False, jinja_file=True,
    vocab_size=300, style="qwen_bytelevel")

# The split pattern of Qwen2's tokenizer (a GPT-4-like regex), as transformers' Qwen2Tokenizer uses it.
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GEMMA_TOKENS = TokenizerSpec(
    special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
    bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
    chat_template=GEMMA_TEMPLATE, bos_in_post_processor=True, add_bos_token=True)


def build_tokenizer(spec: TokenizerSpec):
    """Train a BPE on CORPUS; special tokens take ids 0..len(specials)-1."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=spec.unk))
    alphabet: list[str] = []
    if spec.style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    elif spec.style == "qwen_bytelevel":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes: no <unk> is ever needed
    else:
        raise ValueError(f"unknown tokenizer style {spec.style!r}")
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=list(spec.special_tokens),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if spec.bos_in_post_processor:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B:1",
            special_tokens=[(spec.bos, bos_id)])
    return tok


def save_tokenizer(spec: TokenizerSpec, folder: Path) -> dict[str, int | None]:
    """Save through transformers (so AutoTokenizer loads it); return the special ids."""
    from transformers import PreTrainedTokenizerFast

    backend = build_tokenizer(spec)
    kwargs: dict[str, Any] = dict(bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad,
                                  unk_token=spec.unk, chat_template=spec.chat_template)
    if spec.add_bos_token is not None:
        kwargs["add_bos_token"] = spec.add_bos_token
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    fast.save_pretrained(str(folder), save_jinja_files=spec.jinja_file)
    # transformers 5 writes its own class name; the classic name loads in 4.x and 5.x alike.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if spec.add_bos_token is not None:
        # transformers 5 folds add_bos_token into tokenizer.json's post-processor and drops the key;
        # released checkpoints carry it, and loaders must honour it over the post-processor.
        config["add_bos_token"] = spec.add_bos_token
    config.pop("model_max_length", None)  # transformers' "unset" sentinel, 1e30: noise for readers
    write_json(config_path, config)
    ids = {role: backend.token_to_id(tok) if tok else None
           for role, tok in (("bos", spec.bos), ("eos", spec.eos), ("pad", spec.pad))}
    ids["tokenizer_vocab"] = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    return ids


# ---------------------------------------------------------------------------
# Model specs
# ---------------------------------------------------------------------------

SMALL = dict(hidden_size=32, head_dim=16, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
# head_dim left to the default hidden / heads = 16
WIDE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@dataclasses.dataclass(frozen=True)
class WeightScales:
    """Random-weight scales: large enough that every family feature moves the logits."""

    qk_gain: float = 1.0          # q_proj/k_proj std = qk_gain / sqrt(fan_in)
    lm_gain: float = 3.0          # untied lm_head std = lm_gain / sqrt(fan_in)
    embed_std: float = 1.0
    norm_std: float = 0.2         # spread of norm weights around their neutral value
    bias_std: float = 0.5
    final_norm_offset: float = 0.0  # added to the final norm weight (drives gemma2's logit soft-cap)


@dataclasses.dataclass(frozen=True)
class FixtureSpec:
    name: str
    model_type: str
    config: dict[str, Any]
    tokens: TokenizerSpec
    seed: int
    # Embedding rows; >= the tokenizer's ids (Qwen-style checkpoints pad it beyond them).
    model_vocab: int = 256
    scales: WeightScales = WeightScales()
    zero_centered_norms: bool = False  # Gemma RMSNorm multiplies by (1 + w)
    max_shard_size: str | None = None
    # (feature name, config override, state-dict edit) for the sensitivity check
    ablations: tuple[tuple[str, dict[str, Any], str | None], ...] = ()
    # Reward models (*ForSequenceClassification): number of outputs (0: a causal LM) and their
    # names (empty: transformers' default LABEL_i, as a reward model trained there has).
    num_labels: int = 0
    labels: tuple[str, ...] = ()


def _llama3_rope() -> dict[str, Any]:
    # original_max_position_embeddings 8 puts the low/high-frequency cut-offs (wavelengths 8 and 2)
    # inside a 12-token test sequence, so the scaling changes the logits.
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def fixture_specs() -> list[FixtureSpec]:
    """All fixtures, in build order."""
    llama = FixtureSpec(
        name="llama", model_type="llama", seed=1, tokens=LLAMA3_TOKENS,
        config=dict(SMALL, num_hidden_layers=2, rms_norm_eps=1e-5, hidden_act="silu",
                    rope_parameters=_llama3_rope(), attention_bias=False, mlp_bias=False,
                    tie_word_embeddings=False, max_position_embeddings=64),
        ablations=(("llama3_rope_scaling",
                    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, None),))
    return [
        llama,
        dataclasses.replace(llama, name="llama_sharded", max_shard_size="40KB", ablations=()),
        FixtureSpec(
            name="llama2", model_type="llama", seed=2, tokens=LLAMA2_TOKENS,
            config=dict(WIDE, num_hidden_layers=2, rms_norm_eps=1e-5, hidden_act="silu",
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        tie_word_embeddings=False, max_position_embeddings=64)),
        FixtureSpec(
            name="mistral", model_type="mistral", seed=3, tokens=MISTRAL_TOKENS,
            config=dict(SMALL, num_hidden_layers=2, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        tie_word_embeddings=False, max_position_embeddings=64),
            ablations=(("sliding_window", {"sliding_window": None}, None),)),
        FixtureSpec(
            name="qwen2", model_type="qwen2", seed=4, tokens=QWEN2_TOKENS, model_vocab=320,
            config=dict(WIDE, num_hidden_layers=2, rms_norm_eps=1e-6, hidden_act="silu",
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                        use_sliding_window=False, tie_word_embeddings=False, max_position_embeddings=64),
            ablations=(("qkv_bias", {}, "zero_qkv_bias"),)),
        FixtureSpec(
            name="qwen2_tied", model_type="qwen2", seed=5, tokens=QWEN2_TOKENS, model_vocab=320,
            config=dict(WIDE, num_hidden_layers=2, rms_norm_eps=1e-6, hidden_act="silu",
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                        use_sliding_window=False, tie_word_embeddings=True, max_position_embeddings=64),
            ablations=(("qkv_bias", {}, "zero_qkv_bias"),)),
        FixtureSpec(
            name="qwen3", model_type="qwen3", seed=6, tokens=QWEN3_TOKENS, model_vocab=320,
            config=dict(SMALL, num_hidden_layers=2, rms_norm_eps=1e-6, hidden_act="silu",
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                        attention_bias=False, use_sliding_window=False, tie_word_embeddings=False,
                        max_position_embeddings=64),
            ablations=(("qk_norm_weights", {}, "unit_qk_norm"),)),
        FixtureSpec(
            name="gemma", model_type="gemma", seed=7, tokens=GEMMA_TOKENS, zero_centered_norms=True,
            config=dict(SMALL, num_hidden_layers=2, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        attention_bias=False, tie_word_embeddings=True, max_position_embeddings=64),
            # No config switch turns off Gemma's (1 + w) norms or embedding scaling, and GemmaConfig
            # maps hidden_act "gelu" to the tanh approximation, so there is no ablation to measure.
            ),
        FixtureSpec(
            name="gemma2", model_type="gemma2", seed=8, tokens=GEMMA_TOKENS, zero_centered_norms=True,
            scales=WeightScales(qk_gain=6.0, final_norm_offset=1.5),
            config=dict(SMALL, num_hidden_layers=3, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        attention_bias=False, tie_word_embeddings=True, max_position_embeddings=64,
                        query_pre_attn_scalar=24, sliding_window=4,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
            ablations=(("attn_logit_softcapping", {"attn_logit_softcapping": None}, None),
                       ("final_logit_softcapping", {"final_logit_softcapping": None}, None),
                       ("sliding_window", {"layer_types": ["full_attention"] * 3}, None),
                       ("query_pre_attn_scalar", {"query_pre_attn_scalar": 16}, None))),
    ]


def reward_fixture_specs() -> list[FixtureSpec]:
    """Reward models: each family's causal fixture without lm_head, plus one multi-label head."""
    causal = {spec.name: spec for spec in fixture_specs()}

    def reward(causal_name: str, **changes: Any) -> FixtureSpec:
        spec = causal[causal_name]
        # Gemma 2's final-logit soft-cap acts on LM logits only: a score head has none to ablate.
        ablations = tuple(a for a in spec.ablations if a[0] != "final_logit_softcapping")
        fields = {"seed": spec.seed + 100, "ablations": ablations, "num_labels": 1, **changes}
        return dataclasses.replace(spec, **fields)

    # Qwen2's reward variant uses the small sizes: without the wide ones the folders stay < 300 KB.
    qwen2_small = dict(causal["qwen2"].config, **SMALL)
    return [
        reward("llama"),
        reward("mistral"),
        reward("qwen2", config=qwen2_small),
        reward("qwen3"),
        reward("gemma"),
        reward("gemma2"),
        reward("qwen2", name="qwen2_multi", config=qwen2_small, seed=120, num_labels=3,
               labels=("helpfulness", "correctness", "verbosity")),
    ]


# ---------------------------------------------------------------------------
# Model construction and reference logits
# ---------------------------------------------------------------------------

def make_config(spec: FixtureSpec, ids: dict[str, int | None], overrides: dict[str, Any] | None = None):
    from transformers import AutoConfig

    kwargs = dict(spec.config, vocab_size=spec.model_vocab, initializer_range=0.02,
                  bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    if spec.tokens is LLAMA3_TOKENS:
        # Llama 3.1 instruct stops on either end-of-text or end-of-turn: eos_token_id is a list.
        kwargs["eos_token_id"] = [LLAMA3_TOKENS.special_tokens.index("<|end_of_text|>"), ids["eos"]]
    if spec.num_labels:
        labels = spec.labels or tuple(f"LABEL_{i}" for i in range(spec.num_labels))
        kwargs["id2label"] = dict(enumerate(labels))
        kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
    kwargs.update(copy.deepcopy(overrides or {}))
    return AutoConfig.for_model(spec.model_type, **kwargs)


def auto_class(config):
    """AutoModelForSequenceClassification for reward models (config with id2label), else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    reward = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    return AutoModelForSequenceClassification if reward else AutoModelForCausalLM


def build_model(config, reward: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    assert model.config._attn_implementation == "eager"
    return model.eval()


def random_state(model, spec: FixtureSpec) -> dict[str, Any]:
    """Every parameter drawn from numpy (seeded), independent of torch's RNG and init code."""
    import torch

    rng = np.random.default_rng(spec.seed)
    s = spec.scales
    neutral = 0.0 if spec.zero_centered_norms else 1.0
    state = {}
    for name, param in sorted(model.named_parameters()):  # named_parameters() lists tied weights once
        shape = tuple(param.shape)
        noise = rng.standard_normal(shape)
        if name.endswith("norm.weight"):
            value = neutral + s.norm_std * noise
            if name == "model.norm.weight":
                value = value + s.final_norm_offset
        elif name.endswith(".bias"):
            value = s.bias_std * noise
        elif "embed_tokens" in name:
            value = s.embed_std * noise
        elif name in ("lm_head.weight", "score.weight"):
            value = s.lm_gain * noise / np.sqrt(shape[1])
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            value = s.qk_gain * noise / np.sqrt(shape[1])
        else:
            value = noise / np.sqrt(shape[1])
        state[name] = torch.from_numpy(value.astype(np.float32))
    missing = set(dict(model.named_parameters())) - set(state)
    assert not missing, missing
    return state


def load_state(model, state: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def make_batch(spec: FixtureSpec, ids: dict[str, int | None]) -> tuple[np.ndarray, np.ndarray]:
    """[2, 12] ids: row 0 full, row 1 right-padded after 7 tokens; bos first where the family has one."""
    rng = np.random.default_rng(1000 + spec.seed)
    first_regular = len(spec.tokens.special_tokens)
    input_ids = rng.integers(first_regular, spec.model_vocab, size=(2, 12)).astype(np.int32)
    if ids["bos"] is not None:
        input_ids[:, 0] = ids["bos"]
    attention_mask = np.ones((2, 12), np.int32)
    attention_mask[1, 7:] = 0
    input_ids[1, 7:] = ids["pad"]
    return input_ids, attention_mask


def make_reward_batch(spec: FixtureSpec, ids: dict[str, int | None]) -> tuple[np.ndarray, np.ndarray]:
    """[4, 12] ids, each row ending in EOS (where a reward is read): unpadded, right-padded after 7
    tokens, left-padded with 4 and with 9 pads. bos first where the family has one."""
    rng = np.random.default_rng(1000 + spec.seed)
    first_regular = len(spec.tokens.special_tokens)
    length, real = 12, (12, 7, 8, 3)
    input_ids = np.full((len(real), length), ids["pad"], np.int32)
    attention_mask = np.zeros((len(real), length), np.int32)
    for row, n in enumerate(real):
        tokens = rng.integers(first_regular, spec.model_vocab, size=n).astype(np.int32)
        if ids["bos"] is not None:
            tokens[0] = ids["bos"]
        tokens[-1] = ids["eos"]
        where = slice(0, n) if row < 2 else slice(length - n, length)  # rows 2 and 3: left padding
        input_ids[row, where] = tokens
        attention_mask[row, where] = 1
    return input_ids, attention_mask


def run_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(input_ids).long(),
                    attention_mask=torch.from_numpy(attention_mask).long())
    return out.logits.float().numpy()


def check_reload(folder: Path, batch: tuple[np.ndarray, np.ndarray], logits: np.ndarray,
                 ids: dict[str, int | None]) -> None:
    """What was written loads back through the Auto classes and gives the same logits and ids."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    auto = auto_class(AutoConfig.from_pretrained(str(folder)))
    reloaded = auto.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    np.testing.assert_array_equal(run_logits(reloaded, *batch), logits)
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ids["bos"], ids["eos"], ids["pad"])


def edit_state(state: dict[str, Any], edit: str | None) -> dict[str, Any]:
    """State-dict ablations for features that no config switch turns off."""
    import torch

    if edit is None:
        return state
    edited = dict(state)
    for name, value in state.items():
        if edit == "zero_qkv_bias" and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            edited[name] = torch.zeros_like(value)
        elif edit == "unit_qk_norm" and name.endswith(("q_norm.weight", "k_norm.weight")):
            edited[name] = torch.ones_like(value)
    assert any(edited[k] is not state[k] for k in state), f"ablation {edit} changed nothing"
    return edited


def sensitivities(spec, ids, state, batch, logits) -> dict[str, float]:
    """Max |logit change| on real tokens (reward models: |score change|) when each family feature is
    switched off."""
    valid = batch[1].astype(bool) if not spec.num_labels else np.ones(logits.shape, bool)
    result = {}
    for feature, overrides, edit in spec.ablations:
        model = build_model(make_config(spec, ids, overrides), reward=bool(spec.num_labels))
        load_state(model, edit_state(state, edit))
        diff = np.abs(run_logits(model, *batch) - logits)[valid]
        result[feature] = round(float(diff.max()), 4)
    return result


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez stamps the current time into the zip; fixed timestamps keep reruns byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, buffer.getvalue())


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != "fixture.json"}


def versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {"numpy": np.__version__, "python": sys.version.split()[0], "tokenizers": tokenizers.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__}


def build_fixture(spec: FixtureSpec, out: Path) -> dict[str, Any]:
    folder = out / spec.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ids = save_tokenizer(spec.tokens, folder)
    assert ids["tokenizer_vocab"] <= spec.model_vocab
    reward = bool(spec.num_labels)
    model = build_model(make_config(spec, ids), reward=reward)
    state = random_state(model, spec)
    load_state(model, state)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if spec.max_shard_size:
        save_kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(str(folder), **save_kwargs)
    batch = make_reward_batch(spec, ids) if reward else make_batch(spec, ids)
    logits = run_logits(model, *batch)
    assert np.isfinite(logits).all(), spec.name
    check_reload(folder, batch, logits, ids)
    write_npz(folder / "expected.npz", {"input_ids": batch[0], "attention_mask": batch[1], "logits": logits})
    record = {
        "name": spec.name,
        "family": spec.model_type,
        "model_class": type(model).__name__,
        "attn_implementation": "eager",
        "seed": spec.seed,
        "weight_scales": dataclasses.asdict(spec.scales),
        "tokenizer_vocab_size": ids["tokenizer_vocab"],
        "model_vocab_size": spec.model_vocab,
        "feature_sensitivity_max_abs_logit_change": sensitivities(spec, ids, state, batch, logits),
        "compare_only_where": "attention_mask == 1 (logits at padded positions are implementation-defined)",
        "versions": versions(),
        **(reward_record(spec, model) if reward else {}),
        "sha256": file_hashes(folder),
    }
    write_json(folder / "fixture.json", record)
    return record


def reward_record(spec: FixtureSpec, model) -> dict[str, Any]:
    """What a reward fixture's expected.npz means (replaces the causal fixtures' compare_only_where)."""
    return {
        "num_labels": spec.num_labels,
        "labels": [model.config.id2label[i] for i in range(spec.num_labels)],
        "compare_only_where": "every row: logits [N, num_labels] are the scores",
        "scored_token": "transformers reads the rightmost token that is not pad_token_id; every row ends in "
                        "EOS (!= pad), so that is the last token whose attention_mask is 1",
        "position_ids": "transformers' default, 0..T-1 in every row (pads included: a left-padded row's "
                        "first real token is at position = number of pads)",
    }


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="default: tests/fixtures/hf (tests/fixtures/hf_reward with --reward)")
    parser.add_argument("--reward", action="store_true",
                        help="build the reward-model (*ForSequenceClassification) fixtures")
    parser.add_argument("--only", nargs="*", help="fixture names to rebuild (default: all)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path("tests/fixtures/hf_reward" if args.reward else "tests/fixtures/hf")

    import torch
    import transformers

    torch.set_num_threads(1)  # one thread: the same reduction order on every rerun
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in reward_fixture_specs() if args.reward else fixture_specs():
        if args.only and spec.name not in args.only:
            continue
        record = build_fixture(spec, args.out)
        print(f"{spec.name:14s} {folder_size(args.out / spec.name) / 1024:7.1f} KiB  "
              f"sensitivity {record['feature_sensitivity_max_abs_logit_change']}")
    print(f"total {folder_size(args.out) / 1024:.1f} KiB in {args.out}")


if __name__ == "__main__":
    main()
