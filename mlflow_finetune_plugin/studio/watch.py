"""A run as the Train page shows it, read from MLflow's own records (any run of the plugin, started from the
page or not): `progress` while it trains (its status, step, charts, system use, log and error), `judgement`
once it has evaluated (every contender's scores and cost, the verdict, the answers side by side, the
forgetting check, the registered version), and `promote`, the promotion `mlflow-finetune promote` does."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow_finetune_plugin import paths, tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluate.report import TABLE_FILE
from mlflow_finetune_plugin.metrics import (
    ALTERNATIVE_LABELS,
    CONTENDERS,
    COST_METRICS,
    FORGETTING_PREFIX,
    cost_cell,
)
from mlflow_finetune_plugin.registry.promotion import PromotionResult

# Chart name -> the run's metric (train/callbacks.py names them); every other train/<name> is charted as
# <name>.
CHARTS = {"loss": "train/loss", "eval_loss": "eval/tuned/loss", "learning_rate": "train/learning_rate",
          "grad_norm": "train/grad_norm"}
TOKENS_PER_S = "train/tokens_per_second"
EPOCH = "train/epoch"
PEAK_MEMORY = "train/peak_rss_gib"  # the training process's own (train/callbacks.py), not the machine's
SYSTEM_PREFIX = "system/"
LOG_LINES = 60
MAX_EXAMPLES = 50
# What the Trainer's own evaluation pass logs beside eval/tuned/loss: bookkeeping, not a contender's score.
TRAINER_EVAL = ("runtime", "samples_per_second", "steps_per_second", "num_tokens", "epoch",
                "mean_token_accuracy", "entropy")
ETA_POINTS = 20  # the step rate of the time left: over the last this many logged steps


@dataclass
class Progress:
    run_id: str
    status: str                                  # MLflow's: RUNNING, FINISHED, FAILED, KILLED, SCHEDULED
    step: int                                    # the last step a training metric was logged at
    max_steps: int | None                        # train.max_steps, or estimated from train.epochs
    epoch: float | None
    # training time left at the recent step rate (the evaluation after
    eta_s: float | None
    tokens_per_s: float | None                   # it not counted); None once training is done
    # loss, eval_loss, learning_rate, grad_norm, + other train/* metrics
    charts: dict[str, list[tuple[int, float]]]
    system: dict[str, float]                     # latest system/* metrics: cpu_utilization_percentage, ...
    # the last LOG_LINES lines of the job's log, where it is on this machine
    log_tail: str
    error: str | None                            # a failed run's error
    # the step of the last whole checkpoint logged (Resume starts there)
    checkpoint: int | None = None
    # the run's own memory: its training process's peak resident set so far, in GiB (train/peak_rss_gib)
    memory_gib: float | None = None


@dataclass
class Judgement:
    # {"contender": "base", "rougeL": ..., "latency_s": ...} per contender
    contenders: list[dict]
    verdict: str | None                          # the verdict sentence (finetune.verdict)
    examples: list[dict]                         # prompt, reference, and each contender's answer by its name
    forgetting: dict[str, float]                 # ppl_ratio, base_ppl, tuned_ppl, ...
    model: str | None                            # models:/NAME/VERSION the run registered
    paid_off: bool | None = None
    # the prompt-only contender the verdict weighed the tuned model against
    best_alternative: str | None = None
    # who was scored and why the others were not (finetune.eval.contenders)
    scored: str | None = None
    run_id: str = ""

    def as_markdown(self) -> str:
        parts = [f"**Verdict:** {self.verdict}" if self.verdict else "**Verdict:** none yet (the run has not "
                                                                     "evaluated)"]
        if self.contenders:
            names = [r["contender"] for r in self.contenders]
            metrics = list(dict.fromkeys(m for r in self.contenders for m in r if m != "contender"))
            quality = [m for m in metrics if m not in COST_METRICS]
            rows = [f"| {m} | " + " | ".join(_cell(m, r.get(m)) for r in self.contenders) + " |"
                    for m in quality + [m for m in COST_METRICS if m in metrics]]
            parts.append("\n".join([f"| metric | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|",
                                    *rows]))
        if self.forgetting:
            ratio, base, tuned = (self.forgetting.get(k) for k in ("ppl_ratio", "base_ppl", "tuned_ppl"))
            if ratio is not None:
                parts.append(f"**Forgetting:** general-text perplexity x{ratio:.2f}"
                             + (f" ({base:.1f} -> {tuned:.1f})" if base is not None and tuned is not None
                                else ""))
        if self.best_alternative in ALTERNATIVE_LABELS:
            parts.append(f"**Best prompt-only alternative:** {ALTERNATIVE_LABELS[self.best_alternative]}")
        if self.scored:
            parts.append(f"**Contenders:** {self.scored}")
        if self.model:
            parts.append(f"**Registered:** `{self.model}`")
        return "\n\n".join(parts)


def _cell(metric: str, value) -> str:
    if value is None:
        return "-"
    return cost_cell(metric, value) if metric in COST_METRICS else f"{value:.4f}"


def _client(client):
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


def progress(run_id: str, client=None) -> Progress:
    """Where run `run_id` is: its status, step and epoch, the charts, the time left of training, its system
    use, the tail of its log and, for a failed run, its error."""
    client = _client(client)
    run = client.get_run(run_id)
    latest = run.data.metrics
    charts = {name: _history(client, run_id, metric) for name, metric in CHARTS.items()}
    for metric in sorted(latest):
        name = metric.removeprefix("train/")
        if metric.startswith("train/") and metric not in CHARTS.values() and not name.startswith("summary_"):
            charts[name] = _history(client, run_id, metric)
    trained = [series for series in (charts["loss"], charts.get("epoch", [])) if series]
    step = max((s[-1][0] for s in trained), default=0)
    epoch = latest.get(EPOCH)
    max_steps = _max_steps(run.data.params, step, epoch)
    status = run.info.status
    return Progress(run_id=run_id, status=status, step=step, max_steps=max_steps, epoch=epoch,
                    eta_s=_eta(client, run_id, step, max_steps) if status == "RUNNING" else None,
                    tokens_per_s=latest.get(TOKENS_PER_S), charts=charts,
                    system={k.removeprefix(SYSTEM_PREFIX): v for k,
                            v in latest.items() if k.startswith(SYSTEM_PREFIX)}, log_tail=log_tail(run_id),
                    error=run_error(client, run) if status == "FAILED" else None,
                    checkpoint=_checkpoint_step(run.data.tags.get(tags.LAST_CHECKPOINT)),
                    memory_gib=latest.get(PEAK_MEMORY))


def _checkpoint_step(folder: str | None) -> int | None:
    """checkpoints/checkpoint-40 -> 40: the run tags each checkpoint once it is wholly logged
    (train/resume.py)."""
    tail = (folder or "").rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _history(client, run_id: str, metric: str) -> list[tuple[int, float]]:
    points = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in points]


def _max_steps(params: dict, step: int, epoch: float | None) -> int | None:
    """train.max_steps where the recipe set one (> 0); else the epochs' steps, at the steps per epoch so
    far."""
    try:
        steps = int(params.get("train.max_steps", "None"))
    except ValueError:
        steps = 0
    if steps > 0:
        return steps
    try:
        epochs = float(params.get("train.epochs", "None"))
    except ValueError:
        return None
    return round(step / epoch * epochs) if epoch and step else None


def _eta(client, run_id: str, step: int, max_steps: int | None) -> float | None:
    """Seconds of training left at the step rate of the last ETA_POINTS logged losses; None when training is
    done (the run evaluates) or no rate is known yet."""
    if not max_steps or step >= max_steps:
        return None
    points = sorted(client.get_metric_history(run_id, CHARTS["loss"]), key=lambda m: m.step)[-ETA_POINTS:]
    if len(points) < 2 or points[-1].timestamp <= points[0].timestamp:
        return None
    rate = (points[-1].step - points[0].step) / ((points[-1].timestamp - points[0].timestamp) / 1000)
    return (max_steps - step) / rate if rate > 0 else None


def log_tail(run_id: str, lines: int = LOG_LINES) -> str:
    """The last `lines` lines of the run's job log (`job.log` in its job folder: detached local and torchrun
    jobs write it on the machine that launched them), each progress-bar line at its last redraw; "" where
    there is none."""
    path = paths.cache_root() / "runs" / run_id / "job.log"
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(f.seek(0, 2) - 256 * 1024, 0))
        text = f.read().decode(errors="replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(shown[-lines:]).strip("\n")


def run_error(client, run) -> str:
    """A failed run's error: its error tag, or all of error.txt where the tag is missing or cut short."""
    error = run.data.tags.get(tags.ERROR)
    if error and len(error) < 4900:
        return error
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(client.download_artifacts(run.info.run_id, "error.txt",
                                                  tmp)).read_text(errors="replace")
        except Exception:  # noqa: BLE001 - no error.txt: the tag, or what the status says
            return error or f"the run ended {run.info.status} and recorded no error"


