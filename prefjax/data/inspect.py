"""Look at a preference dataset the way the pipeline will see it.

    python -m prefjax.data.inspect data.jsonl --tokenizer tests/fixtures/hf/qwen2 \\
        --max_len 256 --max_prompt_len 128 --batch_size 8 --buckets 64 --show 3

Prints: counts by kind and format, text histograms of prompt / response / sequence lengths
(before truncation), truncation and drop rates, padding waste of the chosen layout (bucketed
padding or packing, with the packed rows each batch needs), and a few examples rendered with
their loss masks: scored tokens are wrapped in ⟦ ⟧ (or shown in green with ``--color``).

Data: a JSONL file of canonical examples (one dict per line, each with a "kind"; "source"
defaults to "path:line"); anything else goes through prefjax.data.sources.load_source (raw
JSONL / JSON / Parquet / CSV files of any row format, a prepared TFDS directory, "tfds:<builder>",
"hf:<owner>/<name>") with the trainer's data options: ``--format`` (data.format, e.g. sharegpt;
prefjax.data.formats), ``--fields prompt=question,chosen=a`` (data.fields), ``--split``,
``--data_dir`` and ``--on_error error|skip``. The report starts with the row format the rows were
read as (detected or set) and what loading skipped.
From Python, any list / random-access source works via :func:`inspect_examples`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from prefjax.data import formats, records
from prefjax.data.batching import build_batch
from prefjax.data.packing import PaddingStats, pack_sequences
from prefjax.data.pipeline import DataConfig
from prefjax.data.tokenize import PreprocessError, TokenizedExample, response_fields, tokenize_example
from prefjax.data.truncation import TruncationCounter, truncate
from prefjax.models.tokenizer import Tokenizer, load_tokenizer

SCORED_OPEN, SCORED_CLOSE = "⟦", "⟧"
GREEN, RESET = "\033[32m", "\033[0m"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Canonical examples from a JSONL file; errors name the file and line."""
    path = Path(path)
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON at column {err.colno}: {err.msg}") from err
            if not isinstance(example, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(example).__name__}")
            example.setdefault("source", f"{path}:{number}")
            examples.append(example)
    return examples


def _is_canonical_jsonl(path: Path) -> bool:
    """True when the first non-empty line is an object with a "kind" (a canonical example)."""
    if path.suffix != ".jsonl":
        return False
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "kind" in first
    return False


def load_examples(spec: str, *, row_format: str = formats.AUTO, fields: Optional[Mapping[str, str]] = None,
                  split: str = "train", data_dir: Optional[str] = None,
                  on_error: str = "error") -> Sequence[Mapping[str, Any]]:
    """Canonical JSONL directly (unless a row format is set); any other file or dataset spec
    through load_source, with the trainer's data options (``on_error``: "error" | "skip" | "drop")."""
    if row_format == formats.AUTO and not fields and Path(spec).is_file() and _is_canonical_jsonl(Path(spec)):
        return read_jsonl(spec)
    from prefjax.data.sources import load_source  # pylint: disable=import-outside-toplevel

    return load_source(spec, split=split, data_dir=data_dir or None, fields=fields, row_format=row_format,
                       on_error=records.row_policy(on_error))


def describe_load(examples: Any, row_format: str = formats.AUTO) -> Optional[str]:
    """"rows: sharegpt (detected); 12 rows read, 10 examples; skipped ..." for a source that kept
    its LoadSummary (file and Hub sources), else None."""
    summary = getattr(examples, "summary", None)
    if not isinstance(summary, records.LoadSummary):
        return None
    how = "detected" if row_format == formats.AUTO else "set by --format"
    head = f"rows: {summary.row_format} ({how})" if summary.row_format else "rows: no row read"
    return f"{head}; {summary}"


