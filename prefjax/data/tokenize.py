"""Canonical preference examples -> token ids with a response mask.

    opts = RenderOptions()                         # the tokenizer's chat template for "chat" examples
    tok_ex = tokenize_example(example, tokenizer, opts)
    ids, mask = tok_ex.sequence(0)                 # prompt + response 0 (pairs: 0 chosen, 1 rejected)

Every response k of an example becomes one sequence ``prompt + response_k``; the prompt
tokens are shared (stored once). The mask is 1 exactly on the tokens a preference loss
scores: a response's content tokens and the end-of-turn / EOS token that closes it. It is 0
on the prompt, on template headers (the generation prompt, e.g. ``<|im_start|>assistant\\n``),
on BOS, and on non-assistant messages inside a multi-message response (e.g. tool results).

How the split is found (robust to any template, no knowledge of its markers):

1. Render the prompt with the generation prompt and the whole conversation; the first text
   must be a prefix of the second (else :class:`PrefixError`: the template is not
   prefix-stable, e.g. it renders something depending on the last message).
2. Tokenize the full text once; the tokens are exactly what the model sees for the whole
   conversation (tokenizing pieces separately would not be: SentencePiece-style (Metaspace)
   tokenizers prepend "▁" to every separately tokenized piece). Each boundary text is
   tokenized too; where its tokens are a prefix of the full tokens (the usual case) that is
   the split. Where a BPE merge crosses the boundary (e.g. "\\n" + "The" -> "\\nThe"), the
   split falls by character offsets before the merged token, which goes to the response
   side (it holds response text, so it is scored). Responses then share the longest common
   prompt tokens; any prompt-side tokens left over start their response, unscored.
3. In an assistant message's token span, the scored tokens run from its start through the
   span's last end token (the tokenizer's special added tokens, EOS included, or
   ``RenderOptions.end_of_turn_tokens``); what follows (e.g. the "\\n" after ``<|im_end|>``) is
   not scored, and after the last response message it is dropped (a causal model's scores
   never depend on later tokens).

BOS: text is tokenized without the post-processor (``add_special_tokens=False``); BOS is
prepended only if the tokenizer's encode would add it and the rendered text does not already
start with it, so a template that writes ``bos_token`` never yields two. EOS is never added in
chat mode (the template closes turns); plain text closes each response with EOS
(``append_eos``) unless it already ends with it.

Plain text (``format: "text"`` examples, or ``template=None`` for all): prompt contents then
response contents, concatenated without a template (``text_separator`` between them).

Rated examples (one response, multi-attribute ``ratings``): ``TokenizedExample.scores`` holds
the L ratings that ``RenderOptions.rating_labels`` names, in that order (:func:`rating_scores`),
so a batch of them has ``scores`` [B, L] and one response per example. With no labels an
example's own names are used (:func:`rating_names`); the pipeline fixes them from its first
example, so every batch agrees on what column l is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from prefjax.models.tokenizer import Tokenizer

KINDS = ("pair", "unpaired", "ranked", "rated")
TEMPLATE_FROM_TOKENIZER = "tokenizer"


class PreprocessError(ValueError):
    """A canonical example is malformed or cannot be tokenized; the message names its source."""


class PrefixError(PreprocessError):
    """The template renders a conversation's beginning differently from the whole conversation."""


@dataclasses.dataclass(frozen=True)
class RenderOptions:
    """How examples become text and tokens.

    template: "tokenizer" uses the tokenizer's chat template; None renders every example as
      plain concatenation; any other string is a Jinja chat template used instead of the
      tokenizer's.
    text_format: how ``format: "text"`` examples render when a template is set: "plain"
      (concatenation) or "chat" (through the template like chat examples).
    add_bos: prepend BOS; None follows the tokenizer (``Tokenizer.adds_bos``). Never doubled.
    append_eos: plain text only: close each response with EOS (scored), unless already there.
    end_of_turn_tokens: token strings that close an assistant turn; None means every special
      added token of the tokenizer (EOS, ``<|im_end|>``, ``<end_of_turn>``, ...).
    template_kwargs: extra variables for the template (e.g. ``{"enable_thinking": False}``).
    text_separator: plain text only: inserted between the prompt and the response text.
    rating_labels: rated examples only: the attributes whose ratings become the example's scores,
      in order (a regression reward model's output names); () takes each example's own names.
    """

    template: Optional[str] = TEMPLATE_FROM_TOKENIZER
    text_format: str = "plain"
    add_bos: Optional[bool] = None
    append_eos: bool = True
    end_of_turn_tokens: Optional[tuple[str, ...]] = None
    template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    text_separator: str = ""
    rating_labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.text_format not in ("plain", "chat"):
            raise ValueError(f"RenderOptions.text_format must be 'plain' or 'chat', got {self.text_format!r}")
        if self.end_of_turn_tokens is not None and isinstance(self.end_of_turn_tokens, str):
            raise ValueError(
                "RenderOptions.end_of_turn_tokens must be a sequence of token strings, not a string"
            )
        if isinstance(self.rating_labels, str) or not all(
                isinstance(name, str) and name for name in self.rating_labels):
            raise ValueError(f"RenderOptions.rating_labels must be a sequence of attribute names, got "
                             f"{self.rating_labels!r}")
        object.__setattr__(self, "rating_labels", tuple(self.rating_labels))  # lists from a config


