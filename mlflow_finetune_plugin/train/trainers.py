"""The Trainer settings every objective shares, and training across processes (FSDP) or one adapter per
task."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mlflow_finetune_plugin import paths
from mlflow_finetune_plugin.models.base import load_base_model, torch_dtype
from mlflow_finetune_plugin.models.precision import recipe_autocast_bf16


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def training_arguments(recipe, run_id: str, eval_ds) -> dict:
    """The TrainingArguments every objective shares (TRL's SFTConfig, DPOConfig and GRPOConfig take them)."""
    import torch

    t = recipe.train
    if "auto" in (t.batch_size, t.gradient_checkpointing):
        from mlflow_finetune_plugin.errors import FinetuneError

        raise FinetuneError("train.batch_size / train.gradient_checkpointing: auto is chosen by the memory "
                            "plan where a run starts (`mlflow run --backend finetune`, `mlflow-finetune "
                            "train`); this training process was handed the recipe unplanned: give numbers")
    dtype = torch_dtype(t.precision if t.precision != "auto" else recipe.model.dtype)
    on_gpu = torch.cuda.is_available()
    # On a CPU, Trainer's bf16 is autocast: fp32 weights, bf16 matmuls.
    autocast = recipe_autocast_bf16(recipe)
    return dict(
        output_dir=str(paths.job_dir(run_id) / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a value below 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        neftune_noise_alpha=t.neftune_alpha,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=t.save_steps,
        **checkpointing_argument(t.gradient_checkpointing),
        bf16=on_gpu and dtype == torch.bfloat16 or autocast,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        report_to="none",
        dataloader_num_workers=0,
        **_fsdp_arguments(t),
    )


def checkpointing_argument(enabled: bool) -> dict:
    """transformers >= 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` (old name
    deprecated)."""
    from transformers import TrainingArguments

    new = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if new else "gradient_checkpointing": enabled}


def _fsdp_arguments(t) -> dict:
    """`train.distributed: fsdp` with several processes; otherwise Trainer's default (DDP when
    distributed)."""
    import torch

    if t.distributed != "fsdp" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    if not torch.cuda.is_available():  # accelerate shards across GPUs only; on CPU it silently runs DDP
        if is_main_process():
            print("Warning: train.distributed=fsdp needs GPUs; training with DDP.", file=sys.stderr)
        return {}
    return {"fsdp": True, "fsdp_config": {"version": 2, "state_dict_type": "FULL_STATE_DICT"}}


def trained(trainer):
    """The trained model as a model is loaded to answer: accelerate's mixed-precision wrapper (autocast,
    outputs cast to fp32), which preparing the model for training put on its forward, taken off again. Left
    on, everything after training (the tuned contender, the forgetting check) ran under CPU bf16 autocast
    while `serve` answers from the fp32 weights: the evaluated answers were not the served ones (serving
    parity: 3 of 4 tiny-model answers word for word the same on an AVX-512 BF16 CPU)."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


def unsharded(trainer, recipe, run_id: str, main: bool):
    """After FSDP each rank holds a shard: every rank takes part in gathering the full weights (rank 0 writes
    them), then rank 0 reloads them whole for evaluation and logging."""
    final = paths.job_dir(run_id) / "fsdp-final"
    trainer.save_model(str(final))
    if not main:
        return None
    from mlflow_finetune_plugin.train import quantization
    from mlflow_finetune_plugin.train.adapters import adapter_of

    if adapter_of(recipe).ARTIFACT == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(final)
    from mlflow_finetune_plugin.models.peft_targets import load_adapter

    return load_adapter(load_base_model(recipe.model, **quantization.model_kwargs(recipe.model)), final)


def train_per_task(recipe, objective, model, tokenizer, trains: dict, evals: dict, args: dict) -> None:
    """A mixture with `data.adapters: per_task`: each task's adapter (`set_adapter` makes it the one that
    trains) is trained on that task's rows alone, one task after another, by the objective's own trainer."""
    from mlflow_finetune_plugin.train.callbacks import CheckpointLogger, Heartbeat, MlflowMetrics

    for name, ds in trains.items():
        print(f"\nTask {name}: training its adapter on {len(ds)} rows")
        model.set_adapter(name)
        task_args = {**args, "output_dir": str(Path(args["output_dir"]) / name)}
        trainer = objective.build_trainer(recipe, model, tokenizer, ds, evals.get(name), task_args,
                                          [MlflowMetrics(prefix=f"{name}/"),
                                           CheckpointLogger(logged_models=False,
                                                            last_epochs=recipe.train.save_last_epochs),
                                           Heartbeat()])
        trainer.train()
    # Not between tasks: the next task's trainer finds the model prepared already and leaves its forward as it
    # is
    trained(trainer)
