"""What the data tests share: the fixture folder and small builders of expected examples."""

from __future__ import annotations

import json
import pathlib
from typing import Any

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "data"


def fixture(name: str) -> str:
    """Path of a file under tests/fixtures/data."""
    return str(FIXTURES / name)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def same(a: Any, b: Any) -> bool:
    """Equal as JSON (key order ignored; NaN-free values)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