@dataclasses.dataclass
class InspectReport:
    """What :func:`inspect_examples` found; :func:`format_report` prints it."""

    num_examples: int
    kinds: dict[str, int]
    formats: dict[str, int]
    errors: list[str]
    prompt_lengths: np.ndarray
    response_lengths: np.ndarray
    sequence_lengths: np.ndarray
    truncation: dict[str, float]
    padding: dict[str, float]
    packed_rows_needed: list[int]
    shown: list[str]


def render_mask(tokenizer: Tokenizer, ids: Sequence[int], mask: Sequence[float], color: bool = False) -> str:
    """The sequence as text with scored tokens marked (⟦…⟧, or green)."""
    pieces, previous = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1])
        # Incremental decoding keeps Metaspace spaces right; fall back to one token where bytes split.
        piece = text[len(previous) :] if text.startswith(previous) else tokenizer.decode(ids[i : i + 1])
        previous = text
        pieces.append(piece)
    out, scored = [], False
    for piece, m in zip(pieces, mask):
        if bool(m) != scored:
            out.append((GREEN if color else SCORED_OPEN) if m else (RESET if color else SCORED_CLOSE))
            scored = bool(m)
        out.append(piece)
    if scored:
        out.append(RESET if color else SCORED_CLOSE)
    return "".join(out)


def _show(tokenizer: Tokenizer, example: TokenizedExample, color: bool) -> str:
    prompt_len = len(example.prompt_ids)
    head = f"--- {example.source} ({example.kind}, weight {example.weight:g}, prompt {prompt_len} tokens)"
    lines = [head]
    for k in range(example.num_responses):
        ids, mask = example.sequence(k)
        lines.append(f"[response {k}: {len(example.response_ids[k])} tokens, {int(mask.sum())} scored]")
        lines.append(render_mask(tokenizer, ids.tolist(), mask.tolist(), color))
    return "\n".join(lines)


def inspect_examples(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    config: DataConfig,
    show: int = 3,
    color: bool = False,
) -> InspectReport:
    """Tokenize, truncate and batch ``examples`` in order (no shuffle) and collect statistics."""
    kinds: collections.Counter = collections.Counter()
    formats: collections.Counter = collections.Counter()
    errors: list[str] = []
    prompt_lengths, response_lengths, sequence_lengths = [], [], []
    counter = TruncationCounter()
    kept: list[TokenizedExample] = []
    for i in range(len(examples)):
        example = examples[i]
        kinds[str(example.get("kind"))] += 1
        formats[str(example.get("format", "chat"))] += 1
        try:
            tokenized = tokenize_example(example, tokenizer, config.render)
        except PreprocessError as err:
            errors.append(str(err))
            continue
        prompt_lengths.append(len(tokenized.prompt_ids))
        for k in range(tokenized.num_responses):
            response_lengths.append(len(tokenized.response_ids[k]))
            sequence_lengths.append(tokenized.sequence_length(k))
        result = truncate(tokenized, config.truncation, tokenizer.bos_token_id, counter)
        if result is not None:
            kept.append(result)
    padding, rows_needed = _simulate_batches(kept, tokenizer, config)
    return InspectReport(
        num_examples=len(examples),
        kinds=dict(kinds),
        formats=dict(formats),
        errors=errors,
        prompt_lengths=np.asarray(prompt_lengths),
        response_lengths=np.asarray(response_lengths),
        sequence_lengths=np.asarray(sequence_lengths),
        truncation=counter.as_dict(),
        padding=padding,
        packed_rows_needed=rows_needed,
        shown=[_show(tokenizer, ex, color) for ex in kept[:show]],
    )


