"""Row formats: a raw row in a known public layout -> the fields ``records.parse_row`` reads.

    summary = LoadSummary()
    examples = list(iter_parse(located_rows, row_format="auto", on_error="skip", summary=summary))
    # logs once: "prefs.jsonl: rows look like sharegpt (conversations + chosen/rejected or a label);
    #             set data.format to override"
    example = parse_as("alpaca", row, Location("prefs.jsonl", 3))

``records`` knows four shapes with canonical column names (pair / unpaired / ranked / rated). A row
format says how the columns of a public dataset layout map onto one of them. The formats, by
the name ``data.format`` (or ``row_format=``) takes:

=========================  =====================================================================  ==========
format                     columns                                                                gives
=========================  =====================================================================  ==========
trl_pair                   ``prompt`` + ``chosen`` + ``rejected``: TRL's standard (text) and      pair
                           conversational (message lists) layouts; without ``prompt`` the
                           messages chosen and rejected share from the start are the prompt
trl_unpaired               ``prompt`` + ``completion`` + ``label`` (TRL's unpaired layout)        unpaired
ranked                     ``prompt`` + ``responses`` + ``scores`` (higher is better) or          ranked
                           ``ranks`` (1 = best)
sharegpt                   ``conversations`` ``[{"from", "value"}]`` (+ optional ``system``)      pair or
                           + ``chosen``/``rejected`` (one ``{"from", "value"}`` message, a list   unpaired
                           of them, or text); or + ``label``/``kto_tag`` (the conversation
                           ends with the judged assistant turn(s)); LLaMA-Factory's layout
messages                   ``messages`` ``[{"role", "content"}]`` (OpenAI style) +                pair or
                           ``chosen``/``rejected`` (a message, a list of them, or text); or      unpaired
                           + ``label``/``kto_tag``
alpaca                     ``instruction`` [+ ``input``] [+ ``system``, ``history``] +            pair or
                           ``chosen``/``rejected``, or ``output_1``/``output_2`` +               unpaired
                           ``preference`` (1 or 2: the better output; AlpacaFarm), or
                           ``output`` + ``label``/``kto_tag``; prompt = instruction + "\\n\\n" +
                           input when input is not empty
hh_rlhf                    ``chosen``/``rejected`` dialogue text of ``"\\n\\nHuman: ..."`` /       pair
                           ``"\\n\\nAssistant: ..."`` turns (Anthropic/hh-rlhf)
ultrafeedback_binarized    ``prompt`` + ``chosen``/``rejected`` message lists that start with     pair
                           the prompt + ``score_chosen``/``score_rejected``
                           (HuggingFaceH4/ultrafeedback_binarized); the prompt column is left
                           out: the shared first message is the prompt
ultrafeedback              ``instruction`` + ``completions`` ``[{"response",                      ranked
                           "fine-grained_score" (else "overall_score")}]`` (openbmb/UltraFeedback)
rated                      ``prompt`` + ``response`` + ``ratings`` (``{attribute: rating}`` or a  rated
                           list of ratings; null = not rated)
helpsteer2                 ``prompt`` + ``response`` + rating columns ``helpfulness``,            rated
                           ``correctness``, ``coherence``, ``complexity``, ``verbosity``
                           (nvidia/HelpSteer2, one rated response per row): ratings = those five,
                           in that order, NaN where a column is missing or null; the prompt text
                           is split into messages at ``<extra_id_1>User`` / ``Assistant`` lines,
                           so every example is a conversation (as the ``helpsteer2`` TFDS
                           builder's)
=========================  =====================================================================  ==========

``data.fields`` (a canonical name -> column mapping) renames the canonical columns a format reads
(prompt, chosen, rejected, completion, label, responses, scores, ranks, response, ratings,
score_chosen, score_rejected, margin, weight); a format's own columns (conversations, messages,
instruction, output_1, helpfulness, ...) keep their public names. Optional score/margin/weight
columns pass through.

Detection (``row_format="auto"``): each format recognises rows by its distinguishing columns;
where several fit, a more specific format wins over the one it refines (sharegpt, messages,
alpaca, hh_rlhf and ultrafeedback_binarized over trl_pair; ultrafeedback_binarized over
messages); anything else that fits several is an error that names them. The first row that fits
a format decides it for the whole source (and the first example its kind); the choice is logged
once at WARNING, like every data notice of the trainer. A row that does not fit the chosen
format raises ``records.DataError`` naming the file, position and field (counted under
``on_error="skip"``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prefjax import suggest
from prefjax.data.records import (
    BAD_LABEL,
    BAD_ROLE,
    BAD_ROW,
    BAD_SCORE,
    MISSING,
    UNKNOWN_FORMAT,
    WRONG_TYPE,
    DataError,
    LoadSummary,
    Location,
    Row,
    check_fields,
    check_on_error,
    handle_error,
    parse_row,
    rating_value,
)

log = logging.getLogger(__name__)

AUTO = "auto"
AMBIGUOUS = "ambiguous_format"
Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class Converted:
    """A row re-laid for ``records.parse_row``: its shape, the row, and the canonical name ->
    column mapping to read it with (so errors name the columns as the file spells them)."""

    shape: str
    row: Mapping[str, Any]
    fields: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """One public row layout: how to recognise its rows and how to re-lay them."""

    name: str
    looks_like: str  # its columns in a few words, for the detection notice
    shapes: tuple[str, ...]
    matches: Callable[[Row], bool]
    convert: Callable[[Row], Converted]
    refines: tuple[str, ...] = ()  # formats whose rows this one's are a special case of


class AmbiguousFormatError(DataError):
    """Rows that fit several formats: a setting to make, not a bad row (never skipped)."""

    def __init__(self, location: Location, candidates: Sequence[RowFormat]):
        names = ", ".join(f"{f.name} ({f.looks_like})" for f in candidates)
        super().__init__(location, None,
                         f"rows fit several formats: {names}; set data.format to the right one", AMBIGUOUS)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

def _present(value: Any) -> bool:
    # As records reads cells: None (null) and "" (an empty CSV cell) are "not given".
    return not (value is None or (isinstance(value, str) and value == ""))


def _columns(r: Row) -> list[str]:
    return sorted(str(k) for k in r.row)


def _own_column(r: Row, column: str, fmt: str) -> Any:
    """A format's own (not renamable) column, which must be there."""
    value = r.row.get(column)
    if value is None:
        raise DataError(r.location, column,
                        f"missing (row has columns {_columns(r)}); is data.format={fmt!r} right?", MISSING)
    return value


