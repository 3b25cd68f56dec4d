"""Offline DPO vs online and iterative preference learning at an equal budget of reward calls.

    python -m prefjax.quickstart.online --workdir=/tmp/online-exp [--small] [--seeds=0,1,2] [--reuse=DIR]

For each seed, the quick start's stages 1-3 (pipeline.prepare: task, SFT model, West-of-N
pairs) run once in WORKDIR[/seed<s>]/base, or come from `--reuse=DIR` (a workdir prepared
with the same settings; one seed). The SFT model is where every method starts. Then, in
WORKDIR[/seed<s>]/runs/<method>/:

- offline_dpo: the quick start's stage 4 (pipeline.tune: DPO on the West-of-N pairs against
  the frozen SFT model). Its reward calls are the West-of-N samples it scored:
  west_of_n.prompts x west_of_n.n (the held-out pairs, used only for evaluation, not counted);
- online_dpo, iterative_dpo, xpo, nash_md, sppo (config.online_experiment.methods): job="online"
  (prefjax.online.job.run) from the SFT model, with configs/online.py's settings for the
  algorithm, prompts and rewards from the same task ("task:<task>"), and steps, prompts per
  step and samples per prompt chosen by `plan` so that the responses scored equal the
  offline budget exactly (an ExperimentError otherwise). A reward call is one response
  scored by the true reward: a pair's preference (Nash-MD's P(y > y'), SPPO's win rates)
  is the Bradley-Terry probability of two already-scored responses and costs no call.
  The calls are counted from the run's sample store (every round is kept) and checked
  against the plan.

Every final policy is evaluated by the quick start's own evaluation (pipeline.make_evaluator:
the same fresh prompts and samples, mean true reward, KL(policy || SFT) from samples, win
rate against the SFT policy), so the numbers compare with the quick start's table.

Writes WORKDIR/online.json (every run), online.md (mean ± sd over seeds per method: true
reward, KL, win rate, reward calls, wall time) and online_frontier.png (true reward against
KL, one point per method and seed, with best-of-n from the SFT policy), and prints the table.
A run whose results are on disk (runs/<method>/result.json, same settings) is read back, so
an interrupted experiment resumes; an online run stopped mid-training resumes from its
checkpoint. Wall time: the training run itself (sampling and scoring included for the online
methods); for offline DPO, stage 4 plus the stage-3 West-of-N sampling and scoring.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import ml_collections
import numpy as np
from absl import logging as absl_logging
from matplotlib.figure import Figure

from prefjax.quickstart import evaluate, grid, pipeline, plots, report, rollouts, sft
from prefjax.quickstart.reward_model import share_compilations

Echo = Callable[[str], None]
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart_online.py"
ONLINE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "online.py"
RESULT_FILE = "result.json"
OFFLINE = "offline_dpo"
LABELS = {"offline_dpo": "offline DPO (West-of-N)", "online_dpo": "online DPO", "iterative_dpo": "iterative DPO",
          "xpo": "XPO", "nash_md": "Nash-MD", "sppo": "SPPO", "inpo": "INPO"}


class ExperimentError(ValueError):
    """A setting this experiment cannot run with; the message names it and what to do."""


class Preempted(RuntimeError):
    """A training run was preempted; rerunning the command resumes it."""


# --------------------------------------------------------------------------- the budget


def offline_budget(config: ml_collections.ConfigDict) -> int:
    """Reward calls of the West-of-N training pairs: prompts x samples per prompt."""
    return int(config.west_of_n.prompts) * int(config.west_of_n.n)


def plan(config: ml_collections.ConfigDict, method: str) -> dict[str, int]:
    """How `method` spends the offline budget: {"samples", "batch_size", "prompts_per_round",
    "epochs", "total_steps", "reward_calls"}; ExperimentError when it cannot spend it exactly.

    Per-step methods (online DPO, XPO, Nash-MD, SPPO) draw K samples for each of B fresh prompts
    every step (K = 2 for XPO and Nash-MD: the policy's and the opponent's, both scored), so
    steps = budget / (B K). Iterative DPO draws west_of_n.n samples for each prompt of R rounds,
    so a round has budget / (R n) prompts, trained on for `iterative_epochs` passes of
    tune.batch_size pairs. Offline DPO is the quick start's run.
    """
    budget = offline_budget(config)
    e = config.online_experiment
    if method == OFFLINE:
        return dict(samples=int(config.west_of_n.n), batch_size=int(config.tune.batch_size),
                    prompts_per_round=int(config.west_of_n.prompts), epochs=0,
                    total_steps=int(config.total_steps), reward_calls=budget)
    if method not in LABELS:
        raise ExperimentError(f"online_experiment.methods: {method!r} is not one of {sorted(LABELS)}")
    if method == "iterative_dpo":
        k, batch, rounds = int(config.west_of_n.n), int(config.tune.batch_size), int(e.iterative_rounds)
        per_round, left = divmod(budget, rounds * k)
        if left or per_round % batch:
            raise ExperimentError(
                f"the budget west_of_n.prompts x west_of_n.n = {budget} does not split into "
                f"online_experiment.iterative_rounds={rounds} rounds of whole batches of tune.batch_size={batch} "
                f"prompts x {k} samples; make west_of_n.prompts a multiple of {rounds * batch}")
        steps = rounds * (per_round // batch) * int(e.iterative_epochs)
        return dict(samples=k, batch_size=batch, prompts_per_round=per_round, epochs=int(e.iterative_epochs),
                    total_steps=steps, reward_calls=rounds * per_round * k)
    k = int(e.sppo_samples) if method == "sppo" else 2
    batch = int(e.batch_size)
    steps, left = divmod(budget, batch * k)
    if left:
        raise ExperimentError(f"the budget west_of_n.prompts x west_of_n.n = {budget} is not a whole number of "
                              f"{method} steps of online_experiment.batch_size={batch} prompts x {k} samples")
    return dict(samples=k, batch_size=batch, prompts_per_round=0, epochs=1, total_steps=steps,
                reward_calls=steps * batch * k)


def online_config(config: ml_collections.ConfigDict, prepared: pipeline.Prepared,
                  method: str) -> ml_collections.ConfigDict:
    """configs/online.py:<method> from the SFT model, with the budget's steps and sizes (`plan`)."""
    p = plan(config, method)
    c = grid.load_module(ONLINE_CONFIG).get_config(method)
    task = prepared.task
    c.seed = config.seed
    c.model.hf_folder = str(prepared.sft_folder)
    c.online.prompts = f"task:{task.name}"
    c.online.reward.sources = (f"task:{task.name}",)
    c.online.samples_per_prompt = p["samples"]
    c.online.prompts_per_round = p["prompts_per_round"]
    c.online.epochs_per_round = p["epochs"]
    c.online.max_new_tokens = task.max_response_tokens
    c.online.temperature = float(config.west_of_n.temperature)
    rounds = p["total_steps"] * p["batch_size"] // max(p["prompts_per_round"] * p["epochs"], p["batch_size"])
    c.online.store.keep_rounds = max(rounds, 1)  # every round kept: the reward calls are counted from them
    # Room for the prompt as the online prompt stream renders it (a few tokens of slack) and the answer.
    c.data.max_len = rollouts.row_length(task) + 4
    c.data.batch_size = p["batch_size"]
    c.total_steps = p["total_steps"]
    c.optimizer.update(learning_rate=config.tune.learning_rate, warmup_steps=config.tune.warmup_steps)
    c.log_every = config.tune.log_every
    c.checkpoint.every = max(c.total_steps // 4, 1)
    c.checkpoint.keep = 1
    return c


def count_reward_calls(run_dir: str | Path) -> int:
    """Responses scored in an online run: the scores of every round in its sample store."""
    from prefjax.online import store as store_lib  # pylint: disable=import-outside-toplevel

    store = store_lib.SampleStore(Path(run_dir) / "samples", keep_rounds=0, writer=False)
    return sum(len(row["scores"]) for r in store.rounds() for row in store.read_round(r) or [])


# --------------------------------------------------------------------------- one seed


def check_config(config: ml_collections.ConfigDict, where: str | Path) -> None:
    """The online_experiment section, checked (with every method's budget) before anything runs."""
    if "online_experiment" not in config:
        raise ExperimentError(f"{where}: the config has no online_experiment section; start from "
                              "configs/quickstart_online.py")
    methods = tuple(config.online_experiment.methods)
    if not methods:
        raise ExperimentError(f"{where}: online_experiment.methods is empty; name at least one of {sorted(LABELS)}")
    for method in methods:
        plan(config, method)


def _read_back(path: Path, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("settings") == settings else None


def run_seed(base: ml_collections.ConfigDict, seed: int, root: Path, *, reuse: str = "",
             echo: Echo = print) -> dict[str, Any]:
    """Stages 1-3 once, then every method trained from the SFT model and evaluated (module
    docstring); {"seed", "task", "budget", "sft", "best_of_n", "runs": [...]}."""
    seeded = grid.configure(base, {"seed": seed, "reuse": reuse})
    reusing = bool(reuse) or (root / "base" / pipeline.PREPARE_FILE).is_file()
    try:
        prepared = pipeline.prepare(seeded, root / "base", echo)
    except ValueError as err:
        if not reusing:
            raise
        raise ExperimentError(str(err)) from err
    evaluator: Optional[evaluate.Evaluator] = None
    sft_file = root / "sft_eval.json"
    if sft_file.is_file():
        sft_metrics = json.loads(sft_file.read_text())
    else:
        evaluator = pipeline.make_evaluator(seeded, prepared)
        sft_metrics = evaluator.evaluate(prepared.sft_model)
        sft_file.write_text(json.dumps(sft_metrics, indent=2) + "\n")
    runs = []
    methods = tuple(seeded.online_experiment.methods)
    for i, method in enumerate(methods, start=1):
        run_dir = root / "runs" / method
        settings = {"plan": plan(seeded, method), "eval": seeded.eval.to_dict(),
                    "tune": seeded.tune.to_dict(), "loss": seeded.loss.to_dict() if method == OFFLINE else None}
        done = _read_back(run_dir / RESULT_FILE, settings)
        echo(f"=== seed {seed}, method {i}/{len(methods)}: {LABELS[method]}" + (" (finished, read back)" if done else ""))
        if done is None:
            evaluator = evaluator or pipeline.make_evaluator(seeded, prepared)
            done = _train_and_evaluate(seeded, prepared, method, run_dir, evaluator, echo)
            done.update(method=method, seed=seed, settings=settings)
            (run_dir / RESULT_FILE).write_text(json.dumps(done, indent=2) + "\n")
        runs.append(done)
    return {"seed": seed, "task": prepared.task.name, "budget": offline_budget(seeded), "sft": sft_metrics,
            "best_of_n": prepared.best_of_n, "runs": runs}


def _train_and_evaluate(config: ml_collections.ConfigDict, prepared: pipeline.Prepared, method: str,
                        run_dir: Path, evaluator: evaluate.Evaluator, echo: Echo) -> dict[str, Any]:
    p = plan(config, method)
    start = time.perf_counter()
    if method == OFFLINE:
        echo(f"training: DPO on the West-of-N pairs, {p['total_steps']} steps of {p['batch_size']} (prefjax.train)")
        trainer = pipeline.tune(config, prepared, run_dir)
        calls = p["reward_calls"]  # the West-of-N samples stage 3 scored
        extra = float(prepared.stats.get("seconds", {}).get("west_of_n", 0.0))
    else:
        from prefjax.online import job  # pylint: disable=import-outside-toplevel

        echo(f"training: {method}, {p['total_steps']} steps; {p['reward_calls']} reward calls "
             f"(prefjax.online.job)")
        trainer = job.run(online_config(config, prepared, method), run_dir)
        calls, extra = None, 0.0
    if trainer.get("preempted"):
        raise Preempted(f"{method} in {run_dir} stopped at step {trainer['step']}; rerun the same command to "
                        "resume it")
    train_seconds = time.perf_counter() - start
    if calls is None:
        calls = count_reward_calls(run_dir)
        if calls != p["reward_calls"]:
            raise ExperimentError(f"{run_dir}: the sample store holds {calls} scored responses, the plan "
                                  f"{p['reward_calls']}; remove {run_dir} and rerun")
    start = time.perf_counter()
    metrics = evaluator.evaluate(rollouts.load(trainer["exported"]))
    seconds = {"train": train_seconds, "labels": extra, "evaluate": time.perf_counter() - start}
    echo(f"{LABELS[method]}: true reward {metrics['reward']:.3f}, KL {metrics['kl']:.2f} nats, "
         f"{calls} reward calls, {train_seconds + extra:.0f} s")
    final = {k: v for k, v in trainer.items() if k.startswith("final/")}
    return {"eval": metrics, "reward_calls": calls, "seconds": seconds, "exported": trainer["exported"],
            "trainer": final}


# --------------------------------------------------------------------------- the experiment


def run_experiment(config_path: str | Path, workdir: str | Path, *, arg: Optional[str] = None,
                   seeds: Sequence[int] = (0,), reuse: str = "", echo: Echo = print) -> list[dict[str, Any]]:
    """run_seed for each seed, in WORKDIR/seed<s> (WORKDIR itself for one seed)."""
    if reuse and len(seeds) > 1:
        raise ExperimentError(f"--reuse={reuse} holds one seed's SFT model and pairs; give one seed "
                              f"(--seeds=S) with it, not {len(seeds)}")
    module = grid.load_module(config_path)
    base = module.get_config(arg) if arg else module.get_config()
    check_config(base, config_path)
    return [run_seed(base, seed, Path(workdir) / (f"seed{seed}" if len(seeds) > 1 else ""), reuse=reuse, echo=echo)
            for seed in seeds]


def by_method(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """method -> its runs over the seeds, in the config's order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for seed_result in results:
        for run in seed_result["runs"]:
            out.setdefault(run["method"], []).append(run)
    return out


def wall_seconds(run: dict[str, Any]) -> float:
    return float(run["seconds"]["train"] + run["seconds"].get("labels", 0.0))


def table(results: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """One row per method (SFT first): true reward, KL, win rate, reward calls, wall time; mean ± sd over seeds."""
    spread = report.mean_and_spread
    sft_rows = [r["sft"] for r in results]
    rows = [["SFT (start of every method)", spread([m["reward"] for m in sft_rows]), "0", "0.5", "0", "-"]]
    for method, runs in by_method(results).items():
        rows.append([LABELS[method], spread([r["eval"]["reward"] for r in runs]),
                     spread([r["eval"]["kl"] for r in runs], 2), spread([r["eval"]["win_rate"] for r in runs]),
                     spread([r["reward_calls"] for r in runs], 0), spread([wall_seconds(r) for r in runs], 0)])
    header = ["method", "true reward", "KL(policy ‖ SFT), nats", "win rate vs SFT", "reward calls", "wall time, s"]
    return report.table(header, rows, markdown=markdown)


def plot(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """True reward against KL to SFT: one point per method and seed, best-of-n from SFT (seed means) dashed."""
    fig = Figure(figsize=(7.2, 4.6))
    ax = fig.subplots()
    curves = [r["best_of_n"] for r in results]
    kl = [b["kl"] for b in curves[0]]
    ax.plot(kl, np.mean([[b["reward"] for b in c] for c in curves], axis=0), "k--", marker=".",
            label="best-of-n from SFT (KL bound)")
    ax.scatter([0.0] * len(results), [r["sft"]["reward"] for r in results], color="tab:gray", marker="s",
               label="SFT")
    for method, runs in by_method(results).items():
        ax.scatter([r["eval"]["kl"] for r in runs], [r["eval"]["reward"] for r in runs], label=LABELS[method],
                   marker="*" if method == OFFLINE else "o", s=80 if method == OFFLINE else 36)
    seeds = ("seed " if len(results) == 1 else "seeds ") + ", ".join(str(r["seed"]) for r in results)
    ax.set(xlabel="KL(policy || SFT) [nats per response]", ylabel="mean true reward",
           title=f"equal reward-call budget ({results[0]['budget']:,}), {results[0]['task']} task, {seeds}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return plots.save(fig, path)


def write_outputs(results: Sequence[dict[str, Any]], workdir: str | Path) -> dict[str, Path]:
    """online.json, online.md and online_frontier.png in `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "online.json").write_text(json.dumps(list(results), indent=2) + "\n")
    seeds = ", ".join(str(r["seed"]) for r in results)
    (workdir / "online.md").write_text(
        f"Offline vs online preference learning on the {results[0]['task']} task at {results[0]['budget']:,} "
        f"reward calls each, seeds {seeds} (mean ± sd)\n\n" + table(results, markdown=True) + "\n")
    return {"json": workdir / "online.json", "table": workdir / "online.md",
            "plot": plot(results, workdir / "online_frontier.png")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    flags = grid.parser(__doc__.splitlines()[0], DEFAULT_CONFIG)
    flags.add_argument("--reuse", default="",
                       help="a workdir prepared with the same settings whose task, SFT model and pairs to use (one seed)")
    flags.add_argument("--verbose", action="store_true", help="on a user error also print the traceback")
    args = flags.parse_args(argv)
    try:
        seeds = grid.parse_seeds(args.seeds)
    except SystemExit as err:
        flags.error(str(err))
    from prefjax import main as prefjax_main  # pylint: disable=import-outside-toplevel

    known = (ExperimentError, *prefjax_main.user_errors())
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
    print(table(results))
    print(f"\nplot: {files['plot']}\ntable: {files['table']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
