"""One online DPO step: prefjax's job="online" against TRL's OnlineDPOTrainer on this machine.

    python benchmarks/online_step.py                       # the issue's table (minutes on a 2-core CPU)
    python benchmarks/online_step.py --prompts 4 --new-tokens 4 --steps 2 --trl-rows ""   # smoke

Both sides load the same random 5.2M-parameter Llama (compare/workload.py's "small" size, saved
once with a word-level tokenizer: compare/online_workload.py), read the same prompts (--prompts
per step, --prompt-len words each), sample 2 responses of --new-tokens tokens per prompt, score
them with the same Python function (compare/online_reward.py), pair better against worse and
take one DPO step (beta 0.1). TRL runs in a subprocess with its own interpreter (--trl-python,
else benchmarks/compare/venvs.py's venv), at its defaults (gradient checkpointing on, which
makes it generate without a KV cache; bf16 autocast) and with gradient checkpointing off.
prefjax runs in this process: its step is sampling + reward + reference scoring + update, timed
as the interval between the loop's requests for consecutive batches (the loop asks for the next
batch right after dispatching a step, and sampling waits for that step's parameters), after the
first interval (compilation). The breakdown inside a step comes from timers wrapped around the
online source's sampling, reference scoring and reward calls.

First-step agreement: TRL is run once more on prefjax's own first-round samples (its sampler
replaced by them, float32), and the first step's loss and gradient norm (before clipping) are
compared with prefjax's step-1 metrics: the gradient is that of the update itself, not only
log 2. The header carries os.getloadavg(): the machine is shared, so read the times with it.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compare import online_workload, venvs, workload  # noqa: E402

COMPARE = Path(__file__).resolve().parent / "compare"
REWARD_FILE = COMPARE / "online_reward.py"
# TRL rows: name -> settings passed to the runner (None = TRL's default).
TRL_ROWS = {
    "defaults": dict(gradient_checkpointing=None, bf16=None),
    "no-gc": dict(gradient_checkpointing=False, bf16=None),
    "no-gc-fp32": dict(gradient_checkpointing=False, bf16=False),
}


def _load_config_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("online_config", ROOT / "configs" / "online.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prefjax_config(folder: Path, prompts_file: Path, args: argparse.Namespace) -> Any:
    """configs/online.py:online_dpo on the benchmark's model, prompts, reward and lengths."""
    config = _load_config_module().get_config("online_dpo")
    config.model.hf_folder = str(folder)
    config.online.prompts = str(prompts_file)
    config.online.reward.sources = (f"{REWARD_FILE}:reward",)
    config.online.max_new_tokens = args.new_tokens
    config.online.temperature = 0.9  # TRL's default (the speed does not depend on it)
    config.data.batch_size = args.prompts
    config.data.max_len = args.prompt_len + args.new_tokens
    config.total_steps = args.steps
    config.log_every = 1
    config.optimizer.update(learning_rate=5e-7, warmup_steps=0)  # TRL's default rate
    config.checkpoint.every = 10 ** 6
    config.checkpoint.async_save = False
    config.workdir_lock.enabled = False
    return config


class _Timers:
    """Wall time of named calls, collected by wrapping methods for the duration of a run."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.marks: list[float] = []

    @contextlib.contextmanager
    def wrap(self, owner: Any, method: str, name: str) -> Iterator[None]:
        original = getattr(owner, method)

        def timed(*a: Any, **kw: Any) -> Any:
            begin = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.seconds.setdefault(name, []).append(time.perf_counter() - begin)

        setattr(owner, method, timed)
        try:
            yield
        finally:
            setattr(owner, method, original)

    @contextlib.contextmanager
    def wait_for_step(self, owner: Any) -> Iterator[None]:
        """owner.observe(state) first waits for the state's parameters: the step the loop just
        dispatched finishes there (timed as "update") instead of inside the sampler's call."""
        import jax

        original = owner.observe

        def observe(source: Any, state: Any) -> None:
            begin = time.perf_counter()
            jax.block_until_ready(state.params)
            self.seconds.setdefault("update", []).append(time.perf_counter() - begin)
            original(source, state)

        owner.observe = observe
        try:
            yield
        finally:
            owner.observe = original

    @contextlib.contextmanager
    def mark(self, owner: Any, method: str) -> Iterator[None]:
        """Records the time each call of owner.method begins (the loop asking for a batch)."""
        original = getattr(owner, method)

        def marked(*a: Any, **kw: Any) -> Any:
            self.marks.append(time.perf_counter())
            return original(*a, **kw)

        setattr(owner, method, marked)
        try:
            yield
        finally:
            setattr(owner, method, original)


