"""The rehearsal: two rows through everything a run does after training, before the first training step.

A run that fails in evaluation, in the forgetting check or while saving its model has spent its whole training
first; on a GPU that is hours. Before training, the pipeline passes two held-out rows (and two general texts)
through the same functions it calls after training, on the model as it stands (the adapter freshly attached, or the
full model untrained): every contender's answers (a few tokens) and scores, the base contender loaded as after
training, the forgetting check, the verdict, and the save of the model with its tokenizer and a reload of what was
saved. The training step itself is tried by the trainer: one forward and backward pass on a batch of its own data,
gradients dropped, random state restored.

What the rehearsal logs goes to a nested run that is deleted afterwards (its results are nobody's), and no traces
are written (they hold user data). A failure ends the run FAILED, naming the stage and the way to skip it
(`train.rehearsal: false`), before any training.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from pathlib import Path

from mlflow_finetune_plugin.config.checks import SCORING
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.paths import tensor_names

ROWS = 2          # held-out rows and general texts rehearsed
NEW_TOKENS = 4    # answer tokens each contender generates: enough to run generation's loop, cheap on any model
KEY = "train.rehearsal"

# Per stage: what to do besides fixing the cause (the same failure would end the run after training).
_SKIP = {
    "training step": "data.packing, model.attn_implementation and train.fused_lm_head change how a step runs",
    "evaluation": "-P eval.enabled=false trains without the evaluation",
    "forgetting check": "-P eval.forgetting=false trains without the forgetting check",
    "verdict": "-P registry.promote_if=[] leaves the verdict to the primary metric",
    "saving the model": "nothing can be logged or registered until it saves",
}


class RehearsalFailed(FinetuneError):
    """A stage that runs after training failed on two rows before training."""


@contextlib.contextmanager
def stage(name: str):
    """Run one stage; an exception becomes RehearsalFailed naming the stage, the cause and the way out."""
    try:
        yield
    except RehearsalFailed:
        raise
    except Exception as e:  # noqa: BLE001 - reported with its stage; the traceback stays in error.txt via __cause__
        cause = str(e) if isinstance(e, FinetuneError) else f"{type(e).__name__}: {e}"
        raise RehearsalFailed(
            f"before training, the rehearsal of what runs after training failed at {name}, on {ROWS} rows: "
            f"{cause}. Nothing was trained. {_SKIP[name]}; -P {KEY}=false skips the rehearsal (the same error "
            "would then end the run after training).") from e


def training_step(trainer) -> None:
    """One forward and backward pass of `trainer`'s loss on one batch of its train data; gradients are dropped and
    the random state is restored, so the training that follows is the one it would have been."""
    import torch

    model = trainer.model
    # The trainer's own counters and per-step metrics (TRL's `_metrics`, token counts, the replay schedule) go back
    # as they were too: the first logged step and the replay's one-in-n steps are those of the training itself.
    kept = {key: copy.deepcopy(value) for key, value in vars(trainer).items()
            if key == "_metrics" or (type(value) in (int, float) and key.startswith("_"))}
    with stage("training step"), torch.random.fork_rng(devices=_devices()):
        batch = next(iter(trainer.get_train_dataloader()))
        batch = trainer._prepare_inputs(batch)
        was_training = model.training
        model.train()
        try:
            # Under the mixed precision training runs in: accelerate puts autocast on the model's forward only when
            # the trainer prepares it, after this. Without it a bf16 base's LoRA layers answer in fp32 (a bf16 output
            # plus an fp32 update): activations twice a training step's, a peak the training itself never reaches.
            with trainer.accelerator.autocast():
                loss = trainer.compute_loss(model, batch)
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            del batch
            for key, value in kept.items():
                setattr(trainer, key, value)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def after_training(recipe, objective, model, tokenizer, data, general_text: list[str], load_base, config: dict,
                   evaluate_tasks=None) -> None:
    """Evaluation, forgetting check, verdict and model save of the run, on `ROWS` rows, in a throwaway nested run.

    `load_base` loads the base contender the way the pipeline does after training (None when the adapter's own
    disabled state is the base); `config` is the logged model's config; `evaluate_tasks` scores a mixture."""
    import mlflow

    from mlflow_finetune_plugin.evaluate import forgetting
    from mlflow_finetune_plugin.evaluate.verdict import conclude

    started = time.perf_counter()
    small = _small(recipe)
    evaluated = data.task_evals if data.is_mixture else data.eval
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    parent = mlflow.active_run()
    # Created by id: start_run without one would take MLFLOW_RUN_ID from the environment, the parent itself.
    child = mlflow.MlflowClient().create_run(
        parent.info.experiment_id, tags={MLFLOW_PARENT_RUN_ID: parent.info.run_id, MLFLOW_RUN_NAME: "rehearsal"})
    run = mlflow.start_run(run_id=child.info.run_id, nested=True, log_system_metrics=False)
    try:
        with _quiet(), _decoding(model):
            if evaluated and recipe.eval.enabled:
                with stage("evaluation"):
                    base = load_base()
                    if data.is_mixture:
                        evals = {name: _head(ds) for name, ds in data.task_evals.items()}
                        evaluate_tasks(small, model, tokenizer, data.tasks, evals, base)
                    else:
                        objective.evaluate(small, model, tokenizer, data.train, _head(data.eval), base)
                    if general_text and recipe.objective not in SCORING:  # as the pipeline: no text to measure
                        with stage("forgetting check"):
                            forgetting.check(small, general_text[:ROWS], model, tokenizer, base)
                    del base
                with stage("verdict"):
                    conclude(run.info.run_id, recipe.registry.promote_if)
            with stage("saving the model"):
                _save_and_reload(model, tokenizer, config)
        mlflow.end_run()
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    finally:
        mlflow.MlflowClient().delete_run(run.info.run_id)
        _reactivate(parent)
    print(f"Rehearsal before training: {ROWS} rows through evaluation, forgetting check, verdict and the model's "
          f"save and reload passed ({time.perf_counter() - started:.1f} s).")


