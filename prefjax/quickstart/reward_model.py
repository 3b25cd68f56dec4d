"""A reward model on the quick-start task, judged by the true reward: accuracy, label noise, best-of-N.

    python -m prefjax.quickstart.reward_model --workdir=/tmp/reward-model [--small] [--seeds=0,1,2]

For each seed, the quick start's stages 1-3 (pipeline.prepare: task, SFT model, West-of-N
pairs) run once in WORKDIR[/seed<s>]/base, or come from `--reuse=DIR` (a quick-start workdir
of the same settings; one seed). Then each run of the config's sweep
(configs/quickstart_reward_model.py: 0%, 20% and 40% of the training pairs flipped) does:

1. prefjax.train with the `bradley_terry` loss from the SFT model with a fresh reward head
   (pipeline.tune, which writes the flipped copy of the pairs for tune.label_noise > 0)
   -> WORKDIR[/seed<s>]/runs/<name>/tune/hf_export, a *ForSequenceClassification folder;
2. prefjax.reward.load of that folder, and prefjax.reward.score of
   - the held-out West-of-N pairs: **accuracy** = the fraction of pairs the learned reward
     orders as the true reward does (`pairwise_accuracy`);
   - `bon_n` responses per fresh prompt sampled once per seed from the SFT policy: the same
     accuracy over every within-prompt pair of them (`ranking_accuracy`: near-ties and
     middling responses included, so harder than best-vs-worst), and **best-of-n** for
     n = 1, 2, 4, ..., bon_n: the true reward of the response the learned reward ranks first,
     against that of the response the true reward ranks first (the upper line). The learned
     reward's line flattening or falling as n grows, while the upper line keeps rising, is
     reward over-optimisation (Gao et al. 2023, "Scaling laws for reward model
     overoptimization").

Best-of-n values are exact expectations over a uniformly random n-subset of each prompt's
bon_n samples (`best_of_n`), not one draw of the first n, so the curves are smooth in n and
the true-reward line is non-decreasing. Both lines pick among the complete samples (ended
with EOS, task symbols only: what the West-of-N pairs are made of; ~99% of them); an
incomplete one is picked only from a draw without a complete one, and is left out of the
accuracy.

Writes WORKDIR/reward_model.json (every run's numbers), reward_model.md (the tables, mean ±
sd over seeds) and reward_model_bon.png (true reward of the best-of-n pick against n), and
prints the tables. A run whose results are on disk (runs/<name>/reward_eval.json) is read
back, so an interrupted experiment resumes. The runs share one compiled train step through a
persistent XLA cache in WORKDIR/xla_cache (`share_compilations`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging
from matplotlib.figure import Figure

from prefjax import reward
from prefjax.quickstart import evaluate, grid, pipeline, plots, report, rollouts, sft, west_of_n

Echo = Callable[[str], None]
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart_reward_model.py"
RESULT_FILE = "reward_eval.json"


class ExperimentError(ValueError):
    """A setting this experiment cannot run with; the message names it and what to do."""


class Preempted(RuntimeError):
    """A reward model's training was preempted; rerunning the command resumes it."""


# --------------------------------------------------------------------------- the statistics


def pairwise_accuracy(proxy_a: np.ndarray, proxy_b: np.ndarray, gold_a: np.ndarray,
                      gold_b: np.ndarray) -> tuple[float, int]:
    """(accuracy, pairs counted): over the pairs (a_i, b_i) whose true (gold) rewards differ, the
    fraction the learned (proxy) reward orders the same way; a proxy tie counts one half (as in
    evaluate.pair_accuracy). NaN and 0 when every pair's gold rewards tie."""
    proxy_a, proxy_b, gold_a, gold_b = (np.asarray(x, np.float64).ravel()
                                        for x in (proxy_a, proxy_b, gold_a, gold_b))
    if not len(proxy_a) == len(proxy_b) == len(gold_a) == len(gold_b):
        raise ValueError(f"pairwise_accuracy: {len(proxy_a)}, {len(proxy_b)}, {len(gold_a)} and "
                         f"{len(gold_b)} values; each side needs one per pair")
    gold_margin = gold_a - gold_b
    counted = gold_margin != 0
    if not counted.any():
        return math.nan, 0
    # Positive where the proxy agrees with the gold order, zero where the proxy ties.
    agreement = (proxy_a - proxy_b)[counted] * np.sign(gold_margin[counted])
    return evaluate.pair_accuracy(agreement), int(counted.sum())


