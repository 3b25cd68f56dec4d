"""The trainer's config keys as a markdown reference (configs/README.md), generated from the code.

    python -m prefjax.train.config_reference            # prints it
    python -m prefjax.train.config_reference --write    # rewrites configs/README.md

Each key's default is read from `config_lib.trainer_config()` and its meaning from the
comment beside it there (on the key's line, or the comment lines just above it); the
optimizer's keys from the "Fields:" section of `optim.default_config`'s docstring; a key
with no comment of its own takes its section's. The command-line rules come from
prefjax.train.overrides' docstring, and each loss's hyperparameters from the loss registry.
So every fact stays in one place, and a test checks that the committed file is current.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import pathlib
import re
import sys
import textwrap
import tokenize
from typing import Any, Callable, Optional

from prefjax.losses import registry
from prefjax.train import config_lib, optim, overrides

OUTPUT = pathlib.Path(__file__).resolve().parents[2] / "configs" / "README.md"
COMMAND = "python -m prefjax.train.config_reference --write"


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text, whether the comment is the whole line)."""
    lines = source.splitlines()
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0]
            found[row] = (token.string.lstrip("#").strip(), lines[row - 1].lstrip().startswith("#"))
    return found


def _description(line: int, comments: dict[int, tuple[str, bool]]) -> str:
    """The comment on `line`, else the comment lines directly above it."""
    if line in comments and not comments[line][1]:
        return comments[line][0]
    above = []
    row = line - 1
    while row in comments and comments[row][1]:
        above.insert(0, comments[row][0])
        row -= 1
    return " ".join(above)


def _attribute_path(node: ast.AST) -> Optional[str]:
    """"model.attention_impl" for the target `c.model.attention_impl`, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    return ".".join(parts) if isinstance(node, ast.Name) and parts else None


def _callee(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        func = node.func
        return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return ""


def _section_items(value: ast.AST) -> list[tuple[str, ast.AST, int]]:
    """(key, value, line) for a section written as ConfigDict(dict(k=v, ...)) or ConfigDict({"k": v})."""
    if _callee(value) == "ConfigDict" and value.args:
        value = value.args[0]
    if _callee(value) == "dict":
        return [(kw.arg, kw.value, kw.lineno) for kw in value.keywords if kw.arg]
    if isinstance(value, ast.Dict):
        return [(k.value, v, k.lineno) for k, v in zip(value.keys, value.values) if isinstance(k, ast.Constant)]
    return []


def source_descriptions(function: Callable[..., Any]) -> dict[str, str]:
    """Key path -> the comment beside its default in `function`'s source (see module docstring)."""
    source = textwrap.dedent(inspect.getsource(function))
    comments = _comments(source)
    found: dict[str, str] = {}

    def visit(path: str, value: ast.AST, line: int) -> None:
        text = _description(line, comments)
        if text or path not in found:
            found[path] = text
        for key, child, child_line in _section_items(value):
            visit(f"{path}.{key}", child, child_line)

    for statement in ast.walk(ast.parse(source)):
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            path = _attribute_path(statement.targets[0])
            if path:
                visit(path, statement.value, statement.lineno)
    return found


def docstring_fields(function: Callable[..., Any]) -> dict[str, str]:
    """Field -> text from the "Fields:" section of `function`'s docstring ("a, b: text" gives both)."""
    doc = inspect.getdoc(function) or ""
    section = doc.split("Fields:", 1)[1] if "Fields:" in doc else ""
    found: dict[str, str] = {}
    names: list[str] = []
    for line in section.splitlines():
        entry = re.match(r"^  (\w+(?:, \w+)*): (.*)$", line)
        if entry:
            names = entry.group(1).split(", ")
            for name in names:
                found[name] = entry.group(2).strip()
        elif line.startswith("    ") and names:
            for name in names:
                found[name] += " " + line.strip()
        elif line.strip():
            break
    return found


def descriptions() -> dict[str, str]:
    """Every trainer key's meaning (a key without its own takes its section's)."""
    own = source_descriptions(config_lib.trainer_config)
    own.update({f"optimizer.{k}": v for k, v in docstring_fields(optim.default_config).items()})
    result = {}
    for path in config_lib.leaf_paths(config_lib.trainer_config()):
        parts = path.split(".")
        while parts and not own.get(".".join(parts)):
            parts.pop()
        result[path] = own[".".join(parts)] if parts else ""
    return result


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = config[part]
    return config


def _rules() -> str:
    """The command-line rules: prefjax.train.overrides' docstring from its numbered list on."""
    doc = inspect.getdoc(overrides) or ""
    start = re.search(r"^1\. ", doc, re.M)
    return doc[start.start():].strip() if start else ""


def render() -> str:
    """configs/README.md's text."""
    config = config_lib.trainer_config()
    meaning = descriptions()
    out = [
        "# Trainer config keys",
        "",
        f"<!-- generated by `{COMMAND}` from prefjax/train/config_lib.py; do not edit by hand -->",
        "",
        "A config file (`configs/*.py`) starts from `prefjax.train.config_lib.trainer_config()` and changes "
        "what it needs; the command line overrides any key: `--config.data.max_len=256`. Every key is listed "
        "below with its default. A key not listed here is an error (in a config file or on the command line), "
        "with a did-you-mean; so is a hyperparameter the chosen loss lacks.",
        "",
        "## On the command line",
        "",
        _rules(),
        "",
    ]
    section = None
    # Top-level keys first, then each section (ConfigDict lists keys sorted).
    for path in sorted(config_lib.leaf_paths(config), key=lambda p: ("." in p, p)):
        head = path.split(".")[0] if "." in path else "top level"
        if head != section:
            section = head
            out += ["", f"## {section}", "", "| key | default | meaning |", "|---|---|---|"]
        out.append(f"| `{path}` | `{_cell(repr(_value(config, path)))}` | {_cell(meaning[path])} |")
    out += ["", "## loss", "",
            "`config.loss` holds the chosen loss's hyperparameters (`loss_name`); those left out take the "
            "paper defaults below. README.md's loss table says what each loss is.", "",
            "| loss_name | hyperparameters (paper defaults) |", "|---|---|"]
    for name in registry.names():
        hparams = ", ".join(f"`{k}={v!r}`" for k, v in registry.get(name).hparam_defaults.items()) or "-"
        out.append(f"| `{name}` | {_cell(hparams)} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {OUTPUT}")
    args = parser.parse_args(argv)
    if args.write:
        OUTPUT.write_text(render())
    else:
        print(render(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
