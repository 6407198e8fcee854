"""The rehearsal: two rows through everything a run does after training, before the first training step.

A run that fails in evaluation, in the forgetting check or while saving its model has spent its whole training
first; on a GPU that is hours. Before training, the pipeline passes two held-out rows (and two general texts)
through the same functions it calls after training, on the model as it stands (the adapter freshly attached,
or the full model untrained): every contender's answers (a few tokens) and scores, the base contender loaded
as after training, the forgetting check, the verdict, and the save of the model with its tokenizer and a
reload of what was saved. The training step itself is tried by the trainer: one forward and backward pass on a
batch of its own data, gradients dropped, random state restored.

What the stages log (two rows' metrics, tables, a verdict) goes to a tracking store of its own in a temporary
folder, deleted afterwards: it is nobody's result, so nothing of it reaches the user's store, where a run or a
metric of it would be found by whoever looks for the newest run or sorts runs by a score. No traces are
written (they hold user data). The run itself keeps the outcome as its tag `finetune.rehearsal` ("passed in
2.3 s (...)" or "failed at evaluation"). A failure ends the run FAILED, naming the stage and the way to skip
it (`train.rehearsal: false`), before any training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.checks import SCORING
from mlflow_finetune_plugin.errors import FinetuneError

ROWS = 2          # held-out rows and general texts rehearsed
# answer tokens each contender generates: enough to run generation's loop, cheap on any model
NEW_TOKENS = 4
KEY = "train.rehearsal"

# Per stage: what to do besides fixing the cause, and what skipping the rehearsal would lead to. The stages
# run the code the run calls after training, so their failure would recur there; the reload of the saved model
# is the rehearsal's own check (after training the model is logged as it saves, and only its users would meet
# the fault).
_AFTER_TRAINING = "the same error would then end the run after training"
_SKIP = {
    "training step": (
        "data.packing, model.attn_implementation and train.fused_lm_head change how a step runs",
        "the same error would then end the run at its first training step"),
    "evaluation": ("-P eval.enabled=false trains without the evaluation", _AFTER_TRAINING),
    "forgetting check": ("-P eval.forgetting=false trains without the forgetting check", _AFTER_TRAINING),
    "verdict": ("-P registry.promote_if=[] leaves the verdict to the primary metric", _AFTER_TRAINING),
    "saving the model": ("nothing can be logged or registered until it saves", _AFTER_TRAINING),
    "reloading the saved model": (
        "the model trains but would not load as trained: a fault of saving or loading it in this version of "
        "transformers or peft, which another version, or an adapter instead of a full fine-tune, may avoid",
        "the run would then train and log the model as it saves, and whoever loads it would meet the fault"),
}


class RehearsalFailed(FinetuneError):
    """A stage that runs after training failed on two rows before training."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


@contextlib.contextmanager
def stage(name: str):
    """Run one stage; an exception becomes RehearsalFailed naming the stage, the cause and the way out."""
    try:
        yield
    except RehearsalFailed:
        raise
    # reported with its stage; the traceback stays in error.txt via __cause__
    except Exception as e:  # noqa: BLE001
        cause = str(e) if isinstance(e, FinetuneError) else f"{type(e).__name__}: {e}"
        todo, skipped = _SKIP[name]
        raise RehearsalFailed(
            f"before training, the rehearsal of what runs after training failed at {name}, on {ROWS} rows: "
            f"{cause}. Nothing was trained. {todo}; -P {KEY}=false skips the rehearsal ({skipped}).",
            name) from e