def _text(value: Any, r: Row, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(r.location, column, f"must be text, got {type(value).__name__}", WRONG_TYPE)
    return value


def _label_column(r: Row) -> str | None:
    """The column holding an unpaired label: ``label`` (renamable) or LLaMA-Factory's ``kto_tag``."""
    if r.has("label"):
        return r.column("label")
    return "kto_tag" if _present(r.row.get("kto_tag")) else None


def _relaid(r: Row, shape: str, values: Mapping[str, Any], fields: Mapping[str, str],
            drop: Sequence[str] = ()) -> Converted:
    """The row with ``values`` (column -> value) replaced, ``drop``'s canonical columns removed (so
    parse_row does not read them), and ``fields`` added to the mapping."""
    row = {k: v for k, v in r.row.items() if k not in {r.column(name) for name in drop}}
    row.update(values)
    return Converted(shape, row, {**r.fields, **fields})


# ---------------------------------------------------------------------------------------------
# TRL's layouts and ranked rows: the canonical columns themselves
# ---------------------------------------------------------------------------------------------

def _as_is(shape: str) -> Callable[[Row], Converted]:
    def convert(r: Row) -> Converted:
        return Converted(shape, r.row, r.fields)
    return convert


# ---------------------------------------------------------------------------------------------
# Conversations with chosen/rejected or a label: sharegpt and messages
# ---------------------------------------------------------------------------------------------

# ShareGPT speaker names (the "from" key) -> roles. Tool calls are assistant turns, tool results
# tool turns (LLaMA-Factory's function_call / observation).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "function_call": "assistant", "system": "system", "tool": "tool", "observation": "tool",
                  "function": "tool", "ipython": "tool"}


def _sharegpt_message(value: Any, r: Row, field: str) -> Message:
    if not isinstance(value, Mapping) or "from" not in value or "value" not in value:
        got = f"keys {sorted(value)}" if isinstance(value, Mapping) else type(value).__name__
        raise DataError(r.location, field,
                        f"a sharegpt message must be a dict with 'from' and 'value', got {got}", WRONG_TYPE)
    speaker = value["from"]
    role = SHAREGPT_ROLES.get(speaker.strip().lower()) if isinstance(speaker, str) else None
    if role is None:
        raise DataError(r.location, f"{field}.from", f"unknown speaker {speaker!r}; expected one of "
                        f"{sorted(SHAREGPT_ROLES)}", BAD_ROLE)
    return {"role": role, "content": _text(value["value"], r, f"{field}.value")}


