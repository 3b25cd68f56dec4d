"""The launchers' trailing `-- MAIN_ARGS`: the arguments passed through to python -m prefjax.main."""

from __future__ import annotations

import argparse

HELP = "-- then the prefjax.main arguments"


def add(parser: argparse.ArgumentParser, help_text: str = HELP) -> None:
    """Declares the trailing arguments (everything after --)."""
    parser.add_argument("main_args", nargs=argparse.REMAINDER, help=help_text)


def parse(parser: argparse.ArgumentParser, remainder: list[str],
          example: str = "-- --config=configs/tiny_dpo.py") -> list[str]:
    """The prefjax.main arguments without the leading --; a parser error when no --config is among them."""
    main_args = remainder[1:] if remainder[:1] == ["--"] else remainder
    if not any(a.startswith("--config") for a in main_args):
        parser.error(f"pass the prefjax.main arguments after --, e.g. {example}")
    return main_args
