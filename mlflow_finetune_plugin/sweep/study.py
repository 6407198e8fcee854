"""`mlflow-finetune sweep DIR -e lora --space sweep.yaml --trials N`: Optuna (TPE) over any recipe keys.

The space file maps dotted recipe keys to a range or a list of choices:

    train.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
    train.warmup_ratio: {low: 0.0, high: 0.1}
    lora.r: {choices: [4, 8, 16]}

Every key and bound is checked against the recipe schema (through `load_recipe` with the value as a `-P`
override) before anything starts. Each trial is a nested run under one parent run, trained by the real backend
(`launchers.submit`, detached and followed: the path of `mlflow run`) on the recipe's launcher (local,
torchrun, ray via `--backend-config`), with registration off. While a trial trains, its eval loss is reported
to Optuna; a trial the pruner (median) gives up on is cancelled (its run ends KILLED) and tagged pruned. The
parent run logs the best trial, a parallel-coordinate plot and the parameter importances; only the best
trial's model is registered (alias and auto-promotion per the recipe), every finished one with `register_all`.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.sweep.space import Dimension, check_space, cli_value, load_space
from mlflow_finetune_plugin.tracking import experiment_id

# Tags of the sweep (on the parent run and on each trial run).
SWEEP_TRIAL, SWEEP_STATE, SWEEP_BEST_RUN = tags.SWEEP_TRIAL, tags.SWEEP_STATE, tags.SWEEP_BEST_RUN
PLOT_FILE = "sweep/parallel_coordinate.png"
SPACE_FILE = "sweep/space.yaml"
PRUNE_METRIC = "eval/tuned/loss"      # the Trainer's eval loss, logged every train.save_steps while training


@dataclass
class SweepResult:
    parent_run_id: str
    metric: str
    direction: str
    trials: list[dict] = field(default_factory=list)  # number, run_id, state, value, params
    best: dict | None = None
    importances: dict[str, float] = field(default_factory=dict)
    registered: list[tuple[str, str]] = field(default_factory=list)  # (name, version)
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        from mlflow_finetune_plugin.metrics import format_table

        keys = list(dict.fromkeys(k for t in self.trials for k in t["params"]))
        rows = [[t["number"], t["state"], t["value"], *(t["params"].get(k) for k in keys),
                 (t["run_id"] or "-")[:12]] for t in self.trials]
        lines = [format_table(["trial", "state", self.metric, *keys, "run"], rows), ""]
        if self.best:
            lines.append(f"Best: trial {self.best['number']} ({self.direction} {self.metric} = "
                         f"{self.best['value']:.4f}), run {self.best['run_id']}: {self.best['params']}")
        lines += [f"Importance of {k}: {v:.3f}" for k, v in self.importances.items()]
        lines += [f"Registered {name} version {version}" for name, version in self.registered]
        lines += self.notes
        lines.append(f"Sweep run: {self.parent_run_id}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the sweep


def run_sweep(project: str, entry_point: str, space: str | os.PathLike, trials: int,
              metric: str = PRUNE_METRIC, direction: str | None = None, params: dict | None = None,
              backend_config: dict | None = None, experiment_name: str | None = None,
              register_all: bool = False, pruner: str = "median", startup_trials: int | None = None,
              seed: int | None = None, enqueue: list[dict] = (), poll_seconds: float = 1.0) -> SweepResult:
    """Run `trials` fine-tunes of `project` under one parent run, each with values Optuna's TPE sampler picks
    from the `space` file; returns the trials, the best one and what was registered. Nothing starts when the
    space, the recipe or the data is wrong."""
    from mlflow_finetune_plugin.metrics import lower_is_better
    from mlflow_finetune_plugin.tracking import ensure_store

    ensure_store()
    project = str(Path(project).resolve())
    params = {k: str(v) for k, v in (params or {}).items()}
    direction = direction or ("minimize" if lower_is_better(metric.rsplit("/", 1)[-1]) else "maximize")
    config = dict(backend_config or {})
    if "detach" in config:
        raise FinetuneError(
            "--backend-config: leave out `detach`; the sweep runs every trial detached and follows it")
    dims = load_space(space)
    check_space(dims, space, project, entry_point, params, list(enqueue))
    recipe = _trainable_recipe(project, entry_point, params)
    study = _study(direction, pruner,
                   max(1, min(10, trials // 3)) if startup_trials is None else startup_trials, seed)
    for point in enqueue:
        study.enqueue_trial(point)
    sweep = _Sweep(project, entry_point, params, config, dims, metric, direction, trials, poll_seconds)
    sweep.start(space, pruner, _eval_note(recipe), experiment_name)
    return sweep.run(study, register_all)


def _trainable_recipe(project: str, entry_point: str, params: dict):
    """The backend's own check (preset, axes, every data file), once, before any run exists."""
    from mlflow_finetune_plugin.backend import resolve_entry_point
    from mlflow_finetune_plugin.config.presets import PRESETS

    recipe, _command = resolve_entry_point(project, entry_point, params)
    if recipe is None:
        raise FinetuneError(
            f"-e {entry_point}: an MLproject command, whose parameters the sweep cannot check; sweep "
            f"one of the backend's methods: {', '.join(PRESETS)}")
    return recipe