def _sharegpt_turns(value: Any, r: Row, field: str) -> list[Message]:
    if isinstance(value, Mapping):  # one message, as chosen/rejected usually are
        return [_sharegpt_message(value, r, field)]
    if not isinstance(value, (list, tuple)):
        raise DataError(r.location, field,
                        f"must be a list of {{from, value}} messages, got {type(value).__name__}", WRONG_TYPE)
    return [_sharegpt_message(m, r, f"{field}[{i}]") for i, m in enumerate(value)]


def _sharegpt_response(value: Any, r: Row, field: str) -> Any:
    # Text stays text: records makes it one assistant message.
    return value if isinstance(value, str) else _sharegpt_turns(value, r, field)


def _message_response(value: Any, r: Row, field: str) -> Any:
    del r, field  # records validates the messages
    return [value] if isinstance(value, Mapping) else value


def _conversation_with_responses(r: Row, column: str, turns: Any,
                                 response: Callable[[Any, Row, str], Any]) -> Converted:
    """``turns`` (the prompt) + chosen/rejected -> a pair; ``turns`` + a label -> unpaired."""
    if r.has("chosen") or r.has("rejected"):
        values = {column: turns}
        for name in ("chosen", "rejected"):
            if r.has(name):
                values[r.column(name)] = response(r.get(name), r, r.label(name))
        return _relaid(r, "pair", values, {"prompt": column})
    label = _label_column(r)
    if label is not None:
        # The conversation ends with the judged assistant turn(s); records splits the prompt off.
        return _relaid(r, "unpaired", {column: turns}, {"completion": column, "label": label},
                       drop=("prompt",))
    raise DataError(r.location, r.label("chosen"), f"missing: {column} rows need chosen + rejected (pairs) "
                    f"or a label / kto_tag (unpaired); row has columns {_columns(r)}", MISSING)


def _sharegpt(r: Row) -> Converted:
    turns = _sharegpt_turns(_own_column(r, "conversations", "sharegpt"), r, "conversations")
    system = r.row.get("system")
    if isinstance(system, str) and system.strip():
        turns = [{"role": "system", "content": system}] + turns
    return _conversation_with_responses(r, "conversations", turns, _sharegpt_response)


def _messages(r: Row) -> Converted:
    turns = _own_column(r, "messages", "messages")
    return _conversation_with_responses(r, "messages", turns, _message_response)


# ---------------------------------------------------------------------------------------------
# alpaca
# ---------------------------------------------------------------------------------------------

def _alpaca_prompt(r: Row) -> Any:
    """instruction [+ "\\n\\n" + input]; a message list when there is a system text or a history."""
    text = _text(_own_column(r, "instruction", "alpaca"), r, "instruction")
    extra = r.row.get("input")
    if _present(extra) and _text(extra, r, "input").strip():
        text = f"{text}\n\n{extra}"
    system, history = r.row.get("system"), r.row.get("history")
    if not (_present(system) or history):
        return text
    messages = [{"role": "system", "content": _text(system, r, "system")}] if _present(system) else []
    for i, turn in enumerate(history or []):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise DataError(r.location, f"history[{i}]", "must be a [question, answer] pair", WRONG_TYPE)
        messages += [{"role": "user", "content": _text(turn[0], r, f"history[{i}][0]")},
                     {"role": "assistant", "content": _text(turn[1], r, f"history[{i}][1]")}]
    return messages + [{"role": "user", "content": text}]


def _preference(r: Row) -> int:
    """AlpacaFarm's ``preference``: 1 or 2, the better of output_1 and output_2."""
    value = _own_column(r, "preference", "alpaca")
    number = value.strip() if isinstance(value, str) else value
    if isinstance(number, str) and number in ("1", "2"):
        return int(number)
    if isinstance(number, numbers.Real) and not isinstance(number, bool) and float(number) in (1.0, 2.0):
        return int(number)
    raise DataError(r.location, "preference",
                    f"must be 1 (output_1 is better) or 2 (output_2 is better), got {value!r}", BAD_LABEL)


