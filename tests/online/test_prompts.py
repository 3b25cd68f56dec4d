"""prefjax.online.prompts: seeded prompt streams over tasks and data sources, exact restore,
tokenization identical to the trainer's, and clear errors (never a hang)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prefjax.data import load_source
from prefjax.data.tokenize import RenderOptions, tokenize_example
from prefjax.models.tokenizer import load_tokenizer
from prefjax.online.prompts import PromptError, open_prompts
from prefjax.quickstart import tasks, vocab
from prefjax.train import config_lib
from tests.data.fixture_helpers import bot, fixture, system, user
from tests.deadline import run_within

HF = Path(__file__).resolve().parent.parent / "fixtures" / "hf"


@pytest.fixture(scope="module")
def arithmetic_tokenizer(tmp_path_factory):
    return vocab.build(tasks.get_task("arithmetic"), tmp_path_factory.mktemp("tok"))


def _write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prompt_rows(n: int):
    return [{"prompt": f"Question number {i}?", "id": i} for i in range(n)]


# ------------------------------------------------------------------------------------- tasks


def test_task_prompts_are_the_tasks_prompts_drawn_per_index(arithmetic_tokenizer):
    task = tasks.get_task("arithmetic", max_operand=99)
    stream = open_prompts("task:arithmetic", tokenizer=arithmetic_tokenizer, config=None, seed=7,
                          task_options={"max_operand": 99})
    got = stream.take(6)
    want = [task.prompts(np.random.default_rng((7, n)), 1)[0] for n in range(6)]
    assert [p.text for p in got] == want
    # The quick start's plain-text layout: the prompt's own tokens, no BOS.
    assert [list(p.ids) for p in got] == arithmetic_tokenizer.encode_batch(want, add_special_tokens=False)
    text, ids = got[0]
    assert (text, ids) == (got[0].text, got[0].ids)
    assert stream.position == 6
    assert max(int(x) for p in got for x in p.text.rstrip("=").split("+")) > 29  # the option took effect


def test_task_options_come_from_the_config_like_the_quick_start(arithmetic_tokenizer):
    config = config_lib.trainer_config()
    config.arithmetic = {"max_operand": 3}
    stream = open_prompts("task:arithmetic", tokenizer=arithmetic_tokenizer, config=config, seed=0)
    operands = [int(x) for p in stream.take(40) for x in p.text.rstrip("=").split("+")]
    assert max(operands) <= 3


def test_task_stream_restores_exactly(arithmetic_tokenizer):
    stream = open_prompts("task:arithmetic", tokenizer=arithmetic_tokenizer, config=None, seed=3)
    stream.take(5)
    saved = stream.position
    after = stream.take(5)
    fresh = open_prompts("task:arithmetic", tokenizer=arithmetic_tokenizer, config=None, seed=3)
    fresh.restore(json.loads(json.dumps(saved)))
    assert fresh.take(5) == after
    other_seed = open_prompts("task:arithmetic", tokenizer=arithmetic_tokenizer, config=None, seed=4)
    other_seed.restore(saved)
    assert [p.text for p in other_seed.take(5)] != [p.text for p in after]


# -------------------------------------------------------------------------------- data files


def test_file_stream_restores_and_reshuffles_each_epoch(tmp_path, arithmetic_tokenizer):
    path = _write_jsonl(tmp_path / "prompts.jsonl", _prompt_rows(7))
    tok = load_tokenizer(HF / "llama")
    stream = open_prompts(path, tokenizer=tok, config=None, seed=11)
    first = stream.take(5)
    saved = stream.position
    nxt = stream.take(5)
    restored = open_prompts(path, tokenizer=tok, config=None, seed=11)
    restored.restore(saved)
    assert restored.take(5) == nxt

    stream.restore(0)
    epochs = [[p.text for p in stream.take(7)] for _ in range(3)]
    everything = sorted(r["prompt"] for r in _prompt_rows(7))
    for epoch, texts in enumerate(epochs):
        assert sorted(texts) == everything  # every prompt once per epoch
        order = np.random.default_rng((11, epoch)).permutation(7)
        assert texts == [f"Question number {i}?" for i in order]
    assert epochs[0] != epochs[1]
    assert [p.text for p in first] == epochs[0][:5]


def test_text_prompts_tokenize_as_the_trainer_tokenizes_a_pair_rows_prompt():
    tok = load_tokenizer(HF / "llama")  # adds BOS: the rule must match too
    path = fixture("pairs_text.jsonl")
    config = config_lib.trainer_config()
    stream = open_prompts(path, tokenizer=tok, config=config, seed=0)
    prompts = {p.source: p for p in stream.take(stream.count)}
    source = load_source(path)
    assert len(prompts) == len(source) == 3
    for i in range(len(source)):
        example = source[i]
        want = tokenize_example(example, tok).prompt_ids
        got = prompts[example["source"]]
        assert list(got.ids) == want.tolist()
        assert got.ids[0] == tok.bos_token_id
        assert got.text == example["prompt"][0]["content"]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_chat_prompts_tokenize_with_the_template_and_generation_prompt(tmp_path, family):
    tok = load_tokenizer(HF / family)
    conversations = [[user("What is the capital of France?")],
                     [system("Be brief."), user("Hi!"), bot("Hello."), user("Name a fruit.")]]
    prompt_only = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": c} for c in conversations])
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": c, "chosen": "Paris is lovely.",
                                                      "rejected": "No idea."} for c in conversations])
    stream = open_prompts(prompt_only, tokenizer=tok, config=None, seed=0)
    got = {int(p.source.rsplit(":", 1)[1]): p for p in stream.take(2)}
    source = load_source(pairs)
    for line, conversation in enumerate(conversations, start=1):
        want = tokenize_example(source[line - 1], tok).prompt_ids
        assert list(got[line].ids) == want.tolist()
        rendered = tok.apply_chat_template(conversation, add_generation_prompt=True)
        assert tok.decode(list(got[line].ids)).endswith(rendered[-12:])  # ends with the generation prompt
        assert got[line].format == "chat" and list(got[line].messages) == conversation


@pytest.mark.parametrize("name", ["pairs_text.jsonl", "pairs_chat.jsonl", "ranked.jsonl", "unpaired.jsonl",
                                  "pairs_text.parquet", "hh_rlhf/helpful-base/test.jsonl",
                                  "helpsteer2/validation.jsonl"])
def test_rows_of_any_data_format_give_their_prompts(name):
    tok = load_tokenizer(HF / "qwen3")
    path = fixture(name)
    source = load_source(path)
    stream = open_prompts(path, tokenizer=tok, config=None, seed=0)
    assert stream.count == len(source)
    got = sorted(json.dumps(list(p.messages)) for p in stream.take(len(source)))
    assert got == sorted(json.dumps(source[i]["prompt"]) for i in range(len(source)))


def test_too_long_prompts_are_skipped_and_counted(tmp_path):
    tok = load_tokenizer(HF / "qwen3")
    rows = [{"prompt": "Hi?"}, {"prompt": "word " * 60}, {"prompt": "Bye?"}]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    config = config_lib.trainer_config()
    config.data.max_prompt_len = 20
    stream = open_prompts(path, tokenizer=tok, config=config, seed=0)
    taken = stream.take(6)
    assert sorted({p.text for p in taken}) == ["Bye?", "Hi?"]
    assert all(len(p.ids) <= 20 for p in taken)
    assert stream.skipped == 1
    assert stream.position > 6  # the skipped prompt's places count in the position


# ------------------------------------------------------------------------------------ errors


def test_empty_source_errors_within_seconds(tmp_path):
    tok = load_tokenizer(HF / "qwen3")
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(PromptError, match=r"online.prompts=.*empty.jsonl.*has no prompts"):
        run_within(20, open_prompts, str(path), tokenizer=tok, config=None, seed=0)


def test_all_prompts_too_long_errors_within_seconds(tmp_path, arithmetic_tokenizer):
    tok = load_tokenizer(HF / "qwen3")
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "word " * 40}, {"prompt": "more " * 40}])
    with pytest.raises(PromptError, match=r"all 2 prompts are longer than max_prompt_len=5 tokens"):
        run_within(20, open_prompts, path, tokenizer=tok, config=None, seed=0, max_prompt_len=5)
    with pytest.raises(PromptError, match=r"task:arithmetic.*1000 prompts in a row are longer than "
                                          r"max_prompt_len=2"):
        run_within(20, open_prompts, "task:arithmetic", tokenizer=arithmetic_tokenizer, config=None, seed=0,
                   max_prompt_len=2)


def test_a_row_without_prompt_names_file_and_line(tmp_path):
    tok = load_tokenizer(HF / "qwen3")
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?"}, {"prompt": "", "note": "x"}])
    with pytest.raises(PromptError,
                       match=r"online.prompts=.*p.jsonl, line 2: field 'prompt': missing or empty"):
        open_prompts(path, tokenizer=tok, config=None, seed=0)
    # data.on_error="skip" counts the bad row instead.
    config = config_lib.trainer_config()
    config.data.on_error = "skip"
    assert open_prompts(path, tokenizer=tok, config=config, seed=0).count == 1


def test_rows_with_no_prompt_at_all_name_the_row(tmp_path):
    tok = load_tokenizer(HF / "qwen3")
    path = _write_jsonl(tmp_path / "p.jsonl", [{"question": "Hi?"}])
    with pytest.raises(PromptError,
                       match=r"p.jsonl, line 1: cannot tell the row format from columns \['question'\]"):
        open_prompts(path, tokenizer=tok, config=None, seed=0)


def test_bad_specs_and_arguments(arithmetic_tokenizer, tmp_path):
    with pytest.raises(PromptError, match=r"online.prompts='task:nope': unknown task 'nope'; tasks are"):
        open_prompts("task:nope", tokenizer=arithmetic_tokenizer, config=None, seed=0)
    with pytest.raises(PromptError, match=r"task 'arithmetic' has no option\(s\) \['bogus'\]"):
        open_prompts("task:arithmetic", tokenizer=arithmetic_tokenizer, config=None, seed=0,
                     task_options={"bogus": 1})
    with pytest.raises(PromptError, match=r"online.prompts='': give 'task:<name>' \(arithmetic, sentiment\)"):
        open_prompts("", tokenizer=arithmetic_tokenizer, config=None, seed=0)
    with pytest.raises(PromptError, match=r"prompts need a tokenizer.*vocab.build"):
        open_prompts("task:arithmetic", tokenizer=None, config=None, seed=0)
    with pytest.raises(PromptError, match=r"online.prompts=.*missing.jsonl: no such file"):
        open_prompts(str(tmp_path / "missing.jsonl"), tokenizer=arithmetic_tokenizer, config=None, seed=0)
    stream = open_prompts("task:arithmetic", tokenizer=arithmetic_tokenizer, config=None, seed=0)
    with pytest.raises(PromptError, match=r"a stream position must be an integer >= 0, got -1"):
        stream.restore(-1)


def test_hub_prompt_only_rows_with_a_sliced_split(tmp_path, monkeypatch):
    from tests.hub_helpers import FakeHubCache

    rows = "".join(json.dumps(r) + "\n" for r in _prompt_rows(5))
    FakeHubCache(tmp_path / "hub", monkeypatch).add("dataset", "acme/prompts", {"data/train.jsonl": rows})
    config = config_lib.trainer_config()
    config.data.split = "train[1:4]"
    stream = open_prompts("hf:acme/prompts", tokenizer=load_tokenizer(HF / "qwen3"), config=config, seed=0)
    assert stream.count == 3
    assert sorted(p.text for p in stream.take(3)) == [f"Question number {i}?" for i in (1, 2, 3)]


@pytest.mark.parametrize("options", [RenderOptions(text_format="chat"), RenderOptions(template=None),
                                     RenderOptions(text_separator="\n", add_bos=True)])
def test_render_options_apply_as_in_the_trainer(options):
    tok = load_tokenizer(HF / "llama")
    path = fixture("pairs_text.jsonl")
    stream = open_prompts(path, tokenizer=tok, config=None, seed=0, options=options)
    prompts = {p.source: p for p in stream.take(stream.count)}
    source = load_source(path)
    for i in range(len(source)):
        want = tokenize_example(source[i], tok, options).prompt_ids
        assert list(prompts[source[i]["source"]].ids) == want.tolist()
