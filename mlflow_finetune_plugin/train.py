"""One fine-tune, top to bottom: data -> base model -> method -> TRL trainer -> evaluation -> logged, registered model.

Runs as its own process (one per rank under torchrun), inside an MLflow run that already exists
(`--run-id`, or MLFLOW_RUN_ID as set by MLflow's local backend) or a new one. It always ends that run:
FINISHED, FAILED with the error as a tag and `error.txt`, or KILLED on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
from pathlib import Path

import mlflow
from transformers import set_seed

from mlflow_finetune_plugin import paths
from mlflow_finetune_plugin.callbacks import LAST_CHECKPOINT_TAG, CheckpointLogger, MlflowMetrics
from mlflow_finetune_plugin.data import load_training_dataset, mlflow_dataset
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluation import (
    comparison_table,
    conversations,
    log_evaluation,
    run_evaluation,
    trained_system_prompt,
)
from mlflow_finetune_plugin.logged_model import chat_template_hash, log_finetuned_model
from mlflow_finetune_plugin.methods import METHODS
from mlflow_finetune_plugin.models import (
    compute_precision,
    cpu_autocast_bf16,
    load_base_model,
    load_tokenizer,
    model_reference,
    torch_dtype,
)
from mlflow_finetune_plugin.promotion import maybe_auto_promote
from mlflow_finetune_plugin.recipe import Recipe, flat_params, method_config, recipe_hash, to_yaml
from mlflow_finetune_plugin.registry import lineage_tags, register
from mlflow_finetune_plugin.tracking import ensure_store, record_failure


def run(recipe, run_id: str | None = None) -> int:
    """Train inside an MLflow run and end it with the right status; returns a process exit code.

    Under torchrun only rank 0 talks to MLflow; the other ranks train and exit.
    """
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if not is_main_process():
        try:
            train(recipe, run_id or os.environ.get("MLFLOW_RUN_ID"), main=False)
            return 0
        except KeyboardInterrupt:
            return 130
    ensure_store()  # `mlflow-finetune train` may be the first process to open a new store
    active = mlflow.start_run(run_id=run_id)
    run_id = active.info.run_id
    try:
        train(recipe, run_id)
    except KeyboardInterrupt as e:
        previous = _ignore_stop_signals()
        status = _interrupted_status(run_id)
        record_failure(run_id, e if status == "KILLED" else _PEER_FAILED, status)
        mlflow.end_run(status)  # else MLflow's exit hook would end the active run as FINISHED
        _restore_signals(previous)
        print(f"\nRun {run_id} {'cancelled' if status == 'KILLED' else 'failed: ' + str(_PEER_FAILED)}.",
              file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - every failure must end the run, not leave it RUNNING
        previous = _ignore_stop_signals()
        e = _explain_resource_error(e)
        record_failure(run_id, e, "FAILED")
        mlflow.end_run("FAILED")
        _restore_signals(previous)
        if isinstance(e, FinetuneError):
            print(f"Error: {e}", file=sys.stderr)
        else:
            import traceback

            traceback.print_exc()
        return 1
    mlflow.end_run("FINISHED")
    return 0


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


_PEER_FAILED = FinetuneError("stopped because another training process of this job failed; its error is in the "
                             "job's output (under torchrun: the lines prefixed [rankN])")


def _ignore_stop_signals() -> dict:
    """While the run is being ended: a second signal (torchrun's SIGTERM after gloo already failed, a second
    Ctrl-C) would cut that short, and MLflow's exit hook would then end the run FINISHED."""
    signal.setitimer(signal.ITIMER_REAL, 0)  # a deferred stop signal, too
    return {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _interrupted_status(run_id: str) -> str:
    """SIGTERM under torchrun is a cancel only when the canceller said so (the `finetune.cancel_requested` tag):
    torchrun also SIGTERMs rank 0 when another rank dies, and that run FAILED."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return "KILLED"
    try:
        tags = mlflow.MlflowClient().get_run(run_id).data.tags
    except Exception:  # noqa: BLE001 - the run must still end; a cancel is the likelier cause
        return "KILLED"
    return "KILLED" if tags.get("finetune.cancel_requested") == "true" else "FAILED"


def _explain_resource_error(e: BaseException) -> BaseException:
    """Out of memory and disk full, as errors that say what to change."""
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return FinetuneError(
            f"disk full{' writing ' + str(e.filename) if e.filename else ''}. Free space, or move the job folders "
            f"(now {paths.cache_root()}) to a bigger disk with MLFLOW_FINETUNE_CACHE; keep fewer checkpoints with "
            "a lower train.save_total_limit or a higher train.save_steps.")
    text = str(e)
    if (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)):
        return FinetuneError(
            f"out of memory ({type(e).__name__}: {text.splitlines()[0][:200] if text else 'no details'}). "
            "Lower train.batch_size (raise train.grad_accum to keep the effective batch), set "
            "train.gradient_checkpointing: true, lower data.max_length, or use -e qlora (4-bit base model).")
    return e


def train(recipe, run_id: str, main: bool = True) -> None:
    method = METHODS[recipe.method]
    cfg = method_config(recipe)
    base_ref = model_reference(recipe.model.name)
    tags = {}
    if main:
        tags = _log_recipe(recipe, method, cfg, run_id, base_ref)

    # Data first: a bad file fails here, before minutes go into loading a model. A method may bring its own
    # (multi-task mixtures, preference pairs).
    load_data = getattr(method, "load_data", None) or load_data_splits
    train_ds, eval_ds, fmt = load_data(recipe)
    if main:
        log_inputs = getattr(method, "log_inputs", None) or _log_inputs
        tags.update(log_inputs(recipe, train_ds, eval_ds, fmt))
        mlflow.set_tags(tags)

    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    # Adapter weights start random (LoRA's A, prompt embeddings): seeded, a run is repeatable and a resumed run
    # continues the one it resumes. Trainer seeds again, but only once the model exists.
    set_seed(recipe.train.seed)
    model = load_base_model(recipe.model, **method.model_kwargs(cfg))
    base_revision = recipe.model.revision or getattr(model.config, "_commit_hash", None)
    model = method.apply(model, cfg)
    if main and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()

    build_trainer = getattr(method, "build_trainer", None) or sft_trainer
    trainer = build_trainer(recipe, model, tokenizer, train_ds, eval_ds, training_arguments(recipe, run_id, eval_ds))
    checkpoint = _resume_checkpoint(recipe.train.resume, run_id) if main else None
    if recipe.train.resume and trainer.accelerator.num_processes > 1:
        trainer.accelerator.wait_for_everyone()  # rank 0 has picked and downloaded the checkpoint
        checkpoint = checkpoint if main else _rank_resume_checkpoint(run_id)
    # Everything alive now (modules of torch, transformers, MLflow, TRL; the model) lives until the end: frozen out
    # of the cyclic GC, whose full collections otherwise rescan it all during training (measured on CPU: 0.4 s of
    # a 6-9 s, 20-step support-bot loop).
    gc.collect()
    gc.freeze()
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        gc.unfreeze()
    tuned = _unsharded(trainer, recipe, method, cfg, run_id, main) if trainer.is_fsdp_enabled else trainer.model
    if not main:
        return

    if eval_ds is not None:
        # Base zero-shot, base few-shot and tuned on the held-out split; a full fine-tune needs the base loaded apart.
        evaluate = getattr(method, "evaluate", None) or _evaluate
        evaluate(recipe, method, tuned, tokenizer, train_ds, eval_ds)

    tags.update(lineage_tags(base_revision=base_revision, chat_template_hash=chat_template_hash(tokenizer)))
    # The system prompt goes with the model: the playground pre-fills it, or the model answers out of character.
    config = {"base_model": base_ref, "base_revision": base_revision, "method": recipe.method,
              "artifact": method.ARTIFACT, "system_prompt": trained_system_prompt(train_ds, recipe.data.system_prompt)}
    # A method that produces several models (one adapter per task) logs and registers each itself.
    log_models = getattr(method, "log_and_register", None) or log_and_register
    log_models(recipe, tuned, tokenizer, config, tags)


def log_and_register(recipe, model, tokenizer, config: dict, tags: dict, name: str = "model",
                     registered_name: str | None = None) -> None:
    """Log the model in the active run and register it (alias, lineage tags, auto-promotion per the recipe)."""
    info = log_finetuned_model(model, tokenizer, config=config, name=name)
    mlflow.set_tags(tags)
    if recipe.registry.enabled:
        registered_name = registered_name or recipe.registry.name
        version = register(info.model_uri, registered_name, tags, recipe.registry.alias)
        mlflow.set_tags({"finetune.registered_model": registered_name,
                         "finetune.registered_version": version.version})
        alias = f" (alias @{recipe.registry.alias})" if recipe.registry.alias else ""
        print(f"Registered {registered_name} version {version.version}{alias}")
        maybe_auto_promote(registered_name, version.version, recipe)


def _log_recipe(recipe, method, cfg, run_id: str, base_ref: str) -> dict:
    # MLflow's local backend has already logged the raw `-P` strings ('1e-3'); keep those rather than clash
    # with the typed value ('0.001'): MLflow refuses to change a logged param.
    logged = mlflow.MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in flat_params(recipe).items() if k not in logged})
    mlflow.log_text(to_yaml(recipe), "recipe.yaml")
    vllm_ok, vllm_reason = method.vllm_compatible(cfg)
    precision = compute_precision(recipe.train.precision, recipe.model.dtype)
    print(f"Base model: {base_ref}; training precision: {precision}", file=sys.stderr)
    tags = lineage_tags(method=recipe.method, base_model=base_ref, base_revision=recipe.model.revision,
                        recipe_hash=recipe_hash(recipe), source_run=run_id, precision=precision,
                        vllm_compatible=str(vllm_ok).lower(), vllm_reason=vllm_reason)
    mlflow.set_tags(tags)
    return tags


def load_data_splits(recipe):
    """(train, eval or None, format) from the recipe's `data` section."""
    data = recipe.data
    train_ds, fmt = load_training_dataset(data.train, data.format, data.system_prompt, data.columns, data.tags)
    if data.max_rows:
        train_ds = train_ds.select(range(min(data.max_rows, len(train_ds))))
    eval_ds = None
    if not recipe.eval.enabled:
        pass
    elif data.eval:
        eval_ds, _ = load_training_dataset(data.eval, data.format, data.system_prompt, data.columns, data.tags)
    elif data.eval_split > 0:
        split = train_ds.train_test_split(test_size=data.eval_split, seed=recipe.train.seed)
        train_ds, eval_ds = split["train"], split["test"]
    return train_ds, eval_ds, fmt


def _log_inputs(recipe, train_ds, eval_ds, fmt) -> dict:
    train_path = recipe.data.train
    train_input = mlflow_dataset(train_ds, train_path, name=Path(train_path).stem)
    mlflow.log_input(train_input, context="training")
    if eval_ds is not None:
        eval_path = recipe.data.eval or train_path
        mlflow.log_input(mlflow_dataset(eval_ds, eval_path, name=Path(eval_path).stem), context="eval")
    return lineage_tags(dataset_digest=train_input.digest, data_format=fmt)


def _evaluate(recipe, method, model, tokenizer, train_ds, eval_ds) -> None:
    base = load_base_model(recipe.model) if method.ARTIFACT == "full" else None
    result = run_evaluation(model, tokenizer, conversations(eval_ds), conversations(train_ds), recipe.eval,
                            base_model=base)
    log_evaluation(result)
    print(comparison_table(result.metrics))


def training_arguments(recipe, run_id: str, eval_ds) -> dict:
    """The TrainingArguments every method shares (TRL's SFTConfig and DPOConfig both take them)."""
    import torch

    t = recipe.train
    dtype = torch_dtype(t.precision if t.precision != "auto" else recipe.model.dtype)
    on_gpu = torch.cuda.is_available()
    # On a CPU, Trainer's bf16 is autocast: fp32 weights, bf16 matmuls.
    autocast = cpu_autocast_bf16(t.precision, recipe.model.dtype)
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
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=t.save_steps,
        **_checkpointing_argument(t.gradient_checkpointing),
        bf16=on_gpu and dtype == torch.bfloat16 or autocast,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        report_to="none",
        dataloader_num_workers=0,
        **_fsdp_arguments(t),
    )


