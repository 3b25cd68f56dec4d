"""prefjax.data.tokenize on real chat templates (tests/fixtures/hf): masks token by token.

Expectations are built without the code under test: from hand-written renderings of each
family's template, tokenized whole and split by the tokenizer's character offsets (or, for
byte-level Qwen, tokenized piece by piece).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from prefjax.data.tokenize import PrefixError, PreprocessError, RenderOptions, check_example, tokenize_example
from prefjax.models.tokenizer import load_tokenizer

HF = Path(__file__).resolve().parent.parent / "fixtures" / "hf"
QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."
WRONG = "I am fine, thank you."


def _tok(name):
    return load_tokenizer(HF / name)


def _msg(role, content):
    return {"role": role, "content": content}


def _pair(prompt, chosen, rejected, **extra):
    example = {
        "kind": "pair",
        "format": "chat",
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": 2.0,
        "score_rejected": -1.0,
        "margin": math.nan,
        "weight": 1.0,
        "source": "mem.jsonl:7",
    }
    example.update(extra)
    return example


def _by_offsets(tok, text, prompt_chars, scored_end_chars):
    """(ids, mask) of ``text`` tokenized whole: a token is scored iff it starts at or after
    ``prompt_chars`` and ends at or before ``scored_end_chars``; tokens past that are dropped."""
    enc = tok.backend.encode(text, add_special_tokens=False)
    ids, mask = [], []
    for token_id, (start, _) in zip(enc.ids, enc.offsets):
        if start >= scored_end_chars:
            break
        ids.append(token_id)
        mask.append(1 if start >= prompt_chars else 0)
    return ids, mask


def test_llama3_mask_and_single_bos():
    tok = _tok("llama")
    example = _pair([_msg("user", QUESTION)], [_msg("assistant", ANSWER)], [_msg("assistant", WRONG)])
    out = tokenize_example(example, tok)
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    prompt_text = (
        "<|begin_of_text|>" + header.format("user") + QUESTION + "<|eot_id|>" + header.format("assistant")
    )
    for k, answer in enumerate((ANSWER, WRONG)):
        full = prompt_text + answer + "<|eot_id|>"
        want_ids, want_mask = _by_offsets(tok, full, len(prompt_text), len(full))
        ids, mask = out.sequence(k)
        assert ids.tolist() == want_ids
        assert mask.tolist() == want_mask
        # Scored = the answer's tokens and <|eot_id|>, nothing else.
        assert tok.decode(ids[mask == 1]) == answer + "<|eot_id|>"
        assert ids[mask == 1][-1] == tok.eos_token_id
    bos = tok.bos_token_id
    assert tok.adds_bos  # the tokenizer adds BOS *and* the template writes it ...
    naive = tok.encode(prompt_text)  # ... so the naive encode doubles it
    assert naive[:2] == [bos, bos]
    assert out.prompt_ids[0] == bos and (out.prompt_ids == bos).sum() == 1


def test_qwen2_mask_from_pieces():
    tok = _tok("qwen2")
    example = _pair([_msg("user", QUESTION)], [_msg("assistant", ANSWER)], [_msg("assistant", WRONG)])
    out = tokenize_example(example, tok)
    im_end = tok.token_to_id("<|im_end|>")
    prompt_piece = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + QUESTION
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    want_prompt = tok.encode(prompt_piece, add_special_tokens=False)
    assert out.prompt_ids.tolist() == want_prompt
    assert not tok.adds_bos and tok.bos_token_id is None
    for k, answer in enumerate((ANSWER, WRONG)):
        want_response = tok.encode(answer, add_special_tokens=False) + [im_end]  # trailing "\n" dropped
        ids, mask = out.sequence(k)
        assert ids.tolist() == want_prompt + want_response
        assert mask.tolist() == [0] * len(want_prompt) + [1] * len(want_response)
    assert out.scores == (2.0, -1.0) and out.label == 1.0 and out.kind == "pair"


def test_gemma_multi_turn_prompt_ranked():
    tok = _tok("gemma")
    prompt = [_msg("user", "Hello world!"), _msg("assistant", "How are you today?"), _msg("user", QUESTION)]
    answers = [ANSWER, WRONG, "Numbers like 42."]
    example = {
        "kind": "ranked",
        "format": "chat",
        "prompt": prompt,
        "responses": [[_msg("assistant", a)] for a in answers],
        "scores": [3.0, 1.0, 2.0],
        "weight": 0.5,
        "source": "r.jsonl:1",
    }
    out = tokenize_example(example, tok)
    turn = "<start_of_turn>{}\n{}<end_of_turn>\n"
    prompt_text = (
        "<bos>"
        + turn.format("user", "Hello world!")
        + turn.format("model", "How are you today?")
        + turn.format("user", QUESTION)
        + "<start_of_turn>model\n"
    )
    assert out.num_responses == 3 and out.scores == (3.0, 1.0, 2.0) and out.weight == 0.5
    for k, answer in enumerate(answers):
        full = prompt_text + answer + "<end_of_turn>\n"
        want_ids, want_mask = _by_offsets(
            tok, full, len(prompt_text), len(prompt_text) + len(answer + "<end_of_turn>")
        )
        ids, mask = out.sequence(k)
        assert ids.tolist() == want_ids and mask.tolist() == want_mask
        # the earlier assistant turn is prompt: not scored
        assert tok.decode(ids[mask == 1]) == answer + "<end_of_turn>"
    assert (out.prompt_ids == tok.bos_token_id).sum() == 1


def test_mistral_unpaired_scores_content_and_eos():
    tok = _tok("mistral")
    for label in (True, False):
        example = {
            "kind": "unpaired",
            "format": "chat",
            "prompt": [_msg("user", QUESTION)],
            "completion": [_msg("assistant", ANSWER)],
            "label": label,
            "weight": 1.0,
            "source": "u:1",
        }
        out = tokenize_example(example, tok)
        prompt_text = "<s>[INST] " + QUESTION + "[/INST]"
        full = prompt_text + ANSWER + "</s>"
        want_ids, want_mask = _by_offsets(tok, full, len(prompt_text), len(full))
        ids, mask = out.sequence(0)
        assert ids.tolist() == want_ids and mask.tolist() == want_mask
        assert ids[-1] == tok.eos_token_id and mask[-1] == 1
        assert out.label == float(label) and out.num_responses == 1 and math.isnan(out.scores[0])


def test_multi_message_response_scores_only_assistant_turns():
    tok = _tok("qwen2")
    response = [_msg("assistant", "Check the answer."), _msg("tool", "Paris"), _msg("assistant", ANSWER)]
    example = _pair([_msg("user", QUESTION)], response, [_msg("assistant", WRONG)])
    ids, mask = tokenize_example(example, tok).sequence(0)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    im_end = tok.token_to_id("<|im_end|>")
    prompt = enc(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + QUESTION
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    first = enc("Check the answer.") + [im_end]
    tool = enc("\n<|im_start|>tool\nParis<|im_end|>\n<|im_start|>assistant\n")
    last = enc(ANSWER) + [im_end]
    assert ids.tolist() == prompt + first + tool + last
    assert mask.tolist() == [0] * len(prompt) + [1] * len(first) + [0] * len(tool) + [1] * len(last)


def test_plain_text_appends_one_eos_and_bos():
    tok = _tok("llama")
    prompt_text, answer = "Question: why is the sky blue?\nAnswer:", " light scatters in the air."
    example = _pair(
        [_msg("user", prompt_text)],
        [_msg("assistant", answer)],
        [_msg("assistant", " blue." + "<|eot_id|>")],
        format="text",
    )
    out = tokenize_example(example, tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    full = prompt_text + answer
    want_ids, want_mask = _by_offsets(tok, full, len(prompt_text), len(full))
    ids, mask = out.sequence(0)
    assert ids.tolist() == [bos] + want_ids + [eos]
    assert mask.tolist() == [0] + want_mask + [1]
    rejected_ids, rejected_mask = out.sequence(1)
    assert rejected_ids[-1] == eos and rejected_ids[-2] != eos  # already closed: no second EOS
    assert rejected_mask[-1] == 1
    # template=None renders chat examples as plain text too
    chat = _pair([_msg("user", prompt_text)], [_msg("assistant", answer)], [_msg("assistant", " blue.")])
    plain = tokenize_example(chat, tok, RenderOptions(template=None))
    assert plain.sequence(0)[0].tolist() == ids.tolist()


def test_text_format_through_the_template_when_asked():
    tok = _tok("qwen2")
    example = _pair(
        [_msg("user", QUESTION)], [_msg("assistant", ANSWER)], [_msg("assistant", WRONG)], format="text"
    )
    as_chat = tokenize_example(example, tok, RenderOptions(text_format="chat"))
    chat = tokenize_example(dict(example, format="chat"), tok)
    assert as_chat.sequence(0)[0].tolist() == chat.sequence(0)[0].tolist()
    plain = tokenize_example(example, tok)
    assert len(plain.prompt_ids) == len(tok.encode(QUESTION, add_special_tokens=False))


def test_custom_template_and_end_tokens():
    tok = _tok("qwen2")
    template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    example = _pair([_msg("user", QUESTION)], [_msg("assistant", ANSWER)], [_msg("assistant", WRONG)])
    out = tokenize_example(example, tok, RenderOptions(template=template))
    ids, mask = out.sequence(0)
    # No special token closes the turn: the whole assistant span ("answer\n") is scored.
    assert tok.decode(ids[mask == 1]) == ANSWER + "\n"
    assert tok.decode(ids[mask == 0]) == f"user: {QUESTION}\nassistant: "


def test_token_merging_across_the_boundary_goes_to_the_response():
    """The tiny llama vocabulary merges "\\nThe" (header newline + answer): no prefix-stable split."""
    tok = _tok("llama")
    answers = ("Mars.", "The Sun.")
    example = _pair(
        [_msg("user", "Name a planet.")], [_msg("assistant", answers[0])], [_msg("assistant", answers[1])]
    )
    out = tokenize_example(example, tok)
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    prompt_text = (
        "<|begin_of_text|>" + header.format("user") + "Name a planet.<|eot_id|>" + header.format("assistant")
    )
    merged = False
    for k, answer in enumerate(answers):
        full = prompt_text + answer + "<|eot_id|>"
        enc = tok.backend.encode(full, add_special_tokens=False)
        # scored: every token holding any answer character (a merged token straddles the boundary)
        want_mask = [1 if end > len(prompt_text) else 0 for _, end in enc.offsets]
        merged |= any(start < len(prompt_text) < end for start, end in enc.offsets)
        ids, mask = out.sequence(k)
        assert ids.tolist() == enc.ids and mask.tolist() == want_mask
    assert merged, "the fixture no longer merges across the boundary; pick another answer"
    # the shared prompt is the common prefix; the other response starts with an unscored newline
    _, mask0 = out.sequence(0)
    assert mask0[len(out.prompt_ids)] == 0 and tok.decode(out.response_ids[0][:1]) == "\n"


def test_text_separator_is_unscored():
    tok = _tok("qwen2")
    example = _pair(
        [_msg("user", "Question: why?")],
        [_msg("assistant", "Because.")],
        [_msg("assistant", "No.")],
        format="text",
    )
    out = tokenize_example(example, tok, RenderOptions(text_separator="\nAnswer: "))
    ids, mask = out.sequence(0)
    assert tok.decode(ids[mask == 0]) == "Question: why?\nAnswer: "
    assert tok.decode(ids[mask == 1]) == "Because.<|im_end|>"


def test_not_prefix_stable_template_is_a_clear_error():
    tok = _tok("qwen3")  # its generation prompt adds an empty think block the full rendering lacks
    example = _pair([_msg("user", QUESTION)], [_msg("assistant", ANSWER)], [_msg("assistant", WRONG)])
    tokenize_example(example, tok)  # fine by default
    with pytest.raises(PrefixError, match=r"mem\.jsonl:7: the template is not prefix-stable"):
        tokenize_example(example, tok, RenderOptions(template_kwargs={"enable_thinking": False}))


@pytest.mark.parametrize(
    "broken, field",
    [
        ({"kind": "triple"}, "kind"),
        ({"chosen": "Paris"}, "chosen"),
        ({"rejected": []}, "rejected"),
        ({"prompt": [{"role": "user"}]}, r"prompt\[0\]\.content"),
        ({"weight": -1.0}, "weight"),
        ({"format": "html"}, "format"),
    ],
)
def test_bad_examples_name_source_and_field(broken, field):
    example = _pair([_msg("user", QUESTION)], [_msg("assistant", ANSWER)], [_msg("assistant", WRONG)])
    example.update(broken)
    with pytest.raises(PreprocessError, match=rf"mem\.jsonl:7: field '{field}"):
        check_example(example)


def test_response_without_assistant_turn_is_an_error():
    tok = _tok("qwen2")
    example = _pair([_msg("user", QUESTION)], [_msg("user", ANSWER)], [_msg("assistant", WRONG)])
    with pytest.raises(PreprocessError, match="no scored tokens"):
        tokenize_example(example, tok)


def test_every_fixture_scores_exactly_the_answer():
    """On every family: scored tokens decode to the answer (plus its closing token)."""
    example = _pair([_msg("user", QUESTION)], [_msg("assistant", ANSWER)], [_msg("assistant", WRONG)])
    for name in ("llama", "llama2", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        tok = _tok(name)
        out = tokenize_example(example, tok)
        ids, mask = out.sequence(0)
        scored = tok.decode(ids[mask == 1], skip_special_tokens=True).strip()
        assert scored == ANSWER, name
        closing = tok.id_to_token(int(ids[mask == 1][-1]))
        assert closing in tok.backend.get_vocab() and int(ids[mask == 1][-1]) in tok.all_special_ids, name
        assert np.all(mask[: len(out.prompt_ids)] == 0)
        if tok.bos_token_id is not None:
            assert (ids == tok.bos_token_id).sum() == 1, name
