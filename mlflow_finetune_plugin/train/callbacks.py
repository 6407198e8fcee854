"""Trainer callbacks that report to the active MLflow run, and the run's expected time left on the console."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mlflow
from transformers import TrainerCallback

from mlflow_finetune_plugin import stops, tags
from mlflow_finetune_plugin.runtime import allocator, threads


class MlflowMetrics(TrainerCallback):
    """Log training metrics as `train/<name>` and eval metrics as `eval/tuned/<name>`, plus tokens per second.

    Only the main process logs (under torchrun every rank runs the callback).
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix  # e.g. "faq/": train/faq/loss, for one trainer per task in the same run
        self._last_tokens = 0
        self._last_time = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = run_metric_names(logs, self.prefix)
        tokens = logs.get("num_tokens")
        now = time.perf_counter()
        if tokens is not None and self._last_time is not None and now > self._last_time:
            metrics[f"train/{self.prefix}"
                    "tokens_per_second"] = (tokens - self._last_tokens) / (now - self._last_time)
            self._last_tokens, self._last_time = tokens, now
        peak = allocator.peak_rss_bytes()
        if metrics and peak is not None:  # the run's own memory so far, beside system/*'s (the machine's)
            metrics[f"train/{self.prefix}peak_rss_gib"] = peak / 2**30
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        """The training process's peak memory so far (`train/peak_rss_gib`): the training stage's, before the
        evaluation and the logging, which the command's peak adds to; on CUDA also the GPU's
        (`train/peak_gpu_gib`, `torch.cuda.max_memory_allocated`, what the memory plan predicts)."""
        import torch

        peak = allocator.peak_rss_bytes()
        if not state.is_world_process_zero or peak is None:
            return
        mlflow.log_metric(f"train/{self.prefix}peak_rss_gib", peak / 2**30, step=state.global_step)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            mlflow.log_metric(f"train/{self.prefix}peak_gpu_gib", torch.cuda.max_memory_allocated() / 2**30,
                              step=state.global_step)
        print(f"Training {'of ' + self.prefix.rstrip('/') + ' ' if self.prefix else ''}done: this process's "
              f"peak memory so far {peak / 2**30:.2f} GiB ({allocator.in_use()})")


class Heartbeat(TrainerCallback):
    """Each training step is progress for the watchdog (`train/watchdog.py`): a run that trains is not stuck.
    It is also where the process takes its new share of the cores when another heavy process of the project
    started or ended (`runtime/threads.py`)."""

    def on_step_end(self, args, state, control, **kwargs):
        stops.beat()

    def on_step_begin(self, args, state, control, **kwargs):
        # Before the step, so that the first one already runs with the share: two runs started together each
        # planned before the other had registered.
        changed = threads.refit()
        if changed is not None and state.is_world_process_zero:
            mlflow.set_tag(tags.THREADS, f"{changed.describe()}, from step {state.global_step + 1}")


class CheckpointLogger(TrainerCallback):
    """Copy each saved checkpoint into the run's artifacts (`checkpoints/checkpoint-N`), so a run can be
    resumed from any machine that reaches the tracking server, and make it an MLflow logged model
    (`log_checkpoint_model`).

    Checkpoints come every `save_steps`, at the last step (transformers saves there whatever `save_steps`
    says: a run keeps its final state as a checkpoint too, so it can be resumed, listed and registered like
    the others), and, with `last_epochs` (`train.save_last_epochs`), at the end of each of the last that many
    epochs, as OpenAI keeps a job's checkpoints. A step is saved once, whichever of these asks for it.
    transformers also evaluates after the last step; the run then evaluates the final model itself (base /
    few-shot / tuned, `eval/tuned/loss` included), so that extra pass would only cost time and log a second,
    differently computed `eval/tuned/loss`.
    """

    def __init__(self, logged_models: bool = True, last_epochs: int = 0):
        # One adapter per task trains task after task with steps counted from 1 each time: their checkpoints
        # share folder names, so none of them is a model of its own.
        self.logged_models = logged_models
        self.last_epochs = last_epochs
        self._saved_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_training_stop and control.should_evaluate and state.eval_steps \
                and state.global_step % state.eval_steps:
            control.should_evaluate = False
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        # state.epoch is the count of epochs done here; a run that max_steps stopped mid-epoch saved its last
        # step already, at the step's end.
        if self.last_epochs and state.global_step != self._saved_step \
                and round(state.epoch or 0) > state.num_train_epochs - self.last_epochs:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._saved_step = state.global_step
        # Every rank writes its own files (rng_state_<rank>.pth; FSDP shards) and transformers does not wait
        # for them before this hook: rank 0 would copy a half-written file, and the resume on that rank fail
        # to load it.
        if args.world_size > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            path = f"checkpoints/{folder.name}"
            mlflow.log_artifacts(str(folder), artifact_path=path)
            # Set only once every file is in: a process killed mid-copy leaves a newer folder without this
            # mark.
            mlflow.set_tag(tags.LAST_CHECKPOINT, path)
            if self.logged_models:
                step_logs = [entry for entry in state.log_history if entry.get("step") == state.global_step]
                log_checkpoint_model(path, state.global_step, step_logs)