def _simulate_batches(
    kept: list[TokenizedExample], tokenizer: Tokenizer, config: DataConfig
) -> tuple[dict[str, float], list[int]]:
    """Padding statistics of batching ``kept`` in order; packed rows each batch needs."""
    stats = PaddingStats()
    rows_needed: list[int] = []
    if not kept:
        return stats.as_dict(), rows_needed
    size = config.pipeline.batch_size
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    by_shape: dict[tuple[str, int], list[TokenizedExample]] = collections.defaultdict(list)
    for ex in kept:  # mixed kinds never share a batch in the pipeline; simulate them apart
        by_shape[(ex.kind, ex.num_responses)].append(ex)
    for (kind, num_responses), group in by_shape.items():
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            batch, left_out = build_batch(chunk, size, num_responses, config.layout, pad_id, kind)
            stats.add_batch(batch, pack_dropped=left_out)
            if config.layout.pack:
                lengths = [[ex.sequence_length(k) for k in range(num_responses)] for ex in chunk]
                placements, _ = pack_sequences(
                    lengths, config.layout.packed_row_length, num_responses * size, "drop"
                )
                rows_needed.append(len({p.row for p in placements}))
    return stats.as_dict(), rows_needed


def histogram(values: np.ndarray, bins: int = 8, width: int = 40) -> list[str]:
    """Text histogram lines "[lo, hi)  count  ####"."""
    if len(values) == 0:
        return ["  (none)"]
    counts, edges = np.histogram(values, bins=bins)
    top = max(int(counts.max()), 1)
    return [
        f"  [{int(lo):6d}, {int(hi):6d})  {int(c):6d}  {'#' * round(width * c / top)}"
        for c, lo, hi in zip(counts, edges[:-1], edges[1:])
    ]


def _describe(name: str, values: np.ndarray) -> list[str]:
    if len(values) == 0:
        return [f"{name}: none"]
    head = (
        f"{name}: n={len(values)} min={int(values.min())} mean={values.mean():.1f} "
        f"p50={int(np.percentile(values, 50))} p95={int(np.percentile(values, 95))} max={int(values.max())}"
    )
    return [head] + histogram(values)


def format_report(report: InspectReport) -> str:
    """The report as text."""
    lines = [f"examples: {report.num_examples}  kinds: {report.kinds}  formats: {report.formats}"]
    if report.errors:
        lines.append(f"errors: {len(report.errors)} (first: {report.errors[0]})")
    lines.append("lengths in tokens, before truncation:")
    for name, values in (
        ("prompt", report.prompt_lengths),
        ("response", report.response_lengths),
        ("sequence (prompt + response)", report.sequence_lengths),
    ):
        lines += _describe(name, values)
    t = report.truncation
    lines.append(
        f"truncation: {t['examples_truncated']} examples truncated ({t['truncated_rate']:.1%}; prompts "
        f"{t['prompt_truncated']}, responses {t['response_truncated']}), {t['dropped']} dropped "
        f"({t['dropped_rate']:.1%})"
    )
    reasons = {
        k[len("dropped_") :]: v
        for k, v in t.items()
        if k.startswith("dropped_") and k != "dropped_rate" and v
    }
    if reasons:
        lines.append(f"  drop reasons: {reasons}")
    p = report.padding
    lines.append(
        f"padding: {p['batches']} batches, {p['slots']} slots, {p['real_tokens']} real tokens, "
        f"{p['pad_tokens']} padding, {p['filler_tokens']} filler; waste {p['padding_waste']:.1%}"
    )
    if report.packed_rows_needed:
        lines.append(
            f"packed rows needed per batch: max {max(report.packed_rows_needed)}, "
            f"mean {np.mean(report.packed_rows_needed):.1f}"
        )
    if report.shown:
        lines.append(f"examples with their loss masks ({SCORED_OPEN}scored{SCORED_CLOSE}):")
        lines += report.shown
    return "\n".join(lines)


def _parse_buckets(value: str) -> Any:
    if value.lower() == "none":
        return None
    if value == "pow2":
        return value
    if "," in value:
        return tuple(int(v) for v in value.split(","))
    return int(value)


