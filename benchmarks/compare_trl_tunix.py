"""The same DPO step in prefjax, TRL (PyTorch) and Tunix (JAX), side by side on one machine.

    python benchmarks/compare_trl_tunix.py --sizes tiny,small --seq 128           # full comparison
    python benchmarks/compare_trl_tunix.py --frameworks prefjax --sizes tiny --seq 32 --steps 2   # smoke

Every framework gets the same random Llama (initialised once, saved as a Hugging Face folder
with prefjax.models.hf_checkpoint.save and loaded from there by all), the same batch of
preference pairs (prompt = first half of the sequence, chosen/rejected = second half, no
padding), AdamW with the same learning rate and no weight decay, DPO's sigmoid loss with the
same beta, and a frozen reference model run every step. Each framework runs in a subprocess
with its own virtual environment (created under --venv-root on first use with pip; prefjax
uses this interpreter) and reports JSON: per-step times and losses, and its peak RSS.

Printed: params, pairs/s, tokens/s (2 x pairs x seq per step), median step time after
--warmup steps, peak RSS of the subprocess, start-up (launch to end of the first step:
imports, model loading, compilation, first step) -- each with its ratio to prefjax -- and the
first-step losses, which must agree within --loss-tol (policy = reference at step 1, so
the loss is log 2 for everyone, so the policy's first-step log-prob of the chosen responses
is compared too; step 2's loss, after one AdamW update, is shown as well).
A framework that cannot be installed or run gets an "unavailable: <reason>" row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import table, venvs, workload  # noqa: E402

# "prefjax-shared": prefjax's step on prefix-shared rows (each pair's prompt once, then both
# responses: prefjax.data.prefix_sharing), the same loss and gradients with fewer tokens.
FRAMEWORKS = ("prefjax", "prefjax-shared", "trl", "tunix")
RUNNER_ARGS = {"prefjax-shared": ("run_prefjax.py", "--share-prefix")}
RUNNERS = Path(__file__).resolve().parent / "compare"


def _csv(choices: tuple[str, ...] | list[str], flag: str):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{flag}: unknown {bad or text!r}; choose from {','.join(choices)}")
        return items
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frameworks", type=_csv(FRAMEWORKS, "--frameworks"), default=list(FRAMEWORKS))
    p.add_argument("--sizes", type=_csv(list(workload.SIZES), "--sizes"), default=["tiny", "small"])
    p.add_argument("--seq", type=int, nargs="+", default=[128], help="sequence lengths (prompt + response)")
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    p.add_argument("--steps", type=int, default=12, help="steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the median")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the frameworks this many times, interleaved, and keep each one's fastest run "
                        "(shared machines: load from other jobs only ever slows a run down)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss-tol", type=float, default=1e-4, help="largest |first-step loss - prefjax's|")
    p.add_argument("--logp-rtol", type=float, default=1e-4,
                   help="largest relative difference of the first-step chosen log-probs from prefjax's")
    p.add_argument("--venv-root", type=Path, default=Path.home() / ".cache" / "prefjax-bench")
    p.add_argument("--workdir", type=Path, default=None, help="model folders and job files (default: under --venv-root)")
    p.add_argument("--no-install", action="store_true", help="never create venvs; missing ones are unavailable")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per framework run")
    p.add_argument("--omp-spin", action="store_true",
                   help="leave OpenMP's wait policy at its default (spinning); by default runners get "
                        "OMP_WAIT_POLICY=PASSIVE, because on a loaded machine torch's spinning threads slow "
                        "TRL's step down by 10-20x (XLA's own thread pool is not affected)")
    p.add_argument("--json", type=Path, default=None, help="also write every row as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.pairs < 1 or min(args.seq) < 4:
        p.error("--steps and --pairs must be >= 1 and every --seq >= 4")
    args.warmup = min(args.warmup, args.steps - 1)
    return args


def run_framework(framework: str, python: str, job_file: Path, timeout: float, omp_spin: bool = False) -> dict:
    """Launches the runner; adds start-up time (launch -> first step done) to its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = Path(f.name)
    env = dict(os.environ)
    # Foreign venvs must not see this environment's packages (e.g. prefjax's editable install paths).
    env.pop("PYTHONPATH", None)
    if not omp_spin:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    launched = time.time()
    try:
        script, *extra = RUNNER_ARGS.get(framework, (f"run_{framework}.py",))
        proc = subprocess.run([python, str(RUNNERS / script), str(job_file), str(result_file), *extra],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    try:
        result = json.loads(result_file.read_text() or "null")
    except (OSError, json.JSONDecodeError):
        result = None
    finally:
        result_file.unlink(missing_ok=True)
    if not isinstance(result, dict):
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {"error": f"runner exited {proc.returncode}: {tail[-1] if tail else 'no output'}"}
    if "error" not in result:
        result["startup_seconds"] = result["first_step_done_at"] - launched
    return result


def cpu_peak_flops() -> tuple[float, str]:
    """Best float32 rate of a 4096 x 4096 jitted matmul on this machine (before any runner starts)."""
    import jax

    from prefjax import metrics

    rate = metrics.measure_matmul_flops(jax.devices()[0], "float32", size=4096, reps=5)
    return rate, f"measured: float32 4096x4096 matmul, best of 5, {rate / 1e9:.1f} GFLOP/s"


def annotate(row: dict, peak: float) -> dict:
    """Adds the cell's model FLOPs per step and required memory (the same for every framework but
    prefjax-shared, which computes each prompt once)."""
    from prefjax import memory_budget, metrics

    cfg = workload.model_config(row["size"], row["seq"])
    tokens = 2 * row["pairs"] * row["seq"]
    if row["framework"] == "prefjax-shared":  # the FLOPs and activations it actually has: P + 2R per pair
        prompt = row["seq"] // 2
        tokens = row["pairs"] * (prompt + 2 * (row["seq"] - prompt))
    row["model_flops"] = metrics.preference_step_flops(cfg, tokens, row["seq"], reference_forward=True)
    need = memory_budget.preference_step_memory(cfg, tokens)
    row["required_bytes"], row["required_text"] = need.total, need.describe()
    row["peak_flops"] = peak
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or args.venv_root / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    peak, peak_source = cpu_peak_flops()
    pythons = {fw: venvs.python_for(fw, args.venv_root, install=not args.no_install) for fw in args.frameworks}
    rows = []
    for size in args.sizes:
        for seq in args.seq:
            job = workload.make_job(size, seq, args.pairs, args.steps, args.warmup, args.lr, args.beta, workdir)
            job_file = workdir / f"job-{size}-{seq}.json"
            job.write(job_file)
            best: dict[str, dict] = {}
            all_rounds: dict[str, list[float]] = {fw: [] for fw in args.frameworks}
            for _ in range(args.rounds):
                for fw in args.frameworks:
                    python, reason = pythons[fw]
                    if python is None or "error" in best.get(fw, {}):
                        best.setdefault(fw, {"error": reason})
                        continue
                    result = run_framework(fw, python, job_file, args.timeout, args.omp_spin)
                    print(f"[run] {fw} {size} seq={seq}: " + (f"unavailable: {result['error']}" if "error" in result
                          else f"{1e3 * result['step_seconds']:.1f} ms/step"), file=sys.stderr, flush=True)
                    if "error" not in result:
                        all_rounds[fw].append(result["step_seconds"])
                    if fw not in best or ("error" not in result and result["step_seconds"] < best[fw]["step_seconds"]):
                        best[fw] = result
            rows += [annotate(dict(framework=fw, size=size, seq=seq, pairs=args.pairs, params=job.num_params,
                                   round_step_seconds=all_rounds[fw], **best[fw]), peak) for fw in args.frameworks]
    cores = os.cpu_count()
    print(f"DPO step, {args.pairs} pairs x seq (prompt = response = seq/2), frozen reference, AdamW lr={args.lr}, "
          f"beta={args.beta}; median of {args.steps - args.warmup} steps after {args.warmup} warm-up"
          + (f", fastest of {args.rounds} interleaved runs" if args.rounds > 1 else "")
          + ("" if args.omp_spin else ", OMP_WAIT_POLICY=PASSIVE"))
    print(f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.system()}, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f}; "
          + "; ".join(f"{r['framework']}: {r['version']}" for r in rows if "version" in r and r["size"] == rows[0]["size"]
                      and r["seq"] == rows[0]["seq"]))
    print(f"MFU: model FLOPs (policy forward + backward = 3 forwards, reference forward = 1; matmuls + causal "
          f"attention, prefjax.metrics.preference_step_flops) / step time / CPU peak ({peak_source})")
    print()
    print(table.speed_table(rows))
    print()
    print(table.memory_table(rows))
    print()
    losses, ok = table.loss_check(rows, args.loss_tol, args.logp_rtol)
    print(losses)
    print()
    print(f"first-step losses and chosen log-probs {'agree' if ok else 'DO NOT agree'} with prefjax's "
          f"(loss within {args.loss_tol:g}, log-probs within {args.logp_rtol:g} relative)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
