"""Raw rows -> canonical preference examples, with validation.

    example = parse_row({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
                        shape="pair", location=Location("prefs.jsonl", 3))
    # {"kind": "pair", "format": "text", "prompt": [{"role": "user", "content": "Hi"}],
    #  "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [...],
    #  "score_chosen": nan, "score_rejected": nan, "margin": nan, "weight": 1.0,
    #  "source": "prefs.jsonl:3"}

The canonical example is the interface to preprocessing (the project's data contract): plain
dicts; conversations are lists of ``{"role", "content"}`` messages, and plain text becomes a
one-message conversation (prompt -> user, response -> assistant) with ``format: "text"``.
Kinds: "pair" (prompt, chosen, rejected, score_chosen, score_rejected, margin, weight, source),
"unpaired" (prompt, completion, label, weight, source), "ranked" (prompt, responses, scores,
weight, source) and "rated" (prompt, response, ratings, weight, source).

Shapes (``shape=``):

- ``"pair"``: ``prompt`` + ``chosen`` + ``rejected``. Either plain text (``format: "text"``), or
  message lists ``[{"role", "content"}, ...]`` (``format: "chat"``). With message lists the prompt
  may be implicit: the messages that ``chosen`` and ``rejected`` share from the start become the
  prompt, and only the differing tails stay as responses. An explicit prompt that the message lists
  repeat at their start (UltraFeedback style) is removed from them first.
- ``"unpaired"``: ``prompt`` + ``completion`` + ``label`` (True = desirable). Labels may be bools,
  0/1, or unambiguous words ("up"/"down", "good"/"bad", ...; see ``LABEL_WORDS``). Without a prompt,
  a message-list completion is split before its trailing assistant messages.
- ``"ranked"``: ``prompt`` + ``responses`` (K >= 2) + ``scores`` (higher is better) or ``ranks``
  (1 = best; converted to scores = -rank).
- ``"rated"``: ``prompt`` + one ``response`` + ``ratings``, the response's multi-attribute
  ratings for a regression reward model (HelpSteer2 / SteerLM): a dict ``{attribute: rating}``
  (kept as a dict, in the row's order) or a list of ratings (kept as a list: positional). A rating
  is a number; null / NaN (or an empty CSV cell) means "not rated" and is stored as NaN (the loss
  masks it). A row must rate something. Which attributes a reward model trains on, and in which
  order, is chosen later, by name (prefjax.data.tokenize.rating_scores): an attribute a dict
  leaves out is "not rated" (NaN), as a null is. The prompt / response split follows
  ``"unpaired"``'s.

Optional numeric columns: ``score_chosen``, ``score_rejected``, ``margin`` (pairs; NaN when absent)
and ``weight`` (all shapes; 1.0 when absent). Column names are configurable with a field mapping,
canonical name -> column, e.g. ``{"prompt": "question", "chosen": "response_a"}``. Columns that the
shape does not use are ignored; message dicts keep only ``role`` and ``content``.

Rows in other public layouts (ShareGPT, OpenAI messages, Alpaca, HH-RLHF dialogue text, ...) are
turned into these shapes first by prefjax.data.formats, which also detects the layout and runs the
parse loop over a file's rows (``formats.iter_parse``).

Every problem raises :class:`DataError` naming the file, the position (JSONL line, JSON-array
index, CSV/Parquet row) and the column. ``on_error="skip"`` callers record errors in a
:class:`LoadSummary` instead (counted per reason, never dropped silently).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

KINDS = ("pair", "unpaired", "ranked", "rated")
ROLES = ("system", "user", "assistant", "tool")
# Canonical field names a mapping may rename. "ranks" is an input-only alternative to "scores".
FIELD_NAMES = ("prompt", "chosen", "rejected", "completion", "label", "responses", "scores", "ranks",
               "response", "ratings", "score_chosen", "score_rejected", "margin", "weight")
ON_ERROR = ("raise", "skip")

# Unambiguous label words, compared after strip() and lower(). Anything else (e.g. "2", "maybe",
# "neutral") is an error rather than a guess.
LABEL_WORDS = {
    True: ("true", "1", "up", "thumbs_up", "thumbs-up", "good", "desirable", "positive", "yes"),
    False: ("false", "0", "down", "thumbs_down", "thumbs-down", "bad", "undesirable", "negative", "no"),
}

# Reasons, the keys of LoadSummary.skipped: one per kind of problem.
MISSING = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY = "empty_response"
IDENTICAL = "identical_responses"
BAD_ROLE = "bad_role"
BAD_SCORE = "bad_score"
BAD_LABEL = "bad_label"
BAD_JSON = "bad_json"
BAD_UTF8 = "bad_utf8"
BAD_ROW = "bad_row"
BAD_FILE = "bad_file"
UNKNOWN_FORMAT = "unknown_format"  # a row that fits no row format (prefjax.data.formats)

# The user-facing error policy (config data.on_error, the inspect CLI) -> this module's policy.
# "drop" is the older name of "skip", kept as a synonym.
DATA_ON_ERROR = {"error": "raise", "skip": "skip", "drop": "skip"}

Message = dict[str, str]
Conversation = list[Message]


# ---------------------------------------------------------------------------------------------
# Locations, errors and the skip summary
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Location:
    """Where a row came from: ``path`` and its position in the file.

    ``unit`` says how ``index`` counts: "line" (JSONL, 1-based), "index" (JSON array element,
    0-based like Python indexing) or "row" (CSV/Parquet data row, 1-based, header excluded).
    ``line`` is the physical line a CSV row starts on. ``index=None`` means the whole file.
    """

    path: str
    index: int | None = None
    unit: str = "line"
    line: int | None = None

    def __str__(self) -> str:
        """The example's "source" string: "path:index"."""
        return self.path if self.index is None else f"{self.path}:{self.index}"

    def describe(self) -> str:
        """Human form for error messages, e.g. "prefs.csv, row 3 (line 4)"."""
        if self.index is None:
            return self.path
        where = f"{self.path}, {self.unit} {self.index}"
        return where if self.line is None else f"{where} (line {self.line})"


