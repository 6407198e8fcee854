"""`monitor NAME --start` and `--stop`: NAME's judge as an online scorer on its traffic experiments, which the
job runner of `mlflow server` runs on traces as they arrive (MLflow's online scoring: `Scorer.register()` then
`.start(sampling_config=...)`); its verdicts land on the traces, where `monitor NAME` reads them
(monitor/judge.py).

MLflow runs online only judges whose model is a gateway endpoint (`gateway:/ENDPOINT`); a judge given as an
OpenAI-compatible URL gets an endpoint of its own on the server (monitor/gateway.py). Code metrics are not
online: MLflow 3.17 refuses to start a code `@scorer` ("Automatic evaluation is only supported for scorers
that use gateway models"), so `monitor` computes them from the traces."""

from __future__ import annotations

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.monitor import gateway
from mlflow_finetune_plugin.monitor.judge import JudgeSpec, build, judge_name, ready
from mlflow_finetune_plugin.monitor.traffic import served_clause

# What MLflow's job runner does, for the lines `--start` prints (mlflow/genai/scorers/online/, 3.17).
CADENCE = ("MLflow's job runner looks once a minute at traces older than "
           "MLFLOW_ONLINE_SCORING_DEFAULT_TRACE_COMPLETION_BUFFER_SECONDS (300 s by default) and at most an "
           "hour old; `monitor {name}` shows judge_pass from the verdicts, and `monitor {name} --judge ...` "
           "judges older traces on demand")


def start(name: str, experiment_ids: list[str], judge: JudgeSpec, sample_rate: float = 1.0,
          filter_string: str | None = None) -> list[str]:
    """Register `name`'s judge on each experiment and start it on `sample_rate` of `name`'s traces there (and
    `filter_string`'s, where given). Returns what was done, a line per experiment."""
    from mlflow.exceptions import MlflowException
    from mlflow.genai.scorers import ScorerSamplingConfig

    gateway.tracking_server("--start")
    model = online_model(judge)
    scorer = build(judge, name, model)
    wanted = served_clause(name) + (f" AND {filter_string}" if filter_string else "")
    sampling = ScorerSamplingConfig(sample_rate=sample_rate, filter_string=wanted)
    lines = []
    for eid in experiment_ids:
        try:
            scorer.register(name=judge_name(name), experiment_id=eid).start(experiment_id=eid,
                                                                            sampling_config=sampling)
        except MlflowException as e:
            raise FinetuneError(f"--start: MLflow refused the judge {judge_name(name)} on experiment {eid} "
                                f"(MLflow: {e.message}); check --judge and --sample-rate") from None
        lines.append(f"experiment {_label(eid)}: {judge_name(name)} judges {sample_rate:.0%} of {name}'s new "
                     f"traces with {model}")
    return [*lines, CADENCE.format(name=name)]


def online_model(judge: JudgeSpec) -> str:
    """The gateway model the judge runs on online: its endpoint, or one made for its URL; other models are
    refused with MLflow's reason."""
    if judge.model.startswith("gateway:/"):
        gateway.check_endpoint(judge.model[len("gateway:/"):])
        return judge.model
    if judge.url:
        return "gateway:/" + gateway.endpoint_for(judge.url, ready(judge).model_name)
    raise FinetuneError(f"--start --judge {judge.model}: MLflow runs only judges on gateway endpoints online "
                        "(\"Automatic evaluation is only supported for scorers that use gateway models\"): "
                        "create an endpoint for the model in the MLflow UI (AI Gateway) and pass --judge "
                        "gateway:/ENDPOINT, or give an OpenAI-compatible URL, for which --start makes one")


def stop(name: str, experiment_ids: list[str]) -> list[str]:
    """Stop and delete `name`'s judge on each experiment (the verdicts it logged stay on their traces; a
    gateway endpoint made for it stays, for the next --start). Returns a line per experiment."""
    from mlflow.exceptions import MlflowException
    from mlflow.genai.scorers import delete_scorer, get_scorer

    gateway.tracking_server("--stop")
    lines = []
    for eid in experiment_ids:
        try:
            get_scorer(name=judge_name(name), experiment_id=eid).stop(experiment_id=eid)
            delete_scorer(name=judge_name(name), experiment_id=eid, version="all")
        except MlflowException as e:
            if not gateway.missing(e):
                raise FinetuneError(
                    f"--stop: MLflow could not remove {judge_name(name)} from experiment {eid} "
                    f"(MLflow: {e.message})") from None
            lines.append(f"experiment {_label(eid)}: no judge of {name} was registered")
            continue
        lines.append(f"experiment {_label(eid)}: {judge_name(name)} stopped and removed")
    return lines


def traffic_experiments(name: str, experiments: tuple[str, ...]) -> list[str]:
    """The named experiments' ids; none named: the experiments holding traces of `name`'s versions (raises
    FinetuneError when there are none, naming the fix)."""
    import mlflow
    from mlflow import MlflowClient

    from mlflow_finetune_plugin.monitor.traffic import experiment_ids

    if experiments:
        return experiment_ids(experiments)
    client = MlflowClient()
    found = [eid for eid in experiment_ids(()) if client.search_traces(
        locations=[eid], filter_string=served_clause(name), max_results=1)]
    if not found:
        raise FinetuneError(
            f"no experiment in {mlflow.get_tracking_uri()} holds traces of {name} yet: name the "
            "experiment `serve --trace EXPERIMENT` records to with --experiment EXPERIMENT")
    return found


def _label(experiment_id: str) -> str:
    from mlflow import MlflowClient

    return f"{MlflowClient().get_experiment(experiment_id).name} ({experiment_id})"


def command(name: str, experiments: tuple[str, ...], judge: JudgeSpec | None, starting: bool,
            sample_rate: float) -> list[str]:
    """`monitor NAME --start --judge MODEL` or `monitor NAME --stop`: what was done, a line per experiment."""
    if starting and judge is None:
        raise FinetuneError("--start needs the judge to run online: --judge gateway:/ENDPOINT or --judge "
                            "http://HOST:PORT/v1 (an OpenAI-compatible server)")
    ids = traffic_experiments(name, experiments)
    return start(name, ids, judge, sample_rate) if starting else stop(name, ids)
