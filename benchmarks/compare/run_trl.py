"""TRL's side of the comparison: trl.DPOTrainer (PyTorch, CPU) on the shared HF folder and pairs.

Run in the TRL venv by compare_trl_tunix.py as `python run_trl.py JOB.json RESULT.json`.
The pairs arrive as token ids, so dataset preparation (EOS appending, tokenisation) is
skipped; the collator, the reference forward, the loss and the optimizer are TRL's own.
Gradient checkpointing (TRL's default) is off, as in prefjax's step; no gradient clipping,
no weight decay, constant learning rate, like the other frameworks' runs.
"""

from __future__ import annotations

import tempfile
from typing import Any

import runner_common


def _tokenizer() -> Any:
    """A minimal fast tokenizer: TRL wants one for its pad/eos ids only (the data is pre-tokenised)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def run(job: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback

    torch.manual_seed(0)
    clock = runner_common.StepClock()
    first_logps: list[float] = []

    class PreTokenized(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already prompt_ids / chosen_ids / rejected_ids

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if isinstance(out, tuple) else out
            clock.losses.append(float(loss.detach()))  # the logged loss is rounded; keep the exact one
            if len(clock.losses) == 1:  # TRL's own metric: policy log-prob of the chosen responses, mean over pairs
                first_logps.append(self._metrics["train"]["logps/chosen"][-1])
            return out

    class Timer(TrainerCallback):
        # A step is timed from on_step_begin to on_step_end: policy and reference forward, backward
        # and the optimizer update. Batch collation and logging between steps are left out, so
        # TRL's numbers are, if anything, flattering (prefjax's batch is on device already too).
        def on_step_begin(self, args, state, control, **kw):
            clock.begin()

        def on_step_end(self, args, state, control, **kw):
            clock.end()

    # float32 master weights; with job dtype bfloat16 the Trainer computes under bf16 autocast.
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    on_gpu = torch.cuda.is_available()
    bf16 = job.get("dtype", "float32") == "bfloat16"
    data = datasets.Dataset.from_dict(dict(prompt_ids=job["prompt"], chosen_ids=job["chosen"],
                                           rejected_ids=job["rejected"]))
    with tempfile.TemporaryDirectory() as out_dir:
        args = trl.DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=job["pairs"], max_steps=job["steps"],
            learning_rate=job["lr"], weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=0.0, beta=job["beta"], loss_type=["sigmoid"], max_length=None,
            gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
            use_cpu=not on_gpu, dataloader_num_workers=0, seed=0, bf16=bf16, fp16=False)
        trainer = PreTokenized(model=model, args=args, train_dataset=data, processing_class=_tokenizer(),
                               callbacks=[Timer()])
        trainer.train()
    out = clock.summary(job["warmup"])
    out["losses"] = clock.losses[:job["steps"]]
    out["first_logps_chosen"] = first_logps[0] if first_logps else None
    where = torch.cuda.get_device_name() if on_gpu else f"{torch.get_num_threads()} threads"
    out.update(version=f"trl {trl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"{where}, attention {model.config._attn_implementation}",
               device_peak_bytes=torch.cuda.max_memory_allocated() if on_gpu else None)
    return out


if __name__ == "__main__":
    runner_common.main(run)