@dataclasses.dataclass
class TokenizedExample:
    """One example after tokenization: a shared prompt and K responses with their masks.

    ``response_masks[k][t]`` is 1 where ``response_ids[k][t]`` is scored. ``scores`` has K
    entries (nan where absent), or for rated examples (K = 1) the L ratings (nan = not rated);
    ``label`` is 1/0 for unpaired examples and 1 otherwise.
    """

    kind: str
    prompt_ids: np.ndarray  # int32 [P]
    response_ids: list[np.ndarray]  # K x int32 [L_k]
    response_masks: list[np.ndarray]  # K x int8 [L_k]
    weight: float = 1.0
    scores: tuple[float, ...] = ()
    margin: float = math.nan
    label: float = 1.0
    source: str = "?"

    @property
    def num_responses(self) -> int:
        return len(self.response_ids)

    def sequence_length(self, k: int) -> int:
        return len(self.prompt_ids) + len(self.response_ids[k])

    def sequence(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [P + L_k], loss mask float32 [P + L_k]) of prompt + response k."""
        ids = np.concatenate([self.prompt_ids, self.response_ids[k]]).astype(np.int32)
        mask = np.concatenate(
            [np.zeros(len(self.prompt_ids), np.float32), self.response_masks[k].astype(np.float32)]
        )
        return ids, mask


# ---------------------------------------------------------------------------
# Canonical example checks
# ---------------------------------------------------------------------------


def example_source(example: Any) -> str:
    """The example's "source" ("path:line") for error messages, or "?"."""
    if isinstance(example, Mapping):
        return str(example.get("source", "?"))
    return "?"


def _check_conversation(value: Any, field: str, source: str, allow_empty: bool) -> None:
    if not isinstance(value, (list, tuple)):
        raise PreprocessError(
            f"{source}: field '{field}' must be a list of messages, got {type(value).__name__}"
        )
    if not value and not allow_empty:
        raise PreprocessError(f"{source}: field '{field}' is an empty conversation")
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise PreprocessError(
                f"{source}: field '{field}[{i}]' must be a message object, got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise PreprocessError(
                    f"{source}: field '{field}[{i}].{key}' must be a string, got {message.get(key)!r}"
                )