def _checkpointing_argument(enabled: bool) -> dict:
    """transformers >= 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` (old name deprecated)."""
    from transformers import TrainingArguments

    new = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if new else "gradient_checkpointing": enabled}


def _fsdp_arguments(t) -> dict:
    """`train.distributed: fsdp` with several processes; otherwise Trainer's default (DDP when distributed)."""
    import torch

    if t.distributed != "fsdp" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    if not torch.cuda.is_available():  # accelerate shards across GPUs only; on CPU it silently runs DDP
        if is_main_process():
            print("Warning: train.distributed=fsdp needs GPUs; training with DDP.", file=sys.stderr)
        return {}
    return {"fsdp": True, "fsdp_config": {"version": 2, "state_dict_type": "FULL_STATE_DICT"}}


def _unsharded(trainer, recipe, method, cfg, run_id: str, main: bool):
    """After FSDP each rank holds a shard: every rank takes part in gathering the full weights (rank 0 writes
    them), then rank 0 reloads them whole for evaluation and logging."""
    final = paths.job_dir(run_id) / "fsdp-final"
    trainer.save_model(str(final))
    if not main:
        return None
    if method.ARTIFACT == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(final)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base_model(recipe.model, **method.model_kwargs(cfg)), final)


def sft_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict, callbacks: list | None = None):
    """TRL's SFTTrainer on chat data: loss on assistant tokens when the chat template allows it.

    Packed rows stay rows unless a varlen flash-attention kernel is there to use the padding-free layout, and the
    loss goes through TRL's fused LM head only where `train.fused_lm_head` says so (see `sft.py`).
    """
    from trl import SFTConfig

    from mlflow_finetune_plugin.loss_masks import has_zero_weights, with_turn_weights
    from mlflow_finetune_plugin.sft import FinetuneSFTTrainer

    pack = packing(recipe)
    if has_zero_weights(train_ds, eval_ds):  # OpenAI `weight: 0` turns: tokenized here with their masks cleared
        weigh = recipe.data.assistant_only_loss
        train_ds, eval_ds = (with_turn_weights(tokenizer, ds, weigh) for ds in (train_ds, eval_ds))
        assistant_only = False  # the masks are in the data; TRL builds the labels from them
    else:
        assistant_only = recipe.data.assistant_only_loss and _supports_assistant_masks(tokenizer)
    config = SFTConfig(**args, max_length=recipe.data.max_length, packing=pack, assistant_only_loss=assistant_only)
    return FinetuneSFTTrainer(
        model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        callbacks=[MlflowMetrics(), CheckpointLogger()] if callbacks is None else callbacks,
        fused_lm_head=fused_lm_head(recipe), pack_rows=pack and not _varlen_attention(recipe))


FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn",
                   "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")


def _varlen_attention(recipe) -> bool:
    return (recipe.model.attn_implementation or "") in FLASH_ATTENTION


def packing(recipe) -> bool:
    """`data.packing`, with `auto` resolved: on where packing is exact and faster whatever the lengths.

    TRL packs examples into rows of up to max_length (best-fit decreasing) with `position_ids` restarting at each
    example; transformers then keeps attention within each example (tested: packed logits equal per-row logits,
    sdpa and eager). With a varlen flash-attention kernel that costs nothing extra: auto packs. With sdpa and eager
    every packed row costs attention over its full length, which pays on mixed lengths (1.5x measured on CPU) and
    not on rows of similar length: auto leaves it to `data.packing: true`. Virtual-token methods (prefix, prompt)
    prepend per row, and remote code may ignore position_ids: never for those.
    """
    safe = getattr(METHODS[recipe.method], "PACKING_SAFE", True) and not recipe.model.trust_remote_code
    if recipe.data.packing != "auto":
        if recipe.data.packing and not safe:
            print(f"Warning: data.packing=true with {recipe.method}"
                  f"{' and trust_remote_code' if recipe.model.trust_remote_code else ''}: packed rows may attend "
                  "across each other or shift virtual tokens; set data.packing: auto", file=sys.stderr)
        return recipe.data.packing
    return safe and _varlen_attention(recipe)