def judgement(run_id: str, client=None) -> Judgement:
    """How run `run_id` did: each contender's scores and cost (`eval/<contender>/<metric>`), the verdict, the
    held-out answers side by side (the first MAX_EXAMPLES), the forgetting check and the version it
    registered."""
    client = _client(client)
    run = client.get_run(run_id)
    metrics, run_tags = run.data.metrics, run.data.tags
    contenders = []
    for contender in CONTENDERS:
        values = {key.split("/", 2)[2]: value for key, value in metrics.items()
                  if key.startswith(f"eval/{contender}/") and key.count("/") == 2}
        values = {m: v for m, v in values.items() if m not in TRAINER_EVAL}
        if any(m not in COST_METRICS for m in values):
            quality = {m: v for m, v in values.items() if m not in COST_METRICS}
            contenders.append({"contender": contender, **quality,
                               **{m: values[m] for m in COST_METRICS if m in values}})
    name, version = run_tags.get(tags.REGISTERED_MODEL), run_tags.get(tags.REGISTERED_VERSION)
    paid_off = run_tags.get(tags.VERDICT_PAID_OFF)
    return Judgement(contenders=contenders, verdict=run_tags.get(tags.VERDICT),
                     examples=_examples(client, run_id, [c["contender"] for c in contenders]),
                     forgetting={k.removeprefix(FORGETTING_PREFIX): v for k, v in metrics.items()
                                 if k.startswith(FORGETTING_PREFIX)},
                     model=f"models:/{name}/{version}" if name and version else None,
                     paid_off=None if paid_off is None else paid_off == "true",
                     best_alternative=run_tags.get(tags.VERDICT_BEST_ALTERNATIVE),
                     scored=run_tags.get(tags.EVAL_CONTENDERS), run_id=run_id)


