"""The trainer's config: defaults, and validation before anything is compiled.

Experiment files (configs/*.py) start from `trainer_config()` and change what
they need; the command line overrides any key (`--config.loss.beta=0.05`).
configs/README.md lists every key with its default and meaning (generated from
`trainer_config()` by prefjax.train.config_reference).

`check_keys(config, source)` refuses keys that `trainer_config()` lacks (a
misspelled key in a config file would otherwise be a new key, silently
ignored), with a did-you-mean. `validate(config)` checks everything that can be
checked without a device program, and raises ConfigError saying what is wrong
and what is allowed: unknown keys, loss names, hyperparameter names and values (each
loss declares its hyperparameters' domains), a loss that
needs a reference with reference "none", a mesh that does not match the
devices, a batch that does not split over the data-parallel devices or into
micro-batches, the data pipeline's settings (truncation limits against
data.max_len, modes, buckets, packing, on_error, format, field names), the
optimizer section, data columns a loss needs but the data lacks.
`check_data_files` finds missing local data files (prefjax.main calls it before building the
model); `check_length_against_model` compares data.max_len with the model's trained
context once the model config is known.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator, Mapping, Optional

import jax
import ml_collections

from prefjax import roles, suggest
from prefjax.data import packing, readers, records, sources, truncation
from prefjax.losses import registry, types
from prefjax.models.config import PRESETS, ModelConfig
from prefjax.train import optim

ConfigDict = ml_collections.ConfigDict
NONFINITE_MODES = ("stop", "skip")
# data.on_error: "error" stops at a bad row; "skip" counts and skips it ("drop" is the older name of skip).
ON_ERROR_MODES = ("error", "skip", "drop")
KEY_REFERENCE = "configs/README.md"  # where every key is listed (prefjax.train.config_reference)
DATA_KINDS = {types.PairLogps: "pair", types.UnpairedLogps: "unpaired", types.ListLogps: "ranked",
              types.RewardPair: "pair", types.RatedResponses: "ranked"}
REWARD_MODEL_INPUTS = (types.RewardPair, types.RatedResponses)


class ConfigError(ValueError):
    """A config the trainer cannot run; the message names the key and the allowed values."""


def trainer_config() -> ConfigDict:
    """Every key the trainer reads, with defaults (a tiny CPU run on synthetic data).

    Each key's comment (on its line, or the comment lines just above it) is its entry in the
    generated key reference, configs/README.md (`python -m prefjax.train.config_reference --write`).
    """
    c = ConfigDict()
    c.job = "train"  # "train": this trainer; "online": it, on samples from the policy; "quickstart": its own job
    c.seed = 0  # model initialisation, data order and synthetic data
    c.total_steps = 20  # optimizer steps of the run (a resumed run continues to this count)
    c.grad_accum = 1  # micro-batches per step (data.batch_size must divide by it)
    c.on_nonfinite = "stop"  # "stop": end the run with a message; "skip": drop the batch, count it
    c.nonfinite_max_consecutive = 10  # on_nonfinite="skip": stop after this many skipped steps in a row
    # on_nonfinite="skip": stop once more than this fraction of total_steps has been skipped (at least one)
    c.nonfinite_max_fraction = 0.05

    c.model = ConfigDict(dict(
        preset="llama2-tiny",  # a prefjax.models preset name, used when hf_folder is empty
        # a Hugging Face checkpoint to start from: a local folder (config.json, safetensors, tokenizer)
        # or a Hub model id "owner/name" or "owner/name@revision" (downloaded through huggingface_hub)
        hf_folder="",
        param_dtype="float32",  # parameter storage dtype: "float32" or "bfloat16"
        dtype="float32",  # compute dtype: "float32" or "bfloat16"
        remat="none",  # rematerialisation per layer: none | full | dots_saveable | dots_with_no_batch_dims_saveable
        attention_impl=None,  # None (chosen per platform) | fused | blocked | flash | xla | cudnn | splash
        attention_block_size=0,  # queries per block of the CPU attention paths; 0 = measured default
    ))
    c.model.attention_impl = ml_collections.FieldReference(None, field_type=str)
    c.lora = ConfigDict(dict(
        enabled=False,  # train low-rank adapters instead of every weight
        rank=8,  # adapter rank
        alpha=16.0,  # adapter scale numerator (scale = alpha / rank, or alpha / sqrt(rank) with rslora)
        targets=("attn/(q|k|v|o)$", "mlp/(gate|up|down)$"),  # regexes over the weights' paths that get adapters
        rslora=False,  # rank-stabilised scaling alpha / sqrt(rank)
    ))
    c.reward = ConfigDict(dict(
        num_labels=1,  # reward-model losses: outputs of the reward head (L > 1: multi-attribute rating regression)
        # names of the head's outputs (Hugging Face id2label; for rated data, the rating columns, in order);
        # empty: "reward" for one output, LABEL_0, LABEL_1, ... for several
        labels=(),
        normalize=True,  # at the end: mean and std of each output over the training data, stored with the export
        normalize_batches=32,  # most training batches read for those statistics
        # the exported reward model's pad id (transformers scores the last token that is not it, so it must
        # not be an EOS id); None: the tokenizer's pad token
        pad_token_id=ml_collections.FieldReference(None, field_type=int),
    ))
    c.loss_name = "dpo"  # a registered loss (README's loss table); switching it resets config.loss
    c.loss = ConfigDict()  # the loss's hyperparameters; unset ones take the paper defaults
    c.reference = ConfigDict(dict(
        kind="auto",  # auto (what the loss needs) | frozen | lora (base, adapters off) | precomputed | none
        dtype="",  # "" = the policy's param dtype; e.g. "bfloat16" halves its memory
        refresh="none",  # none | soft (TR-DPO alpha mix-in) | hard (copy; previous iterate)
        refresh_every=1,  # steps between reference refreshes
        alpha=0.5,  # soft refresh: reference <- alpha * policy + (1 - alpha) * reference
    ))
    c.data = ConfigDict(dict(
        # "synthetic", or files / a TFDS dir / "tfds:<builder>[/<config>]" / a Hub dataset
        # "hf:<owner>/<name>[@revision][:<config>]" (prefjax.data.load_source)
        source="synthetic",
        eval_source="",  # held-out data in the same forms ("" = none; "synthetic" for a random one)
        split="train",  # the training split of a TFDS or Hub source (TFDS split syntax, e.g. "train[:90%]")
        eval_split="test",  # the split of eval_source when it is a TFDS or Hub source
        data_dir="",  # where "tfds:<builder>" sources are prepared ("" = TFDS's default, ~/tensorflow_datasets)
        format="auto",  # the rows' format (prefjax.data.formats); "auto" detects it and prints what it found
        fields=ConfigDict({name: "" for name in records.FIELD_NAMES}),  # canonical name -> your column ("" = same)
        tokenizer="",  # tokenizer folder or Hub id when the model is a preset ("" = the model's hf_folder)
        batch_size=8,  # global examples per step (all processes together)
        max_len=64,  # most tokens of prompt + one response; longer examples are truncated
        pack=False,  # several sequences per row (segment ids); real data only
        # packed rows per process and step (each step holds pack_rows x row_length tokens per process)
        pack_rows=ml_collections.FieldReference(None, field_type=int),
        row_length=ml_collections.FieldReference(None, field_type=int),  # packed row length; None: max_len
        pack_overflow="error",  # an example that finds no room: "error", or "drop" (weight 0, counted)
        fill_rows=False,  # with pack: batches take examples until the rows are full (batch_size = the most)
        share_prefix=False,  # one row per example: prompt once, then every response (prefjax.data.prefix_sharing)
        buckets=64,  # unpacked row lengths: a multiple (int), "pow2", a list of lengths, or None (max_len only)
        max_prompt_len=ml_collections.FieldReference(None, field_type=int),  # prompt token limit; None: no limit
        max_response_len=ml_collections.FieldReference(None, field_type=int),  # response token limit; None: no limit
        prompt_mode="keep_end",  # a prompt over its limit: keep_end | keep_start | drop (the example)
        response_mode="keep_start",  # a response over its limit: keep_start | keep_end | drop (the example)
        num_epochs=ml_collections.FieldReference(None, field_type=int),  # passes over the data; None: repeat forever
        shuffle=True,  # shuffle the examples (seeded)
        label_noise=0.0,  # fraction of examples whose preference is flipped (robustness experiments)
        on_error="error",  # a row that cannot be read or tokenized: "error" stops; "skip" (or "drop") counts it
        num_responses=2,  # synthetic data only: responses per example for ranked losses
        synthetic_pool=4,  # synthetic data only: distinct batches cycled (0 = fresh random pairs every step)
    ))
    c.optimizer = optim.default_config()  # the optax chain and its schedule (prefjax.train.optim)
    c.mesh = ConfigDict(dict(
        data=-1,  # data-parallel devices (-1: the devices the other axes leave)
        fsdp=1,  # devices the weights are sharded over (also data-parallel)
        tensor=1,  # devices each layer's matmuls are split over
    ))
    c.sharding_rules = ml_collections.FieldReference(None, field_type=list)  # None: prefjax.sharding.DEFAULT_RULES
    c.distributed = ConfigDict(dict(
        coordinator_address="",  # "host:port" of process 0 for multi-host runs ("" = one host, or the TPU pod's)
        num_processes=0,  # processes in the run (0 = from the environment)
        process_id=-1,  # this process's index (-1 = from the environment)
        # seconds without a heartbeat after which jax's coordination service declares a process dead
        # and stops the others (jax's own default is 100)
        heartbeat_timeout_seconds=20,
    ))
    c.workdir_lock = ConfigDict(dict(
        enabled=True,  # one run per workdir: a second run on the same workdir is refused
        heartbeat_seconds=10.0,  # how often the running trainer refreshes its lock
        # a lock not refreshed for this long is stale (its run died on another host) and is taken over;
        # on the same host a lock whose process is gone is taken over at once
        stale_seconds=120.0,
    ))
    c.checkpoint = ConfigDict(dict(
        every=10,  # steps between checkpoints
        keep=3,  # checkpoints kept
        async_save=True,  # write checkpoints in the background
        export_hf=True,  # write a Hugging Face folder at the end
        export_dtype="",  # dtype of the exported weights ("" = param dtype)
        export_dir="",  # where the Hugging Face export goes ("" = <workdir>/hf_export)
        allow_config_change=False,  # resume a workdir whose checkpointed config differs from this one
        # checksums of the saved state written with each checkpoint and checked (with finiteness) on
        # restore; a damaged checkpoint is moved to <workdir>/checkpoints-damaged and the previous one used
        verify=True,
    ))
    c.online = ConfigDict(dict(
        # job="online" (prefjax.online): online_dpo | iterative_dpo | xpo | nash_md | sppo | inpo | hypo
        algorithm="online_dpo",
        # where prompts come from: "task:arithmetic" / "task:sentiment" (the quick start's tasks), or any data
        # source prefjax.data reads whose rows have a prompt ("" = data.source)
        prompts="",
        samples_per_prompt=2,  # K responses sampled per prompt (nash_md and xpo: one, plus their opponent's)
        # 0: fresh samples every step (data.batch_size prompts; online); N: rounds of N prompts sampled from
        # the policy at the round's start, trained on for epochs_per_round epochs (iterative)
        prompts_per_round=0,
        epochs_per_round=1,  # passes over each round's examples
        pairs="best_worst",  # K scored samples -> one pair: best_worst (West-of-N) | random (two samples)
        # the reference's log-probs: "initial" (the starting policy, scored when sampling), "previous_iterate"
        # (the sampler's own log-probs: pi_t, no reference weights), "auto" (what the algorithm's paper uses)
        reference="auto",
        max_new_tokens=32,  # most tokens sampled per response (its EOS included)
        temperature=1.0,  # sampling temperature (the log-probs the losses read are untempered)
        top_p=1.0,  # nucleus sampling (1 = off)
        top_k=0,  # top-k sampling (0 = off)
        mixture_coef=0.5,  # nash_md: c in the token-level mixture softmax((1 - c) log pi + c log pi_ref)
        sample_batch=0,  # prompts per sampler call (0 = data.batch_size); a multiple of the data devices
        reward=ConfigDict(dict(
            # where rewards come from: "task:<name>", "module:function" or "file.py:function" (a Python reward
            # function), "rm:<folder or Hub id>" (a reward model, on the trainer's mesh), "preference:module:function"
            # (a pairwise judge P(a > b)); several are mixed with `weights`
            sources=(),
            weights=(),  # one weight per source (() = equal)
            preference_scale=1.0,  # scalar rewards -> P(a > b) = sigmoid(scale * (r_a - r_b)); inf = hard labels
        )),
        store=ConfigDict(dict(
            format="jsonl",  # the sample store's files under <workdir>/samples: jsonl | parquet
            keep_rounds=100,  # the newest rounds kept (at least the current one)
        )),
    ))
    c.log_every = 1  # steps between metric lines
    c.eval_every = 0  # 0: evaluate only at the end (when there is eval data)
    c.eval_batches = 4  # batches per evaluation of synthetic eval data
    c.logprob_chunk = 256  # positions per log-prob tile
    c.vocab_chunk = ml_collections.FieldReference(None, field_type=int)  # vocabulary entries per tile; None: all
    # Most tokens (rows on one device x positions) per log-prob tile; None: logprob_chunk alone.
    c.logprob_tile_tokens = ml_collections.FieldReference(512, field_type=int)
    c.peak_flops = 0.0  # 0: datasheet (TPU/GPU) or a one-off measurement (CPU)
    return c


def _fail(message: str) -> None:
    raise ConfigError(message)


def validate(config: ConfigDict, num_devices: Optional[int] = None) -> None:
    """Raises ConfigError for a config the trainer cannot run (see module docstring)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    check_keys(config)
    _check_choice("on_nonfinite", config.on_nonfinite, NONFINITE_MODES)
    _check_loss(config)
    _check_reference(config)
    _check_model(config)
    _check_mesh_and_batch(config, num_devices)
    _check_packing(config, num_devices)
    _check_data(config)
    if config.total_steps < 1:
        _fail(f"total_steps={config.total_steps} must be >= 1")
    _check_optimizer(config)
    _check_tiles(config)


