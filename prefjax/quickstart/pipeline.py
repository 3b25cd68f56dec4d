"""The quick-start job: task -> SFT -> West-of-N pairs -> preference tuning -> evaluation and plots.

    python -m prefjax.main --config=configs/quickstart.py --workdir=/tmp/quickstart

`run(config, workdir)` runs the five stages and prints a summary table:

1. task: the synthetic task (prefjax.quickstart.tasks) and its tokenizer (workdir/tokenizer/);
2. SFT: a tiny Llama-family model imitates the task's noisy demonstrator, trained by
   prefjax.train with the `sft` loss (workdir/sft/: the trainer's metrics.jsonl and
   checkpoints, and model/, a Hugging Face folder);
3. West-of-N: N samples per prompt from the SFT policy, scored by the ground-truth reward,
   best vs worst -> workdir/pairs/train.jsonl (pairs), train_unpaired.jsonl (for KTO-style
   losses), train_ranked.jsonl (listwise losses), heldout.jsonl (evaluation), stats.json,
   best_of_n.json;
4. preference tuning with prefjax.train (config.loss_name, DPO by default) from the SFT model
   against the frozen SFT reference (workdir/tune/: the trainer's metrics.jsonl, summary.json
   and hf_export/);
5. evaluation of the SFT and tuned policies (prefjax.quickstart.evaluate) -> workdir/eval.json,
   plots -> workdir/plots/training_curves.png and reward_vs_kl.png, and workdir/summary.json.

Stages 1-3 ("prepare") are recorded in workdir/prepare.json; rerunning in the same workdir
reuses them (and the trainer resumes), provided the settings they depend on are unchanged.
`config.reuse` points at another workdir whose prepared stages to use (sweeps share one SFT
model and one pair dataset that way).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import ml_collections
import numpy as np
from absl import logging as absl_logging

from prefjax import train
from prefjax.losses import registry
from prefjax.models.tokenizer import Tokenizer, load_tokenizer
from prefjax.quickstart import evaluate, plots, report, rollouts, sft, tasks, vocab, west_of_n
from prefjax.train import config_lib
from prefjax.train.metrics import read_metrics

Echo = Callable[[str], None]
PREPARE_FILE = "prepare.json"
# The config keys stages 1-3 depend on (plus the task's own option section).
PREPARE_KEYS = ("seed", "task", "model", "sft", "west_of_n")
DATA_FILES = {"pair": "train.jsonl", "unpaired": "train_unpaired.jsonl", "ranked": "train_ranked.jsonl"}


def _quiet(_: str) -> None:
    pass


@dataclasses.dataclass
class Prepared:
    """The outputs of stages 1-3, loaded from disk (so a fresh and a resumed run see the same)."""

    folder: Path
    task: tasks.Task
    tokenizer: Tokenizer
    sft_folder: Path
    sft_model: rollouts.Model
    sft_history: list[dict[str, float]]
    heldout: west_of_n.PairSet
    best_of_n: list[dict[str, float]]
    stats: dict[str, Any]

    def data_file(self, kind: str) -> Path:
        return self.folder / "pairs" / DATA_FILES[kind]


def make_task(config: ml_collections.ConfigDict) -> tasks.Task:
    """The configured task, with its option section (config.<task name>) when the config has one."""
    options = config[config.task].to_dict() if config.task in config else {}
    return tasks.get_task(config.task, **options)


def prepare_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings stages 1-3 depend on, as plain JSON-able values."""
    settings = {key: (config[key].to_dict() if isinstance(config[key], ml_collections.ConfigDict)
                      else config[key]) for key in PREPARE_KEYS}
    settings["task_options"] = config[config.task].to_dict() if config.task in config else {}
    return json.loads(json.dumps(settings))


# --------------------------------------------------------------------------------- stages 1-3