def training_step(trainer) -> None:
    """One forward and backward pass of `trainer`'s loss on one batch of its train data; gradients are dropped
    and the random state is restored, so the training that follows is the one it would have been."""
    import torch

    model = trainer.model
    # The trainer's own counters and per-step metrics (TRL's `_metrics`, token counts, the replay schedule) go
    # back as they were too: the first logged step and the replay's one-in-n steps are those of the training
    # itself.
    kept = {key: copy.deepcopy(value) for key, value in vars(trainer).items()
            if key == "_metrics" or (type(value) in (int, float) and key.startswith("_"))}
    with _outcome_on_failure(trainer.is_world_process_zero()), stage("training step"), \
            torch.random.fork_rng(devices=_devices()):
        batch = next(iter(trainer.get_train_dataloader()))
        batch = trainer._prepare_inputs(batch)
        was_training = model.training
        model.train()
        try:
            # Under the mixed precision training runs in: accelerate puts autocast on the model's forward only
            # when the trainer prepares it, after this. Without it a bf16 base's LoRA layers answer in fp32 (a
            # bf16 output plus an fp32 update): activations twice a training step's, a peak the training
            # itself never reaches.
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


def after_training(recipe, objective, model, tokenizer, data, general_text: list[str],
                   starting_rows: dict | None, config: dict, prepared=None) -> None:
    """Evaluation, forgetting check, verdict and model save of the run, on `ROWS` rows, logged to a throwaway
    store (`_throwaway_run`); the outcome is tagged on the run.

    The evaluation stage is the pipeline's own (`evaluate/stage.py`), on the same plain data: the objective,
    the run's splits cut to `ROWS` held-out rows, a documents recipe's `prepared` sets; the base contender is
    loaded as the pipeline loads it after training (`starting_rows`: the token rows a full fine-tune started
    from). `config` is the logged model's config."""
    from mlflow_finetune_plugin.evaluate import stage as evaluation
    from mlflow_finetune_plugin.train.templates import base_contender

    started = time.perf_counter()
    small = _small(recipe)
    scored = None
    ran = []
    with _outcome_on_failure(True), _throwaway_run() as run_id, _quiet(), _decoding(model):
        if evaluation.has_held_out(data, prepared) and recipe.eval.enabled:
            with stage("evaluation"):
                base = base_contender(recipe, config["artifact"], tokenizer, starting_rows)
                scored = evaluation.evaluate(small, objective, model, tokenizer, _cut(data), base, prepared)
                ran.append("evaluation")
                with stage("forgetting check"):
                    if evaluation.check_forgetting(small, general_text[:ROWS], model, tokenizer, base):
                        ran.append("forgetting check")
                del base
            with stage("verdict"):
                evaluation.conclude(run_id, recipe, scored, documents=prepared is not None)
            ran.append("verdict")
        _save_and_reload(model, tokenizer, config)
        ran.append("the model's save and reload")
    seconds = time.perf_counter() - started
    _record(f"passed in {seconds:.1f} s ({ROWS} rows through {', '.join(ran)})")
    print(f"Rehearsal before training: {ROWS} rows through {', '.join(ran)} passed ({seconds:.1f} s).")


@contextlib.contextmanager
def _throwaway_run():
    """A run, active (nested under the run's own) in a tracking store of its own in a temporary folder, gone
    afterwards with all it logged; the run's store and its run active again after it, whatever happened.
    Yields its run id. The store is a copy of an empty one made once per cache (a new store's schema
    migrations take a second)."""
    import mlflow
    from mlflow.tracking import fluent

    parent, uri = mlflow.active_run(), mlflow.get_tracking_uri()
    # A process that called set_experiment (a notebook, a test) has an active experiment of the run's store,
    # which start_run refuses to match against this store's run ("active experiment ID does not match"): set
    # aside here.
    chosen = fluent._active_experiment_id
    with tempfile.TemporaryDirectory(prefix="finetune-rehearsal-") as tmp:
        shutil.copy(_empty_store(), Path(tmp) / STORE)
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / STORE}")
        fluent._active_experiment_id = None
        try:
            client = mlflow.MlflowClient()
            experiment = client.create_experiment("rehearsal", artifact_location=str(Path(tmp) / "artifacts"))
            # no random name: rank 0's `random` untouched
            run = client.create_run(experiment, run_name="rehearsal")
            mlflow.start_run(run_id=run.info.run_id, nested=True, log_system_metrics=False)
            try:
                yield run.info.run_id
            finally:
                mlflow.end_run()
        finally:
            mlflow.set_tracking_uri(uri)
            fluent._active_experiment_id = chosen
            _reactivate(parent)


