"""Did-you-mean suggestions for names a user mistyped (config keys, loss names, formats).

    did_you_mean("data.max_lenght", keys)   # ' (did you mean data.max_len?)', or '' when nothing is close

One place for the wording and the closeness cut-off, so that every error that names an
unknown key or choice reads the same.
"""

from __future__ import annotations

import difflib
from typing import Iterable

# difflib's ratio above which a name counts as a likely typo (its default, 0.6, also matches
# unrelated short names such as "beta" for "eta"; 0.7 keeps one or two wrong letters).
CUTOFF = 0.7


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most like `name` (a likely typo of it), or None."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=CUTOFF)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when none is close."""
    match = closest(name, choices)
    return f" (did you mean {match}?)" if match else ""
