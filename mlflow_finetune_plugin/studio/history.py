"""The plugin's runs as the Train page lists them (method, model, key settings, status, verdict, when and how
long), and two runs side by side: the params that differ, their final metrics, their charts."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.metrics import format_table
from mlflow_finetune_plugin.studio.watch import SYSTEM_PREFIX, progress

# Setting shown -> the run param it is read from (the resolved recipe, flattened: config/loading.flat_params).
SETTINGS = {"lr": "train.learning_rate", "steps": "train.max_steps", "epochs": "train.epochs",
            "r": "adapter.r", "batch": "train.batch_size", "grad_accum": "train.grad_accum",
            "quantization": "model.quantization"}
ENTRY_POINT = "mlflow.project.entryPoint"  # MLflow's own tags
BACKEND = "mlflow.project.backend"


@dataclass
class RunSummary:
    run_id: str
    name: str
    experiment_id: str
    method: str | None             # finetune.method, else the entry point
    model: str | None              # the base model
    settings: dict[str, str]       # lr, steps or epochs, r, batch, ... as logged
    status: str
    verdict: str | None
    start_time: float | None       # seconds since the epoch
    duration_s: float | None       # to its end, or to now while it runs
    paid_off: bool | None = None
    registered: str | None = None  # models:/NAME/VERSION
    resumed_from: str | None = None  # run id/checkpoint it continued from
    job: str | None = None         # the Train page's job that started it


@dataclass
class Comparison:
    run_a: str
    run_b: str
    # the params both logged that differ: (a's, b's)
    params: dict[str, tuple[str, str]]
    metrics: dict[str, tuple[float | None, float | None]]      # every final metric of either, side by side
    # chart name -> (a's series, b's series)
    charts: dict[str, tuple[list, list]] = field(default_factory=dict)
    only_one: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # params one run logged

    def as_markdown(self) -> str:
        a, b = self.run_a[:12], self.run_b[:12]

        def table(title, rows):
            if not rows:
                return f"**{title}:** none differ"
            return "\n".join([f"| {title} | {a} | {b} |", "|---|---|---|",
                              *(f"| {k} | {_show(x)} | {_show(y)} |" for k, (x, y) in rows.items())])
        return table("param", self.params) + "\n\n" + table("metric", self.metrics)

    def as_text(self) -> str:
        return "\n\n".join(format_table([title, self.run_a[:12], self.run_b[:12]],
                                        [[k, x, y] for k, (x, y) in rows.items()])
                           for title, rows in (("param", self.params), ("metric", self.metrics)))


def _show(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _client(client):
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


def runs(experiment_names_or_ids=None, client=None, max_results: int = 100) -> list[RunSummary]:
    """The plugin's runs (those of the finetune backend and those that trained with the plugin), newest first,
    in the experiments named (names or ids; default: every active experiment)."""
    import time

    client = _client(client)
    ids = _experiment_ids(client, experiment_names_or_ids)
    if not ids:
        return []
    found = {}
    for query in (f"tags.`{tags.METHOD}` LIKE '%'", f"tags.`{BACKEND}` = 'finetune'"):
        for run in client.search_runs(ids, query, order_by=["attributes.start_time DESC"],
                                      max_results=max_results):
            found[run.info.run_id] = run
    newest = sorted(found.values(), key=lambda r: r.info.start_time or 0, reverse=True)[:max_results]
    now = time.time()
    return [_summary(run, now) for run in newest]


def _experiment_ids(client, given) -> list[str]:
    if given is None:
        return [e.experiment_id for e in client.search_experiments()]
    if isinstance(given, str):
        given = [given]
    ids = []
    for item in given:
        experiment = client.get_experiment_by_name(str(item))
        if experiment is None and str(item).isdigit():
            try:
                experiment = client.get_experiment(str(item))
            except Exception:  # noqa: BLE001 - MLflow raises for an unknown id: named below
                experiment = None
        if experiment is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise FinetuneError(f"no experiment named (or with id) {item!r}; experiments: {known}")
        ids.append(experiment.experiment_id)
    return ids


def _summary(run, now: float) -> RunSummary:
    params, run_tags, info = run.data.params, run.data.tags, run.info
    settings = {name: params[key] for name, key in SETTINGS.items() if params.get(key) not in (None, "None",
                                                                                               "-1")}
    if "steps" in settings:  # max_steps set: the epochs are not what bounds the run
        settings.pop("epochs", None)
    start = info.start_time / 1000 if info.start_time else None
    end = info.end_time / 1000 if info.end_time else (now if info.status == "RUNNING" else None)
    name, version = run_tags.get(tags.REGISTERED_MODEL), run_tags.get(tags.REGISTERED_VERSION)
    paid_off = run_tags.get(tags.VERDICT_PAID_OFF)
    model = run_tags.get(tags.BASE_MODEL) or params.get("model.name")
    return RunSummary(run_id=info.run_id, name=info.run_name or "", experiment_id=info.experiment_id,
                      method=run_tags.get(tags.METHOD) or run_tags.get(ENTRY_POINT),
                      model=None if model in (None, "None") else model, settings=settings, status=info.status,
                      verdict=run_tags.get(tags.VERDICT), start_time=start,
                      duration_s=end - start if start is not None and end is not None else None,
                      paid_off=None if paid_off is None else paid_off == "true",
                      registered=f"models:/{name}/{version}" if name and version else None,
                      resumed_from=run_tags.get(tags.RESUMED_FROM), job=run_tags.get(tags.STUDIO_JOB))


def compare(run_a: str, run_b: str, client=None) -> Comparison:
    """Runs `run_a` and `run_b` side by side: the params that differ (both values; those only one run logged
    apart), every final metric of either (system/* left out), and each chart of `watch.progress` as the pair
    of series."""
    client = _client(client)
    a, b = client.get_run(run_a), client.get_run(run_b)
    pa, pb = a.data.params, b.data.params
    params = {k: (pa[k], pb[k]) for k in sorted(set(pa) & set(pb)) if pa[k] != pb[k]}
    # e.g. what a run logs with its model at the end, which a stopped run never logged
    only_one = {k: (pa.get(k), pb.get(k)) for k in sorted(set(pa) ^ set(pb))}
    names = sorted(k for k in set(a.data.metrics) | set(b.data.metrics) if not k.startswith(SYSTEM_PREFIX))
    metrics = {k: (a.data.metrics.get(k), b.data.metrics.get(k)) for k in names}
    charts_a, charts_b = progress(run_a, client).charts, progress(run_b, client).charts
    charts = {name: (charts_a.get(name, []), charts_b.get(name, [])) for name in dict.fromkeys([*charts_a,
                                                                                                *charts_b])}
    return Comparison(run_a=run_a, run_b=run_b, params=params, metrics=metrics, charts=charts,
                      only_one=only_one)
