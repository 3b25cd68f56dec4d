"""The preference trainer: `prefjax.train.run(config, workdir)`, and everything it is made of.

    loop.py             run(): the readable training loop, resumable; a `Run` value carries its pieces
    steps.py            the pure jitted train and eval steps (StepSpec)
    setup.py            model, roles, optimizer, state and shardings from a config
    config_lib.py       the trainer's config: defaults and validation (ConfigError)
    batch_source.py     the protocol the loop reads batches from
    reference_cache.py  the precomputed reference's log-probs, and the source that attaches them
    loss_inputs.py      scores + batch -> the input container a registered loss takes
    evaluation.py       held-out loss and metrics
    export.py           the trained policy as a Hugging Face folder
    state.py            TrainState: what a checkpoint holds
    checkpoint.py       orbax checkpoints (state, data position, metadata)
    state_digest.py     per-leaf checksums of the state, computed on device (checkpoint integrity)
    resume.py           a rerun's config against the checkpointed one; every config kept
    startup.py          the start-up report (printed, and summary.json's "startup")
    preemption.py       SIGTERM / preemption sync points
    metrics.py          metrics.jsonl + TensorBoard, late fetching, FLOPs and MFU
    optim.py            the optax chain and its schedule

`run` and `NonFiniteLossError` are imported lazily, so that config files can import
`prefjax.train.config_lib` without loading orbax and grain.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("run", "Run", "NonFiniteLossError"):
        from prefjax.train import loop  # pylint: disable=import-outside-toplevel

        return getattr(loop, name)
    raise AttributeError(f"module 'prefjax.train' has no attribute {name!r}")