STORE = "mlflow.db"


def _empty_store() -> Path:
    """An empty sqlite tracking store of this MLflow version, made once in the cache."""
    import mlflow

    from mlflow_finetune_plugin.paths import cached_build

    def build(out: Path) -> None:
        import logging

        # "Creating initial MLflow database tables": not the run's
        said = logging.getLogger("mlflow.store.db.utils")
        level = said.level
        said.setLevel(logging.WARNING)
        try:
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / STORE}").search_experiments()
        finally:
            said.setLevel(level)

    return cached_build(f"rehearsal-store-mlflow-{mlflow.__version__}", build, complete=(STORE,)) / STORE


@contextlib.contextmanager
def _outcome_on_failure(main: bool):
    """A stage's failure is tagged on the run (`finetune.rehearsal`: failed at STAGE) by the main process."""
    try:
        yield
    except RehearsalFailed as e:
        if main:
            _record(f"failed at {e.stage} (the run's error says why)")
        raise


def _record(outcome: str) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tag(tags.REHEARSAL, outcome)


def _small(recipe):
    """The recipe with the evaluation cut to the rehearsal's size, and no traces."""
    ev = recipe.eval.model_copy(update={"max_examples": ROWS, "max_new_tokens": NEW_TOKENS, "traces": False})
    return recipe.model_copy(update={"eval": ev})


def _head(ds):
    return ds.select(range(min(ROWS, len(ds)))) if ds is not None else None


def _cut(data):
    """The run's splits with `ROWS` held-out rows (each task's, for a mixture)."""
    return dataclasses.replace(data, eval=_head(data.eval),
                               task_evals={name: _head(ds) for name, ds in data.task_evals.items()})


def _save_and_reload(model, tokenizer, config: dict) -> None:
    """Save the model and tokenizer as the logged model does (with the code and requirements it carries), then
    read back what was saved: the tokenizer with its chat template, and the adapter or the full model, whose
    reloaded weights must be the model's own."""
    from mlflow_finetune_plugin.logged_model import (
        _adapter_save_options,
        requirements,
        saved_artifacts,
        stage_code,
    )

    options = _adapter_save_options(model) if config["artifact"] == "adapter" else {}
    with tempfile.TemporaryDirectory(prefix="finetune-rehearsal-") as tmp:
        with stage("saving the model"):
            full, artifacts = saved_artifacts(model, tokenizer, config, Path(tmp), **options)
            requirements(full)
            stage_code(Path(tmp) / "code")
        with stage("reloading the saved model"):
            _check_tokenizer(tokenizer, Path(artifacts["tokenizer"]))
            if config["artifact"] == "adapter":
                _check_adapter(model, Path(artifacts["adapter"]), options)
            else:
                _check_full(model, Path(artifacts["model"]), scoring=config["objective"] in SCORING)


def _check_tokenizer(tokenizer, folder: Path) -> None:
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(folder).chat_template != tokenizer.chat_template:
        raise FinetuneError("the saved tokenizer reloads with another chat template")


