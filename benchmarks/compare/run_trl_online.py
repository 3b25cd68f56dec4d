"""TRL's side of the online benchmark: trl.experimental's OnlineDPOTrainer (PyTorch, CPU).

Run in a venv with trl by benchmarks/online_step.py as `python run_trl_online.py JOB.json RESULT.json`.
JOB: model_dir (the shared HF folder, tokenizer included), prompts (texts), steps, warmup,
max_new_tokens, reward_file (compare/online_reward.py, imported by path), and the settings under
test: gradient_checkpointing (null = TRL's default), bf16 (null = TRL's default). Everything
else is TRL's default (AdamW, lr 5e-7, beta 0.1, temperature 0.9, max_grad_norm 1).

With "fixed" = {"prompt_ids": [B][P], "completion_ids": [2B][<=N]} the trainer's own sampler
is replaced by those samples (rows i and B+i are prompt i's two samples, TRL's layout) for a
one-step agreement run: the rest of the step (policy and reference forwards, reward, pairing,
loss, backward) is TRL's own, and the result carries the first step's loss and the gradient's
global norm before clipping.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from typing import Any

import runner_common


def _reward_function(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("online_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.trl_reward


def _fixed_samples(fixed: dict[str, Any], pad_id: int) -> tuple[Any, ...]:
    """(prompt_ids, prompt_mask, completion_ids, completion_mask) as TRL's _generate returns them."""
    import torch

    prompts = torch.tensor(fixed["prompt_ids"]).repeat(2, 1)
    width = max(len(c) for c in fixed["completion_ids"])
    completions = torch.full((len(fixed["completion_ids"]), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(completions)
    for i, row in enumerate(fixed["completion_ids"]):
        completions[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    # No truncation at EOS here: prefjax's rows already end at (and include) their stop token.
    return prompts, torch.ones_like(prompts), completions, mask


def _peak_rss_bytes() -> int:
    """This process's VmHWM: unlike ru_maxrss, it starts afresh at exec, so the orchestrator's
    memory (inherited through fork/vfork) does not count."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return runner_common.peak_rss_bytes()


def run(job: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    torch.manual_seed(0)
    clock = runner_common.StepClock()
    phases: dict[str, list[float]] = {"generate": [], "loss": []}
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    fixed = job.get("fixed")

    class Trainer(OnlineDPOTrainer):
        def _generate(self, model, prompts, images=None):
            begin = time.perf_counter()
            if fixed is not None:
                out = (*_fixed_samples(fixed, tokenizer.pad_token_id), None)
            else:
                out = super()._generate(model, prompts, images)
            phases["generate"].append(time.perf_counter() - begin)
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            clock.losses.append(float(loss))
            return loss

    class Timer(TrainerCallback):
        # One step: generation, policy and reference forwards, reward, backward and the update.
        def on_step_begin(self, args, state, control, **kw):
            clock.begin()

        def on_step_end(self, args, state, control, **kw):
            clock.end()

    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    batch = len(job["prompts"]) // job["steps"]
    data = datasets.Dataset.from_dict(dict(prompt=job["prompts"]))
    settings = {k: job[k] for k in ("gradient_checkpointing", "bf16") if job.get(k) is not None}
    with tempfile.TemporaryDirectory() as out_dir:
        args = OnlineDPOConfig(
            output_dir=out_dir, per_device_train_batch_size=batch, max_steps=job["steps"],
            max_new_tokens=job["max_new_tokens"], logging_steps=1, report_to="none", save_strategy="no",
            use_cpu=True, dataloader_num_workers=0, seed=0, **settings)
        trainer = Trainer(model=model, reward_funcs=_reward_function(job["reward_file"]), args=args,
                          train_dataset=data, processing_class=tokenizer, callbacks=[Timer()])
        resolved = dict(gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16,
                        use_cache=trainer.generation_config.use_cache)
        trainer.train()
        # The Trainer's logged norm is the one before clipping (max_grad_norm=1 clips after it).
        grad_norms = [float(e["grad_norm"]) for e in trainer.state.log_history if "grad_norm" in e]
    out = clock.summary(job["warmup"])
    timed = phases["generate"][job["warmup"]:] or phases["generate"][-1:]
    out.update(peak_rss=_peak_rss_bytes(), generate_seconds=statistics.median(timed), grad_norms=grad_norms,
               settings=resolved,
               version=f"trl {trl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"{torch.get_num_threads()} threads")
    return out


if __name__ == "__main__":
    runner_common.main(run)
