"""Canonical examples <-> TFDS records: every field stored as the JSON text of its value.

Why JSON text rather than typed TFDS features: conversations are ragged lists of dicts (ranked
examples are lists of those), which TFDS would hand back as struct-of-arrays of bytes; and TFDS
stores float64 scalars as float32. A JSON string per field stays exact (floats round-trip through
``repr``, NaN is kept), reads back as plain ``str``/``float``/``bool``/``list``/``dict``, and the
stored dataset still shows one named column per field. ``kind`` is not stored per example: it
follows from the columns (``FEATURE_KEYS``).

This module has no TFDS import, so decoding costs nothing extra in a reader.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

# Stored columns per kind: every canonical field except "kind".
FEATURE_KEYS = {
    "pair": ("format", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin", "weight",
             "source"),
    "unpaired": ("format", "prompt", "completion", "label", "weight", "source"),
    "ranked": ("format", "prompt", "responses", "scores", "weight", "source"),
    "rated": ("format", "prompt", "response", "ratings", "weight", "source"),
}


def kind_of(keys: Any) -> str:
    """The kind whose stored columns are exactly ``keys``."""
    keys = set(keys)
    for kind, expected in FEATURE_KEYS.items():
        if keys == set(expected):
            return kind
    raise ValueError(f"columns {sorted(keys)} are not a stored preference dataset; expected one of "
                     f"{ {k: list(v) for k, v in FEATURE_KEYS.items()} }")


def encode(example: Mapping[str, Any]) -> dict[str, str]:
    """Canonical example -> {column: JSON text}."""
    return {key: json.dumps(example[key], ensure_ascii=False) for key in FEATURE_KEYS[example["kind"]]}


def _text(value: Any) -> str:
    # array_record/TFDS hands Text features back as bytes (or numpy bytes scalars).
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode(record: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """TFDS record (bytes or str values) -> canonical example with "kind" first."""
    example: dict[str, Any] = {"kind": kind}
    for key in FEATURE_KEYS[kind]:
        example[key] = json.loads(_text(record[key]))
    return example