def _alpaca(r: Row) -> Converted:
    values = {"instruction": _alpaca_prompt(r)}
    if "output_1" in r.row or "output_2" in r.row:
        better = _preference(r)
        return _relaid(r, "pair", values, {"prompt": "instruction", "chosen": f"output_{better}",
                                           "rejected": f"output_{3 - better}"})
    if r.has("chosen") or r.has("rejected"):
        return _relaid(r, "pair", values, {"prompt": "instruction"})
    if "output" in r.row:
        label = _label_column(r)
        if label is None:
            raise DataError(r.location, r.label("label"), "missing: an alpaca row with one output is "
                            "preference data only with a label (or kto_tag); pairs need chosen + rejected or "
                            "output_1 + output_2 + preference", MISSING)
        return _relaid(r, "unpaired", values,
                       {"prompt": "instruction", "completion": "output", "label": label})
    raise DataError(r.location, r.label("chosen"), "missing: alpaca rows need chosen + rejected, output_1 + "
                    f"output_2 + preference, or output + label; row has columns {_columns(r)}", MISSING)


# ---------------------------------------------------------------------------------------------
# hh_rlhf dialogue text
# ---------------------------------------------------------------------------------------------

_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# A turn header at the very start or after a blank line. Some rows start without the "\n\n".
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def parse_dialogue(text: Any, location: Location, field: str) -> list[Message]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}]``
    (Human -> user, Assistant -> assistant, content stripped)."""
    if text is None:
        raise DataError(location, field, "missing", MISSING)
    if not isinstance(text, str):
        raise DataError(location, field, f"must be dialogue text, got {type(text).__name__}", WRONG_TYPE)
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(location, field, "dialogue text must start with a 'Human:' turn", BAD_ROLE)
    # parts = ["", role, content, role, content, ...]
    turns = zip(parts[1::2], parts[2::2])
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in turns]


def _is_dialogue(value: Any) -> bool:
    return isinstance(value, str) and re.match(r"\s*Human:", value) is not None and "\n\nAssistant:" in value


def _hh_rlhf(r: Row) -> Converted:
    # The whole conversation is in each text: a prompt column would be counted twice.
    values = {r.column(name): parse_dialogue(r.get(name), r.location, r.label(name))
              for name in ("chosen", "rejected")}
    return _relaid(r, "pair", values, {}, drop=("prompt",))


# ---------------------------------------------------------------------------------------------
# UltraFeedback: binarized (H4) and raw (openbmb)
# ---------------------------------------------------------------------------------------------

def _repeats_prompt(messages: Any, prompt: str) -> bool:
    return (isinstance(messages, list) and bool(messages) and isinstance(messages[0], Mapping)
            and messages[0].get("role") == "user" and isinstance(messages[0].get("content"), str)
            and messages[0]["content"].strip() == prompt.strip())


def _is_ultrafeedback_binarized(r: Row) -> bool:
    prompt = r.get("prompt")
    return (isinstance(prompt, str) and r.has("score_chosen") and r.has("score_rejected")
            and _repeats_prompt(r.get("chosen"), prompt) and _repeats_prompt(r.get("rejected"), prompt))


def _ultrafeedback_binarized(r: Row) -> Converted:
    # The prompt text can differ from the first message by whitespace: the shared first message is
    # the prompt, so it is not counted twice.
    return _relaid(r, "pair", {}, {}, drop=("prompt",))


def _ultrafeedback(r: Row) -> Converted:
    completions = _own_column(r, "completions", "ultrafeedback")
    if not isinstance(completions, (list, tuple)):
        raise DataError(r.location, "completions", f"must be a list of completions, got "
                        f"{type(completions).__name__}", WRONG_TYPE)
    responses, scores = [], []
    for i, completion in enumerate(completions):
        if not isinstance(completion, Mapping):
            raise DataError(r.location, f"completions[{i}]",
                            f"must be a dict, got {type(completion).__name__}", WRONG_TYPE)
        responses.append(_text(completion.get("response"), r, f"completions[{i}].response"))
        # fine-grained_score (the mean of the four aspect ratings) is what H4 binarized by.
        key = "fine-grained_score" if "fine-grained_score" in completion else "overall_score"
        score = completion.get(key)
        if not (isinstance(score, numbers.Real) and not isinstance(score, bool) and math.isfinite(score)):
            raise DataError(r.location, f"completions[{i}].{key}", f"must be a number, got {score!r}",
                            BAD_SCORE)
        scores.append(float(score))
    values = {"completions": responses, "completions[].score": scores}
    return _relaid(r, "ranked", values, {"prompt": "instruction", "responses": "completions",
                                         "scores": "completions[].score"}, drop=("ranks",))


# ---------------------------------------------------------------------------------------------
# HelpSteer2: one rated response per row
# ---------------------------------------------------------------------------------------------

# nvidia/HelpSteer2's rated attributes (0-4 each), in the dataset card's order: the rated
# examples' ratings, and the default labels of a reward model trained on them.
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
_HELPSTEER2_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")
_HELPSTEER2_ROLES = {"User": "user", "Assistant": "assistant"}


def parse_helpsteer2_prompt(text: str) -> list[Message]:
    """HelpSteer2 prompt text -> messages: the first turn is the user's, later turns follow
    ``<extra_id_1>User`` / ``<extra_id_1>Assistant`` lines (multi-turn prompts, about 29%)."""
    parts = _HELPSTEER2_TURN.split(text)
    roles = ["user"] + [_HELPSTEER2_ROLES[role] for role in parts[1::2]]
    return [{"role": role, "content": content.strip()} for role, content in zip(roles, parts[0::2])]


def _is_helpsteer2(r: Row) -> bool:
    return (r.has("response") and not r.has("ratings")
            and any(column in r.row for column in HELPSTEER2_ATTRIBUTES))


def _helpsteer2(r: Row) -> Converted:
    # Every attribute, in order, NaN where missing: rows agree on what ratings[i] is.
    ratings = {name: rating_value(r.row.get(name), r.location, name) for name in HELPSTEER2_ATTRIBUTES}
    if all(math.isnan(value) for value in ratings.values()):
        raise DataError(r.location, None, f"rates nothing: {', '.join(HELPSTEER2_ATTRIBUTES)} are all missing or "
                        "null", MISSING)
    values = {r.column("ratings"): ratings}
    prompt = r.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        values[r.column("prompt")] = parse_helpsteer2_prompt(prompt)
    return _relaid(r, "rated", values, {})


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

def _has_list(column: str) -> Callable[[Row], bool]:
    return lambda r: isinstance(r.row.get(column), list)


FORMATS: dict[str, RowFormat] = {f.name: f for f in (
    RowFormat("trl_pair", "prompt + chosen + rejected", ("pair",),
              lambda r: r.has("chosen") and r.has("rejected"), _as_is("pair")),
    RowFormat("trl_unpaired", "prompt + completion + label", ("unpaired",),
              lambda r: r.has("completion") and r.has("label"), _as_is("unpaired")),
    RowFormat("ranked", "prompt + responses + scores or ranks", ("ranked",),
              lambda r: r.has("responses"), _as_is("ranked")),
    RowFormat("sharegpt", "conversations + chosen/rejected or a label", ("pair", "unpaired"),
              _has_list("conversations"), _sharegpt, refines=("trl_pair",)),
    RowFormat("messages", "messages + chosen/rejected or a label", ("pair", "unpaired"),
              _has_list("messages"), _messages, refines=("trl_pair",)),
    RowFormat("alpaca", "instruction [+ input] + two outputs, or one output + a label", ("pair", "unpaired"),
              lambda r: "instruction" in r.row and any(c in r.row for c in (
                  "output", "output_1", "output_2", r.column("chosen"), r.column("rejected"))),
              _alpaca, refines=("trl_pair",)),
    RowFormat("hh_rlhf", "chosen/rejected dialogue text of Human:/Assistant: turns", ("pair",),
              lambda r: _is_dialogue(r.get("chosen")) and _is_dialogue(r.get("rejected")), _hh_rlhf,
              refines=("trl_pair",)),
    RowFormat("ultrafeedback_binarized", "prompt + chosen/rejected conversations that repeat it + "
              "score_chosen/score_rejected", ("pair",), _is_ultrafeedback_binarized, _ultrafeedback_binarized,
              refines=("trl_pair", "messages")),
    RowFormat("ultrafeedback", "instruction + completions with ratings", ("ranked",),
              lambda r: "instruction" in r.row and isinstance(r.row.get("completions"), list),
              _ultrafeedback),
    RowFormat("rated", "prompt + response + ratings", ("rated",),
              lambda r: r.has("response") and r.has("ratings"), _as_is("rated")),
    RowFormat("helpsteer2", "prompt + response + helpfulness/correctness/coherence/complexity/verbosity",
              ("rated",), _is_helpsteer2, _helpsteer2),
)}
# The format a shape's canonical columns make (what a row with no better match is read as).
CANONICAL = {"pair": "trl_pair", "unpaired": "trl_unpaired", "ranked": "ranked", "rated": "rated"}


def check_format(name: str) -> None:
    """Raises ValueError (with "did you mean") unless ``name`` is "auto" or a known format."""
    if name == AUTO or name in FORMATS:
        return
    known = [AUTO, *FORMATS]
    raise ValueError(f"unknown row format {name!r}{suggest.did_you_mean(str(name), known)}; "
                     f"known formats: {', '.join(known)}")


def _check_shape(shape: str) -> None:
    if shape != AUTO and shape not in CANONICAL:
        raise ValueError(f"shape must be 'auto' or one of {tuple(CANONICAL)}, got {shape!r}")


def detect_row_format(row: Mapping[str, Any], location: Location, fields: Mapping[str, str] | None = None,
                      shape: str = AUTO) -> RowFormat:
    """The format a row's columns imply (see the module docstring).

    With ``shape`` given only formats that can make that shape compete, and a row that fits none is
    read as the shape's canonical columns (so its error names the missing column). Raises DataError
    when no format fits, AmbiguousFormatError when several do.
    """
    _check_shape(shape)
    r = Row(row if isinstance(row, Mapping) else {}, location, check_fields(fields))
    found = [f for f in FORMATS.values() if (shape == AUTO or shape in f.shapes) and f.matches(r)]
    refined = {name for f in found for name in f.refines}
    found = [f for f in found if f.name not in refined]
    if len(found) > 1:
        raise AmbiguousFormatError(location, found)
    if found:
        return found[0]
    if shape != AUTO:
        return FORMATS[CANONICAL[shape]]
    raise DataError(location, None, f"cannot tell the row format from columns {_columns(r)}: it fits none of "
                    f"{', '.join(FORMATS)}; set data.format, and data.fields to name your columns (e.g. "
                    "prompt=question)", UNKNOWN_FORMAT)


def parse_as(row_format: str, row: Mapping[str, Any], location: Location,
             fields: Mapping[str, str] | None = None, shape: str = AUTO) -> dict[str, Any]:
    """One row of a known format -> one canonical example. ``shape``: the kind the example must have."""
    check_format(row_format)
    _check_shape(shape)
    if row_format == AUTO:
        row_format = detect_row_format(row, location, fields, shape).name
    if not isinstance(row, Mapping):
        raise DataError(location, None, f"a row must be an object/dict, got {type(row).__name__}", BAD_ROW)
    converted = FORMATS[row_format].convert(Row(row, location, check_fields(fields)))
    if shape != AUTO and converted.shape != shape:
        raise DataError(location, None, f"this {row_format} row makes a {converted.shape} example, but this "
                        f"source holds {shape} examples (one kind per source)", WRONG_TYPE)
    return parse_row(converted.row, converted.shape, location, converted.fields)


def iter_parse(rows: Iterable[tuple[Location, Mapping[str, Any]]], shape: str = AUTO,
               fields: Mapping[str, str] | None = None, on_error: str = "raise",
               summary: LoadSummary | None = None, row_format: str = AUTO) -> Iterator[dict[str, Any]]:
    """Parses located rows under an error policy.

    ``row_format="auto"``: the first row that fits a format decides it (logged once); ``shape="auto"``:
    the first example's kind is every later example's. ``summary.row_format`` records the format.
    A source whose rows fit several formats raises AmbiguousFormatError whatever ``on_error``.
    """
    check_on_error(on_error)
    check_format(row_format)
    _check_shape(shape)
    fields = check_fields(fields)
    chosen = None if row_format == AUTO else row_format
    if summary is not None:
        summary.row_format = chosen
    for location, row in rows:
        try:
            if chosen is None:
                found = detect_row_format(row, location, fields, shape)
                chosen = found.name
                log.warning("%s: rows look like %s (%s); set data.format to override", location.path,
                            found.name, found.looks_like)
                if summary is not None:
                    summary.row_format = chosen
            example = parse_as(chosen, row, location, fields, shape)
        except AmbiguousFormatError:
            raise
        except DataError as error:
            handle_error(error, on_error, summary)
            continue
        shape = example["kind"]
        if summary is not None:
            summary.examples += 1
        yield example