def _row_format(value: str) -> str:
    try:
        formats.check_format(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _fields(value: str) -> dict[str, str]:
    """"prompt=question,chosen=a" -> {"prompt": "question", "chosen": "a"} (canonical name = column)."""
    items = [item for item in value.split(",") if item.strip()]
    bad = [item for item in items if "=" not in item]
    if bad:
        raise argparse.ArgumentTypeError(f"expected name=column items separated by commas (e.g. "
                                         f"prompt=question,chosen=a), got {bad[0]!r}")
    try:
        return records.check_fields({name.strip(): column.strip()
                                     for name, column in (item.split("=", 1) for item in items)})
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prefjax.data.inspect", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "data", help="JSONL file of canonical examples (or a spec for the registered source loader)"
    )
    parser.add_argument(
        "--tokenizer", required=True, help="folder with tokenizer.json (+ tokenizer_config.json)"
    )
    parser.add_argument(
        "--format",
        type=_row_format,
        default=formats.AUTO,
        help=f"row format (data.format): {', '.join([formats.AUTO, *formats.FORMATS])}",
    )
    parser.add_argument(
        "--fields", type=_fields, default={}, help="column names (data.fields), e.g. prompt=question,chosen=a"
    )
    parser.add_argument("--split", default="train", help="split of a TFDS or Hub source, e.g. train[:1000]")
    parser.add_argument("--data_dir", default="", help="where tfds: sources are prepared")
    parser.add_argument(
        "--on_error",
        default="error",
        choices=tuple(records.DATA_ON_ERROR),
        help="bad rows: error (stop at the first) or skip (count by reason); drop = skip",
    )
    parser.add_argument(
        "--template",
        default="tokenizer",
        help="'tokenizer' (its chat template), 'none' (plain concatenation) or a Jinja file",
    )
    parser.add_argument("--max_len", type=int, default=1024)
    parser.add_argument("--max_prompt_len", type=int)
    parser.add_argument("--max_response_len", type=int)
    parser.add_argument("--prompt_mode", default="keep_end", choices=("keep_start", "keep_end", "drop"))
    parser.add_argument("--response_mode", default="keep_start", choices=("keep_start", "keep_end", "drop"))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--buckets", type=_parse_buckets, default=64, help="pow2, a multiple, a,b,c list, or none"
    )
    parser.add_argument("--pack", action="store_true")
    parser.add_argument("--pack_rows", type=int)
    parser.add_argument("--row_length", type=int)
    parser.add_argument("--limit", type=int, help="inspect only the first N examples")
    parser.add_argument("--show", type=int, default=3, help="examples to print with their masks")
    parser.add_argument("--color", action="store_true", help="scored tokens in green instead of brackets")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    template: Optional[str] = args.template
    if template == "none":
        template = None
    elif template != "tokenizer":
        template = Path(template).read_text(encoding="utf-8")
    try:
        examples = load_examples(args.data, row_format=args.format, fields=args.fields, split=args.split,
                                 data_dir=args.data_dir, on_error=args.on_error)
    except (ValueError, FileNotFoundError) as err:  # DataError is a ValueError: file, line and field
        print(f"error: {err}", file=sys.stderr)
        return 2
    loaded = describe_load(examples, args.format)
    if args.limit is not None:
        examples = [examples[i] for i in range(min(args.limit, len(examples)))]
    pack_rows = args.pack_rows
    if args.pack and pack_rows is None:  # one row per sequence at most: never overflows
        pack_rows = args.batch_size * (len(response_fields(examples[0])) if len(examples) else 2)
    config = DataConfig.from_mapping(
        {
            "batch_size": args.batch_size,
            "max_len": args.max_len,
            "max_prompt_len": args.max_prompt_len,
            "max_response_len": args.max_response_len,
            "prompt_mode": args.prompt_mode,
            "response_mode": args.response_mode,
            "buckets": args.buckets,
            "pack": args.pack,
            "pack_rows": pack_rows,
            "row_length": args.row_length,
            "pack_overflow": "drop",
            "template": template,
        }
    )
    report = inspect_examples(
        examples, load_tokenizer(args.tokenizer), config, show=args.show, color=args.color
    )
    print(format_report(report) if loaded is None else f"{loaded}\n{format_report(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