def prepare(config: ml_collections.ConfigDict, workdir: str | Path, echo: Echo = print) -> Prepared:
    """Stages 1-3 in `workdir` (or loads them from there, or from config.reuse)."""
    folder = Path(config.reuse or workdir)
    marker = folder / PREPARE_FILE
    wanted = prepare_settings(config)
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ValueError(f"{marker}: the task, SFT model and pairs there were made with other settings "
                             f"(changed: {changed}); use a fresh --workdir (or config.reuse of a matching "
                             "run)")
        echo(f"[1-3] reusing the task, SFT model and pairs in {folder}")
        return _load_prepared(config, folder)
    if config.reuse:
        raise ValueError(f"config.reuse={config.reuse!r}: no prepared run there ({marker} is missing); "
                         "run the quick start there first")
    folder.mkdir(parents=True, exist_ok=True)
    task = make_task(config)
    tokenizer = vocab.build(task, folder / "tokenizer")
    echo(f"[1/5] task {task.name!r}: {len(task.symbols())} symbols, reward in {list(task.reward_range)}, "
         f"e.g. {task.prompts(np.random.default_rng(0), 1)[0]!r}")
    start = time.perf_counter()
    sft_folder = _stage_sft(config, task, tokenizer, folder, echo)
    timings = {"sft": time.perf_counter() - start}
    start = time.perf_counter()
    sft_model = rollouts.load(sft_folder)
    stats, best_of_n = _stage_pairs(config, task, tokenizer, sft_model, folder / "pairs", echo)
    timings["west_of_n"] = time.perf_counter() - start
    stats["seconds"] = timings
    (folder / "pairs" / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (folder / "pairs" / "best_of_n.json").write_text(json.dumps(best_of_n, indent=2) + "\n")
    marker.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")  # last: the stages are complete
    return _load_prepared(config, folder)


def _stage_sft(config: ml_collections.ConfigDict, task: tasks.Task, tokenizer: Tokenizer, folder: Path,
               echo: Echo) -> Path:
    """Stage 2: SFT through prefjax.train (the `sft` loss): the model as a Hugging Face folder (with the
    tokenizer) in sft/model/, the loss history in sft/metrics.jsonl."""
    cfg = sft.model_config(tokenizer, max_len=rollouts.row_length(task), **config.model.to_dict())
    echo(f"[2/5] supervised fine-tuning: {config.sft.steps} steps of {config.sft.batch_size} demonstrations "
         f"on a {config.model.num_layers}-layer, {config.model.hidden_size}-wide decoder (prefjax.train, loss sft)")
    return sft.fine_tune(task, cfg, sft.SftConfig(**config.sft.to_dict()), seed=config.seed,
                         folder=folder / "sft", tokenizer_folder=folder / "tokenizer")


def _stage_pairs(config: ml_collections.ConfigDict, task: tasks.Task, tokenizer: Tokenizer,
                 model: rollouts.Model, pairs_dir: Path, echo: Echo) -> tuple[dict[str, Any], list[dict]]:
    """Stage 3: West-of-N datasets from the saved SFT model (exactly as a resumed run loads it);
    (stats, best-of-n curve on the held-out prompts)."""
    wn = config.west_of_n
    echo(f"[3/5] West-of-N: {wn.n} samples for each of {wn.prompts} prompts, best vs worst by reward")
    train_pairs = _sample_pairs(task, tokenizer, model, wn.prompts, wn.n, wn.temperature,
                                seed=[config.seed, 3])
    heldout = _sample_pairs(task, tokenizer, model, wn.heldout_prompts, wn.n, wn.temperature,
                            seed=[config.seed, 4])
    west_of_n.write_pairs(train_pairs.pairs, pairs_dir / DATA_FILES["pair"])
    west_of_n.write_unpaired(train_pairs.pairs, pairs_dir / DATA_FILES["unpaired"])
    ranked_rows = west_of_n.write_ranked(train_pairs.pairs, pairs_dir / DATA_FILES["ranked"], wn.list_size)
    west_of_n.write_pairs(heldout.pairs, pairs_dir / "heldout.jsonl")
    stats = dict(train_pairs.stats, heldout_pairs=len(heldout.pairs), ranked_rows=ranked_rows)
    echo(f"      {stats['pairs']} pairs from {stats['prompts']} prompts; chosen reward "
         f"{stats['chosen_reward']:.3f} vs rejected {stats['rejected_reward']:.3f} "
         f"(policy mean {stats['sample_reward']:.3f})")
    return stats, heldout.best_of_n


@dataclasses.dataclass
class _Sampled:
    pairs: west_of_n.PairSet
    stats: dict[str, Any]
    best_of_n: list[dict[str, float]]


def _sample_pairs(task: tasks.Task, tokenizer: Tokenizer, model: rollouts.Model, num_prompts: int, n: int,
                  temperature: float, seed: list[int]) -> _Sampled:
    rng = np.random.default_rng(seed)
    prompts = task.prompts(rng, num_prompts)
    responses = rollouts.sample(model, tokenizer, task, [p for p in prompts for _ in range(n)],
                                seed=int(rng.integers(2**31)), temperature=temperature)
    rewards = responses.rewards(task)
    pairs = west_of_n.select(responses, rewards, n)
    stats = dict(prompts=num_prompts, n=n, pairs=len(pairs), sample_reward=float(rewards.mean()),
                 complete=float(responses.complete.mean()),
                 chosen_reward=float(np.mean(pairs.score_chosen)) if len(pairs) else math.nan,
                 rejected_reward=float(np.mean(pairs.score_rejected)) if len(pairs) else math.nan)
    return _Sampled(pairs, stats, best_of_n_curve(rewards.reshape(num_prompts, n)))


def best_of_n_curve(rewards_PxN: np.ndarray) -> list[dict[str, float]]:
    """Mean reward of the best of the first k samples, k = 1, 2, 4, ..., N, with the KL bound
    log k - (k - 1) / k of best-of-k sampling (exact when rewards do not tie)."""
    n = rewards_PxN.shape[1]
    ks = sorted({2**i for i in range(int(math.log2(n)) + 1)} | {n})
    return [{"n": k, "kl": math.log(k) - (k - 1) / k, "reward": float(rewards_PxN[:, :k].max(axis=1).mean())}
            for k in ks]


def _load_prepared(config: ml_collections.ConfigDict, folder: Path) -> Prepared:
    sft_folder = folder / "sft" / "model"
    return Prepared(
        folder=folder, task=make_task(config), tokenizer=load_tokenizer(folder / "tokenizer"),
        sft_folder=sft_folder, sft_model=rollouts.load(sft_folder),
        sft_history=read_metrics(str(folder / "sft" / "metrics.jsonl")),
        heldout=west_of_n.read_pairs(folder / "pairs" / "heldout.jsonl"),
        best_of_n=json.loads((folder / "pairs" / "best_of_n.json").read_text()),
        stats=json.loads((folder / "pairs" / "stats.json").read_text()))


# --------------------------------------------------------------------------------- stage 4


def trainer_config(config: ml_collections.ConfigDict, prepared: Prepared) -> ml_collections.ConfigDict:
    """The preference trainer's config: the SFT model as policy init and frozen reference."""
    if config.loss_name not in registry.names():
        raise KeyError(f"loss_name={config.loss_name!r} is not a registered loss; registered: "
                       f"{registry.names()}")
    spec = registry.get(config.loss_name)
    kind = config_lib.data_kind(config.loss_name)
    if kind not in DATA_FILES:
        raise ValueError(f"loss {config.loss_name!r} trains on {kind!r} data, which the quick start "
                         "does not make")
    if kind == "ranked" and not prepared.stats.get("ranked_rows"):
        raise ValueError(f"loss {config.loss_name!r} needs ranked lists of west_of_n.list_size="
                         f"{config.west_of_n.list_size} distinct responses, and no prompt had that many; "
                         "lower west_of_n.list_size or raise west_of_n.n")
    t = config.tune
    c = config_lib.trainer_config()
    c.seed = config.seed
    c.model.hf_folder = str(prepared.sft_folder)
    c.loss_name = config.loss_name
    c.loss = ml_collections.ConfigDict(config.loss.to_dict())
    c.reference.kind = "frozen" if spec.needs_reference else "none"
    c.data.source = str(prepared.data_file(kind))
    c.data.batch_size = t.batch_size
    c.data.max_len = rollouts.row_length(prepared.task)
    c.total_steps = config.total_steps
    c.optimizer.learning_rate = t.learning_rate
    c.optimizer.warmup_steps = t.warmup_steps
    c.log_every = t.log_every
    c.checkpoint.every = config.total_steps  # one checkpoint at the end: the run is short
    c.checkpoint.keep = 1
    return c


def tune(config: ml_collections.ConfigDict, prepared: Prepared, workdir: str | Path) -> dict[str, Any]:
    """Stage 4: prefjax.train on the West-of-N data; the trainer's summary (hf_export in "exported").

    With tune.label_noise > 0 the run trains on its own copy of the data (workdir/data/) in which
    exactly that fraction of preferences is flipped, the same rows for every loss at one seed.
    """
    c = trainer_config(config, prepared)
    rate = config.tune.label_noise
    if rate:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"tune.label_noise={rate} must be in [0, 1]")
        if config_lib.data_kind(config.loss_name) == "ranked":
            raise ValueError("tune.label_noise flips pair or unpaired preferences, not ranked lists")
        noisy = Path(workdir) / "data" / f"{Path(c.data.source).stem}_flipped.jsonl"
        flipped = west_of_n.write_flipped(c.data.source, noisy, rate, seed=config.seed)
        c.data.source, c.data.label_noise = str(noisy), 0.0
        (Path(workdir) / "data" / "label_noise.json").write_text(
            json.dumps({"rate": rate, "flipped": flipped, "source": str(noisy)}) + "\n")
    return train.run(c, str(Path(workdir) / "tune"))


