"""Prompt streams for online learning: prompts in a seeded order, forever, with an exact position.

    stream = open_prompts("task:arithmetic", tokenizer=tok, config=config, seed=0)
    stream = open_prompts("prompts.jsonl", tokenizer=tok, config=config, seed=0)   # or hf:..., tfds:...
    batch = stream.take(64)                  # [Prompt(text, ids, messages, format, source)] * 64
    text, ids = batch[0]                     # a Prompt unpacks as (text, ids)
    saved = stream.position                  # an int (JSON): where the next prompt comes from
    stream.restore(saved)                    # the next take() gives the same prompts again

Specs (the config key ``online.prompts``):

- ``"task:<name>"``: the quick-start task's prompts (prefjax.quickstart.tasks). The prompt at
  position n is ``task.prompts(np.random.default_rng((seed, n)), 1)[0]``, so it depends on
  nothing but (seed, n). Task options: the ``task_options`` argument, else
  ``config.online.task_options`` when the config has it, else ``config.<name>`` (the quick
  start's convention), else the task's defaults. The prompt is a plain-text row's prompt, so it
  tokenizes as the quick start's rows do (prefjax.quickstart.vocab's tokenizer: its characters
  or words, no BOS).
- anything prefjax.data reads (files, globs, ``hf:<owner>/<name>``, ``tfds:<builder>``, a
  prepared TFDS directory), read with ``config.data``'s split, data_dir, fields and on_error.
  Rows of every row format prefjax.data knows give their prompt (pairs, unpaired, ranked and
  rated rows, sharegpt, messages, alpaca, hh_rlhf, ultrafeedback...), and so do prompt-only rows
  (``{"prompt": "..."}`` or ``{"prompt": [messages]}``, other columns ignored), which the data
  layer has no format for: a source whose first row fits no row format but has a prompt column
  is read as prompt-only rows (``row_format="prompt"`` says so explicitly). Prepared TFDS
  datasets hold canonical examples, never prompt-only rows.

Order of a data source: epoch e is ``np.random.default_rng((seed, e)).permutation(N)`` of its
N prompts, epochs repeat forever. ``position`` counts places in that endless order, so
restoring it resumes exactly, whatever was skipped.

Tokens: every prompt is rendered and tokenized by prefjax.data.tokenize.tokenize_prompt with
the trainer's render options (``streams.data_config(config.data, ...).render``): chat prompts
through the chat template with the generation prompt, plain-text prompts as plain text, BOS as
the trainer adds it. These are the prompt ids the trainer gives the same prompt in a pair row.
``Prompt.text`` is the prompt's message contents joined as prefjax.data's plain-text rendering
joins them (for a one-message prompt: its text); ``Prompt.messages`` is the whole conversation.

Length: prompts longer than ``max_prompt_len`` tokens are skipped and counted
(``PromptStream.skipped``; argument, else ``config.online.max_prompt_len`` when present, else
``config.data.max_prompt_len``; None = no limit). An empty source, or one whose every prompt is
too long, raises :class:`PromptError` at once (a task stream: after 1000 consecutive too-long
draws), never loops.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from prefjax.data import formats, readers, records, sources
from prefjax.data.tokenize import PreprocessError, RenderOptions, tokenize_prompt
from prefjax.models.tokenizer import Tokenizer, TokenizerError
from prefjax.quickstart import tasks as tasks_lib

log = logging.getLogger(__name__)

KEY = "online.prompts"
TASK_PREFIX = "task:"
PROMPT_ONLY = "prompt"  # row_format for rows that hold nothing but a prompt
TASK_SKIP_LIMIT = 1000  # consecutive too-long task prompts before the stream gives up

Conversation = list[dict[str, str]]


class PromptError(ValueError):
    """A prompt source that cannot give prompts; the message names the key, file and line."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: ``text``, its token ``ids`` for generation, the ``messages`` it came from, its
    ``format`` ("chat" | "text") and ``source`` ("file:line", "task:arithmetic#12"). Unpacks as
    ``(text, ids)``."""

    text: str
    ids: tuple[int, ...]
    messages: tuple[Mapping[str, str], ...]
    format: str
    source: str

    def __iter__(self) -> Iterator[Any]:
        return iter((self.text, self.ids))


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A parsed, not yet tokenized, prompt."""

    messages: tuple[Mapping[str, str], ...]
    format: str
    source: str


