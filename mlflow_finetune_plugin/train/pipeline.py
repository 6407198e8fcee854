"""One fine-tune, top to bottom: data -> base model -> adapter -> the objective's trainer -> evaluation -> the
logged, registered model. Runs inside an MLflow run that already exists (`job.py` owns its lifecycle); under
torchrun every rank runs it and only rank 0 (`main`) talks to MLflow."""

from __future__ import annotations

import gc
import os

import mlflow
from transformers import set_seed

from mlflow_finetune_plugin import distill, paths, stops, tracking
from mlflow_finetune_plugin import tags as tag_names
from mlflow_finetune_plugin.config.checks import ONLINE, SCORING
from mlflow_finetune_plugin.config.presets import PRESETS
from mlflow_finetune_plugin.data import splits
from mlflow_finetune_plugin.evaluate import forgetting, stage
from mlflow_finetune_plugin.evaluate.contenders import trained_system_prompt
from mlflow_finetune_plugin.logged_model import chat_template_hash
from mlflow_finetune_plugin.metrics import TUNED_RAG
from mlflow_finetune_plugin.models import kernels
from mlflow_finetune_plugin.models.architecture import for_generation
from mlflow_finetune_plugin.models.base import load_base_model, load_tokenizer, model_reference
from mlflow_finetune_plugin.models.precision import (
    fp32_where_it_matters,
    frozen_weights_in_bf16,
    measured_for,
    recipe_autocast_bf16,
)
from mlflow_finetune_plugin.models.template_clock import pinned_clock
from mlflow_finetune_plugin.tags import lineage_tags
from mlflow_finetune_plugin.train import (
    documents,
    publish,
    quantization,
    reach,
    rehearsal,
    resume,
    templates,
    trainers,
)
from mlflow_finetune_plugin.train.adapters import adapter_of, attach, lora
from mlflow_finetune_plugin.train.callbacks import (
    CheckpointLogger,
    Heartbeat,
    MlflowMetrics,
    Reached,
    TimeLeft,
)
from mlflow_finetune_plugin.train.objectives import objective_of
from mlflow_finetune_plugin.train.prompt_only import optimize_prompt


def fine_tune(recipe, run_id: str, main: bool = True) -> None:
    if not PRESETS[recipe.method].trains:  # -e optimize-prompt: the prompt search alone
        return optimize_prompt(recipe, run_id, main)
    # Every chat template rendered in this process reads the pinned date (gpt-oss's system block, Llama 3.x's
    # header): TRL's trainers render rows and prompts themselves (DPO, KTO, GRPO), not through
    # models/chat_format.
    with pinned_clock():
        _fine_tune(recipe, run_id, main)