def memory_rows(cfg: Any, label: str, rows_per_step: int, row_length: int, cache_len: int) -> list[list[Any]]:
    """What an online DPO step holds, in GiB, from the architecture (prefjax.models.memory_budget for
    the train step's parts, plus the sampler's KV cache): full fine-tuning with a reference copy,
    and LoRA, whose reference is the base the policy already holds (adapters not counted)."""
    import jax.numpy as jnp

    from prefjax.models import memory_budget
    from prefjax.models.dtypes import dtype_of

    step = memory_budget.preference_step_memory(cfg, rows_per_step * row_length)
    width = jnp.dtype(dtype_of(cfg.dtype)).itemsize
    kv = cfg.num_layers * 2 * rows_per_step * cfg.num_kv_heads * cfg.head_dim * cache_len * width
    gib = lambda n: n / 2 ** 30  # noqa: E731
    full = step.params + step.grads + step.optimizer + step.reference
    return [[f"{label}: full fine-tuning", gib(step.params), gib(step.optimizer), gib(step.grads),
             gib(step.reference), 0.0, gib(kv), gib(step.activations), gib(full + max(kv, step.activations))],
            [f"{label}: LoRA (reference = base)", gib(step.params), 0.0, 0.0, 0.0, 0.0, gib(kv),
             gib(step.activations), gib(step.params + max(kv, step.activations))]]


def print_memory(size: str, args: argparse.Namespace, measured: dict[str, Any]) -> None:
    """The arithmetic for the benchmark's model and for Llama-3-8B in bf16, and the measured peak."""
    from prefjax import models
    from prefjax.quickstart import report

    rows_per_step, row_length = 2 * args.prompts, args.prompt_len + args.new_tokens
    cache_len = row_length - 1
    small = workload.model_config(size, row_length)
    big = models.get_preset("llama3-8b", param_dtype="bfloat16", dtype="bfloat16")
    rows = memory_rows(small, f"{size} {small.num_params / 1e6:.2f}M f32", rows_per_step, row_length, cache_len)
    rows += memory_rows(big, f"8B bf16 ({big.num_params / 1e9:.2f}B)", rows_per_step, row_length, cache_len)
    print(f"\nmemory an online DPO step holds (GiB; {rows_per_step} rows x {row_length} tokens per step, KV cache "
          f"for {rows_per_step} rows x {cache_len} slots; reward = a Python function, so 0; a reward model of "
          "the policy's size adds one more 'params'; total = params + Adam + grads + reference + the larger "
          "of KV cache (sampling) and activations (update), which are not live at once; logits not counted "
          "(chunked log-probs))")
    print(report.table(["", "params", "Adam (2 moments)", "grads", "reference", "reward", "KV cache",
                        "activations", "total"], rows, markdown=True, digits=3))
    print(f"measured (prefjax run, this process): RSS before the run {measured['rss_before'] / 2 ** 20:.0f} MiB "
          f"(JAX and the imports), peak {measured['peak_rss'] / 2 ** 20:.0f} MiB, difference "
          f"{(measured['peak_rss'] - measured['rss_before']) / 2 ** 20:.0f} MiB")