# --------------------------------------------------------------------------------- stage 5


def make_evaluator(config: ml_collections.ConfigDict, prepared: Prepared) -> evaluate.Evaluator:
    prompts = prepared.task.prompts(np.random.default_rng([config.seed, 5]), config.eval.prompts)
    return evaluate.Evaluator(prepared.task, prepared.tokenizer, prepared.sft_model, prompts,
                              prepared.heldout, samples=config.eval.samples, seed=config.seed + 17,
                              temperature=config.eval.temperature)


def loss_label(config: ml_collections.ConfigDict) -> str:
    """"dpo (beta=0.1)": the loss and its beta (the other hyperparameters are in summary.json)."""
    beta = config.loss.to_dict().get("beta")
    return config.loss_name if beta is None else f"{config.loss_name} (beta={beta})"


ROWS = (("reward", "ground-truth reward (mean)"), ("reward_se", "  standard error over prompts"),
        ("kl", "KL(policy || SFT) [nats]"), ("win_rate", "win rate vs SFT"),
        ("reward_accuracy", "reward accuracy (held-out pairs)"), ("complete", "well-formed responses"))


def summary_table(sft_metrics: dict[str, float], tuned: dict[str, float], label: str,
                  best_of_n: Optional[list[dict[str, float]]] = None) -> str:
    header = ["", "SFT (reference)", label]
    rows = [[name, sft_metrics.get(key), tuned.get(key)] for key, name in ROWS]
    if best_of_n:
        last = best_of_n[-1]
        rows.append([f"best-of-{last['n']} from SFT: reward (KL <= {last['kl']:.2f})", None, last["reward"]])
    return report.table(header, rows)