class DataError(ValueError):
    """A bad row or file: the message names the file, the position and the field.

    ``reason`` is a short key (``missing_field``, ``bad_role``, ...) used to count skipped rows.
    """

    def __init__(self, location: Location, field: str | None, detail: str, reason: str):
        self.location, self.field, self.detail, self.reason = location, field, detail, reason
        where = location.describe()
        super().__init__(f"{where}: {detail}" if field is None else f"{where}: field {field!r}: {detail}")

    def __reduce__(self):
        # Rebuild from the four parts (ValueError's default would pass only the message).
        return (DataError, (self.location, self.field, self.detail, self.reason))


@dataclasses.dataclass
class LoadSummary:
    """What happened to the rows of one load: counts, never silent drops.

    ``skipped``: rows rejected as errors under ``on_error="skip"``, per reason.
    ``filtered``: rows a builder leaves out by design (e.g. HelpSteer2 ties), per reason.
    ``first_errors``: the first message per reason, to show what went wrong.
    ``row_format``: the row format the rows were read as (prefjax.data.formats), when known.
    """

    rows: int = 0
    examples: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    filtered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    row_format: str | None = None

    def record(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        self.first_errors.setdefault(error.reason, str(error))

    def record_filtered(self, reason: str, count: int = 1) -> None:
        self.filtered[reason] += count

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (stored in TFDS metadata)."""
        return {"rows": self.rows, "examples": self.examples, "skipped": dict(self.skipped),
                "filtered": dict(self.filtered), "first_errors": dict(self.first_errors),
                "row_format": self.row_format}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoadSummary":
        """The inverse of :meth:`as_dict` (missing keys take their defaults: older metadata)."""
        return cls(rows=int(data.get("rows", 0)), examples=int(data.get("examples", 0)),
                   skipped=collections.Counter(data.get("skipped", {})),
                   filtered=collections.Counter(data.get("filtered", {})),
                   first_errors=dict(data.get("first_errors", {})), row_format=data.get("row_format"))

    def __str__(self) -> str:
        text = f"{self.rows} rows read, {self.examples} examples"
        if self.skipped:
            text += f"; skipped {self.num_skipped} bad rows: " + ", ".join(
                f"{reason}={n}" for reason, n in sorted(self.skipped.items()))
            text += "".join(f"\n  first {reason}: {msg}" for reason, msg in sorted(self.first_errors.items()))
        if self.filtered:
            text += "; filtered " + ", ".join(f"{reason}={n}" for reason, n in sorted(self.filtered.items()))
        return text


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def row_policy(data_on_error: str) -> str:
    """The user-facing policy ("error" | "skip", or "drop" = "skip") -> "raise" | "skip"."""
    if data_on_error not in DATA_ON_ERROR:
        raise ValueError(f"data.on_error must be one of {list(DATA_ON_ERROR)}, got {data_on_error!r}")
    return DATA_ON_ERROR[data_on_error]


def handle_error(error: DataError, on_error: str, summary: LoadSummary | None) -> None:
    """Apply the error policy: raise, or count the row as skipped in ``summary``."""
    if on_error == "raise" or summary is None:
        raise error
    summary.record(error)


# ---------------------------------------------------------------------------------------------
# Field mapping and access to one row
# ---------------------------------------------------------------------------------------------

def check_fields(fields: Mapping[str, str] | None) -> dict[str, str]:
    """Validates a canonical-name -> column mapping (unknown canonical names are a typo)."""
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"field mapping: unknown canonical names {unknown}; known: {list(FIELD_NAMES)}")
    for name, column in fields.items():
        if not isinstance(column, str) or not column:
            raise ValueError(f"field mapping: column for {name!r} must be a non-empty string, got {column!r}")
    return fields


def _absent(value: Any) -> bool:
    # None (JSON null, Parquet null) and "" (an empty CSV cell) both mean "not given".
    return value is None or (isinstance(value, str) and value == "")


class Row:
    """One raw row with its location and field mapping; builds located errors.

    ``get``/``has``/``require`` read a canonical field through the mapping; ``row`` is the raw dict
    (row formats read their own columns from it, prefjax.data.formats).
    """

    def __init__(self, row: Mapping[str, Any], location: Location, fields: Mapping[str, str]):
        self.row, self.location, self.fields = row, location, fields

    def column(self, name: str) -> str:
        return self.fields.get(name, name)

    def label(self, name: str, suffix: str = "") -> str:
        """Field name for messages: the column as written in the file (canonical name if renamed)."""
        column = self.column(name)
        return column + suffix if column == name else f"{column}{suffix} ({name})"

    def error(self, name: str, detail: str, reason: str, suffix: str = "") -> DataError:
        return DataError(self.location, self.label(name, suffix), detail, reason)

    def has(self, name: str) -> bool:
        return not _absent(self.row.get(self.column(name)))

    def get(self, name: str) -> Any:
        return self.row.get(self.column(name))

    def require(self, name: str) -> Any:
        value = self.get(name)
        if value is None:
            present = sorted(str(k) for k in self.row)
            raise self.error(name, f"missing (row has columns {present})", MISSING)
        if isinstance(value, str) and not value.strip():
            raise self.error(name, "empty", EMPTY)
        return value


# ---------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------

def _message(value: Any, r: Row, name: str, suffix: str) -> Message:
    if not isinstance(value, Mapping):
        raise r.error(name, f"a message must be a dict with 'role' and 'content', got {type(value).__name__}",
                      WRONG_TYPE, suffix)
    for key in ("role", "content"):
        if key not in value:
            raise r.error(name, f"message has no {key!r} (keys: {sorted(value)})", MISSING, f"{suffix}.{key}")
    role, content = value["role"], value["content"]
    if not isinstance(role, str) or role not in ROLES:
        raise r.error(name, f"role must be one of {ROLES}, got {role!r}", BAD_ROLE, f"{suffix}.role")
    if not isinstance(content, str):
        raise r.error(name, f"content must be a string, got {type(content).__name__}", WRONG_TYPE,
                      f"{suffix}.content")
    return {"role": role, "content": content}


def _conversation(value: Any, r: Row, name: str, role: str, suffix: str = "") -> tuple[Conversation, bool]:
    """(messages, is_chat): text becomes one message with ``role``; a list is validated message by message."""
    if isinstance(value, str):
        return [{"role": role, "content": value}], False
    if isinstance(value, (list, tuple)):
        if not value:
            raise r.error(name, "empty message list", EMPTY, suffix)
        return [_message(m, r, name, f"{suffix}[{i}]") for i, m in enumerate(value)], True
    raise r.error(name, f"must be text or a list of messages, got {type(value).__name__}", WRONG_TYPE, suffix)


def shared_prefix_length(conversations: Sequence[Conversation]) -> int:
    """Number of leading messages that all conversations have in common."""
    n = 0
    for messages in zip(*conversations):
        if any(m != messages[0] for m in messages[1:]):
            break
        n += 1
    return n


def _check_response(messages: Conversation, r: Row, name: str, suffix: str, offset: int) -> None:
    """A response starts with an assistant message and has no blank message."""
    if messages[0]["role"] != "assistant":
        raise r.error(name, f"a response must start with an assistant message, got role "
                      f"{messages[0]['role']!r}", BAD_ROLE, f"{suffix}[{offset}].role")
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise r.error(name, "empty response", EMPTY, f"{suffix}[{offset + i}].content")


def _text_response(messages: Conversation, r: Row, name: str, suffix: str = "") -> None:
    if not messages[0]["content"].strip():
        raise r.error(name, "empty response", EMPTY, suffix)


def _prompt(r: Row) -> tuple[Conversation, bool]:
    """The explicit prompt (text -> one user message), or ([], False) when absent."""
    if not r.has("prompt"):
        return [], False
    prompt, chat = _conversation(r.get("prompt"), r, "prompt", "user")
    if not chat and not prompt[0]["content"].strip():
        raise r.error("prompt", "empty prompt", EMPTY)
    return prompt, chat


def _split_prompt(prompt: Conversation, responses: list[Conversation], r: Row,
                  names: Sequence[tuple[str, str]]) -> tuple[Conversation, list[Conversation], int]:
    """Moves the explicit prompt repeated at the start of every response, then the shared prefix,
    into the prompt. Returns (prompt, tails, messages removed from each response)."""
    offset = 0
    if prompt and all(resp[:len(prompt)] == prompt for resp in responses):
        offset = len(prompt)
        responses = [resp[offset:] for resp in responses]
    if all(resp == responses[0] for resp in responses[1:]):
        (first, first_suffix), (name, suffix) = names[0], names[-1]
        raise r.error(name, f"identical to {first}{first_suffix}", IDENTICAL, suffix)
    shared = shared_prefix_length(responses)
    for (name, suffix), resp in zip(names, responses):
        if shared == len(resp):
            raise r.error(name, "has no messages left after the prompt shared with the other response(s)",
                          EMPTY, suffix)
    prompt = prompt + responses[0][:shared]
    return prompt, [resp[shared:] for resp in responses], offset + shared


def _no_prompt(r: Row) -> DataError:
    return r.error("prompt", "missing or empty: give a prompt column, or message lists that start with "
                   "the shared prompt", MISSING)


def _same_stripped(a: Conversation, b: Conversation) -> bool:
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# Numbers and labels
# ---------------------------------------------------------------------------------------------

def _to_float(value: Any, r: Row, name: str, suffix: str = "") -> float:
    # bool is an int subclass: True as a score is almost certainly a misplaced label.
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise r.error(name, f"must be a number, got {value!r}", BAD_SCORE, suffix)


def _optional_float(r: Row, name: str) -> float:
    """A score/margin: NaN when absent; present values must be finite (NaN also means absent)."""
    if not r.has(name):
        return math.nan
    value = _to_float(r.get(name), r, name)
    if math.isinf(value):
        raise r.error(name, f"must be finite, got {value}", BAD_SCORE)
    return value


def _weight(r: Row) -> float:
    if not r.has("weight"):
        return 1.0
    value = _to_float(r.get("weight"), r, "weight")
    if not math.isfinite(value) or value < 0:
        raise r.error("weight", f"must be a finite number >= 0, got {value}", BAD_SCORE)
    return value


def parse_label(value: Any) -> bool | None:
    """True/False for an unambiguous label, None otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real):
        return {0: False, 1: True}.get(value) if float(value) in (0.0, 1.0) else None
    if isinstance(value, str):
        word = value.strip().lower()
        for label, words in LABEL_WORDS.items():
            if word in words:
                return label
    return None