def run_metric_names(logs: dict, prefix: str = "") -> dict[str, float]:
    """Trainer logs under the run's metric names: `eval_loss` -> `eval/tuned/<prefix>loss`, the summary logged
    once at the end (`train_runtime`) -> `train/<prefix>summary_runtime`, anything else ->
    `train/<prefix><name>`."""
    metrics = {}
    for key, value in logs.items():
        if not isinstance(value, (int, float)) or key in ("total_flos", "step"):
            continue
        if key.startswith("eval_"):
            metrics[f"eval/tuned/{prefix}{key[5:]}"] = value
        elif key.startswith("train_"):
            metrics[f"train/{prefix}summary_{key[6:]}"] = value
        else:
            metrics[f"train/{prefix}{key}"] = value
    return metrics


def log_checkpoint_model(path: str, step: int, step_logs: list[dict]) -> str:
    """The checkpoint in the active run's artifacts at `path` as an MLflow logged model, `checkpoint-<step>`:
    an
    output of the run at `step`, with the run's lineage tags and the metrics the run logged at that step (eval
    loss on the eval set, train loss on the training set, each linked to that dataset input). Returns its
    model id.

    The model holds no copy of the weights (an external model): they stay in the run's `checkpoints/` where
    resume finds them, and are packaged as a servable model only when the checkpoint is registered
    (`publish.register_checkpoint`).
    """
    from mlflow.entities import LoggedModelOutput, Metric

    client = mlflow.MlflowClient()
    run = client.get_run(mlflow.active_run().info.run_id)
    run_id = run.info.run_id
    lineage = {k: v for k, v in run.data.tags.items() if k in tags.LINEAGE.values()}
    model = mlflow.create_external_model(
        name=f"checkpoint-{step}", source_run_id=run_id,
        tags={**lineage, tags.CHECKPOINT_STEP: str(step), tags.CHECKPOINT_PATH: path,
              tags.CHECKPOINT_RUN: run_id})
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    datasets = _datasets_by_context(run)
    names = {}
    for entry in step_logs:
        names.update(run_metric_names(entry))
    # The values MlflowMetrics already logged at this step, again with the model and dataset: the same
    # timestamps keep the run's own history free of doubles.
    metrics = {}
    for key in names:
        dataset = datasets.get("eval" if key.startswith("eval/") else "training")
        for m in client.get_metric_history(run_id, key):
            if m.step == step:
                metrics[key] = Metric(key, m.value, m.timestamp, step, model_id=model.model_id, run_id=run_id,
                                      dataset_name=dataset.name if dataset else None,
                                      dataset_digest=dataset.digest if dataset else None)
    if metrics:
        client.log_batch(run_id, metrics=list(metrics.values()))
    return model.model_id