def _small(recipe):
    """The recipe with the evaluation cut to the rehearsal's size, and no traces."""
    ev = recipe.eval.model_copy(update={"max_examples": ROWS, "max_new_tokens": NEW_TOKENS, "traces": False})
    return recipe.model_copy(update={"eval": ev})


def _head(ds):
    return ds.select(range(min(ROWS, len(ds)))) if ds is not None else None


def _save_and_reload(model, tokenizer, config: dict) -> None:
    """Save the model and tokenizer as the logged model does, then read back what was saved: the tokenizer with its
    chat template, the adapter's config and weights (every saved tensor named as the model names it), or a full
    model's config and every weight's name. The base is not loaded a second time: that would double the memory."""
    from transformers import AutoConfig, AutoTokenizer

    from mlflow_finetune_plugin.logged_model import (
        _adapter_save_options,
        requirements,
        saved_artifacts,
        stage_code,
    )

    with tempfile.TemporaryDirectory(prefix="finetune-rehearsal-") as tmp:
        options = _adapter_save_options(model) if config["artifact"] == "adapter" else {}
        full, artifacts = saved_artifacts(model, tokenizer, config, Path(tmp), **options)
        requirements(full)
        stage_code(Path(tmp) / "code")
        reloaded = AutoTokenizer.from_pretrained(artifacts["tokenizer"])
        if reloaded.chat_template != tokenizer.chat_template:
            raise FinetuneError("the saved tokenizer reloads with another chat template")
        if config["artifact"] == "adapter":
            _check_adapter(model, Path(artifacts["adapter"]))
        else:
            AutoConfig.from_pretrained(artifacts["model"])
            saved = set(tensor_names(Path(artifacts["model"]), recursive=True))
            _check_names(saved, set(model.state_dict()), "model")


def _check_adapter(model, folder: Path) -> None:
    from peft import PeftConfig

    for sub in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (sub / "adapter_config.json").exists():
            PeftConfig.from_pretrained(sub)
    if not tensor_names(folder, recursive=True):
        raise FinetuneError(f"the adapter saved no weights in {folder.name}/")


def _check_names(saved: set[str], expected: set[str], what: str) -> None:
    """Every saved weight must be one the model has (tied weights may be saved once)."""
    unknown = sorted(saved - expected)
    if not saved or unknown:
        raise FinetuneError(f"the saved {what} holds {len(saved)} tensors, {len(unknown)} of them unknown to the "
                            f"model (e.g. {unknown[:3]})")


@contextlib.contextmanager
def _decoding(model):
    """The model as it decodes after training (router logits off: `architecture.for_generation`), and back as the
    trainer set it up (TRL switches them on for a mixture of experts' load-balancing loss)."""
    from mlflow_finetune_plugin.models.architecture import for_generation

    configs = {id(c): c for c in (model.config, getattr(model.config, "text_config", None)) if c is not None}
    before = {key: getattr(c, "output_router_logits", None) for key, c in configs.items()}
    for_generation(model)
    try:
        yield
    finally:
        for key, c in configs.items():
            if before[key] is not None:
                c.output_router_logits = before[key]


def _devices() -> list:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def _quiet():
    """The evaluation's tables and lines are not the run's: printed to nowhere."""
    import io
    import sys

    real = sys.stdout
    sys.stdout = io.StringIO()
    try:
        yield
    finally:
        sys.stdout = real


def _reactivate(parent) -> None:
    """Back to the run that was active (start_run(nested=True) pushed the rehearsal's run on MLflow's stack)."""
    import mlflow

    active = mlflow.active_run()
    if active is None or active.info.run_id != parent.info.run_id:
        mlflow.start_run(run_id=parent.info.run_id)