def _label(r: Row) -> bool:
    if not r.has("label"):
        raise r.error("label", "missing or empty", MISSING)
    value = r.get("label")
    label = parse_label(value)
    if label is None:
        raise r.error("label", f"ambiguous label {value!r}: use a bool, 0/1, or one of "
                      f"{LABEL_WORDS[True]} / {LABEL_WORDS[False]}", BAD_LABEL)
    return label


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

def _parse_pair(r: Row) -> dict[str, Any]:
    chosen, chosen_chat = _conversation(r.require("chosen"), r, "chosen", "assistant")
    rejected, rejected_chat = _conversation(r.require("rejected"), r, "rejected", "assistant")
    if chosen_chat != rejected_chat:
        kinds = {True: "a message list", False: "text"}
        raise r.error("rejected", f"is {kinds[rejected_chat]} but chosen is {kinds[chosen_chat]}", WRONG_TYPE)
    prompt, prompt_chat = _prompt(r)
    if chosen_chat:
        prompt, (chosen, rejected), offset = _split_prompt(prompt, [chosen, rejected], r,
                                                           [("chosen", ""), ("rejected", "")])
        _check_response(chosen, r, "chosen", "", offset)
        _check_response(rejected, r, "rejected", "", offset)
    else:
        _text_response(chosen, r, "chosen")
        _text_response(rejected, r, "rejected")
    if not prompt:
        raise _no_prompt(r)
    if _same_stripped(chosen, rejected):
        raise r.error("rejected", "identical to chosen", IDENTICAL)
    return {"kind": "pair", "format": "chat" if (chosen_chat or prompt_chat) else "text", "prompt": prompt,
            "chosen": chosen, "rejected": rejected, "score_chosen": _optional_float(r, "score_chosen"),
            "score_rejected": _optional_float(r, "score_rejected"), "margin": _optional_float(r, "margin"),
            "weight": _weight(r), "source": str(r.location)}