def _eval_note(recipe) -> str | None:
    data = recipe.data
    if not (data.eval or data.eval_split or any(t.eval for t in data.tasks.values())):
        return (
            "Note: no eval data (data.eval or data.eval_split): no eval loss while training, so no trial can "
            "be pruned")
    return None


def _study(direction: str, pruner: str, startup: int, seed: int | None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints each trial itself
    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=startup),
               "none": optuna.pruners.NopPruner}
    if pruner not in pruners:
        raise FinetuneError(f"--pruner {pruner!r}: use one of {', '.join(pruners)}")
    return optuna.create_study(direction=direction, pruner=pruners[pruner](),
                               sampler=optuna.samplers.TPESampler(n_startup_trials=startup, seed=seed))


@dataclass
class _Sweep:
    project: str
    entry_point: str
    params: dict
    config: dict
    dims: list[Dimension]
    metric: str
    direction: str
    n_trials: int
    poll_seconds: float
    client: MlflowClient = field(default_factory=MlflowClient)
    experiment_id: str = ""
    result: SweepResult | None = None

    def start(self, space, pruner: str, note: str | None, experiment_name: str | None) -> None:
        """The parent run, with the space file and the sweep's settings."""
        from mlflow.entities import Param

        self.experiment_id = _experiment_id(self.client, experiment_name)
        run = self.client.create_run(self.experiment_id,
                                     run_name=f"sweep-{Path(self.project).name}-{self.entry_point}")
        self.result = SweepResult(run.info.run_id, self.metric, self.direction)
        settings = {"entry_point": self.entry_point, "metric": self.metric, "direction": self.direction,
                    "trials": self.n_trials, "sampler": "TPE", "pruner": pruner,
                    **{f"P.{k}": v for k, v in self.params.items()}}
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in settings.items()])
        self.client.log_text(run.info.run_id, Path(space).read_text(encoding="utf-8"), SPACE_FILE)
        if note:
            self.result.notes.append(note)
            print(note, file=sys.stderr)
        print(f"=== Sweep run {run.info.run_id}: {self.n_trials} trials of -e {self.entry_point}, "
              f"{self.direction} {self.metric} ===", file=sys.stderr)

    def run(self, study, register_all: bool) -> SweepResult:
        from mlflow_finetune_plugin.launchers.local import stop_signals_interrupt
        from mlflow_finetune_plugin.tracking import record_failure

        parent = self.result.parent_run_id
        try:
            with stop_signals_interrupt():
                for _ in range(self.n_trials):
                    self.result.trials.append(self.trial(study))
                self.finish(study, register_all)
        except KeyboardInterrupt as e:
            record_failure(parent, e, "KILLED")
            raise
        except BaseException as e:  # noqa: BLE001 - the parent run must end, never stay RUNNING
            record_failure(parent, e)
            raise
        self.client.set_terminated(parent, "FINISHED")
        return self.result

    def trial(self, study) -> dict:
        """Ask Optuna for values, train them through the backend, follow the run and tell Optuna how it
        went."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
        from optuna.trial import TrialState

        from mlflow_finetune_plugin.launchers.submit import submit

        trial = study.ask()
        values = {d.key: d.suggest(trial) for d in self.dims}
        record = {"number": trial.number, "run_id": None, "state": "failed", "value": None, "params": values}
        print(f"=== Trial {trial.number + 1}/{self.n_trials}: "
              + ", ".join(f"{k}={v}" for k, v in values.items()) + " ===", file=sys.stderr)
        overrides = {**self.params, **{k: cli_value(v) for k, v in values.items()},
                     "registry.enabled": "false"}
        started = submit(self.project, self.entry_point, overrides, self.config, mode="follow",
                         experiment_id=self.experiment_id, run_name=f"trial-{trial.number}")
        if started.run_id is None:  # refused before a run existed: the values, --backend-config, Ray down
            study.tell(trial, state=TrialState.FAIL)
            record["error"] = f"trial {trial.number} could not start: {started.error}"
            print(record["error"], file=sys.stderr)
            return record
        record["run_id"] = run_id = started.run_id
        submitted = started.submitted
        self.client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, self.result.parent_run_id)
        self.client.set_tag(run_id, SWEEP_TRIAL, str(trial.number))
        try:
            status = self.follow(submitted, trial)
        except KeyboardInterrupt:
            submitted.cancel()
            self.client.set_tag(run_id, SWEEP_STATE, "failed")
            raise
        record.update(self.conclude(study, trial, run_id, status))
        self.client.set_tag(run_id, SWEEP_STATE, record["state"])
        return record

    def follow(self, submitted, trial) -> str:
        """Wait for the run, reporting each eval loss it logs while training; cancel it when the pruner says
        so. Returns the run's final status, or PRUNED."""
        # The pruner compares reports in the study's direction: the loss for minimize, its negative for
        # maximize.
        sign = 1.0 if self.direction == "minimize" else -1.0
        reported: set[int] = set()
        while True:
            # Done when the run has ended, not when its process has: the next trial starts during the
            # teardown.
            status = self.client.get_run(submitted.run_id).info.status
            running = status == "RUNNING" and submitted.get_status() == "RUNNING"
            history = self.client.get_metric_history(submitted.run_id, PRUNE_METRIC)
            new = sorted((m.step, m.value) for m in history if m.step > 0 and m.step not in reported)
            for step, value in new:  # step 0 is the final evaluation's loss, logged after training
                trial.report(sign * value, step)
                reported.add(step)
            if new and running and trial.should_prune():
                print(f"Trial {trial.number}: pruned at step {new[-1][0]} ({PRUNE_METRIC} {new[-1][1]:.4f}); "
                      f"cancelling run {submitted.run_id}", file=sys.stderr)
                submitted.cancel()
                return "PRUNED"
            if not running:
                break
            time.sleep(self.poll_seconds)
        if status == "RUNNING":  # the job died without ending its run: the launcher's wait() ends it
            submitted.wait()
            status = self.client.get_run(submitted.run_id).info.status
        return status

    def conclude(self, study, trial, run_id: str, status: str) -> dict:
        from mlflow.entities import Metric
        from optuna.trial import TrialState

        if status == "PRUNED":
            study.tell(trial, state=TrialState.PRUNED)
            return {"state": "pruned"}
        if status != "FINISHED":
            study.tell(trial, state=TrialState.FAIL)
            error = self.client.get_run(run_id).data.tags.get(tags.ERROR, "see the run's error.txt")
            print(f"Trial {trial.number}: run {run_id} {status}: {error.splitlines()[0]}", file=sys.stderr)
            return {"state": "failed"}
        value = final_value(self.client, run_id, self.metric)
        if value is None:
            study.tell(trial, state=TrialState.FAIL)
            self.client.set_tag(run_id, SWEEP_STATE, "failed")
            logged = sorted(self.client.get_run(run_id).data.metrics)
            raise FinetuneError(
                f"--metric {self.metric}: run {run_id} logged no such metric. It logged: "
                f"{', '.join(m for m in logged if m.startswith('eval/')) or ', '.join(logged)}. "
                "Pick one of those (eval/tuned/* need eval data: data.eval or "
                "data.eval_split)"
            )
        study.tell(trial, value)
        self.client.log_batch(self.result.parent_run_id, metrics=[
            Metric(f"trials/{self.metric}", value, int(time.time() * 1000), trial.number)])
        print(f"Trial {trial.number}: {self.metric} = {value:.4f} (run {run_id})", file=sys.stderr)
        return {"state": "complete", "value": value}

    def finish(self, study, register_all: bool) -> None:
        """The best trial, the plot and the importances on the parent run; then the best model (or every
        finished one, best last so that it holds the alias) into the registry."""
        from mlflow.entities import Metric, Param, RunTag
        from optuna.trial import TrialState

        done = [r for r in self.result.trials if r["state"] == "complete"]
        if not done:
            states = ", ".join(f"{sum(r['state'] == s for r in self.result.trials)} {s}"
                               for s in ("pruned", "failed"))
            errors = list(dict.fromkeys(r["error"] for r in self.result.trials if r.get("error")))
            raise FinetuneError(f"no trial completed ({states}); " + ("\n".join(errors) if errors else
                                f"the trial runs' {tags.ERROR} tags say why"))
        best = study.best_trial
        record = next(r for r in done if r["number"] == best.number)
        parent = self.result.parent_run_id
        self.result.best = {"number": best.number, "run_id": record["run_id"], "value": best.value,
                            "params": best.params}
        self.result.importances, note = importances(study)
        self.client.log_batch(
            parent, params=[Param(f"best.{k}", cli_value(v)) for k, v in best.params.items()],
            metrics=[Metric(name, value, int(time.time() * 1000), 0) for name, value in
                     {f"best/{self.metric}": best.value,
                      **{f"importance/{k}": v for k, v in self.result.importances.items()}}.items()],
            tags=[RunTag(SWEEP_BEST_RUN, record["run_id"])])
        log_plot(self.client, parent, study, self.metric)
        if note:
            self.result.notes.append(note)
        pruned = sum(t.state == TrialState.PRUNED for t in study.trials)
        print(f"=== Best: trial {best.number}, {self.metric} = {best.value:.4f}, run {record['run_id']} "
              f"({len(done)} completed, {pruned} pruned) ===", file=sys.stderr)
        for r in ([r for r in done if r is not record] if register_all else []) + [record]:
            self.register(r)

    def register(self, record: dict) -> None:
        """Register a finished trial's model as the run would have: lineage tags from the run, the recipe's
        alias, auto-promotion when the recipe asks for it."""
        from mlflow_finetune_plugin.config.loading import load_recipe
        from mlflow_finetune_plugin.registry.promotion import maybe_auto_promote
        from mlflow_finetune_plugin.registry.versions import register
        from mlflow_finetune_plugin.serving.parity import promote_checked

        run_id = record["run_id"]
        recipe = load_recipe(self.project, method=self.entry_point, overrides={
            **self.params, **{k: cli_value(v) for k, v in record["params"].items()}})
        if not recipe.registry.enabled:
            self.result.notes.append(
                f"registry.enabled is false: trial {record['number']}'s model stays in run "
                f"{run_id}, not registered")
            return
        run = self.client.get_run(run_id)
        lineage = {k: v for k, v in run.data.tags.items() if k in tags.LINEAGE.values()}
        models = [("model", recipe.registry.name, {})]
        # one adapter per task, as publish logs them
        if recipe.data.tasks and recipe.data.adapters == "per_task":
            models = [(f"model-{t}", f"{recipe.registry.name}-{t}", {tags.TASK: t})
                      for t in recipe.data.tasks]
        for artifact, name, extra in models:
            (logged,) = self.client.search_logged_models(
                [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{artifact}'")
            version = register(f"models:/{logged.model_id}", name, {**lineage, **extra},
                               recipe.registry.alias)
            self.client.set_tag(run_id, tags.REGISTERED_MODEL, name)
            self.client.set_tag(run_id, tags.REGISTERED_VERSION, str(version.version))
            self.result.registered.append((name, str(version.version)))
            promoted = maybe_auto_promote(name, version.version, recipe, promote_with=promote_checked)
            if promoted is not None:
                self.client.set_tag(run_id, tags.AUTO_PROMOTED, str(promoted.promoted).lower())


def _experiment_id(client: MlflowClient, name: str | None) -> str:
    """The experiment named, else the one `mlflow run` would use: MLFLOW_EXPERIMENT_NAME,
    MLFLOW_EXPERIMENT_ID, Default."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        return experiment_id(name, client)
    return os.environ.get("MLFLOW_EXPERIMENT_ID", "0")


def final_value(client: MlflowClient, run_id: str, metric: str) -> float | None:
    """The value of `metric` logged last: for eval/tuned/loss the final evaluation's (step 0), not the eval
    loss of the last training step, which MLflow's latest-by-step view would show."""
    history = client.get_metric_history(run_id, metric)
    return max(history, key=lambda m: (m.timestamp, m.step)).value if history else None


MIN_IMPORTANCE_TRIALS = 3


def importances(study) -> tuple[dict[str, float], str | None]:
    """Optuna's parameter importances (PED-ANOVA), or a note saying why there are none."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < MIN_IMPORTANCE_TRIALS:
        return {}, (
            f"Parameter importance needs {MIN_IMPORTANCE_TRIALS} completed trials ({len(done)} completed); "
            "run more --trials")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study)), None
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        return {}, f"Parameter importance not computed: {e}"


def log_plot(client: MlflowClient, run_id: str, study, metric: str) -> None:
    """Optuna's parallel-coordinate plot (every completed trial's values against the metric) as a PNG."""
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        axes = plot_parallel_coordinate(study, target_name=metric)
    figure = axes.figure
    figure.set_size_inches(max(6.0, 2.0 * len(study.best_trial.params) + 3), 4.5)
    figure.tight_layout()
    client.log_figure(run_id, figure, PLOT_FILE)
    plt.close(figure)
