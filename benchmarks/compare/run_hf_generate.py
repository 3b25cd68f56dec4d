"""transformers' side of benchmarks/decode_vs_generate.py: model.generate's sampling throughput.

Run with an interpreter that has torch and transformers as `python run_hf_generate.py JOB.json RESULT.json`.
JOB: model_dir, batches, prompt_len, new_tokens, repeats, vocab_size. For each batch size it
times (median of `repeats`, after one warm-up call) generate with max_new_tokens=1 (prefill plus
one token) and with new_tokens (min_new_tokens the same, so no row stops early), sampling at
temperature 1 with top-k and top-p off, KV cache on (transformers' default).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import runner_common


def run(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    out: dict[str, Any] = dict(version=f"transformers {transformers.__version__}, torch {torch.__version__}, "
                                       f"{torch.get_num_threads()} threads", rows={})
    for batch in job["batches"]:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, job["vocab_size"], (batch, job["prompt_len"]), generator=g)

        def call(n: int) -> float:
            begin = time.perf_counter()
            with torch.no_grad():
                model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                               top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                               pad_token_id=0, eos_token_id=None)
            return time.perf_counter() - begin

        times = {}
        for n in (1, job["new_tokens"]):
            call(n)  # warm-up
            times[n] = statistics.median(call(n) for _ in range(job["repeats"]))
        out["rows"][str(batch)] = dict(prefill_s=times[1], total_s=times[job["new_tokens"]])
    return out


if __name__ == "__main__":
    runner_common.main(run)