def ranking_accuracy(proxy_PxM: np.ndarray, gold_PxM: np.ndarray,
                     keep_PxM: Optional[np.ndarray] = None) -> tuple[float, int]:
    """pairwise_accuracy over every pair of responses to the same prompt (rows are prompts), both
    of whose `keep` entries are true (default: all)."""
    proxy, gold = np.asarray(proxy_PxM), np.asarray(gold_PxM)
    keep = np.ones(proxy.shape, bool) if keep_PxM is None else np.asarray(keep_PxM, bool)
    if not proxy.shape == gold.shape == keep.shape or proxy.ndim != 2:
        raise ValueError(f"ranking_accuracy: proxy {proxy.shape}, gold {gold.shape} and keep {keep.shape} "
                         "must be the same [prompts, responses] shape")
    i, j = np.triu_indices(proxy.shape[1], k=1)
    both = keep[:, i] & keep[:, j]
    return pairwise_accuracy(proxy[:, i][both], proxy[:, j][both], gold[:, i][both], gold[:, j][both])


def best_of_n(keys_PxM: np.ndarray, values_PxM: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """[len(sizes)]: for each n, the mean over prompts (rows) of E[value of the response with the
    largest key among n of the prompt's M responses drawn without replacement], exactly.

    Sorting a prompt's keys, the largest key of a random n-subset lies in the group of keys tied
    at one value, spanning sorted positions [lo, hi), with probability
    (C(hi, n) - C(lo, n)) / C(M, n); ties are broken uniformly, so that group contributes its
    mean value. keys = proxy rewards gives the proxy-picked response's gold reward; keys =
    values the gold best-of-n (non-decreasing in n). n = 1 is the mean value, n = M the pick
    among all M.
    """
    keys, values = np.asarray(keys_PxM, np.float64), np.asarray(values_PxM, np.float64)
    if keys.shape != values.shape or keys.ndim != 2:
        raise ValueError(f"best_of_n: keys {keys.shape} and values {values.shape} must be the same "
                         "[prompts, responses] shape")
    if np.isnan(keys).any():
        raise ValueError("best_of_n: the keys (rewards) must not be NaN (-inf marks a response never to "
                         "pick)")
    m = keys.shape[1]
    bad = [n for n in sizes if not 1 <= n <= m]
    if bad:
        raise ValueError(f"best_of_n: sizes {bad} are not in [1, {m}] (the responses per prompt)")
    # below[i, s] = C(i, n_s) / C(M, n_s), exact integer binomials divided once.
    below = np.asarray([[math.comb(i, n) / math.comb(m, n) for n in sizes] for i in range(m + 1)])
    total = np.zeros(len(sizes))
    for k, v in zip(keys, values):
        order = np.argsort(k, kind="stable")
        k, v = k[order], v[order]
        lo = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        hi = np.r_[lo[1:], m]
        group_means = np.add.reduceat(v, lo) / (hi - lo)
        total += group_means @ (below[hi] - below[lo])
    return total / len(keys)


def best_of_n_sizes(m: int) -> list[int]:
    """1, 2, 4, ... up to m, and m itself (pipeline.best_of_n_curve's sizes)."""
    return [point["n"] for point in pipeline.best_of_n_curve(np.zeros((1, m)))]


def kl_bound(n: int) -> float:
    """KL(best-of-n || policy) <= log n - (n - 1) / n (as pipeline.best_of_n_curve reports it)."""
    return next(point["kl"] for point in pipeline.best_of_n_curve(np.zeros((1, n))) if point["n"] == n)


# --------------------------------------------------------------------------- one seed


def check_config(config: ml_collections.ConfigDict, where: str | Path) -> None:
    """The reward_model section's settings, checked before anything runs."""
    if "reward_model" not in config:
        raise ExperimentError(f"{where}: the config has no reward_model section (bon_prompts, bon_n, "
                              "score_batch_size); start from configs/quickstart_reward_model.py")
    for key, value in config.reward_model.items():
        if not isinstance(value, int) or value < 1:
            raise ExperimentError(f"{where}: reward_model.{key}={value!r} must be a whole number >= 1")


class BestOfNSamples:
    """`m` responses from the SFT policy to each of `prompts` fresh prompts, with their gold rewards."""

    def __init__(self, config: ml_collections.ConfigDict, prepared: pipeline.Prepared):
        rm = config.reward_model
        # [seed, 6]: stages 3 and 5 of the quick start draw their prompts from [seed, 3..5].
        rng = np.random.default_rng([config.seed, 6])
        prompts = prepared.task.prompts(rng, rm.bon_prompts)
        self.m = rm.bon_n
        self.responses = rollouts.sample(prepared.sft_model, prepared.tokenizer, prepared.task,
                                         [p for p in prompts for _ in range(self.m)],
                                         seed=int(rng.integers(2**31)),
                                         temperature=config.west_of_n.temperature)
        self.gold = self.responses.rewards(prepared.task).reshape(-1, self.m)
        self.complete = self.responses.complete.reshape(-1, self.m)
        self.sizes = best_of_n_sizes(self.m)

    def candidates(self, keys_PxM: np.ndarray) -> np.ndarray:
        """The keys with -inf for incomplete responses: never picked while a complete one is in the draw."""
        return np.where(self.complete, keys_PxM, -np.inf)

    def gold_curve(self) -> list[float]:
        """Best-of-n picked by the true reward: the upper line."""
        return [float(x) for x in best_of_n(self.candidates(self.gold), self.gold, self.sizes)]


def score_run(model: reward.RewardModel, heldout: west_of_n.PairSet, samples: BestOfNSamples,
              batch_size: int) -> dict[str, Any]:
    """The learned reward's accuracy on the held-out pairs and on the samples, and its best-of-n curve."""
    pairs = len(heldout)
    # Only complete samples are scored (an empty response is no text to score); the others are never picked.
    complete = np.flatnonzero(samples.complete.ravel())
    prompts = list(heldout.prompts) * 2 + [samples.responses.prompts[i] for i in complete]
    texts = list(heldout.chosen) + list(heldout.rejected) + [samples.responses.texts[i] for i in complete]
    proxy = np.asarray(reward.score(model, prompts, texts, batch_size=batch_size))[:, 0]  # num_labels = 1
    heldout_accuracy, heldout_counted = pairwise_accuracy(
        proxy[:pairs], proxy[pairs:2 * pairs], heldout.score_chosen, heldout.score_rejected)
    proxy_PxM = np.zeros(samples.gold.size)
    proxy_PxM[complete] = proxy[2 * pairs:]
    proxy_PxM = samples.candidates(proxy_PxM.reshape(samples.gold.shape))
    sample_accuracy, sample_counted = ranking_accuracy(proxy_PxM, samples.gold, samples.complete)
    return {"heldout_accuracy": heldout_accuracy, "heldout_pairs": heldout_counted,
            "sample_accuracy": sample_accuracy, "sample_pairs": sample_counted,
            "best_of_n": [float(x) for x in best_of_n(proxy_PxM, samples.gold, samples.sizes)]}


def _read_back(path: Path, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("settings") == settings else None


def run_seed(base: ml_collections.ConfigDict, sweep: Sequence[dict[str, Any]], seed: int, root: Path, *,
             reuse: str = "", echo: Echo = print) -> dict[str, Any]:
    """Stages 1-3 once, then each sweep run's reward model trained, loaded and scored (module
    docstring); {"seed", "bon_sizes", "gold_best_of_n", "sft_reward", "runs": [...]}."""
    seeded = grid.configure(base, {"seed": seed, "reuse": reuse})
    reusing = bool(reuse) or (root / "base" / pipeline.PREPARE_FILE).is_file()
    try:
        prepared = pipeline.prepare(seeded, root / "base", echo)
    except ValueError as err:
        if not reusing:
            raise
        # Reusing runs no stage, only pipeline's checks of the saved settings: the user's to fix.
        raise ExperimentError(str(err)) from err
    settings = pipeline.prepare_settings(seeded)
    start = time.perf_counter()
    samples = BestOfNSamples(seeded, prepared)
    echo(f"best-of-n samples: {samples.m} from the SFT policy for each of {len(samples.gold)} prompts "
         f"({time.perf_counter() - start:.0f} s)")
    runs = []
    for i, overrides in enumerate(sweep, start=1):
        config = grid.configure(seeded, overrides)
        if pipeline.prepare_settings(config) != settings:
            raise ExperimentError(f"run {grid.run_name(overrides)} changes the task, SFT or West-of-N "
                                  "settings, which the runs of one seed share; sweep only loss, total_steps "
                                  "and tune.* keys")
        name = grid.run_name(overrides)
        run_dir = root / "runs" / name
        wanted = {"total_steps": config.total_steps, "loss": config.loss.to_dict(),
                  "tune": config.tune.to_dict(), "reward_model": config.reward_model.to_dict()}
        done = _read_back(run_dir / RESULT_FILE, wanted)
        echo(f"=== seed {seed}, reward model {i}/{len(sweep)}: {name}"
             + (" (finished, read back)" if done else ""))
        if done is None:
            done = _train_and_score(config, prepared, samples, run_dir, echo)
            done.update(name=name, overrides=overrides, seed=seed, label_noise=float(config.tune.label_noise),
                        settings=wanted)
            (run_dir / RESULT_FILE).write_text(json.dumps(done, indent=2) + "\n")
        runs.append(done)
    return {"seed": seed, "task": prepared.task.name, "bon_sizes": samples.sizes,
            "gold_best_of_n": samples.gold_curve(), "sft_reward": float(samples.gold.mean()), "runs": runs}


def _train_and_score(config: ml_collections.ConfigDict, prepared: pipeline.Prepared, samples: BestOfNSamples,
                     run_dir: Path, echo: Echo) -> dict[str, Any]:
    start = time.perf_counter()
    echo(f"training: {config.loss_name}, {config.total_steps} steps of {config.tune.batch_size} pairs, "
         f"{config.tune.label_noise:.0%} of the pairs flipped (prefjax.train)")
    trainer = pipeline.tune(config, prepared, run_dir)
    if trainer.get("preempted"):
        raise Preempted(f"the reward model in {run_dir} stopped at step {trainer['step']}; rerun the same "
                        "command to resume it")
    seconds = {"train": time.perf_counter() - start}
    start = time.perf_counter()
    model = reward.load(trainer["exported"])
    scored = score_run(model, prepared.heldout, samples, config.reward_model.score_batch_size)
    seconds["score"] = time.perf_counter() - start
    echo(f"accuracy against the true reward: {scored['heldout_accuracy']:.3f} on {scored['heldout_pairs']} "
         f"held-out pairs, {scored['sample_accuracy']:.3f} on {scored['sample_pairs']} pairs of samples; "
         f"best-of-{samples.m} by it: {scored['best_of_n'][-1]:.3f} ({seconds['score']:.0f} s)")
    final = {k: v for k, v in trainer.items() if k.startswith("final/")}
    return dict(scored, exported=trainer["exported"], trainer=final, seconds=seconds)


# --------------------------------------------------------------------------- the experiment


def run_experiment(config_path: str | Path, workdir: str | Path, *, arg: Optional[str] = None,
                   seeds: Sequence[int] = (0,), reuse: str = "", echo: Echo = print) -> list[dict[str, Any]]:
    """run_seed for each seed, in WORKDIR/seed<s> (WORKDIR itself for one seed): the list of its results."""
    if reuse and len(seeds) > 1:
        raise ExperimentError(f"--reuse={reuse} holds one seed's SFT model and pairs; give one seed "
                              f"(--seeds=S) with it, not {len(seeds)}")
    module = grid.load_module(config_path)
    base = module.get_config(arg) if arg else module.get_config()
    check_config(base, config_path)
    sweep = grid.expand(module)
    return [run_seed(base, sweep, seed, Path(workdir) / (f"seed{seed}" if len(seeds) > 1 else ""),
                     reuse=reuse, echo=echo) for seed in seeds]


def by_noise(results: Sequence[dict[str, Any]], key: str) -> dict[float, list[Any]]:
    """flip rate -> the runs' `key` values, one per seed."""
    out: dict[float, list[Any]] = {}
    for seed_result in results:
        for run in seed_result["runs"]:
            out.setdefault(run["label_noise"], []).append(run[key])
    return dict(sorted(out.items()))


def _columns(curves: Sequence[Sequence[float]]) -> list[list[float]]:
    """Per-seed curves -> per-n lists of values."""
    return [list(values) for values in zip(*curves)]


def accuracy_table(results: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """One row per flip rate: accuracies and the best-of-N pick's true reward, mean ± sd over seeds."""
    spread = report.mean_and_spread
    m = results[0]["bon_sizes"][-1]
    heldout, sampled, curves = (by_noise(results, key)
                                for key in ("heldout_accuracy", "sample_accuracy", "best_of_n"))
    rows = [[f"{eps:.0%}", spread(heldout[eps]), spread(sampled[eps]), spread([c[-1] for c in curves[eps]])]
            for eps in heldout]
    rows.append(["true reward (upper bound)", "1", "1", spread([r["gold_best_of_n"][-1] for r in results])])
    header = ["pairs flipped in training", "accuracy: held-out pairs", "accuracy: all pairs of samples",
              f"best-of-{m}: true reward"]
    return report.table(header, rows, markdown=markdown)


def best_of_n_table(results: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """One row per n: KL bound, true reward of the pick by the true reward and by each learned reward."""
    spread = report.mean_and_spread
    sizes = results[0]["bon_sizes"]
    gold = _columns([r["gold_best_of_n"] for r in results])
    proxies = {eps: _columns(curves) for eps, curves in by_noise(results, "best_of_n").items()}
    rows = [[n, kl_bound(n), spread(gold[i])] + [spread(columns[i]) for columns in proxies.values()]
            for i, n in enumerate(sizes)]
    header = ["n", "KL bound", "picked by true reward"] + [f"by RM, {eps:.0%} flipped" for eps in proxies]
    return report.table(header, rows, markdown=markdown)


def plot(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """True reward of the best-of-n pick against n: by the true reward (dashed) and by each learned reward."""
    sizes = results[0]["bon_sizes"]
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()

    def line(curves: Sequence[Sequence[float]], **style: Any) -> None:
        values = np.asarray(curves)
        sd = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(sizes))
        ax.errorbar(sizes, values.mean(axis=0), yerr=sd, marker="o", capsize=3, **style)

    line([r["gold_best_of_n"] for r in results], color="k", ls="--", label="picked by the true reward")
    for eps, curves in by_noise(results, "best_of_n").items():
        line(curves, label=f"picked by the reward model ({eps:.0%} flipped)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{n}\n{kl_bound(n):.2f}" for n in sizes])
    ax.set(xlabel="n samples from the SFT policy  (KL bound, nats)", ylabel="true reward of the pick (mean)",
           title=f"best-of-n: reward model vs true reward ({results[0]['task']} task)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plots.save(fig, path)


def write_outputs(results: Sequence[dict[str, Any]], workdir: str | Path) -> dict[str, Path]:
    """reward_model.json, reward_model.md and reward_model_bon.png in `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "reward_model.json").write_text(json.dumps(list(results), indent=2) + "\n")
    seeds = ", ".join(str(r["seed"]) for r in results)
    (workdir / "reward_model.md").write_text(
        f"Reward models on the {results[0]['task']} task, seeds {seeds} (mean ± sd)\n\n"
        + accuracy_table(results, markdown=True) + "\n\n" + best_of_n_table(results, markdown=True) + "\n")
    return {"json": workdir / "reward_model.json", "table": workdir / "reward_model.md",
            "plot": plot(results, workdir / "reward_model_bon.png")}


def share_compilations(workdir: str | Path) -> None:
    """A persistent XLA cache in WORKDIR/xla_cache, unless JAX_COMPILATION_CACHE_DIR names one: every
    reward model of the sweep trains with the same program, compiled once instead of once per run."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(Path(workdir) / "xla_cache"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    flags = grid.parser(__doc__.splitlines()[0], DEFAULT_CONFIG)
    flags.add_argument("--reuse", default="",
                       help="a quick-start workdir whose task, SFT model and pairs to use (one seed)")
    flags.add_argument("--verbose", action="store_true", help="on a user error also print the traceback")
    args = flags.parse_args(argv)
    try:
        seeds = grid.parse_seeds(args.seeds)
    except SystemExit as err:
        flags.error(str(err))
    from prefjax import main as prefjax_main  # pylint: disable=import-outside-toplevel

    # The trainer's, data's and checkpoints' user errors, as prefjax.main shows them.
    known = (ExperimentError, *prefjax_main.user_errors())
    # orbax logs every file operation at INFO; the stage lines and the trainer's progress suffice.
    absl_logging.set_verbosity(absl_logging.WARNING)
    share_compilations(args.workdir)
    try:
        results = run_experiment(args.config, args.workdir, arg="small" if args.small else None, seeds=seeds,
                                 reuse=args.reuse)
    except (Preempted, sft.Preempted) as stopped:
        print(stopped)
        return 1
    except known as err:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = write_outputs(results, args.workdir)
    print()
    print(accuracy_table(results))
    print()
    print(best_of_n_table(results))
    print(f"\nplot: {files['plot']}\ntables: {files['table']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