def _single_response(r: Row, name: str) -> tuple[Conversation, Conversation, str]:
    """(prompt, response, format) of a one-response row (unpaired, rated): a message-list response
    that repeats the prompt at its start loses it; without a prompt, everything before the
    response's trailing assistant messages is the prompt."""
    response, chat = _conversation(r.require(name), r, name, "assistant")
    prompt, prompt_chat = _prompt(r)
    offset = 0
    if chat and prompt and response[:len(prompt)] == prompt:
        offset = len(prompt)
    elif chat and not prompt:
        offset = max((i + 1 for i, m in enumerate(response) if m["role"] != "assistant"), default=0)
        prompt = response[:offset]
    response = response[offset:]
    if not prompt:
        raise _no_prompt(r)
    if not response:
        raise r.error(name, "has no assistant message after the prompt", EMPTY)
    if chat:
        _check_response(response, r, name, "", offset)
    else:
        _text_response(response, r, name)
    return prompt, response, "chat" if (chat or prompt_chat) else "text"


def _parse_unpaired(r: Row) -> dict[str, Any]:
    prompt, completion, fmt = _single_response(r, "completion")
    return {"kind": "unpaired", "format": fmt, "prompt": prompt, "completion": completion, "label": _label(r),
            "weight": _weight(r), "source": str(r.location)}