def _check_full(model, folder: Path, scoring: bool) -> None:
    """Load the saved `model/` as the logged model loads it, and ask transformers what did not fit; then every
    weight of the reload must equal the model's.

    The saved tensor names alone say nothing: transformers 5 saves several architectures in their checkpoint
    layout (one tensor per expert where a mixture of experts fuses them in memory, other modules' names) and
    converts them back on load. What `from_pretrained` reports missing, unexpected or of another shape, and
    the values it loads, are what a user of the logged model gets.

    Memory: the reload is on the CPU in the model's dtype, the dtype it was saved in, so transformers keeps
    its tensors as views of the mapped safetensors files: pages of a file the kernel can drop, not memory of
    the process. Only what it converts (experts fused again) or casts is a copy, at worst one of every weight,
    held for the comparison and freed at once. Acceptable before a full fine-tune, whose training holds more:
    the gradients alone
    are a copy of every weight, beside the optimizer state; a model that trains on a GPU was loaded on the CPU
    before the trainer moved it there. docs/benchmarks-history.md has the figures
    (bench/rehearsal_save_check.py).
    """
    import gc

    import transformers

    from mlflow_finetune_plugin.logged_model import load_full_model

    # ignore_mismatched_sizes: a tensor of another shape is reported in the loading info, not raised mid-load
    reloaded, info = load_full_model(folder, model.dtype, scoring=scoring, output_loading_info=True,
                                     ignore_mismatched_sizes=True)
    try:
        shapes = [f"{key} (saved {list(saved)}, model {list(expected)})"
                  for key, saved, expected in info["mismatched_keys"]]
        faults = [f"{len(keys)} {what} (e.g. {sorted(keys)[:3]})" for what, keys in (
            ("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"]),
            ("of another shape", shapes), ("in error", info["error_msgs"])) if keys]
        if faults:
            raise FinetuneError(
                f"the saved model/ does not reload as {type(model).__name__}: transformers "
                f"{transformers.__version__} reports its weights {', '.join(faults)}")
        if type(reloaded) is not type(model):
            raise FinetuneError(f"the saved model/ reloads as {type(reloaded).__name__}, not as the "
                                f"{type(model).__name__} it was saved from")
        _compare(model.state_dict(), reloaded.state_dict(), "model/")
    finally:
        del reloaded
        gc.collect()


def _check_adapter(model, folder: Path, options: dict) -> None:
    """Every adapter of the model reloads as PEFT loads it (its config, then its weights) with the tensors the
    model saves: `get_peft_model_state_dict`'s, which `set_peft_model_state_dict` puts back. The base is not
    loaded a second time (that would double the memory): the adapter's tensors are the whole of what was
    saved."""
    from peft import PeftConfig
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    for name, expected_config in model.peft_config.items():
        # PEFT saves the adapter named "default" at the top of the folder, every other in a subfolder of its
        # name
        sub = folder if name == "default" else folder / name
        where = f"{folder.name}/" if name == "default" else f"{folder.name}/{name}/"
        saved_config = PeftConfig.from_pretrained(sub)
        if saved_config.peft_type != expected_config.peft_type:
            raise FinetuneError(f"the adapter in {where} reloads as {saved_config.peft_type}, not "
                                f"{expected_config.peft_type}")
        saved = load_peft_weights(str(sub), device="cpu")
        if not saved:
            raise FinetuneError(f"the adapter saved no weights in {where}")
        expected = get_peft_model_state_dict(model, adapter_name=name, **options)
        _compare(expected, saved, where)


def _compare(expected: dict, reloaded: dict, where: str) -> None:
    """The reloaded tensors are the expected ones, by name, shape and value (compared in the reload's dtype: a
    module kept in fp32 in a bf16 model may reload cast)."""
    import torch

    missing = sorted(expected.keys() - reloaded.keys())
    unknown = sorted(reloaded.keys() - expected.keys())
    differ = []
    for key in sorted(expected.keys() & reloaded.keys()):
        mine, theirs = expected[key], reloaded[key]
        if mine.shape != theirs.shape or not torch.equal(theirs, mine.detach().to(theirs.device,
                                                                                  theirs.dtype)):
            differ.append(key)
    faults = [f"{len(keys)} {what} (e.g. {keys[:3]})" for what, keys in (
        ("missing", missing), ("not in the model", unknown), ("with other values than the model's",
                                                              differ)) if keys]
    if faults:
        raise FinetuneError(
            f"the weights reloaded from the saved {where} are not the model's: {'; '.join(faults)}")


@contextlib.contextmanager
def _decoding(model):
    """The model as it decodes after training (router logits off: `architecture.for_generation`), and back as
    the trainer set it up (TRL switches them on for a mixture of experts' load-balancing loss)."""
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
    """Back to the run that was active (start_run(nested=True) pushed the rehearsal's run on MLflow's
    stack)."""
    import mlflow

    active = mlflow.active_run()
    if parent is not None and (active is None or active.info.run_id != parent.info.run_id):
        mlflow.start_run(run_id=parent.info.run_id)