def _current_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_prefjax(folder: Path, prompts_file: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from prefjax.online import job, rewards, rollout, source

    config = prefjax_config(folder, prompts_file, args)
    rss_before = _current_rss_bytes()
    timers = _Timers()
    with contextlib.ExitStack() as stack:
        stack.enter_context(timers.mark(source.OnlineSource, "__next__"))
        stack.enter_context(timers.wait_for_step(source.OnlineSource))
        stack.enter_context(timers.wrap(source.OnlineSource, "_sample_round", "round"))
        stack.enter_context(timers.wrap(rollout.Rollout, "sample", "sampling"))
        stack.enter_context(timers.wrap(rollout.Rollout, "reference_logps", "reference"))
        stack.enter_context(timers.wrap(rewards.PythonReward, "rewards", "reward"))
        job.run(config, workdir)
    end = time.perf_counter()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    intervals = [b - a for a, b in zip(timers.marks, timers.marks[1:])]
    timed = intervals[1:] or intervals
    def med(name: str) -> float:  # median after the first (compiling) call
        values = timers.seconds.get(name, [0.0])
        return statistics.median(values[1:] or values)
    steps = [r.get("step_seconds") for r in records[1:] if r.get("step_seconds") is not None]
    return dict(step_seconds=statistics.median(timed) if timed else float("nan"), intervals=intervals,
                rss_before=rss_before,
                first_interval=intervals[0] if intervals else end - timers.marks[0],
                sampling=med("sampling"), reference=med("reference"), update=med("update"), reward=med("reward"),
                round=med("round"),
                loop_step_seconds=statistics.median(steps) if steps else float("nan"),
                loss=records[0].get("loss"), grad_norm=records[0].get("grad_norm"),
                pairs=records[0].get("online/pairs"), ties=records[0].get("online/ties"),
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # this process: prefjax only


def first_round_samples(workdir: Path) -> dict[str, Any]:
    """prefjax's round-0 samples in TRL's layout: rows i and B+i are prompt i's two samples."""
    path = workdir / "samples" / "round_000000.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return dict(prompt_ids=[r["prompt_ids"] for r in rows],
                completion_ids=[r["response_ids"][0] for r in rows] + [r["response_ids"][1] for r in rows])


def run_trl(python: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        try:
            proc = subprocess.run([python, str(COMPARE / "run_trl_online.py"), str(job_file), str(result_file)],
                                  capture_output=True, text=True, timeout=timeout, cwd=COMPARE, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if not result_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            return {"error": tail[0]}
        return json.loads(result_file.read_text())


def _trl_python(args: argparse.Namespace) -> tuple[Optional[str], str]:
    if args.trl_python:
        return (args.trl_python, "") if Path(args.trl_python).is_file() else (None, f"no {args.trl_python}")
    return venvs.python_for("trl", Path(args.venv_root), install=not args.no_install)


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in TRL_ROWS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown TRL row(s) {bad}; choose from {sorted(TRL_ROWS)}")
    return items


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(workload.SIZES))
    parser.add_argument("--prompts", type=int, default=64, help="prompts per step (2 samples each)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="prefjax steps; the first is not timed")
    parser.add_argument("--trl-steps", type=int, default=3, help="TRL steps per row; the first is not timed")
    parser.add_argument("--trl-rows", type=_csv, default=["defaults", "no-gc"])
    parser.add_argument("--no-agreement", action="store_true", help="skip TRL's run on prefjax's samples")
    parser.add_argument("--trl-python", default="", help="an interpreter with trl (else the venv below)")
    parser.add_argument("--venv-root", default=str(Path(tempfile.gettempdir()) / "prefjax-bench-venvs"))
    parser.add_argument("--no-install", action="store_true")
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "prefjax-bench-online"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per TRL run")
    args = parser.parse_args(argv)
    if min(args.steps, args.trl_steps) < 2:
        parser.error("--steps and --trl-steps must be at least 2 (the first step is not timed)")

    root = Path(args.root)
    folder, num_params = online_workload.make_model_folder(args.size, args.prompt_len + args.new_tokens, root)
    vocab = workload.SIZES[args.size]["vocab_size"]
    count = args.prompts * max(args.steps, args.trl_steps)
    texts = online_workload.write_prompts(root / "prompts.jsonl", count, args.prompt_len, vocab)
    load = os.getloadavg()
    print(f"online DPO step, {args.size} Llama ({num_params / 1e6:.2f}M params), {args.prompts} prompts x 2 samples "
          f"x {args.new_tokens} new tokens, prompt {args.prompt_len} tokens; {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "prefjax"
        mine = run_prefjax(folder, root / "prompts.jsonl", workdir, args)
        fixed = first_round_samples(workdir)
    rows: list[list[Any]] = []
    base = mine["step_seconds"]
    trl_results: dict[str, dict[str, Any]] = {}
    python, reason = _trl_python(args) if (args.trl_rows or not args.no_agreement) else (None, "not asked")
    common = dict(model_dir=str(folder), prompts=texts[:args.prompts * args.trl_steps], steps=args.trl_steps,
                  warmup=1, max_new_tokens=args.new_tokens,
                  reward_file=str(REWARD_FILE))
    for name in args.trl_rows:
        result = run_trl(python, dict(common, **TRL_ROWS[name]), args.timeout) if python else {"error": reason}
        trl_results[name] = result
        if "error" in result:
            rows.append([f"TRL {name}", f"unavailable: {result['error']}", "", "", "", ""])
            continue
        s = result["settings"]
        rows.append([f"TRL {name} (gc={s['gradient_checkpointing']}, cache={s['use_cache']}, bf16={s['bf16']})",
                     result["step_seconds"], result["generate_seconds"],
                     result["step_seconds"] - result["generate_seconds"], result["step_seconds"] / base,
                     result["peak_rss"] / 2 ** 20])
    rows.append(["prefjax online_dpo (float32)", base, mine["sampling"], base - mine["sampling"], 1.0,
                 mine["peak_rss"] / 2 ** 20])
    from prefjax.quickstart import report

    print(report.table(["", "step (s)", "generate (s)", "rest (s)", "x prefjax", "peak RSS (MiB)"], rows,
                       markdown=True, digits=3))
    other = base - mine["update"] - mine["sampling"] - mine["reference"] - mine["reward"]
    print(f"\nprefjax step breakdown (median per step after compilation): update (waiting for the dispatched "
          f"train step) {mine['update']:.3f} s, sampling {mine['sampling']:.3f} s, "
          f"reference scoring {mine['reference']:.3f} s, reward {mine['reward']:.3f} s, round total (sample + "
          f"score + label + host work) {mine['round']:.3f} s, rest (train step, batch assembly, loop) "
          f"{base - mine['round']:.3f} s; all but update, sampling, reference and reward: {other:.3f} s; "
          f"the loop's own "
          f"step_seconds {mine['loop_step_seconds']:.3f} s; first interval (compilation) "
          f"{mine['first_interval']:.1f} s; intervals {[round(x, 2) for x in mine['intervals']]}")
    if not args.no_agreement:
        agree = run_trl(python, dict(common, steps=1, warmup=0, prompts=texts[:args.prompts], fixed=fixed,
                                     gradient_checkpointing=False, bf16=False), args.timeout) if python else \
            {"error": reason}
        if "error" in agree:
            print(f"\nfirst-step agreement: TRL unavailable: {agree['error']}")
        else:
            t_loss, t_norm = agree["losses"][0], agree["grad_norms"][0]
            print(f"\nfirst-step agreement on prefjax's round-0 samples ({mine['pairs']} pairs, {mine['ties']} ties; "
                  f"a tie is a weight-0 example in prefjax and a pair in TRL):\n"
                  f"  loss      prefjax {mine['loss']:.6f}  TRL {t_loss:.6f}  |diff| {abs(mine['loss'] - t_loss):.2e}\n"
                  f"  grad norm prefjax {mine['grad_norm']:.6f}  TRL {t_norm:.6f}  rel diff "
                  f"{abs(mine['grad_norm'] - t_norm) / max(abs(t_norm), 1e-12):.2e}")
    print_memory(args.size, args, mine)
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end")
    print("results: " + json.dumps(dict(prefjax=mine, trl={k: {kk: v for kk, v in r.items() if kk != 'step_times'}
                                                            for k, r in trl_results.items()})))


if __name__ == "__main__":
    main()