def _fine_tune(recipe, run_id: str, main: bool) -> None:
    adapter, objective = adapter_of(recipe), objective_of(recipe)
    quantization.check_precision(recipe)  # before the data, the model or anything logged
    kernels.resolve(recipe)  # train.kernels: liger without CUDA or liger-kernel is refused here
    base_ref = model_reference(recipe.model.name)
    vllm = templates.vllm_verdict(recipe, adapter.vllm_compatible(recipe.adapter))
    tags = publish.log_recipe(recipe, run_id, base_ref, vllm) if main else {}

    # Data first: a bad file fails here, before minutes go into loading a model. A teacher (-e distill)
    # answers the prompts first, once (rank 0), and its answers are the rows.
    if recipe.distill is not None and recipe.distill.teacher:
        recipe = distill.answered(recipe, run_id, main)
    # A documents recipe's rows need the tokenizer (chunk sizes): they are made once it is loaded.
    data = None if recipe.data.documents else splits.load_splits(recipe)
    general_text = forgetting.read_set(recipe)  # eval.forgetting's texts ([] when off)
    if main:
        if data is not None:
            tags.update(splits.log_inputs(recipe, data))
        mlflow.set_tags(tags)

    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code,
                               recipe.model.chat_template, recipe.project_dir)
    prepared = documents.prepare(recipe, tokenizer, run_id, main) if recipe.data.documents else None
    if prepared is not None:
        data = prepared.splits
        tags.update(prepared.lineage)
    data = templates.for_template(recipe, data, tokenizer, main)  # system handling, told once
    # Adapter weights start random (LoRA's A, prompt embeddings): seeded, a run is repeatable and a resumed
    # run continues the one it resumes. Trainer seeds again, but only once the model exists.
    set_seed(recipe.train.seed)
    scoring = recipe.objective in SCORING  # a reward model: the base under a score head
    model = load_base_model(recipe.model, scoring=scoring, **quantization.model_kwargs(recipe.model))
    _fused_kernels(recipe, model, main)  # on the base's layers, before an adapter wraps them
    base_revision = recipe.model.revision or getattr(model.config, "_commit_hash", None)
    # new tokens' rows, every end-of-turn id stops
    trainable = templates.fit_model(recipe, model, tokenizer, main)
    # what a full fine-tune's base contender starts from
    starting_rows = templates.added_rows(model, tokenizer)
    model = attach(quantization.prepare(model, recipe.model), recipe, trainable)
    if recipe.adapter.type == "lora":
        lora.no_casts_under_autocast(model)  # PEFT's input casts, a no-op round trip under autocast
    # the share that trains (param, metric) and, for a mixture of experts, what the adapter reaches: printed
    # now, tagged once training took its first step (a run failing before then carries no such tag)
    reached = reach.report(recipe, model, main)

    config = _model_config(recipe, adapter, data, tokenizer, base_ref, base_revision)
    tuned, last_step = _train(recipe, run_id, main, objective, model, tokenizer, data, reached,
                              (general_text, starting_rows, config, prepared))
    # TRL left router logits on (mixtures of experts): off to decode, and in the saved config
    for_generation(tuned)
    if not main:
        return
    # a cancel whose interrupt Python dropped (stops.py) ends the run here, not after publishing
    stops.check()

    # Base zero-shot, few-shot and with retrieved shots, and tuned, on the held-out rows; a full fine-tune
    # needs the base loaded apart, and only when there is something to evaluate.
    stops.enter("evaluate")  # each batch of answers is progress
    scored = None
    if stage.has_held_out(data, prepared):
        base = templates.base_contender(recipe, adapter.ARTIFACT, tokenizer, starting_rows)
        with tracking.results_at_step(last_step):
            scored = stage.evaluate(recipe, objective, tuned, tokenizer, data, base, prepared)
            stage.check_forgetting(recipe, general_text, tuned, tokenizer, base)  # general text: base, tuned
        del base
    stops.enter("publish")
    # Did it pay off against the best prompt-only alternative? Tagged before publishing: the model card says
    # it.
    verdict = stage.conclude(run_id, recipe, scored, documents=prepared is not None)

    _publish(recipe, tuned, tokenizer, data, prepared, tags, config, base_revision)
    print(f"\nVerdict: {verdict.sentence()}")
    if verdict.cost:
        print(verdict.cost)


def _train(recipe, run_id: str, main: bool, objective, model, tokenizer, data, reached, rehearsed) -> tuple:
    """The training loop (or one adapter per task), the rehearsal before it: (the trained model, the last
    step). `rehearsed` is what the rehearsal evaluates with: (general text, starting rows, model config,
    documents)."""
    args = trainers.training_arguments(recipe, run_id, data.eval)
    # Everything alive now (modules, the model) lives until the end: frozen out of the cyclic GC, whose full
    # collections otherwise rescan it all during training (measured on CPU: 0.4 s of a 6-9 s, 20-step loop).
    gc.collect()
    gc.freeze()
    last_step = 0  # one adapter per task: each task's steps count from 1, its metrics carry the task's name
    # Under CPU bf16 autocast the logits and the LoRA updates stay fp32 (models/precision.py); no-op
    # otherwise.
    autocast = recipe_autocast_bf16(recipe)
    stops.enter("train")  # watched from here (train/watchdog.py): each step is progress
    try:
        per_task = recipe.data.adapters == "per_task" and data.is_mixture
        if per_task:
            trainer = None
        else:
            evaluated = list(data.task_evals.values()) if data.is_mixture else [data.eval]
            callbacks = [MlflowMetrics(), CheckpointLogger(last_epochs=recipe.train.save_last_epochs),
                         TimeLeft.of(recipe, evaluated),
                         Reached(reached if main else ""), Heartbeat()]
            with fp32_where_it_matters(model, autocast):
                trainer = objective.build_trainer(recipe, model, tokenizer, data.train, data.eval, args,
                                                  callbacks)
                if recipe.train.rehearsal and recipe.objective not in ONLINE:
                    # GRPO's inputs come from its own generation: its first step
                    rehearsal.training_step(trainer)
        if recipe.train.rehearsal and main:
            general_text, starting_rows, config, prepared = rehearsed
            rehearsal.after_training(recipe, objective, model, tokenizer, data, general_text, starting_rows,
                                     config, prepared)
        if recipe.train.torch_compile:  # after the rehearsal's step: its shapes are not the training's
            print(
                f"torch.compile: {kernels.compile_layers(model)} decoder layers (compiled in the first "
                "steps)")
        # The frozen base weights in bf16 while training (the same numbers under autocast, 0.4 GB less at the
        # peak on smollm2), the fp32 ones back after it (models/precision.py). One process only: each rank
        # measures its CPU for `auto` and may choose apart under load, and DDP's start-up sync of the weights
        # then hung on their dtypes.
        alone = int(os.environ.get("WORLD_SIZE", "1")) <= 1
        with (
            frozen_weights_in_bf16(model, autocast and measured_for(recipe) and alone, paths.job_dir(run_id)),
            fp32_where_it_matters(model, autocast),
        ):
            if per_task:
                trainers.train_per_task(recipe, objective, model, tokenizer, data.tasks, data.task_evals,
                                        args)
                reach.tag(reached if main else "")
                tuned = model
            else:
                trainer.train(resume_from_checkpoint=_checkpoint(recipe, trainer, run_id, main))
                last_step = trainer.state.global_step  # the evaluation's metrics are logged there: the latest
                tuned = trainers.unsharded(trainer, recipe, run_id, main) if trainer.is_fsdp_enabled \
                    else trainers.trained(trainer)
    finally:
        gc.unfreeze()
        # generation's shapes change every token: evaluation runs them as they were
        if recipe.train.torch_compile:
            kernels.uncompile_layers(model)
    return tuned, last_step