def run(config: ml_collections.ConfigDict, workdir: str, *, echo: Echo = print, make_plots: bool = True,
        prepared: Optional[Prepared] = None, evaluator: Optional[evaluate.Evaluator] = None,
        ) -> dict[str, Any]:
    """The whole quick start (module docstring); returns the summary (also workdir/summary.json).

    `prepared` / `evaluator` let in-process sweeps share stages 1-3 and the reference's samples.
    """
    # orbax logs every file operation at INFO; the stage lines and the trainer's progress suffice.
    absl_logging.set_verbosity(absl_logging.WARNING)
    workdir_path = Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        prepared = prepared or prepare(config, workdir_path, echo)
    except sft.Preempted as stopped:
        (workdir_path / "summary.json").write_text(json.dumps({"stage": "sft", "preempted": True}, indent=2) + "\n")
        echo(str(stopped))
        return {"stage": "sft", "preempted": True}
    seconds = {"prepare": time.perf_counter() - start}

    start = time.perf_counter()
    label = loss_label(config)
    echo(f"[4/5] preference tuning: {label}, {config.total_steps} steps of {config.tune.batch_size} "
         f"examples (prefjax.train)")
    trainer_summary = tune(config, prepared, workdir_path)
    seconds["tune"] = time.perf_counter() - start
    if trainer_summary.get("preempted"):
        summary = {"step": trainer_summary["step"], "preempted": True, "seconds": seconds}
        (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        echo(f"preempted at step {trainer_summary['step']}: rerun the same command to resume")
        return summary

    start = time.perf_counter()
    echo(f"[5/5] evaluation on {config.eval.prompts} prompts x {config.eval.samples} samples")
    evaluator = evaluator or make_evaluator(config, prepared)
    sft_metrics = evaluator.evaluate(prepared.sft_model)
    tuned = evaluator.evaluate(rollouts.load(trainer_summary["exported"]))
    seconds["evaluate"] = time.perf_counter() - start
    (workdir_path / "eval.json").write_text(json.dumps({"sft": sft_metrics, "tuned": tuned}, indent=2) + "\n")

    files = {"pairs": str(prepared.data_file("pair")), "sft_model": str(prepared.sft_folder),
             "tuned_model": trainer_summary["exported"],
             "trainer_metrics": str(workdir_path / "tune" / "metrics.jsonl")}
    if make_plots:
        tune_records = read_metrics(str(workdir_path / "tune" / "metrics.jsonl"))
        files["training_curves"] = str(plots.training_curves(
            prepared.sft_history, tune_records, workdir_path / "plots" / "training_curves.png",
            title=f"{prepared.task.name}: SFT, then {label}"))
        points = [{"label": "SFT", "group": "SFT", "kl": 0.0, "reward": sft_metrics["reward"],
                   "reward_se": sft_metrics["reward_se"]},
                  {"label": label, "group": label, "kl": tuned["kl"], "reward": tuned["reward"],
                   "reward_se": tuned["reward_se"]}]
        files["reward_vs_kl"] = str(plots.reward_vs_kl(points, prepared.best_of_n,
                                                       workdir_path / "plots" / "reward_vs_kl.png",
                                                       reward_range=prepared.task.reward_range))
    summary = {
        # launch.sweep / launch.collect read these flat keys (finished runs, final/ and eval/ metrics).
        "step": trainer_summary["step"], "preempted": False,
        **{f"eval/{k}": v for k, v in tuned.items()}, **{f"eval/sft_{k}": v for k, v in sft_metrics.items()},
        **{k: v for k, v in trainer_summary.items() if k.startswith("final/")},
        "task": prepared.task.name, "seed": config.seed, "loss_name": config.loss_name,
        "loss": config.loss.to_dict(), "label_noise": config.tune.label_noise,
        "sft": sft_metrics, "tuned": tuned, "best_of_n": prepared.best_of_n, "pairs": prepared.stats,
        "seconds": seconds,
        "files": files,
    }
    (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo("")
    echo(summary_table(sft_metrics, tuned, label, prepared.best_of_n))
    echo("")
    echo(f"stages: prepare {seconds['prepare']:.0f} s, tuning {seconds['tune']:.0f} s, evaluation "
         f"{seconds['evaluate']:.0f} s; results in {workdir_path}/summary.json"
         + (f", plots in {workdir_path}/plots/" if make_plots else ""))
    return summary