def response_fields(example: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """[(field name, conversation)] of the example's responses in batch order."""
    kind = example["kind"]
    if kind == "pair":
        return [("chosen", example.get("chosen")), ("rejected", example.get("rejected"))]
    if kind == "unpaired":
        return [("completion", example.get("completion"))]
    if kind == "rated":
        return [("response", example.get("response"))]
    responses = example.get("responses")
    if not isinstance(responses, (list, tuple)):
        raise PreprocessError(f"{example_source(example)}: field 'responses' must be a list of conversations")
    return [(f"responses[{k}]", conv) for k, conv in enumerate(responses)]


def check_example(example: Any) -> None:
    """Raise :class:`PreprocessError` naming source and field if ``example`` is not canonical."""
    source = example_source(example)
    if not isinstance(example, Mapping):
        raise PreprocessError(f"{source}: an example must be a dict, got {type(example).__name__}")
    kind = example.get("kind")
    if kind not in KINDS:
        raise PreprocessError(f"{source}: field 'kind' must be one of {KINDS}, got {kind!r}")
    fmt = example.get("format", "chat")
    if fmt not in ("chat", "text"):
        raise PreprocessError(f"{source}: field 'format' must be 'chat' or 'text', got {fmt!r}")
    _check_conversation(example.get("prompt"), "prompt", source, allow_empty=True)
    fields = response_fields(example)
    if kind == "ranked" and len(fields) < 2:
        raise PreprocessError(f"{source}: field 'responses' needs at least 2 responses, got {len(fields)}")
    for field, conv in fields:
        _check_conversation(conv, field, source, allow_empty=False)
    if kind == "unpaired" and not isinstance(example.get("label"), (bool, np.bool_)):
        raise PreprocessError(f"{source}: field 'label' must be true or false, got {example.get('label')!r}")
    if kind == "ranked":
        scores = example.get("scores")
        if not isinstance(scores, (list, tuple)) or len(scores) != len(fields):
            raise PreprocessError(
                f"{source}: field 'scores' must be a list of {len(fields)} numbers, got {scores!r}"
            )
    if kind == "rated":
        _check_ratings(example.get("ratings"), source)
    weight = example.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0:
        raise PreprocessError(f"{source}: field 'weight' must be a number >= 0, got {weight!r}")


def _is_rating(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_ratings(ratings: Any, source: str) -> None:
    values = list(ratings.values()) if isinstance(ratings, Mapping) else ratings
    if not isinstance(values, (list, tuple)) or not values or not all(_is_rating(v) for v in values):
        raise PreprocessError(f"{source}: field 'ratings' must be a non-empty dict {{attribute: number}} or "
                              f"list of numbers (null / NaN = not rated), got {ratings!r}")


def rating_names(ratings: Any) -> tuple[str, ...]:
    """The attribute names of an example's ``ratings``: a dict's keys in order; a list's positions
    as Hugging Face's default label names LABEL_0, LABEL_1, ..."""
    if isinstance(ratings, Mapping):
        return tuple(str(name) for name in ratings)
    return tuple(f"LABEL_{i}" for i in range(len(ratings)))


def rating_scores(example: Mapping[str, Any], labels: Sequence[str] = ()) -> tuple[float, ...]:
    """A rated example's ratings of ``labels``, in that order (NaN = not rated).

    A dict is read by name: an attribute it leaves out is not rated (NaN), but a dict that has
    none of the labels is an error (the names do not match the data). A list is positional: it
    must have one rating per label. ``labels=()``: every rating, in the example's order.
    """
    ratings, source = example["ratings"], example_source(example)
    _check_ratings(ratings, source)
    labels = tuple(labels) or rating_names(ratings)
    if isinstance(ratings, Mapping):
        if not any(name in ratings for name in labels):
            raise PreprocessError(
                f"{source}: field 'ratings' rates none of the reward model's labels {list(labels)}; it rates "
                f"{list(ratings)}: set reward.labels to the attribute names the data uses")
        values = [ratings.get(name) for name in labels]
    else:
        if len(ratings) != len(labels):
            raise PreprocessError(
                f"{source}: field 'ratings' has {len(ratings)} ratings but the reward model has {len(labels)} "
                f"labels {list(labels)}: give every row one rating per label (or ratings as a dict by name)")
        values = list(ratings)
    return tuple(math.nan if v is None else float(v) for v in values)


def _float(example: Mapping[str, Any], field: str) -> float:
    value = example.get(field)
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise PreprocessError(
            f"{example_source(example)}: field '{field}' must be a number, got {value!r}"
        ) from err


def _per_example_fields(example: Mapping[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    kind = example["kind"]
    if kind == "pair":
        scores = (_float(example, "score_chosen"), _float(example, "score_rejected"))
        label = 1.0
    elif kind == "unpaired":
        scores = (math.nan,)
        label = 1.0 if example["label"] else 0.0
    elif kind == "rated":
        scores = rating_scores(example, labels)
        label = 1.0
    else:
        scores = tuple(float(s) if s is not None else math.nan for s in example["scores"])
        label = 1.0
    return {
        "kind": kind,
        "weight": float(example.get("weight", 1.0)),
        "scores": scores,
        "margin": _float(example, "margin"),
        "label": label,
        "source": example_source(example),
    }


# ---------------------------------------------------------------------------
# Rendering and tokenizing one sequence
# ---------------------------------------------------------------------------


class _Encoder:
    """Renders and encodes one example's texts; encodings are cached (responses share the prompt's)."""

    def __init__(self, tokenizer: Tokenizer, options: RenderOptions, source: str):
        self.tokenizer = tokenizer
        self.options = options
        self.source = source
        self._encodings: dict[str, list[int]] = {}
        if options.template not in (None, TEMPLATE_FROM_TOKENIZER):
            self.tokenizer = dataclasses.replace(
                tokenizer, chat_template=options.template, chat_template_source="RenderOptions.template"
            )

    def render(self, messages: Sequence[Mapping[str, Any]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, **dict(self.options.template_kwargs)
        )

    def encode(self, text: str) -> list[int]:
        if text not in self._encodings:
            self._encodings[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._encodings[text]

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return self.tokenizer.backend.encode(text, add_special_tokens=False).offsets

    def boundary(self, full_text: str, full_ids: list[int], text: str, what: str) -> int:
        """Index of the first token of ``full_ids`` past ``text``, a prefix of ``full_text``."""
        if not full_text.startswith(text):
            at = _first_difference(text, full_text)
            window = slice(max(at - 40, 0), at + 40)
            raise PrefixError(
                f"{self.source}: the template is not prefix-stable: the rendering of {what} is not a prefix "
                f"of the full conversation's rendering; from character {at} it reads {text[window]!r} but "
                f"the full conversation reads {full_text[window]!r}. The response mask cannot be located: "
                f"use a template that renders earlier turns independently of later ones"
            )
        ids = self.encode(text)
        if full_ids[: len(ids)] == ids:
            return len(ids)
        # A token merges across the boundary: split before the first token not wholly inside `text`.
        return next(
            (t for t, (_, end) in enumerate(self.offsets(full_text)) if end > len(text)), len(full_ids)
        )


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _end_ids(tokenizer: Tokenizer, options: RenderOptions) -> frozenset[int]:
    if options.end_of_turn_tokens is None:
        ids = set(tokenizer.all_special_ids)
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return frozenset(ids)
    ids = set()
    for token in options.end_of_turn_tokens:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"RenderOptions.end_of_turn_tokens: {token!r} is not in the vocabulary of {tokenizer.folder}"
            )
        ids.add(token_id)
    return frozenset(ids)


def _chat_sequence(
    enc: _Encoder,
    prompt: Sequence[Mapping[str, Any]],
    response: Sequence[Mapping[str, Any]],
    end_ids: frozenset[int],
) -> tuple[list[int], list[int], int]:
    """(ids, mask, number of prompt tokens) of prompt + response through the chat template."""
    messages = list(prompt) + list(response)
    full_text = enc.render(messages, generation_prompt=False)
    full_ids = enc.encode(full_text)
    mask = [0] * len(full_ids)
    first_is_assistant = response[0]["role"] == "assistant"
    prompt_text = enc.render(prompt, generation_prompt=first_is_assistant)
    num_prompt = enc.boundary(full_text, full_ids, prompt_text, "the prompt with its generation prompt")
    last_scored = -1
    for j, message in enumerate(response):
        i = len(prompt) + j
        if message["role"] != "assistant":
            continue
        start = (
            num_prompt
            if j == 0
            else enc.boundary(
                full_text,
                full_ids,
                enc.render(messages[:i], generation_prompt=True),
                f"the conversation before response message {j} with the generation prompt",
            )
        )
        end = (
            len(full_ids)
            if j == len(response) - 1
            else enc.boundary(
                full_text,
                full_ids,
                enc.render(messages[: i + 1], generation_prompt=False),
                f"the conversation through response message {j}",
            )
        )
        closing = [t for t in range(start, end) if full_ids[t] in end_ids]
        stop = closing[-1] + 1 if closing else end
        for t in range(start, stop):
            mask[t] = 1
        last_scored = max(last_scored, stop - 1)
    if last_scored < num_prompt:
        raise PreprocessError(
            f"{enc.source}: a response has no scored tokens (no assistant message with "
            f"content); roles {[m['role'] for m in response]}"
        )
    keep = last_scored + 1  # tokens after the last scored one influence nothing in a causal model
    return full_ids[:keep], mask[:keep], num_prompt


def _plain_prompt_text(options: RenderOptions, prompt: Sequence[Mapping[str, Any]]) -> str:
    """A prompt in plain-text rendering: its messages' contents, then the separator."""
    return "".join(m["content"] for m in prompt) + options.text_separator


def _text_sequence(
    enc: _Encoder, prompt: Sequence[Mapping[str, Any]], response: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[int], int]:
    """(ids, mask, number of prompt tokens) of the plain concatenation prompt + response."""
    prompt_text = _plain_prompt_text(enc.options, prompt)  # unscored
    full_text = prompt_text + "".join(m["content"] for m in response)
    full_ids = list(enc.encode(full_text))
    num_prompt = enc.boundary(full_text, full_ids, prompt_text, "the prompt text")
    eos = enc.tokenizer.eos_token_id
    if enc.options.append_eos and eos is not None and full_ids[-1:] != [eos]:
        full_ids.append(eos)
    if len(full_ids) == num_prompt:
        raise PreprocessError(f"{enc.source}: a response renders to no tokens")
    return full_ids, [0] * num_prompt + [1] * (len(full_ids) - num_prompt), num_prompt


def tokenize_example(
    example: Mapping[str, Any], tokenizer: Tokenizer, options: Optional[RenderOptions] = None
) -> TokenizedExample:
    """Render and tokenize every response of a canonical example (see the module docstring)."""
    options = options or RenderOptions()
    check_example(example)
    source = example_source(example)
    enc = _Encoder(tokenizer, options, source)
    plain = options.template is None or (
        example.get("format", "chat") == "text" and options.text_format == "plain"
    )
    end_ids = _end_ids(tokenizer, options)
    add_bos = tokenizer.adds_bos if options.add_bos is None else options.add_bos
    bos = tokenizer.bos_token_id
    if add_bos and bos is None:
        raise ValueError(f"RenderOptions.add_bos is set but {tokenizer.folder} has no bos_token")
    sequences = []
    for _, conv in response_fields(example):
        if plain:
            ids, mask, num_prompt = _text_sequence(enc, example["prompt"], conv)
        else:
            ids, mask, num_prompt = _chat_sequence(enc, example["prompt"], conv, end_ids)
        if add_bos and ids[:1] != [bos]:  # the template (or text) did not write BOS itself
            ids, mask, num_prompt = [bos] + ids, [0] + mask, num_prompt + 1
        sequences.append((ids, mask, num_prompt))
    # The shared prompt: the prompt tokens common to all responses (they differ only where a
    # token merged across the boundary); leftovers open their response, unscored.
    shared = min(num_prompt for _, _, num_prompt in sequences)
    first = sequences[0][0]
    for ids, _, _ in sequences[1:]:
        shared = min(shared, _first_difference(first[:shared], ids[:shared]))
    return TokenizedExample(
        prompt_ids=np.asarray(first[:shared], np.int32),
        response_ids=[np.asarray(ids[shared:], np.int32) for ids, _, _ in sequences],
        response_masks=[np.asarray(mask[shared:], np.int8) for _, mask, _ in sequences],
        **_per_example_fields(example, options.rating_labels),
    )


def tokenize_prompt(
    prompt: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    options: Optional[RenderOptions] = None,
    *,
    format: str = "chat",  # pylint: disable=redefined-builtin
    source: str = "?",
) -> np.ndarray:
    """int32 ids of a canonical ``prompt`` (a message list) ready for generation: rendered as
    :func:`tokenize_example` renders the prompt of an example of that ``format`` ("chat": the
    template with the generation prompt; "text": plain text), BOS by the same rule. These are
    the prompt ids tokenize_example gives such an example, unless a token of its responses
    merges across the boundary (module docstring, step 2)."""
    options = options or RenderOptions()
    if format not in ("chat", "text"):
        raise PreprocessError(f"{source}: field 'format' must be 'chat' or 'text', got {format!r}")
    _check_conversation(prompt, "prompt", source, allow_empty=False)
    enc = _Encoder(tokenizer, options, source)
    if options.template is None or (format == "text" and options.text_format == "plain"):
        ids = list(enc.encode(_plain_prompt_text(options, prompt)))
    else:
        ids = list(enc.encode(enc.render(prompt, generation_prompt=True)))
    add_bos = tokenizer.adds_bos if options.add_bos is None else options.add_bos
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError(f"RenderOptions.add_bos is set but {tokenizer.folder} has no bos_token")
    if add_bos and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return np.asarray(ids, np.int32)