def _publish(recipe, tuned, tokenizer, data, prepared, tags: dict, config: dict, base_revision) -> None:
    """Lineage tags, then the model logged and registered (one version, or one per task)."""
    stops.check()
    tags.update(lineage_tags(base_revision=base_revision, chat_template_hash=chat_template_hash(tokenizer)))
    # the logged model retrieves: it answers as tuned-rag did
    if prepared is not None and recipe.retrieval.raft:
        tags[tag_names.SERVED_AS] = TUNED_RAG
    if recipe.data.adapters == "per_task" and data.is_mixture:
        prompts = {name: trained_system_prompt(ds, recipe.data.tasks[name].system_prompt)
                   for name, ds in data.tasks.items()}
        publish.log_per_task(recipe, tuned, tokenizer, config, tags, prompts)
    else:
        publish.log_and_register(recipe, tuned, tokenizer, config, tags,
                                 retriever=prepared.retriever if prepared and recipe.retrieval.raft else None)




def _model_config(recipe, adapter, data, tokenizer, base_ref: str, base_revision) -> dict:
    """The logged model's config. The system prompt goes with the model: the playground pre-fills it, or the
    model answers out of character."""
    return {"base_model": base_ref, "base_revision": base_revision, "method": recipe.method,
            "adapter": recipe.adapter.type, "objective": recipe.objective, "artifact": adapter.ARTIFACT,
            "system_prompt": trained_system_prompt(data.train, recipe.data.system_prompt),
            "num_beams": recipe.eval.num_beams if recipe.eval.num_beams > 1 else None,
            "vocab_size": len(tokenizer) if getattr(tokenizer, "added_control_tokens", None) else None}


def _fused_kernels(recipe, model, main: bool) -> None:
    """`train.kernels` (models/kernels.py) on the loaded base, printed and tagged with what takes the SFT
    loss."""
    kernel = kernels.resolve(recipe, model.config)
    kernels.apply_layers(model, kernel)
    if main:
        said = kernels.describe(kernel, recipe.objective == "sft" and kernels.takes_lm_head(recipe, kernel))
        said += "; torch.compile per decoder layer" if recipe.train.torch_compile else ""
        print(f"Kernels: {said}")
        mlflow.set_tag(tag_names.KERNELS, said)


def _checkpoint(recipe, trainer, run_id: str, main: bool) -> str | None:
    """The checkpoint to resume from (`train.resume`): rank 0 picks and downloads it, the other ranks
    follow."""
    checkpoint = resume.resume_checkpoint(recipe.train.resume, run_id) if main else None
    if recipe.train.resume and trainer.accelerator.num_processes > 1:
        trainer.accelerator.wait_for_everyone()
        checkpoint = checkpoint if main else resume.rank_resume_checkpoint(run_id)
    return checkpoint
