"""Decoding throughput: prefjax.sampling.generate against transformers' generate, same weights.

    python benchmarks/decode_vs_generate.py                      # 5.2M Llama, batch 32 and 128
    python benchmarks/decode_vs_generate.py --batch 2 --new-tokens 4 --repeats 1 --hf-python ""   # smoke

Both load the online benchmark's Hugging Face folder (compare/online_workload.py; random
weights, float32) and sample at temperature 1 with no top-k/top-p and no stop token, so every
row decodes --new-tokens tokens after a --prompt-len prompt. For each side and batch size
(median of --repeats after a warm-up call): t(1) = generate with one new token (prefill and
one sampling step) and t(N) with N; decode tokens/s = batch x (N - 1) / (t(N) - t(1)), the
cached single-token steps alone. transformers runs in a subprocess with --hf-python (torch +
transformers; compare/run_hf_generate.py); "" skips it.

At the largest batch it also reports, for prefjax's decode loop:
- the fraction of this CPU's matmul rate reached, counting 2 x params FLOPs per token (the
  issue's convention; the embedding table is a gather, so 2 x non-embedding params is shown
  too), against the rate of a jnp matmul of the decode step's largest shape (batch x hidden
  @ hidden x vocab, the LM head) and of a 1024-cube matmul, both timed here;
- the memory-traffic bound: bytes read per decode step (all weights plus the whole KV cache,
  which the step attends over: layers x 2 x batch x kv_heads x head_dim x (P + N - 1) x 4
  bytes) over the bandwidth of a large array copy (2 x bytes per copy: read and write),
  i.e. the tokens/s no decode loop could beat if every byte came from memory.
The header has os.getloadavg(): the machine is shared. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import online_workload, workload  # noqa: E402

COMPARE = Path(__file__).resolve().parent / "compare"
DEFAULT_HF_PYTHON = "/tmp/torchenv/bin/python"


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def prefjax_times(folder: Path, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, float]:
    from prefjax import sampling

    ckpt = _checkpoint(folder)
    prompts = np.random.default_rng(0).integers(3, ckpt.cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    prompts, lengths = jax.device_put(prompts), jax.device_put(np.full((batch,), prompt_len, np.int32))

    def call(n: int) -> Callable[[], Any]:
        return lambda: sampling.generate(ckpt.graphdef, ckpt.params, ckpt.cfg, prompts, lengths, max_new_tokens=n,
                                         rng=jax.random.key(0), temperature=1.0)

    return dict(prefill_s=_median_seconds(call(1), repeats), total_s=_median_seconds(call(new_tokens), repeats))


_LOADED: dict[str, Any] = {}


def _checkpoint(folder: Path) -> Any:
    from prefjax.models import hf_checkpoint

    if str(folder) not in _LOADED:
        _LOADED[str(folder)] = hf_checkpoint.load(folder, with_tokenizer=False)
    return _LOADED[str(folder)]


def hf_times(python: str, folder: Path, batches: list[int], prompt_len: int, new_tokens: int, repeats: int,
             vocab_size: int) -> dict[str, Any]:
    job = dict(model_dir=str(folder), batches=batches, prompt_len=prompt_len, new_tokens=new_tokens,
               repeats=repeats, vocab_size=vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        proc = subprocess.run([python, str(COMPARE / "run_hf_generate.py"), str(job_file), str(result_file)],
                              capture_output=True, text=True, cwd=COMPARE, timeout=1800)
        if not result_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            return {"error": tail[0]}
        return json.loads(result_file.read_text())


def decode_tps(times: dict[str, float], batch: int, new_tokens: int) -> float:
    return batch * max(new_tokens - 1, 1) / max(times["total_s"] - times["prefill_s"], 1e-9)


def matmul_flops_per_second(m: int, k: int, n: int, repeats: int = 5, budget: float = 2e9) -> float:
    """FLOP/s of one jitted float32 [m, k] @ [k, n] matmul (median over repeats)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    # Small shapes run many times per timing so that dispatch overhead does not dominate.
    inner = max(1, int(budget // (2 * m * k * n)))

    def many() -> Any:
        out = None
        for _ in range(inner):
            out = matmul(a, b)
        return out

    return inner * 2 * m * k * n / _median_seconds(many, repeats)


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved by copying a large float32 array (read + write)."""
    src = np.ones(megabytes * 2 ** 20 // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        begin = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - begin)
    return 2 * src.nbytes / statistics.median(times[1:])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(workload.SIZES))
    parser.add_argument("--batch", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-python", default=DEFAULT_HF_PYTHON,
                        help="an interpreter with torch + transformers ('' skips transformers)")
    parser.add_argument("--copy-mib", type=int, default=512, help="array size of the bandwidth probe")
    parser.add_argument("--matmul-flops", type=float, default=2e9, help="FLOPs per timing of the matmul probes")
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "prefjax-bench-online"))
    args = parser.parse_args(argv)
    from prefjax.quickstart import report

    folder, num_params = online_workload.make_model_folder(args.size, args.prompt_len + args.new_tokens,
                                                           Path(args.root))
    cfg = _checkpoint(folder).cfg
    load = os.getloadavg()
    print(f"decode, {args.size} Llama ({num_params / 1e6:.2f}M params, float32), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, temperature 1, no stop token; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start; median of {args.repeats}", flush=True)
    mine = {b: prefjax_times(folder, b, args.prompt_len, args.new_tokens, args.repeats) for b in args.batch}
    theirs: dict[str, Any] = {"error": "skipped (--hf-python '')"}
    if args.hf_python:
        theirs = hf_times(args.hf_python, folder, args.batch, args.prompt_len, args.new_tokens, args.repeats,
                          cfg.vocab_size) if Path(args.hf_python).is_file() else {"error": f"no {args.hf_python}"}
    rows = []
    for b in args.batch:
        p = decode_tps(mine[b], b, args.new_tokens)
        e2e = b * args.new_tokens / mine[b]["total_s"]
        if "error" in theirs:
            rows.append([b, p, e2e, f"unavailable: {theirs['error']}", "", ""])
            continue
        h = theirs["rows"][str(b)]
        q = decode_tps(h, b, args.new_tokens)
        rows.append([b, p, e2e, q, b * args.new_tokens / h["total_s"], p / q])
    print(report.table(["batch", "prefjax decode tok/s", "prefjax end-to-end tok/s", "transformers decode tok/s",
                        "transformers end-to-end tok/s", "decode x transformers"], rows, markdown=True, digits=4))
    if "version" in theirs:
        print(f"transformers side: {theirs['version']}")

    # Roofline numbers at the largest batch.
    b = max(args.batch)
    tps = decode_tps(mine[b], b, args.new_tokens)
    embed = cfg.vocab_size * cfg.hidden_size
    head_rate = matmul_flops_per_second(b, cfg.hidden_size, cfg.vocab_size, budget=args.matmul_flops)
    cube_rate = matmul_flops_per_second(1024, 1024, 1024, budget=args.matmul_flops)
    achieved = 2 * num_params * tps
    achieved_ne = 2 * (num_params - embed) * tps
    cache_len = args.prompt_len + args.new_tokens - 1
    kv_bytes = cfg.num_layers * 2 * b * cfg.num_kv_heads * cfg.head_dim * cache_len * 4
    weight_bytes = num_params * 4
    bandwidth = copy_bandwidth(args.copy_mib)
    bound_tps = b * bandwidth / (weight_bytes + kv_bytes)
    print(f"\nbatch {b}: prefjax decodes {tps:,.0f} tok/s = {achieved / 1e9:.2f} GFLOP/s at 2 x params "
          f"({achieved_ne / 1e9:.2f} at 2 x non-embedding params)\n"
          f"  jnp matmul [{b}x{cfg.hidden_size}]@[{cfg.hidden_size}x{cfg.vocab_size}] (the LM head): "
          f"{head_rate / 1e9:.2f} GFLOP/s -> decode reaches {achieved / head_rate:.0%} "
          f"({achieved_ne / head_rate:.0%} non-embedding)\n"
          f"  jnp matmul 1024^3: {cube_rate / 1e9:.2f} GFLOP/s -> decode reaches {achieved / cube_rate:.0%} "
          f"({achieved_ne / cube_rate:.0%} non-embedding)\n"
          f"  memory traffic per decode step: weights {weight_bytes / 2 ** 20:.1f} MiB + KV cache "
          f"{kv_bytes / 2 ** 20:.1f} MiB (all {cache_len} slots) = {(weight_bytes + kv_bytes) / 2 ** 20:.1f} MiB; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> bound {bound_tps:,.0f} tok/s "
          f"(prefjax at {tps / bound_tps:.0%} of it)")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at end")


if __name__ == "__main__":
    main()