def _numbers(r: Row, name: str, count: int) -> list[float]:
    values = r.get(name)
    if not isinstance(values, (list, tuple)):
        raise r.error(name, f"must be a list of numbers, got {type(values).__name__}", WRONG_TYPE)
    if len(values) != count:
        raise r.error(name, f"has {len(values)} values for {count} responses", BAD_SCORE)
    out = [_to_float(v, r, name, f"[{i}]") for i, v in enumerate(values)]
    for i, v in enumerate(out):
        if not math.isfinite(v):
            raise r.error(name, f"must be finite, got {v}", BAD_SCORE, f"[{i}]")
    return out


def _parse_ranked(r: Row) -> dict[str, Any]:
    raw = r.require("responses")
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
        raise r.error("responses", f"must be a list of responses, got {type(raw).__name__}", WRONG_TYPE)
    if len(raw) < 2:
        raise r.error("responses", f"needs at least 2 responses, got {len(raw)}", EMPTY)
    parsed = [_conversation(v, r, "responses", "assistant", f"[{i}]") for i, v in enumerate(raw)]
    responses, chats = [p[0] for p in parsed], [p[1] for p in parsed]
    if len(set(chats)) > 1:
        raise r.error("responses", "mixes text and message lists", WRONG_TYPE)
    chat = chats[0]
    if r.has("scores") == r.has("ranks"):
        raise r.error("scores", f"give exactly one of {r.label('scores')!r} and {r.label('ranks')!r}",
                      MISSING if not r.has("scores") else BAD_SCORE)
    scores = (_numbers(r, "scores", len(raw)) if r.has("scores")
              else [-rank for rank in _numbers(r, "ranks", len(raw))])
    prompt, prompt_chat = _prompt(r)
    names = [("responses", f"[{i}]") for i in range(len(raw))]
    if chat:
        prompt, responses, offset = _split_prompt(prompt, responses, r, names)
        for (name, suffix), resp in zip(names, responses):
            _check_response(resp, r, name, suffix, offset)
    else:
        for (name, suffix), resp in zip(names, responses):
            _text_response(resp, r, name, suffix)
    if not prompt:
        raise _no_prompt(r)
    for j in range(len(responses)):
        for i in range(j):
            if _same_stripped(responses[i], responses[j]):
                raise r.error("responses", f"identical to responses[{i}]", IDENTICAL, f"[{j}]")
    return {"kind": "ranked", "format": "chat" if (chat or prompt_chat) else "text", "prompt": prompt,
            "responses": responses, "scores": scores, "weight": _weight(r), "source": str(r.location)}