def _datasets_by_context(run) -> dict:
    """`training` / `eval` -> the run's one dataset input of that context (none for a mixture's several)."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    found: dict[str, list] = {}
    for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in dataset_input.tags if t.key == MLFLOW_DATASET_CONTEXT), None)
        found.setdefault(context, []).append(dataset_input.dataset)
    return {context: datasets[0] for context, datasets in found.items() if len(datasets) == 1}


class Reached(TrainerCallback):
    """Tags what the adapter reaches (`reach.report`'s line) at the end of the first training step: the
    rehearsal and the trainer's set-up are behind, so the tag describes a run that trained."""

    def __init__(self, line: str):
        self.line = line

    def on_step_end(self, args, state, control, **kwargs):
        from mlflow_finetune_plugin.train import reach

        reach.tag(self.line)
        self.line = ""


class DropReferenceAdapter(TrainerCallback):
    """TRL adds a frozen `ref` copy of a pretrained adapter as the reference model (DPO continuing an adapter,
    GRPO with beta > 0); the logged model is the `default` adapter only."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and "ref" in getattr(model, "peft_config", {}):
            model.set_adapter("default")
            model.delete_adapter("ref")


class TimeLeft(TrainerCallback):
    """Print once, a few steps in, how long the whole run should still take: training from the measured step
    rate, then the evaluation estimated from the measured training token rate. Main process only; it reads
    clocks and the logged token count, never runs the model.

    The progress bar shows s/it; what it cannot show is the evaluation that follows it.
    """

    # an estimate needs a few steps of warm caches; or halfway, for short runs
    MIN_STEPS, MIN_SECONDS = 5, 30.0
    # Generating answers one token at a time (in batches), scoring the references and the forgetting check,
    # per generated token, against one trained token (forward and backward): calibrated on the README run
    # (docs/benchmarks.md, "Time to a fine-tuned model").
    GENERATED_TOKEN_COST = 3.0

    def __init__(self, eval_rows: int = 0, contenders: int = 0, max_new_tokens: int = 0,
                 tokens_per_step: float = 0.0, search_passes: float = 0.0):
        self.eval_rows, self.contenders, self.max_new_tokens = eval_rows, contenders, max_new_tokens
        self.search_passes = search_passes  # the prompt search, in contender passes
        self.tokens_per_step = tokens_per_step  # an upper bound, until the trainer logs its own count
        self._start: tuple[int, float] | None = None
        self._printed = False

    @classmethod
    def of(cls, recipe, eval_sets: list) -> TimeLeft:
        """For a run that evaluates `eval_sets` after training (its held-out sets; none when it evaluates
        nothing): the tuned model and the prompt-only contenders of eval.contenders answer the first
        eval.max_examples of each: base zero-shot, few-shot when eval.fewshot_k > 0, retrieval when its k
        (eval.retrieval_k, else fewshot_k) > 0, and the optimized prompt, whose search costs
        eval.optimize.budget passes more."""
        e, t = recipe.eval, recipe.train
        rows = sum(min(len(ds), e.max_examples) for ds in eval_sets if ds is not None)
        retrieval = (e.fewshot_k if e.retrieval_k is None else e.retrieval_k) > 0
        # the search runs where its budget fits 2 candidates (evaluate/prompt_search.py)
        searched = "optimized" in e.contenders and int(e.optimize.budget * rows) // e.optimize.dev_rows >= 2
        contenders = (1 + ("base" in e.contenders) + (e.fewshot_k > 0 and "fewshot" in e.contenders)
                      + (retrieval and "retrieval" in e.contenders) + searched)
        # beam search: num_beams sequences a question (the beams' shared prompt is a small part of the cost)
        return cls(rows, contenders, e.max_new_tokens * e.num_beams,
                   t.batch_size * t.grad_accum * recipe.data.max_length,
                   e.optimize.budget if searched else 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        tokens = (logs or {}).get("num_tokens")  # TRL's count of the tokens trained so far, all processes
        if tokens and state.global_step:
            self.tokens_per_step = tokens / state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self._printed or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        # the first step pays for warm-up (allocations, kernel choice): timed from its end
        if self._start is None:
            self._start = (state.global_step, now)
            return
        steps, seconds = state.global_step - self._start[0], now - self._start[1]
        halfway = state.global_step >= state.max_steps / 2 and steps >= 2
        if steps and (steps >= self.MIN_STEPS and seconds >= self.MIN_SECONDS or halfway):
            self._printed = True
            from tqdm.auto import tqdm  # written above the progress bar, not into it

            tqdm.write(self.message(max(state.max_steps - state.global_step, 0), seconds / steps),
                       file=sys.stderr)

    def message(self, steps_left: int, step_seconds: float) -> str:
        training = steps_left * step_seconds
        line = f"{steps_left} steps at {step_seconds:.2g} s/step ≈ {_duration(training, 1)} of training"
        evaluation = 0.0
        if self.eval_rows:
            generated = self.eval_rows * (self.contenders + self.search_passes) * self.max_new_tokens
            evaluation = generated * self.GENERATED_TOKEN_COST * step_seconds / max(self.tokens_per_step, 1.0)
            search = f" and a prompt search of {self.search_passes:g} passes" if self.search_passes else ""
            line += (
                f"; then evaluation of {self.eval_rows} held-out questions x {self.contenders} "
                f"contenders{search}, ~{_duration(evaluation)}, estimated")
        return f"=== about {_duration(training + evaluation)} left ({line}) ==="


def _duration(seconds: float, decimals: int = 0) -> str:
    """`42 s` under a minute, else minutes (`7 min`, or `6.6 min` with one decimal)."""
    if seconds < 59.5:
        return f"{max(round(seconds), 1)} s"
    return f"{seconds / 60:.{decimals}f} min"
