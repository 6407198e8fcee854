"""One fine-tune, top to bottom: data -> base model -> method -> TRL trainer -> evaluation -> logged, registered model.

Runs as its own process (one per rank under torchrun), inside an MLflow run that already exists
(`--run-id`, or MLFLOW_RUN_ID as set by MLflow's local backend) or a new one. It always ends that run:
FINISHED, FAILED with the error as a tag and `error.txt`, or KILLED on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import mlflow

from mlflow_finetune_plugin import paths
from mlflow_finetune_plugin.callbacks import CheckpointLogger, MlflowMetrics
from mlflow_finetune_plugin.data import load_training_dataset, mlflow_dataset
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluation import comparison_table, conversations, log_evaluation, run_evaluation
from mlflow_finetune_plugin.logged_model import chat_template_hash, log_finetuned_model
from mlflow_finetune_plugin.methods import METHODS
from mlflow_finetune_plugin.models import load_base_model, load_tokenizer, model_reference, torch_dtype
from mlflow_finetune_plugin.promotion import maybe_auto_promote
from mlflow_finetune_plugin.recipe import Recipe, flat_params, method_config, recipe_hash, to_yaml
from mlflow_finetune_plugin.registry import lineage_tags, register
from mlflow_finetune_plugin.tracking import record_failure


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
    active = mlflow.start_run(run_id=run_id)
    run_id = active.info.run_id
    try:
        train(recipe, run_id)
    except KeyboardInterrupt as e:
        record_failure(run_id, e, "KILLED")
        mlflow.end_run("KILLED")  # else MLflow's exit hook would end the active run as FINISHED
        print(f"\nRun {run_id} cancelled.", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - every failure must end the run, not leave it RUNNING
        record_failure(run_id, e, "FAILED")
        mlflow.end_run("FAILED")
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
        tags.update(_log_inputs(recipe, train_ds, eval_ds, fmt))
        mlflow.set_tags(tags)

    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    model = load_base_model(recipe.model, **method.model_kwargs(cfg))
    base_revision = recipe.model.revision or getattr(model.config, "_commit_hash", None)
    model = method.apply(model, cfg)
    if main and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()

    build_trainer = getattr(method, "build_trainer", None) or sft_trainer
    trainer = build_trainer(recipe, model, tokenizer, train_ds, eval_ds, training_arguments(recipe, run_id, eval_ds))
    trainer.train(resume_from_checkpoint=_resume_checkpoint(recipe.train.resume, run_id) if main else
                  _local_resume_checkpoint(run_id))
    if not main:
        return

    if eval_ds is not None:
        # Base zero-shot, base few-shot and tuned on the held-out split; a full fine-tune needs the base loaded apart.
        evaluate = getattr(method, "evaluate", None) or _evaluate
        evaluate(recipe, method, trainer.model, tokenizer, train_ds, eval_ds)

    tags.update(lineage_tags(base_revision=base_revision))
    info = log_finetuned_model(
        trainer.model, tokenizer,
        config={"base_model": base_ref, "base_revision": base_revision, "method": recipe.method,
                "artifact": method.ARTIFACT},
    )
    tags.update(lineage_tags(chat_template_hash=chat_template_hash(tokenizer)))
    mlflow.set_tags(tags)
    if recipe.registry.enabled:
        version = register(info.model_uri, recipe.registry.name, tags, recipe.registry.alias)
        mlflow.set_tags({"finetune.registered_model": recipe.registry.name,
                         "finetune.registered_version": version.version})
        alias = f" (alias @{recipe.registry.alias})" if recipe.registry.alias else ""
        print(f"Registered {recipe.registry.name} version {version.version}{alias}")
        maybe_auto_promote(recipe.registry.name, version.version, recipe)


def _log_recipe(recipe, method, cfg, run_id: str, base_ref: str) -> dict:
    # MLflow's local backend has already logged the raw `-P` strings ('1e-3'); keep those rather than clash
    # with the typed value ('0.001'): MLflow refuses to change a logged param.
    logged = mlflow.MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in flat_params(recipe).items() if k not in logged})
    mlflow.log_text(to_yaml(recipe), "recipe.yaml")
    vllm_ok, vllm_reason = method.vllm_compatible(cfg)
    tags = lineage_tags(method=recipe.method, base_model=base_ref, base_revision=recipe.model.revision,
                        recipe_hash=recipe_hash(recipe), source_run=run_id,
                        vllm_compatible=str(vllm_ok).lower(), vllm_reason=vllm_reason)
    mlflow.set_tags(tags)
    return tags


def load_data_splits(recipe):
    """(train, eval or None, format) from the recipe's `data` section."""
    data = recipe.data
    train_ds, fmt = load_training_dataset(data.train, data.format, data.system_prompt)
    if data.max_rows:
        train_ds = train_ds.select(range(min(data.max_rows, len(train_ds))))
    eval_ds = None
    if not recipe.eval.enabled:
        pass
    elif data.eval:
        eval_ds, _ = load_training_dataset(data.eval, data.format, data.system_prompt)
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
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        report_to="none",
        dataloader_num_workers=0,
    )


def sft_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict):
    """TRL's SFTTrainer on chat data: loss on assistant tokens when the chat template allows it."""
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        **args,
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        assistant_only_loss=recipe.data.assistant_only_loss and _supports_assistant_masks(tokenizer),
    )
    return SFTTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, callbacks=[MlflowMetrics(), CheckpointLogger()])


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
            checkpoints = [a.path for a in client.list_artifacts(rid, "checkpoints") if a.is_dir]
        except Exception as e:  # noqa: BLE001
            raise FinetuneError(f"train.resume: cannot read run {rid!r}: {e}") from None
        if checkpoints:
            last = max(checkpoints, key=lambda p: int(p.rsplit("-", 1)[-1]))
            dest = paths.job_dir(current_run) / "resume"
            local = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path=last, dst_path=str(dest))
            print(f"Resuming from {rid}/{last}")
            mlflow.set_tag("finetune.resumed_from", f"{rid}/{last}")
            return local
        if resume != "latest":
            raise FinetuneError(f"train.resume: run {rid} has no checkpoints to resume from")
    raise FinetuneError("train.resume=latest: no earlier run in this experiment has checkpoints")


def _local_resume_checkpoint(run_id: str) -> str | None:
    """Non-main ranks resume from the checkpoint rank 0 downloads (shared job folder on one node)."""
    resume = paths.job_dir(run_id) / "resume"
    found = sorted(resume.rglob("trainer_state.json")) if resume.exists() else []
    return str(found[-1].parent) if found else None


def _raise_keyboard_interrupt(signum, frame):
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