def _examples(client, run_id: str, contenders: list[str]) -> list[dict]:
    """The latest evaluation's per-example table (`eval/examples.json`, or `examples-N.json` after N
    evaluations): prompt, reference, and each contender's answer under the contender's name."""
    folder, _, file = TABLE_FILE.rpartition("/")
    stem, _, suffix = file.rpartition(".")
    tables = [a.path for a in client.list_artifacts(run_id, folder)
              if a.path.rsplit("/", 1)[-1].startswith(stem) and a.path.endswith("." + suffix)]
    if not tables:
        return []

    def number(path: str) -> int:
        rest = path.rsplit("/", 1)[-1][len(stem):-len(suffix) - 1].lstrip("-")
        return int(rest) if rest.isdigit() else 1
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(client.download_artifacts(run_id, max(tables, key=number), tmp)).read_text())
    out = []
    for values in table.get("data", [])[:MAX_EXAMPLES]:
        row = dict(zip(table.get("columns", []), values))
        example = {"prompt": row.get("prompt"), "reference": row.get("reference")}
        if row.get("system"):
            example["system"] = row["system"]
        example.update({c: row[f"{c}_answer"] for c in contenders if f"{c}_answer" in row})
        out.append(example)
    return out


def promote(model_uri_or_name_version: str, force: bool = False,
            reason: str | None = None) -> PromotionResult:
    """Move the champion alias to a registered version when it passes its recipe's gates and serving parity:
    what
    `mlflow-finetune promote NAME --version N` does. `models:/NAME/VERSION`, `models:/NAME@ALIAS`,
    `NAME/VERSION` or `NAME@ALIAS`. The result says whether the alias moved (`promoted`) and each gate's
    outcome (`checks`, and `report()` as text). Raises FinetuneError where the gates cannot be checked (a
    metric missing: unless `force`, with a `reason`)."""
    from mlflow_finetune_plugin.serving.parity import promote_checked

    name, ref = parse_version(model_uri_or_name_version)
    return promote_checked(name, ref, force=force, reason=reason)


def parse_version(text: str) -> tuple[str, str]:
    """(name, version or @alias) of `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `NAME/VERSION` or
    `NAME@ALIAS`."""
    rest = str(text or "").strip().removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        ref = "@" + alias
    else:
        name, _, ref = rest.rpartition("/")
    if not name or not ref.lstrip("@"):
        raise FinetuneError(
            f"{text!r} names no registered version: give models:/NAME/VERSION (e.g. models:/bot/3), "
            "NAME/VERSION or NAME@ALIAS")
    return name, ref

