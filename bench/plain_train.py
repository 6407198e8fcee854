"""The baseline: the same fine-tune written by hand with transformers `Trainer` + PEFT; no TRL, no MLflow, no
plugin.

Same model folder, data file, chat template, truncation, assistant-only labels, batch, steps, optimizer,
schedule and sampler seed as the plugin run it is compared with; batches padded to their longest row. Prints
one JSON line: non-padding tokens through the training loop (counted where TRL counts them), the Trainer's
`train_runtime`, and the mean loss.

`--liger` is the one-line speed-up a user adds to that script: transformers' `use_liger_kernel=True`.

Precision: fp32; or bf16, which on CPU is autocast over fp32 weights (`TrainingArguments(bf16=True,
use_cpu=True)`) and on a GPU bf16 weights under autocast.

    python bench/plain_train.py --model DIR --data train.jsonl --max-length 256 --batch-size 8 --steps 30
"""

from __future__ import annotations

import argparse
import json


def tokenize(tokenizer, path: str, max_length: int) -> list[dict]:
    """Chat rows -> input_ids + labels on the assistant tokens only; rows left without one are dropped (as
    TRL)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in filter(str.strip, f):
            enc = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids, mask = enc["input_ids"][:max_length], enc["assistant_masks"][:max_length]
            if any(mask):
                rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return rows


def pad_collator(pad_id: int):
    import torch

    def collate(batch):
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):
            k = len(r["input_ids"])
            ids[i, :k], labels[i, :k], attn[i,
                                            :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    return collate


def load_model(args, dtype, on_gpu: bool):
    """The base model, wrapped for `--method` (lora | qlora | full) the way PEFT's docs show it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if args.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        if on_gpu:
            kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kwargs)
    if args.method == "full":
        return model
    if args.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                                            lora_dropout=0.0, target_modules="all-linear"))


def train(args) -> dict:
    import torch
    from torch.utils.data import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    on_gpu = torch.cuda.is_available()
    bf16 = args.precision == "bf16"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(args, torch.bfloat16 if bf16 and on_gpu else torch.float32, on_gpu)
    rows = tokenize(tokenizer, args.data, args.max_length)

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    counted = {"tokens": 0}

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                counted["tokens"] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *a, **kw)

    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup, weight_decay=0.0,
        max_grad_norm=1.0, seed=args.seed, data_seed=args.seed, logging_steps=args.logging_steps,
        logging_first_step=True, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=not on_gpu,
        bf16=bf16, dataloader_num_workers=0, gradient_checkpointing=args.gradient_checkpointing,
        disable_tqdm=True, remove_unused_columns=False, use_liger_kernel=args.liger)
    trainer = CountingTrainer(model=model, args=targs, train_dataset=Rows(),
                              data_collator=pad_collator(tokenizer.pad_token_id))
    metrics = trainer.train().metrics
    seconds = metrics["train_runtime"]
    return {"tokens": counted["tokens"], "seconds": seconds, "tokens_per_s": counted["tokens"] / seconds,
            "loss": metrics.get("train_loss"), "steps": trainer.state.global_step}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="Model folder (save_pretrained) with tokenizer + chat template.")
    p.add_argument("--data", required=True, help="Chat JSONL ({'messages': [...]} per line).")
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--warmup", type=float, default=0.05,
                   help="Warmup ratio (below 1) or steps, as the plugin.")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--liger", action="store_true",
                   help="transformers' `use_liger_kernel=True` (Liger's defaults: "
                        "RMSNorm, RoPE, SwiGLU, fused linear cross-entropy; CUDA).")
    p.add_argument("--output-dir", default="/tmp/mlflow-finetune-bench/plain-out")
    print(json.dumps(train(p.parse_args(argv))))


if __name__ == "__main__":
    main()
