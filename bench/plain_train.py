"""The baselines: the same fine-tune written by hand, no MLflow, no plugin.

`--trainer hf` (default): transformers `Trainer` + PEFT, no TRL. `--trainer trl`: TRL's `SFTTrainer` configured as
the plugin configures it, minus MLflow: it separates what TRL costs from what tracking costs.
Same model folder, data file, chat template, truncation, assistant-only labels, batch, steps, optimizer and
schedule as the plugin run it is compared with; nothing is reported anywhere. Prints one JSON line:
non-padding tokens seen by the training loop, the Trainer's `train_runtime`, peak memory.

    python bench/plain_train.py --model DIR --data train.jsonl --max-length 256 --batch-size 16 --steps 40
"""

from __future__ import annotations

import argparse
import json
import time


def tokenize(tokenizer, path: str, max_length: int) -> list[dict]:
    """Chat rows -> input_ids + labels on the assistant tokens only (what TRL's assistant_only_loss trains on).

    Rows with no assistant token left after truncation are dropped, as TRL does.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            enc = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids, mask = enc["input_ids"][:max_length], enc["assistant_masks"][:max_length]
            if any(mask):
                rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return rows


def pad_collator(pad_id: int):
    """Pad each batch to its longest row (like TRL's collator without packing)."""
    import torch

    def collate(batch):
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            attn[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    return collate


def load_model(path: str, method: str, dtype, lora: dict, on_gpu: bool):
    """The base model, wrapped for `method` (lora | qlora | full) the way PEFT's docs show it."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        if on_gpu:
            kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if method == "full":
        return model
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora["r"], lora_alpha=lora["alpha"],
                        lora_dropout=lora["dropout"], target_modules="all-linear")
    return get_peft_model(model, config)


def train(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    on_gpu = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(args.model, args.method, dtype,
                       {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout}, on_gpu)
    shared = dict(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup, weight_decay=0.0,
        max_grad_norm=1.0, seed=args.seed, data_seed=args.seed, logging_steps=args.logging_steps,
        logging_first_step=True, save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=not on_gpu, bf16=on_gpu and args.precision == "bf16", dataloader_num_workers=0,
        gradient_checkpointing=args.gradient_checkpointing, disable_tqdm=True)
    if args.trainer == "trl":
        trainer = _trl_trainer(args, model, tokenizer, shared)
        count = lambda: trainer._total_train_tokens  # noqa: E731 - TRL's own counter, the one the plugin logs
    else:
        trainer, counted = _hf_trainer(args, model, tokenizer, shared)
        count = lambda: counted["tokens"]  # noqa: E731
    stamps = {"log_points": []}
    trainer.add_callback(_LogPoints(stamps, count))
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    seconds = result.metrics["train_runtime"]
    return {"tokens": count(), "seconds": seconds, "tokens_per_s": count() / seconds,
            "train_wall": wall, "steps": trainer.state.global_step, "loss": result.metrics.get("train_loss"),
            "peak_memory": torch.cuda.max_memory_allocated() if on_gpu else None, **stamps}


def _LogPoints(stamps: dict, count):
    """A callback noting (time, tokens so far) at every training log, as the plugin's metrics record them; the
    first one is when step 1 was logged (what the plugin's first metric marks)."""
    from transformers import TrainerCallback

    class LogPoints(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                now = time.time()
                stamps.setdefault("first_log_at", now)
                stamps["log_points"].append([now, count()])

    return LogPoints()


def _trl_trainer(args, model, tokenizer, shared: dict):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with open(args.data, encoding="utf-8") as f:
        rows = [{"messages": json.loads(line)["messages"]} for line in f if line.strip()]
    config = SFTConfig(**shared, max_length=args.max_length, packing=args.packing, assistant_only_loss=True)
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def _hf_trainer(args, model, tokenizer, shared: dict):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    if args.packing:
        raise SystemExit("--packing needs --trainer trl (the plain Trainer pads)")
    rows = tokenize(tokenizer, args.data, args.max_length)

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    counted = {"tokens": 0}

    class CountingTrainer(Trainer):
        # Non-padding tokens that went through the model, counted where TRL counts them (in compute_loss).
        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                counted["tokens"] += int(inputs["attention_mask"].sum().item())
                self._total_train_tokens = counted["tokens"]  # the attribute TRL keeps; bench probes read it
            return super().compute_loss(model, inputs, *a, **kw)

    targs = TrainingArguments(**shared, remove_unused_columns=False)
    trainer = CountingTrainer(model=model, args=targs, train_dataset=Rows(),
                              data_collator=pad_collator(tokenizer.pad_token_id))
    return trainer, counted


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Model folder (save_pretrained) with tokenizer + chat template.")
    p.add_argument("--data", required=True, help="Chat JSONL ({'messages': [...]} per line).")
    p.add_argument("--trainer", default="hf", choices=["hf", "trl"])
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--packing", action="store_true", help="TRL packing (bfd, padding-free); --trainer trl only.")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="Warmup ratio (below 1) or steps, as the plugin.")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--output-dir", default="/tmp/mlflow-finetune-bench/plain-out")
    print(json.dumps(train(p.parse_args(argv))))


if __name__ == "__main__":
    main()
