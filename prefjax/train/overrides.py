"""Command-line overrides that ml_collections' config flags cannot express, and the loss-switch rule.

config_flags parses `--config.KEY=VALUE` as the type the config file gave KEY, and refuses keys
the file lacks. `split_argv` takes the overrides below out of the command line before
config_flags sees it, and `apply` applies them to the parsed config (the list is also the
"On the command line" section of configs/README.md):

1. `--config.KEY=None` sets KEY to None. Trainer keys allow it where their default is None or a
   typed placeholder (`config_lib.nullable_keys()`: data.max_prompt_len, data.num_epochs,
   model.attention_impl, vocab_chunk, logprob_tile_tokens, ...); other keys refuse it.
2. `--config.loss.NAME=VALUE` sets any hyperparameter of the chosen loss, whether or not the
   config file listed it; VALUE is read as the type of the loss's paper default (a tuple as
   "0.3,0.7"). A name the loss lacks is an error with a did-you-mean.
3. `--config.loss_name=NAME` switching to another loss than the file's:
   - config.loss becomes NAME's paper defaults plus the loss.* values of the command line. The
     file's hyperparameters are dropped even where NAME has one of the same name: they were
     chosen for the file's loss (DPO's beta=0.1 is not SimPO's beta=2.0).
   - reference settings the file chose that do not suit NAME go back to their defaults: for a
     reference-free loss reference.kind "auto" (no reference is held) and reference.refresh
     "none"; for a loss that needs a reference where the file said reference.kind="none",
     "auto" (a frozen copy, or the LoRA base). Other reference settings (frozen, lora,
     precomputed, dtype) carry over, and reference keys given on the command line are never
     reset (validation then refuses an impossible combination, naming it).
   Each reset is reported in one line (a "note:" on stderr, printed by prefjax.main).
   Naming the same loss as the file is not a switch: the file's hyperparameters stay.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Collection, Optional, Sequence

import ml_collections

from prefjax import suggest
from prefjax.losses import registry
from prefjax.train import config_lib

ConfigError = config_lib.ConfigError
_OVERRIDE = re.compile(r"^--?(no)?config\.([^=\s]+)(?:=(.*))?$", re.S)


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """The command line split for config_flags and for `apply`.

    argv: the arguments config_flags parses (the ones below taken out).
    nones: keys set to None, in order.
    loss_name: the --config.loss_name value, or None.
    loss_values: loss hyperparameter -> its text on the command line.
    """

    argv: list[str]
    nones: tuple[str, ...] = ()
    loss_name: Optional[str] = None
    loss_values: dict[str, str] = dataclasses.field(default_factory=dict)


def split_argv(argv: Sequence[str]) -> CommandLine:
    """Takes `--config.KEY=None`, `--config.loss_name` and `--config.loss.*` out of `argv`.

    Accepts `--config.KEY=VALUE`, `--config.KEY VALUE`, and for flags `--config.loss.KEY`
    (true) / `--noconfig.loss.KEY` (false), as absl does.
    """
    rest, nones, loss_name, loss_values = [], [], None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        match = _OVERRIDE.match(arg) if i > 0 else None
        i += 1
        if match is None:
            rest.append(arg)
            continue
        negated, key, value = match.groups()
        takes_next = value is None and not negated and i < len(argv) and not argv[i].startswith("-")
        if takes_next:
            value = argv[i]
        ours = key == "loss_name" or key.startswith("loss.") or value == "None"
        if not ours:
            rest.append(arg)
            continue
        if takes_next:
            i += 1
        if key.startswith("loss."):
            loss_values[key[len("loss."):]] = "false" if negated else ("true" if value is None else value)
        elif key == "loss_name":
            if value is None:
                raise ConfigError("--config.loss_name needs a value, e.g. --config.loss_name=simpo")
            loss_name = value
        else:
            nones.append(key)
    return CommandLine(argv=rest, nones=tuple(nones), loss_name=loss_name, loss_values=loss_values)


def _has_key(config: ml_collections.ConfigDict, path: str) -> bool:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def parse_value(text: str, default: Any, name: str) -> Any:
    """`text` as the type of `default` (bool, int, float, str or tuple); ConfigError if it is not one."""
    try:
        if isinstance(default, bool):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return lowered in ("true", "1")
        if isinstance(default, (int, float, str)):
            return type(default)(text)
        if isinstance(default, tuple):
            parts = ast.literal_eval(text) if text.strip()[:1] in "([" else text.split(",")
            kind = type(default[0]) if default else str
            return tuple(kind(part) for part in parts)
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):
        raise ConfigError(f"--config.loss.{name}={text!r}: not a {type(default).__name__} "
                          f"(the paper default is {default!r})") from None


def apply(config: ml_collections.ConfigDict, command_line: CommandLine, *,
          overridden: Collection[str] = (), nullable: Optional[Collection[str]] = None) -> list[str]:
    """Applies `command_line`'s None values and loss settings to `config` (module docstring).

    `overridden`: the keys config_flags set from the command line (they are not reset).
    `nullable`: the keys that may be None (None: any key). Returns the notes to show the user.
    """
    for key in command_line.nones:
        if not _has_key(config, key):
            valid = list(config_lib.leaf_paths(config))
            raise ConfigError(f"--config.{key}=None: unknown key{suggest.did_you_mean(key, valid)}")
        if nullable is not None and key not in nullable:
            raise ConfigError(f"--config.{key}=None: {key} cannot be None (it is {_value(config, key)!r} "
                              f"by default; see {config_lib.KEY_REFERENCE})")
        _set(config, key, None)
    file_loss = config.loss_name
    new_loss = command_line.loss_name
    if new_loss is not None:
        config_lib.check_loss_name(new_loss, key="--config.loss_name")
        config.loss_name = new_loss
    defaults = registry.get(config.loss_name).hparam_defaults
    config_lib.check_loss_hparams(config.loss_name, list(command_line.loss_values), source="--config.loss")
    given = {name: parse_value(text, defaults[name], name) for name, text in command_line.loss_values.items()}
    notes = []
    if new_loss is not None and new_loss != file_loss:
        dropped = {k: v for k, v in config.loss.to_dict().items() if k not in given}
        hparams = {**defaults, **given}
        notes.append(f"loss_name {file_loss} -> {new_loss}: config.loss = {hparams} ({new_loss}'s paper defaults"
                     + (f" and the command line's; the file's {dropped} dropped)" if dropped else
                        " and the command line's)"))
        notes += _reset_reference(config, overridden)
    else:
        hparams = {**config.loss.to_dict(), **given}
    # A new section: a locked one refuses the hyperparameters the file did not list.
    with config.unlocked():
        config.loss = ml_collections.ConfigDict(hparams)
    return notes


def _value(config: ml_collections.ConfigDict, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = node[part]
    return node


def _reset_reference(config: ml_collections.ConfigDict, overridden: Collection[str]) -> list[str]:
    """After a loss switch: the file's reference settings that the new loss cannot use, reset."""
    if "reference" not in config:  # the quick start's config has no reference section
        return []
    spec = registry.get(config.loss_name)
    ref = config.reference
    if spec.needs_reference:
        resets = {"kind": "auto"} if ref.kind == "none" else {}
        why = "it needs a reference"
    else:
        resets = {k: v for k, v in (("kind", "auto"), ("refresh", "none")) if ref[k] != v}
        why = "it reads no reference"
    notes = []
    for key, value in resets.items():
        if f"reference.{key}" in overridden:
            continue
        notes.append(f"reference.{key} {ref[key]!r} -> {value!r} for {config.loss_name} ({why})")
        ref[key] = value
    return notes