def rating_value(value: Any, location: Location, field: str) -> float:
    """One attribute rating as a float: NaN for "not rated" (null, an empty cell, NaN); a number or
    numeric text otherwise. Raises DataError (BAD_SCORE) naming ``field`` for anything else."""
    if _absent(value):
        return math.nan
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None or math.isinf(number):
        raise DataError(location, field, f"must be a number (or null when not rated), got {value!r}", BAD_SCORE)
    return number


def _ratings(r: Row) -> dict[str, float] | list[float]:
    raw = r.get("ratings")
    if _absent(raw):
        raise r.error("ratings", f"missing (row has columns {sorted(str(k) for k in r.row)})", MISSING)
    if isinstance(raw, Mapping):
        ratings: dict[str, float] | list[float] = {}
        for name, value in raw.items():
            if not isinstance(name, str) or not name.strip():
                raise r.error("ratings", f"attribute names must be non-empty text, got {name!r}", WRONG_TYPE)
            ratings[name] = rating_value(value, r.location, r.label("ratings", f".{name}"))
    elif isinstance(raw, (list, tuple)):
        ratings = [rating_value(v, r.location, r.label("ratings", f"[{i}]")) for i, v in enumerate(raw)]
    else:
        raise r.error("ratings", f"must be a dict {{attribute: rating}} or a list of ratings, got "
                      f"{type(raw).__name__}", WRONG_TYPE)
    values = list(ratings.values()) if isinstance(ratings, dict) else ratings
    if not values:
        raise r.error("ratings", "has no ratings", MISSING)
    if all(math.isnan(v) for v in values):
        raise r.error("ratings", "rates nothing: every rating is null or NaN", MISSING)
    return ratings


def _parse_rated(r: Row) -> dict[str, Any]:
    prompt, response, fmt = _single_response(r, "response")
    return {"kind": "rated", "format": fmt, "prompt": prompt, "response": response, "ratings": _ratings(r),
            "weight": _weight(r), "source": str(r.location)}


_PARSERS = {"pair": _parse_pair, "unpaired": _parse_unpaired, "ranked": _parse_ranked, "rated": _parse_rated}


def parse_row(row: Mapping[str, Any], shape: str, location: Location,
              fields: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One raw row -> one canonical example (a fresh dict; the row is not modified).

    Raises DataError (file, position and field in the message) on any problem.
    """
    if shape not in _PARSERS:
        raise ValueError(f"shape must be one of {KINDS}, got {shape!r}")
    if not isinstance(row, Mapping):
        raise DataError(location, None, f"a row must be an object/dict, got {type(row).__name__}", BAD_ROW)
    return _PARSERS[shape](Row(row, location, check_fields(fields)))


def pair_to_unpaired(example: Mapping[str, Any], desirable: bool) -> dict[str, Any]:
    """One side of a canonical pair as an unpaired example: the chosen response is desirable
    (label True), the rejected one undesirable (TRL's convention for KTO on paired data)."""
    side = "chosen" if desirable else "rejected"
    return {"kind": "unpaired", "format": example["format"], "prompt": copy.deepcopy(example["prompt"]),
            "completion": copy.deepcopy(example[side]), "label": desirable, "weight": example["weight"],
            "source": f"{example['source']} ({side})"}