def fused_lm_head(recipe) -> bool:
    """`train.fused_lm_head`, with `auto` resolved: TRL's fused LM head on CUDA (memory), the model's loss elsewhere."""
    if recipe.train.fused_lm_head != "auto":
        return recipe.train.fused_lm_head
    import torch

    return torch.cuda.is_available()


def _supports_assistant_masks(tokenizer) -> bool:
    """Assistant-only loss needs `{% generation %}` markers; TRL patches the templates it knows, warn otherwise."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return True
    try:
        if get_training_chat_template(tokenizer) is not None:
            return True
    except Exception:  # noqa: BLE001 - TRL raises for templates it has no training variant of
        pass
    print("Warning: this chat template has no {% generation %} markers and TRL has no training variant of it; "
          "training on whole conversations. Add the markers to the template for assistant-only loss.",
          file=sys.stderr)
    return False


def _resume_checkpoint(resume: str | None, current_run: str) -> str | None:
    """Download the last checkpoint of run `resume` (or of the latest other run of this experiment)."""
    if not resume:
        return None
    client = mlflow.MlflowClient()
    if resume == "latest":
        exp = client.get_run(current_run).info.experiment_id
        runs = client.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=50)
        candidates = [r.info.run_id for r in runs if r.info.run_id != current_run]
    else:
        candidates = [resume]
    for rid in candidates:
        try:
            checkpoints = resumable_checkpoints(client, rid)
        except Exception as e:  # noqa: BLE001
            raise FinetuneError(f"train.resume: cannot read run {rid!r}: {e}") from None
        if checkpoints:
            last = max(checkpoints, key=_step)
            dest = paths.job_dir(current_run) / "resume"
            local = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=last, dst_path=str(dest))
            print(f"Resuming from {rid}/{last}")
            mlflow.set_tag("finetune.resumed_from", f"{rid}/{last}")
            return local
        if resume != "latest":
            raise FinetuneError(f"train.resume: run {rid} has no checkpoints to resume from")
    raise FinetuneError("train.resume=latest: no earlier run in this experiment has checkpoints")


def resumable_checkpoints(client, run_id: str) -> list[str]:
    """The checkpoint folders of a run that can be resumed from.

    A run killed while logging a checkpoint leaves that folder partial. The run tags the last folder it finished
    copying (`finetune.last_checkpoint`): folders after it are partial. Runs without the tag (logged elsewhere, or
    killed before their first checkpoint was complete) are judged by their files.
    """
    folders = [a.path for a in client.list_artifacts(run_id, "checkpoints") if a.is_dir]
    marked = client.get_run(run_id).data.tags.get(LAST_CHECKPOINT_TAG)
    if marked:
        last = _step(marked)
        folders = [f for f in folders if _step(f) <= last]
    return [f for f in folders if _is_whole_checkpoint(client, run_id, f)]


def _step(checkpoint: str) -> int:
    return int(checkpoint.rsplit("-", 1)[-1])


def _is_whole_checkpoint(client, run_id: str, path: str) -> bool:
    """Trainer state, optimizer and weights all logged, none of them empty."""
    sizes = {a.path.rsplit("/", 1)[-1]: 1 if a.is_dir else a.file_size or 0 for a in client.list_artifacts(run_id, path)}
    weights = any(size for name, size in sizes.items()
                  if name.endswith((".safetensors", ".bin")) or name.startswith("pytorch_model_fsdp"))
    optimizer = any(size for name, size in sizes.items() if name.startswith("optimizer"))
    return bool(sizes.get("trainer_state.json")) and optimizer and weights


def _rank_resume_checkpoint(run_id: str) -> str | None:
    """Non-main ranks resume from the checkpoint rank 0 picked (its `finetune.resumed_from` tag): from the job
    folder on rank 0's node, downloaded on any other node."""
    picked = mlflow.MlflowClient().get_run(run_id).data.tags.get("finetune.resumed_from")
    if not picked:
        return None
    source_run, artifact_path = picked.split("/", 1)
    local = paths.job_dir(run_id) / "resume" / artifact_path
    if (local / "trainer_state.json").exists():
        return str(local)
    dest = paths.job_dir(run_id) / f"resume-rank{os.environ.get('RANK', '0')}"
    return mlflow.artifacts.download_artifacts(run_id=source_run, artifact_path=artifact_path, dst_path=str(dest))


# Code a stop signal must not cut short: a tracking-store write interrupted halfway leaves the sqlite database
# locked (the run could then not even be ended), an artifact copy leaves a partial file.
_UNINTERRUPTIBLE = ("mlflow.store", "sqlalchemy", "sqlite3", "alembic")


def _raise_keyboard_interrupt(signum, frame):
    """SIGTERM (cancel) as KeyboardInterrupt in the main thread, once it is outside tracking-store code."""
    inner = frame
    while inner is not None:
        if inner.f_globals.get("__name__", "").startswith(_UNINTERRUPTIBLE):
            signal.signal(signal.SIGALRM, lambda _, later: _raise_keyboard_interrupt(signum, later))
            signal.setitimer(signal.ITIMER_REAL, 0.05)  # look again in 50 ms
            return
        inner = inner.f_back
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Internal: the training process started by the finetune backend.")
    parser.add_argument("--recipe-json", required=True, help="Resolved recipe (JSON) written by the backend.")
    parser.add_argument("--run-id", default=None)
    args = parser.parse_args(argv)
    recipe = Recipe.model_validate(json.loads(Path(args.recipe_json).read_text()))
    sys.exit(run(recipe, args.run_id))


if __name__ == "__main__":
    main()