def leaf_paths(config: ConfigDict, prefix: str = "") -> Iterator[str]:
    """Dotted paths of the config's leaves ("data.max_len", ...), in order."""
    for key, value in config.items():
        if isinstance(value, ConfigDict):
            yield from leaf_paths(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def _unknown_paths(config: ConfigDict, schema: ConfigDict, prefix: str = "") -> Iterator[str]:
    for key, value in config.items():
        path = prefix + key
        if path == "loss":  # the chosen loss's hyperparameters: checked against the loss (_check_loss)
            continue
        if key not in schema:
            yield path
        elif isinstance(value, ConfigDict) and isinstance(schema[key], ConfigDict):
            yield from _unknown_paths(value, schema[key], path + ".")


def unknown_keys_message(keys: list[str], valid: list[str], source: str, schema_name: str = "") -> str:
    """"<source>: unknown key a.b (did you mean a.c?)", and where the valid keys are listed:
    configs/README.md for the trainer's keys, else the file `schema_name` that sets them."""
    described = ", ".join(key + suggest.did_you_mean(key, valid) for key in keys)
    where = (f"the keys are those {schema_name} sets" if schema_name
             else f"every key, its default and meaning: {KEY_REFERENCE}")
    return f"{source}: unknown key{'s' if len(keys) > 1 else ''} {described}\n{where}"


def check_keys(config: ConfigDict, source: str = "config", schema: Optional[ConfigDict] = None,
               schema_name: str = "") -> None:
    """ConfigError naming every key of `config` that `schema` (default: trainer_config()) lacks, with
    a did-you-mean.

    `source` names where the config came from (the config file) in the message; `schema_name`
    names a schema other than the trainer's (e.g. the quick start's configs/quickstart.py).
    """
    schema = trainer_config() if schema is None else schema
    unknown = list(_unknown_paths(config, schema))
    if unknown:
        _fail(unknown_keys_message(unknown, list(leaf_paths(schema)), source, schema_name))


def nullable_keys() -> frozenset[str]:
    """The trainer keys that may be None (a None default, or a typed placeholder such as data.max_prompt_len)."""
    def walk(node: ConfigDict, prefix: str) -> Iterator[str]:
        for key, value in node.items(preserve_field_references=True):
            if isinstance(value, ConfigDict):
                yield from walk(value, f"{prefix}{key}.")
            elif value is None or isinstance(value, ml_collections.FieldReference):
                yield prefix + key
    return frozenset(walk(trainer_config(), ""))


def check_length_against_model(config: ConfigDict, model_cfg: ModelConfig) -> Optional[str]:
    """A one-line warning when data.max_len exceeds the context the model was trained for, else None.

    Positions past max_position_embeddings are outside what the model saw in pre-training (its
    RoPE frequencies were never trained there), so its outputs there are unreliable.
    """
    limit = model_cfg.max_position_embeddings
    if config.data.max_len > limit:
        return (f"data.max_len={config.data.max_len} exceeds the model's max_position_embeddings={limit} "
                "(the longest context it was trained on); quality past that length is not to be trusted")
    return None


def _check_tiles(config: ConfigDict) -> None:
    """Log-prob tiling: positive sizes (None where the key allows no limit)."""
    for key, optional in (("logprob_chunk", False), ("vocab_chunk", True), ("logprob_tile_tokens", True)):
        value = config[key]
        if value is None and optional:
            continue
        if value is None or value < 1:
            _fail(f"{key}={value!r} must be a positive number of {'tokens' if 'tokens' in key else 'entries'}"
                  + (" or None (no limit)" if optional else ""))


def _check_optimizer(config: ConfigDict) -> None:
    """The optimizer section, as prefjax.train.optim will read it (builds no device program)."""
    try:
        optim.make_optimizer(config.optimizer, config.total_steps)
    except ValueError as err:
        raise ConfigError(f"optimizer: {err}") from None


def _check_data(config: ConfigDict) -> None:
    """The data pipeline's settings, checked here rather than when the first batch is built."""
    data = config.data
    if not isinstance(data.max_len, int) or data.max_len < 2:
        _fail(f"data.max_len={data.max_len!r} must be an integer >= 2 (tokens of prompt + one response)")
    if not isinstance(data.batch_size, int) or data.batch_size < 1:
        _fail(f"data.batch_size={data.batch_size!r} must be a positive integer")
    limits = (("max_prompt_len", "below", lambda v: v < data.max_len),
              ("max_response_len", "at most", lambda v: v <= data.max_len))
    for key, relation, fits in limits:
        value = data[key]
        if value is None:
            continue
        if not isinstance(value, int) or value < 1:
            _fail(f"data.{key}={value!r} must be a positive number of tokens, or None (no limit)")
        if not fits(value):
            _fail(f"data.{key}={value} must be {relation} data.max_len={data.max_len} (prompt + one response "
                  f"fit in max_len); lower it or raise data.max_len")
    _check_choice("data.prompt_mode", data.prompt_mode, truncation.MODES)
    _check_choice("data.response_mode", data.response_mode, truncation.MODES)
    _check_choice("data.on_error", data.on_error, ON_ERROR_MODES)
    try:
        packing.bucket_lengths(data.max_len, tuple(data.buckets) if isinstance(data.buckets, list) else data.buckets)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data.buckets={data.buckets!r}: {err}") from None
    if data.num_epochs is not None and data.num_epochs < 1:
        _fail(f"data.num_epochs={data.num_epochs} must be >= 1, or None (repeat until total_steps)")
    if not 0.0 <= data.label_noise <= 1.0:
        _fail(f"data.label_noise={data.label_noise} must be a fraction in [0, 1]")
    _check_tokenizer(config)
    for name, column in data.fields.items():
        if not isinstance(column, str):
            _fail(f"data.fields.{name}={column!r} must be a column name (a string; \"\" = the column {name!r})")
    _check_format(data.format)


def _check_tokenizer(config: ConfigDict) -> None:
    """Text data (anything but synthetic batches) needs a tokenizer."""
    for key in ("source", "eval_source"):
        spec = config.data[key]
        if spec not in ("", "synthetic") and not (config.model.hf_folder or config.data.tokenizer):
            _fail(f"data.{key}={spec!r} is text: set model.hf_folder (a model with its tokenizer) or data.tokenizer")


def check_data_files(config: ConfigDict) -> None:
    """ConfigError when data.source / data.eval_source name local files that do not exist.

    prefjax.main calls it before the model is built (train.run would find out only when it opens
    the data); Hub and TFDS sources and directories are checked when they are opened.
    """
    for key in ("source", "eval_source"):
        spec = config.data[key]
        if spec in ("", "synthetic") or spec.startswith((sources.HUB_PREFIX, sources.TFDS_PREFIX)):
            continue
        if os.path.isdir(spec):
            continue
        try:
            readers.expand_paths(spec)
        except FileNotFoundError as err:
            raise ConfigError(f"data.{key}: {err}") from None


def _check_format(name: str) -> None:
    """data.format against prefjax.data.formats (which names the formats and suggests the closest)."""
    try:
        from prefjax.data import formats  # pylint: disable=import-outside-toplevel
    except ModuleNotFoundError as err:  # a tree without prefjax.data.formats: the readers detect the format
        if err.name != "prefjax.data.formats":
            raise
        return
    try:
        formats.check_format(name)
    except ValueError as err:
        raise ConfigError(f"data.format: {err}") from None


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def check_loss_name(name: str, key: str = "loss_name") -> None:
    """ConfigError for a name the loss registry lacks, with a did-you-mean."""
    if name not in registry.names():
        hint = suggest.did_you_mean(name, registry.names())
        _fail(f"{key}={name!r} is not a registered loss{hint}; registered: {', '.join(registry.names())}")


def check_loss_hparams(loss_name: str, names: Any, source: str = "config.loss") -> None:
    """ConfigError for hyperparameter names that loss `loss_name` does not take, with a did-you-mean;
    and, when `names` is a mapping of names to values, for a value outside its hyperparameter's
    declared domain (prefjax.losses.hparam_domains), naming the key "<source>.<name>", the allowed
    range and why: "config.loss.beta=0.0: loss 'ipo' needs beta > 0 (...); set a positive value"."""
    spec = registry.get(loss_name)
    defaults = spec.hparam_defaults
    unknown = [name for name in names if name not in defaults]
    if unknown:
        described = ", ".join(name + suggest.did_you_mean(name, defaults) for name in unknown)
        valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
        _fail(f"{source}: loss {loss_name!r} has no hyperparameter {described}; its hyperparameters "
              f"(paper defaults): {valid}")
    if isinstance(names, Mapping):
        for name, value in names.items():
            reason = spec.hparam_problem(name, value)
            if reason is not None:
                _fail(f"{source}.{name}={value!r}: {reason}")


def _check_loss(config: ConfigDict) -> None:
    check_loss_name(config.loss_name)
    # The values the step will use: the paper defaults, overridden by config.loss.
    check_loss_hparams(config.loss_name, {**registry.get(config.loss_name).hparam_defaults,
                                          **config.loss.to_dict()})


def _check_reference(config: ConfigDict) -> None:
    """The reference strategy (prefjax.roles), with reference.kind="auto" resolved for the loss."""
    ref = config.reference
    _check_choice("reference.kind", ref.kind, roles.REFERENCE_KINDS)
    _check_choice("reference.refresh", ref.refresh, roles.REFRESH_MODES)
    spec = registry.get(config.loss_name)
    kind = roles.resolve_kind(ref.kind, spec, config.lora.enabled)
    if spec.needs_reference and kind == "none":
        _fail(f"loss {config.loss_name!r} needs a reference model but reference.kind='none'; "
              "use 'auto', 'frozen', 'lora' or 'precomputed', or a reference-free loss")
    if kind == "lora" and not config.lora.enabled:
        _fail("reference.kind='lora' needs lora.enabled=True (the reference is the base with adapters off)")
    if config.lora.enabled and kind == "frozen":
        _fail("with lora.enabled the reference is the base model: set reference.kind='lora' "
              "(no second copy of the weights) or 'precomputed'")
    if kind == "precomputed":
        if "chosen_token_kl" in spec.requires or "kl_logps" in spec.requires:
            _fail(f"loss {config.loss_name!r} needs reference log-probs per token or on mismatched pairs, "
                  "which a precomputed reference does not store; use reference.kind='frozen'")
        # (an online run's batches bring the log-probs of their own samples, in any layout)
        if _mixing_layout(config) and config.job != "online":
            _fail(f"reference.kind='precomputed' needs unpacked batches ({_mixing_layout(config)}=False)")
        if ref.refresh != "none":
            _fail("a precomputed reference cannot be updated during training (reference.refresh='none')")
    if ref.refresh != "none":
        if kind != "frozen":
            _fail(f"reference.refresh={ref.refresh!r} needs reference.kind='frozen'"
                  + (" (the loss reads no reference)" if kind == "none" else ""))
        if ref.refresh_every < 1:
            _fail(f"reference.refresh_every={ref.refresh_every} must be >= 1")
        if not 0.0 < ref.alpha <= 1.0:
            _fail(f"reference.alpha={ref.alpha} must be in (0, 1]")
    _check_choice("reference.dtype", ref.dtype, roles.DTYPES)


def _mixing_layout(config: ConfigDict) -> str:
    """The data key whose rows are not one response each ("" when rows are unpacked)."""
    if config.data.pack:
        return "data.pack"
    return "data.share_prefix" if config.data.share_prefix else ""


def _check_model(config: ConfigDict) -> None:
    m = config.model
    if not m.hf_folder and m.preset not in PRESETS:
        _fail(f"model.preset={m.preset!r} is not a preset ({sorted(PRESETS)}); or set model.hf_folder")
    spec = registry.get(config.loss_name)
    if spec.inputs in REWARD_MODEL_INPUTS:
        _check_reward(config, spec)
    token_level = "chosen_token_kl" in spec.requires or "chosen_mask" in spec.requires
    layout = _mixing_layout(config)
    if config.data.fill_rows and config.data.share_prefix:
        _fail("data.fill_rows and data.share_prefix cannot both be set: prefix-shared rows are packed from "
              "batches of data.batch_size examples (data.pack with a fixed count)")
    if config.data.share_prefix and data_kind(config.loss_name, config.reward.num_labels) in ("unpaired", "rated"):
        _fail(f"data.share_prefix needs examples with several responses; loss {config.loss_name!r} reads "
              "single responses")
    if token_level and layout:
        _fail(f"loss {config.loss_name!r} works on per-token arrays, which packed or shared-prefix rows do not "
              f"give; set {layout}=False")
    if "kl_logps" in spec.requires and layout:
        _fail(f"loss {config.loss_name!r} builds mismatched pairs from unpacked rows: set {layout}=False")


def _check_reward(config: ConfigDict, spec: Any) -> None:
    reward = config.reward
    n = reward.num_labels
    if not isinstance(n, int) or n < 1:
        _fail(f"reward.num_labels={n!r} must be a positive integer (the reward head's outputs)")
    labels = tuple(reward.labels)
    if labels and len(labels) != n:
        _fail(f"reward.labels has {len(labels)} name(s) {list(labels)} but reward.num_labels={n}; give one name "
              "per output")
    if len(set(labels)) != len(labels):
        _fail(f"reward.labels {list(labels)} repeats a name; each output needs its own")
    if n > 1 and config.data.label_noise:
        _fail(f"data.label_noise={config.data.label_noise} flips preferences; rated data (reward.num_labels={n}) "
              "has ratings, not preferences: set data.label_noise=0")
    if spec.inputs is types.RewardPair and n != 1:
        _fail(f"loss {spec.name!r} compares one reward per response; set reward.num_labels=1 (several outputs "
              "train with loss_name='rating_regression')")
    if reward.normalize_batches < 1:
        _fail(f"reward.normalize_batches={reward.normalize_batches} must be >= 1")


def _check_mesh_and_batch(config: ConfigDict, num_devices: int) -> None:
    mesh = config.mesh.to_dict()
    unknown = sorted(set(mesh) - {"data", "fsdp", "tensor"})
    if unknown:
        _fail(f"mesh axes {unknown} are unknown; the mesh has axes data, fsdp, tensor")
    sizes = list(mesh.values())
    if sum(1 for s in sizes if s == -1) > 1:
        _fail(f"mesh {mesh}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or num_devices % known:
        _fail(f"mesh {mesh} does not fit {num_devices} devices")
    if -1 not in sizes and known != num_devices:
        _fail(f"mesh {mesh} has {known} devices but {num_devices} are available; set one axis to -1 to fill")
    resolved = _resolved_mesh(config, num_devices)
    data_parallel = resolved["data"] * resolved["fsdp"]
    batch = config.data.batch_size
    if batch % jax.process_count():
        _fail(f"data.batch_size={batch} must split evenly over {jax.process_count()} processes")
    if config.grad_accum < 1 or batch % config.grad_accum:
        _fail(f"data.batch_size={batch} must be a multiple of grad_accum={config.grad_accum}")
    micro = batch // config.grad_accum
    if micro % data_parallel:
        _fail(f"the micro-batch ({batch} examples / grad_accum {config.grad_accum} = {micro}) must be a multiple "
              f"of the data-parallel size data*fsdp = {data_parallel} (mesh {resolved})")
    if config.grad_accum > 1 and _mixing_layout(config):
        _fail(f"grad_accum > 1 needs unpacked batches ({_mixing_layout(config)}=False): micro-batches are cut "
              "from the unpacked row order")


def _resolved_mesh(config: ConfigDict, num_devices: int) -> dict[str, int]:
    """The mesh axis sizes with the -1 axis filled (after _check_mesh_and_batch accepted them)."""
    mesh = config.mesh.to_dict()
    known = math.prod(v for v in mesh.values() if v != -1)
    return {k: (num_devices // known if v == -1 else v) for k, v in mesh.items()}


def _check_packing(config: ConfigDict, num_devices: int) -> None:
    data = config.data
    if data.fill_rows and not data.pack:
        _fail("data.fill_rows=True fills packed rows: set data.pack=True (and data.pack_rows)")
    if not data.pack:
        return
    if data.source == "synthetic":
        _fail("data.pack=True packs real data; synthetic batches are unpacked (set data.source, or pack=False)")
    _check_choice("data.pack_overflow", data.pack_overflow, ("error", "drop"))
    if data.pack_rows is None or data.pack_rows < 1:
        _fail(f"data.pack=True needs data.pack_rows >= 1 (got {data.pack_rows}): the packed rows per process and "
              "step, fixed so that the step compiles once; a step then holds pack_rows x row_length tokens per "
              "process")
    if data.row_length is not None and data.row_length < data.max_len:
        _fail(f"data.row_length={data.row_length} must be >= data.max_len={data.max_len} (a sequence fills at "
              "most one row)")
    resolved = _resolved_mesh(config, num_devices)
    data_parallel = resolved["data"] * resolved["fsdp"]
    rows = data.pack_rows * jax.process_count()
    if rows % data_parallel:
        _fail(f"data.pack_rows={data.pack_rows} x {jax.process_count()} processes = {rows} packed rows must be a "
              f"multiple of the data-parallel size data*fsdp = {data_parallel}")
    if data.fill_rows and jax.process_count() > 1:
        # Each process then makes as many batches as its data fills: on data read a fixed number of
        # times the processes would disagree on the step count.
        if data.num_epochs is not None:
            _fail("data.fill_rows=True with several processes needs data.num_epochs=None (repeat; total_steps "
                  "ends the run)")
        if data.eval_source:
            _fail("data.fill_rows=True with several processes cannot evaluate data.eval_source (read once, it "
                  "would give the processes different batch counts); evaluate in a one-process run")


def data_kind(loss_name: str, num_labels: int = 1) -> str:
    """"pair", "unpaired", "ranked" or "rated": the example kind a loss trains on (rating regression
    with several outputs, `reward.num_labels` > 1, reads one response with that many ratings)."""
    inputs = registry.get(loss_name).inputs
    if inputs is types.RatedResponses and num_labels > 1:
        return "rated"
    return DATA_KINDS[inputs]


def reward_labels(config: ConfigDict) -> tuple[str, ...]:
    """The reward head's output names: reward.labels, or the defaults its comment gives."""
    labels = tuple(config.reward.labels)
    if labels:
        return labels
    n = config.reward.num_labels
    return ("reward",) if n == 1 else tuple(f"LABEL_{i}" for i in range(n))


def loss_hparams(config: ConfigDict) -> tuple[tuple[str, Any], ...]:
    """The loss's hyperparameters: paper defaults, overridden by config.loss."""
    values = dict(registry.get(config.loss_name).hparam_defaults)
    values.update(config.loss.to_dict())
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))
