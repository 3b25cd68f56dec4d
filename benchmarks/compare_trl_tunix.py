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

On a GPU (benchmarks/gpu_table.sh runs the ~1B table): --dtype bfloat16 computes in bf16
over float32 master weights (prefjax's model dtype, TRL's autocast; Tunix has only bf16
parameters), MFU is against the datasheet's dense bf16 peak, memory is the device's
high-water mark, and --python FW=PATH runs a framework with an interpreter that is already
there (a machine without a package index), keeping PYTHONPATH.
"""

from __future__ import annotations

import argparse
import dataclasses
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
# The orchestrator touches the accelerator only to read its peak; it must not hold the runners'
# memory (JAX reserves 75% of a GPU by default).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (bfloat16: float32 master weights where the framework has them)")
    p.add_argument("--attention", default="", help="prefjax's attention_impl (default: its choice for the backend)")
    p.add_argument("--python", action="append", default=[], metavar="FW=PATH",
                   help="run framework FW with this interpreter (no venv; PYTHONPATH kept)")
    p.add_argument("--json", type=Path, default=None, help="also write every row as JSON here (after each cell)")
    args = p.parse_args(argv)
    try:
        args.python = dict(item.split("=", 1) for item in args.python)
    except ValueError:
        p.error(f"--python: expected FW=PATH, got {args.python}")
    unknown = sorted(set(args.python) - set(FRAMEWORKS))
    if unknown:
        p.error(f"--python: unknown framework {unknown}; choose from {','.join(FRAMEWORKS)}")
    if args.steps < 1 or args.pairs < 1 or min(args.seq) < 4:
        p.error("--steps and --pairs must be >= 1 and every --seq >= 4")
    args.warmup = min(args.warmup, args.steps - 1)
    return args


def run_framework(framework: str, python: str, job_file: Path, timeout: float, omp_spin: bool = False,
                  keep_pythonpath: bool = False) -> dict:
    """Launches the runner; adds start-up time (launch -> first step done) to its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = Path(f.name)
    env = dict(os.environ)
    if not keep_pythonpath:
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


def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo): results move with it, e.g. torch's CPU kernels
    run far slower relative to XLA's on the AMD EPYC of 2026-12-04 than on the 2026-11-23 machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def peak_flops(dtype: str) -> tuple[float, str]:
    """The MFU denominator: on CPU the best float32 rate of a 4096 x 4096 jitted matmul on this
    machine (before any runner starts); on an accelerator the datasheet's dense peak for `dtype`
    (prefjax.train.metrics), with a measured 8192^3 matmul on random data printed beside it."""
    import jax

    from prefjax.train import metrics

    device = jax.devices()[0]
    if device.platform == "cpu":
        rate = metrics.measure_matmul_flops(device, "float32", size=4096, reps=5)
        return rate, f"measured: float32 4096x4096 matmul, best of 5, {rate / 1e9:.1f} GFLOP/s"
    peak, source = metrics.device_peak_flops(device, dtype)
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (8192, 8192), dtype)
    b = jax.random.normal(key_b, (8192, 8192), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    measured = 2 * 8192**3 / sorted(times)[len(times) // 2]
    return peak, (f"{source}: {peak / 1e12:.0f} TFLOP/s; measured {dtype} 8192^3 matmul on random data, "
                  f"median of 10: {measured / 1e12:.0f} TFLOP/s")


def annotate(row: dict, peak: float) -> dict:
    """Adds the cell's model FLOPs per step and required memory (the same for every framework but
    prefjax-shared, which computes each prompt once)."""
    from prefjax.models import memory_budget
    from prefjax.train import metrics

    cfg = dataclasses.replace(workload.model_config(row["size"], row["seq"]), dtype=row.get("dtype", "float32"))
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
    peak, peak_source = peak_flops(args.dtype)
    pythons = {fw: (args.python[fw], "") if fw in args.python else
               venvs.python_for(fw, args.venv_root, install=not args.no_install) for fw in args.frameworks}
    rows = []
    for size in args.sizes:
        for seq in args.seq:
            job = workload.make_job(size, seq, args.pairs, args.steps, args.warmup, args.lr, args.beta, workdir,
                                    dtype=args.dtype, attention=args.attention)
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
                    result = run_framework(fw, python, job_file, args.timeout, args.omp_spin,
                                           # prefjax's runners use this interpreter and its environment
                                           keep_pythonpath=fw in args.python or fw.startswith("prefjax"))
                    print(f"[run] {fw} {size} seq={seq}: " + (f"unavailable: {result['error']}" if "error" in result
                          else f"{1e3 * result['step_seconds']:.1f} ms/step"), file=sys.stderr, flush=True)
                    if "error" not in result:
                        all_rounds[fw].append(result["step_seconds"])
                    if fw not in best or ("error" not in result and result["step_seconds"] < best[fw]["step_seconds"]):
                        best[fw] = result
            rows += [annotate(dict(framework=fw, size=size, seq=seq, pairs=args.pairs, params=job.num_params,
                                   dtype=args.dtype, round_step_seconds=all_rounds[fw], **best[fw]), peak)
                     for fw in args.frameworks]
            if args.json:  # after every cell, so a run cut short still leaves its finished cells
                args.json.write_text(json.dumps(rows, indent=1))
    cores = os.cpu_count()
    print(f"DPO step, {args.pairs} pairs x seq (prompt = response = seq/2), frozen reference, AdamW lr={args.lr}, "
          f"beta={args.beta}, {args.dtype}; median of {args.steps - args.warmup} steps after {args.warmup} warm-up"
          + (f", fastest of {args.rounds} interleaved runs" if args.rounds > 1 else "")
          + ("" if args.omp_spin else ", OMP_WAIT_POLICY=PASSIVE"))
    first = [r for r in rows if "version" in r and (r["size"], r["seq"]) == (rows[0]["size"], rows[0]["seq"])]
    print(f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.system()} ({cpu_model()}), "
          f"{cores} cores, load average {os.getloadavg()[0]:.1f}; "
          + "; ".join(f"{r['framework']}: {r['version']}" for r in first))
    print(f"MFU: model FLOPs (policy forward + backward = 3 forwards, reference forward = 1; matmuls + causal "
          f"attention, prefjax.train.metrics.preference_step_flops) / step time / peak ({peak_source})")
    print()
    ok = table.print_tables(rows, args.loss_tol, args.logp_rtol)
    print()
    print(f"first-step losses and chosen log-probs {'agree' if ok else 'DO NOT agree'} with prefjax's "
          f"(loss within {args.loss_tol:g}, log-probs within {args.logp_rtol:g} relative)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