class PromptStream:
    """Prompts forever in a seeded order (module docstring). ``draw(index)`` gives (the number of
    the distinct prompt, its entry) at place ``index`` of the order; ``count`` is the number of
    distinct prompts (None: endless, every place a new draw)."""

    def __init__(self, draw: Callable[[int], tuple[int, _Entry]], *, count: int | None, tokenizer: Tokenizer,
                 options: RenderOptions, max_prompt_len: int | None, name: str):
        self._draw, self.count, self.name = draw, count, name
        self._tokenizer, self._options, self._max_len = tokenizer, options, max_prompt_len
        self._position = 0
        self._too_long: set[int] = set()  # the distinct prompts found too long
        self._cache: dict[int, Prompt | None] = {}  # finite sources: tokenized once per prompt
        self._next_prompt(0)  # an unusable source fails here, not at the first sampling step

    @property
    def position(self) -> int:
        """Where the next prompt is drawn from (JSON-able; give it to :meth:`restore`)."""
        return self._position

    @property
    def skipped(self) -> int:
        """Distinct prompts skipped so far for being longer than max_prompt_len."""
        return len(self._too_long)

    def restore(self, position: int) -> None:
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or position < 0:
            raise PromptError(f"{KEY}={self.name!r}: a stream position must be an integer >= 0, "
                              f"got {position!r}")
        self._position = int(position)

    def take(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts (too-long prompts skipped)."""
        out = []
        for _ in range(n):
            prompt, self._position = self._next_prompt(self._position)
            out.append(prompt)
        return out

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> Prompt:
        return self.take(1)[0]

    def _next_prompt(self, index: int) -> tuple[Prompt, int]:
        """(the first prompt that fits at or after place ``index``, the place after it)."""
        misses = 0
        while True:
            item, entry = self._draw(index)
            prompt = self._tokenized(item, entry)
            index += 1
            if prompt is not None:
                return prompt, index
            misses += 1
            self._check_not_all_too_long(misses)

    def _tokenized(self, item: int, entry: _Entry) -> Prompt | None:
        if self.count is not None and item in self._cache:
            return self._cache[item]
        try:
            ids = tokenize_prompt(list(entry.messages), self._tokenizer, self._options, format=entry.format,
                                  source=entry.source)
        except (PreprocessError, TokenizerError) as err:
            raise PromptError(f"{KEY}={self.name!r}: {err}") from None
        prompt = None
        if self._max_len is None or len(ids) <= self._max_len:
            prompt = Prompt(text=_text(entry.messages), ids=tuple(int(t) for t in ids),
                            messages=entry.messages, format=entry.format, source=entry.source)
        else:
            self._too_long.add(item)
        if self.count is not None:
            self._cache[item] = prompt
        return prompt

    def _check_not_all_too_long(self, misses: int) -> None:
        if self.count is not None and len(self._too_long) >= self.count:
            raise PromptError(f"{KEY}={self.name!r}: all {self.count} prompts are longer than max_prompt_len="
                              f"{self._max_len} tokens; raise the limit or use shorter prompts")
        if self.count is None and misses >= TASK_SKIP_LIMIT:
            raise PromptError(f"{KEY}={self.name!r}: {misses} prompts in a row are longer than "
                              f"max_prompt_len={self._max_len} tokens; raise the limit")

    def __repr__(self) -> str:
        size = "endless" if self.count is None else f"{self.count} prompts"
        return f"PromptStream({self.name!r}, {size}, position={self._position}, skipped={self.skipped})"


def _text(messages: Sequence[Mapping[str, str]]) -> str:
    return "".join(m["content"] for m in messages)


# ------------------------------------------------------------------------------------------ config


def _lookup(config: Any, path: str, default: Any = None) -> Any:
    """``config.a.b`` when the config has it (a ConfigDict or a dict), else ``default``."""
    node = config
    for part in path.split("."):
        if node is None:
            return default
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def _render_options(config: Any) -> RenderOptions:
    """The trainer's render options for ``config`` (RenderOptions() without a config)."""
    data = _lookup(config, "data")
    if data is None:
        return RenderOptions()
    from prefjax.data import streams  # pylint: disable=import-outside-toplevel  (imports grain, ml_collections)

    return streams.data_config(data, per_process_batch=1, seed=0, num_epochs=None, shuffle=False).render


# ------------------------------------------------------------------------------------------ tasks


def _task_stream_draw(name: str, options: Mapping[str, Any],
                      seed: int) -> Callable[[int], tuple[int, _Entry]]:
    try:
        task = tasks_lib.get_task(name, **dict(options))
    except KeyError as err:
        raise PromptError(f"{KEY}='task:{name}': {err.args[0]}") from None
    except (TypeError, ValueError) as err:
        raise PromptError(f"{KEY}='task:{name}': {err}") from None

    def draw(index: int) -> tuple[int, _Entry]:
        text = task.prompts(np.random.default_rng((seed, index)), 1)[0]
        return index, _Entry(({"role": "user", "content": text},), "text", f"task:{name}#{index}")

    return draw


# ------------------------------------------------------------------------------------------ data


def _prompt_only(row: Mapping[str, Any], location: records.Location, fields: Mapping[str, str]) -> _Entry:
    """A row's prompt column, parsed as records parses prompts (text -> one user message)."""
    r = records.Row(row, location, fields)
    prompt, chat = records._prompt(r)  # pylint: disable=protected-access  (records' own prompt parser)
    if not prompt:
        raise r.error("prompt", "missing or empty: a prompt-only row needs a prompt (text or a message list)",
                      records.MISSING)
    return _Entry(tuple(prompt), "chat" if chat else "text", str(location))


def _is_prompt_only(row: Mapping[str, Any], location: records.Location, fields: Mapping[str, str]) -> bool:
    """True when ``row`` fits no row format of prefjax.data but has a prompt column."""
    try:
        formats.detect_row_format(row, location, fields)
    except formats.AmbiguousFormatError:
        return False  # parsing reports it
    except records.DataError as err:
        return err.reason == records.UNKNOWN_FORMAT and records.Row(row, location, fields).has("prompt")
    return False


def _entries_from_rows(rows: Iterator[tuple[records.Location, dict]], *, fields: Mapping[str, str],
                       on_error: str, summary: records.LoadSummary, row_format: str) -> list[_Entry]:
    first = next(rows, None)
    if first is None:
        return []
    rows = itertools.chain([first], rows)
    auto = row_format == formats.AUTO
    if row_format == PROMPT_ONLY or (auto and _is_prompt_only(first[1], first[0], fields)):
        if row_format == formats.AUTO:
            log.warning("%s: rows hold only a prompt (no responses): read as prompts", first[0].path)
        entries = []
        for location, row in rows:
            try:
                entries.append(_prompt_only(row, location, fields))
                summary.examples += 1
            except records.DataError as error:
                records.handle_error(error, on_error, summary)
        return entries
    return [_Entry(tuple(e["prompt"]), e["format"], e["source"])
            for e in formats.iter_parse(rows, fields=fields, on_error=on_error, summary=summary,
                                        row_format=row_format)]


def _file_entries(files: Sequence[str], *, fields: Mapping[str, str], on_error: str, row_format: str,
                  json_columns: Sequence[str] = ()) -> tuple[list[_Entry], records.LoadSummary]:
    summary = records.LoadSummary()

    def rows() -> Iterator[tuple[records.Location, dict]]:
        for path in files:
            yield from readers.read_rows(path, json_columns=json_columns, on_error=on_error, summary=summary)

    entries = _entries_from_rows(rows(), fields=fields, on_error=on_error, summary=summary,
                                 row_format=row_format)
    if summary.num_skipped:
        log.warning("%s: %s", KEY, summary)
    return entries, summary


def _source_entries(spec: str, *, config: Any, row_format: str) -> list[_Entry]:
    """The prompts of a prefjax.data source, read with config.data's split/data_dir/fields/on_error."""
    mapping = dict(_lookup(config, "data.fields", {}) or {})
    fields = {name: column for name, column in mapping.items() if column}
    on_error = records.row_policy(_lookup(config, "data.on_error", "error"))
    split = _lookup(config, "data.split", "train")
    what = f"{KEY}={spec!r}"
    try:
        if spec.startswith(sources.HUB_PREFIX):
            from prefjax.data import hub  # pylint: disable=import-outside-toplevel  (slow import)

            name, bounds = sources.parse_split(split)
            entries, summary = _file_entries(hub.data_files(spec, name, key=KEY), fields=fields,
                                             on_error=on_error, row_format=row_format)
            listed = sources.ListSource([dataclasses.asdict(e) for e in entries], summary)
            kept = sources.slice_split(listed, bounds)
            return [_Entry(**kept[i]) for i in range(len(kept))]
        if spec.startswith(sources.TFDS_PREFIX) or os.path.isdir(spec):
            if row_format == PROMPT_ONLY:
                raise PromptError(f"{what}: a prepared TFDS dataset holds examples, not prompt-only rows")
            source = sources.load_source(spec, split=split, on_error=on_error, key=KEY,
                                         data_dir=_lookup(config, "data.data_dir", "") or None)
            examples = (source[i] for i in range(len(source)))
            return [_Entry(tuple(e["prompt"]), e["format"], e["source"]) for e in examples]
        files = readers.expand_paths(spec)
        return _file_entries(files, fields=fields, on_error=on_error, row_format=row_format)[0]
    except records.DataError as err:
        raise PromptError(f"{what}: {err}") from None
    except FileNotFoundError as err:
        raise PromptError(f"{what}: {err}") from None


# ------------------------------------------------------------------------------------------ opening


def open_prompts(spec: str, *, tokenizer: Tokenizer | None, config: Any, seed: int,
                 max_prompt_len: int | None = None, task_options: Mapping[str, Any] | None = None,
                 row_format: str = formats.AUTO, options: RenderOptions | None = None) -> PromptStream:
    """A PromptStream for ``spec`` (module docstring). ``config``: the trainer config (or None);
    ``options`` overrides the render options derived from it."""
    if not isinstance(spec, str) or not spec.strip():
        raise PromptError(f"{KEY}={spec!r}: give 'task:<name>' ({', '.join(sorted(tasks_lib.TASKS))}) or a "
                          "data source (files, a glob, hf:<owner>/<name>, tfds:<builder>)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PromptError(f"{KEY}: the seed must be an integer >= 0, got {seed!r}")
    if tokenizer is None:
        hint = (" (prefjax.quickstart.vocab.build(task, folder) makes a task's tokenizer)"
                if spec.startswith(TASK_PREFIX) else "")
        raise PromptError(f"{KEY}={spec!r}: prompts need a tokenizer: set model.hf_folder or "
                          f"data.tokenizer{hint}")
    if row_format not in (formats.AUTO, PROMPT_ONLY):
        formats.check_format(row_format)
    if max_prompt_len is None:
        max_prompt_len = _lookup(config, "online.max_prompt_len", _lookup(config, "data.max_prompt_len"))
    if max_prompt_len is not None and (isinstance(max_prompt_len, bool) or not isinstance(max_prompt_len, int)
                                       or max_prompt_len < 1):
        raise PromptError(f"{KEY}: max_prompt_len must be a positive number of tokens or None, "
                          f"got {max_prompt_len!r}")
    render = options if options is not None else _render_options(config)
    seed = int(seed)
    stream_args = {"tokenizer": tokenizer, "options": render, "max_prompt_len": max_prompt_len, "name": spec}
    if spec.startswith(TASK_PREFIX):
        name = spec[len(TASK_PREFIX):]
        if task_options is None:
            task_options = _lookup(config, "online.task_options", _lookup(config, name, {}))
        if hasattr(task_options, "to_dict"):  # a ConfigDict
            task_options = task_options.to_dict()
        task_options = dict(task_options or {})
        return PromptStream(_task_stream_draw(name, task_options, seed), count=None, **stream_args)
    entries = _source_entries(spec, config=config, row_format=row_format)
    if not entries:
        raise PromptError(f"{KEY}={spec!r}: the source has no prompts (no rows, or every row was skipped: "
                          "see the warning above)")
    count = len(entries)
    epoch_orders: dict[int, np.ndarray] = {}

    def draw(index: int) -> tuple[int, _Entry]:
        epoch, place = divmod(index, count)
        if epoch not in epoch_orders:
            epoch_orders.clear()  # one epoch at a time: memory stays O(N)
            epoch_orders[epoch] = np.random.default_rng((seed, epoch)).permutation(count)
        item = int(epoch_orders[epoch][place])
        return item, entries[item]

    return PromptStream(draw, count=count, **stream_args)
