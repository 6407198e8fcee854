"""What an evaluation logs and shows: the result (`eval/<contender>/<metric>` metrics and the per-example
table), logged into the active MLflow run with the few-shot and retrieved shots, the per-example scores the
verdict weighs (`verdict.SCORES_FILE`), a comparison chart of the contenders and, through `genai_view.py`, one
MLflow trace per example for MLflow's own evaluation view."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluate.genai_view import log_genai_view
from mlflow_finetune_plugin.evaluate.verdict import SCORES_FILE, per_example_scores
from mlflow_finetune_plugin.messages import text_of
from mlflow_finetune_plugin.metrics import CONTENDERS, FORGETTING_PREFIX
from mlflow_finetune_plugin.tracking import log_results

# Per-example scores shown in the table (the aggregate of every metric is logged).
TABLE_METRICS = ("exact_match", "token_f1", "rougeL", "chrf", "json_valid", "misrouted", "fact_recall")
CHART_METRICS = ("exact_match", "token_f1", "rougeL", "chrf", "bleu", "json_valid", "fact_recall")
TABLE_FILE, CHART_FILE, SHOTS_FILE = "eval/examples.json", "eval/comparison.png", "eval/fewshot_examples.json"
RETRIEVED_FILE = "eval/retrieval_examples.json"
# Which prompt-only contenders were not scored and why; the optimized contender's prompt and its search.
CONTENDERS_FILE, OPTIMIZED_FILE = "eval/contenders.json", "eval/optimized_prompt.json"
# A retrieved-shot winner's shot pool (the train conversations it draws from), kept for the registered prompt.
SHOT_POOL_FILE = "eval/optimized_shot_pool.jsonl"
# The tuned model's answers as generated: each held-out prompt's messages, its reference, the answer and how
# it ended, and the generation settings; the latest evaluation's, overwritten by the next. Promotion asks the
# served model the same prompts and compares (serving/parity.py).
TUNED_FILE = "eval/tuned_answers.json"


@dataclass
class EvalResult:
    metrics: dict[str, float]                  # "eval/<contender>/<metric>" -> value, plus "eval/n_examples"
    rows: list[dict]                           # one per example: prompt, reference, answers, scores
    contenders: list[str] = field(default_factory=list)
    fewshot_examples: list[list[dict]] = field(default_factory=list)
    data_digest: str = ""                      # of the prompts and references scored
    retrieval_shots: list[list[list[dict]]] = field(default_factory=list)  # per example, most similar first
    verdict: object = None                     # verdict.Verdict, once `verdict.conclude` weighed the result
    # per example, its chat messages (the rows render them)
    prompts: list[list[dict]] = field(default_factory=list)
    traces: bool = True                        # eval.traces: log the rows in MLflow's evaluation view
    notes: dict[str, str] = field(default_factory=dict)  # prompt-only contender -> why it was not scored
    search: object = None                      # prompt_search.Search of the optimized contender, when it ran
    # how the tuned model answered (contenders.generation_settings)
    generation: dict = field(default_factory=dict)


def table_rows(examples: list[tuple[list[dict], str]]) -> list[dict]:
    """The per-example table's rows for (prompt, reference) pairs, before any contender's answers."""
    rows = [{"system": "\n".join(text_of(m["content"]) for m in p if m.get("role") == "system"),
             "prompt": _render(p), "reference": ref} for p, ref in examples]
    images = [_image_refs(p) for p, _ in examples]
    if any(images):  # the prompt's images, by reference (a path, or a data URL cut short), in order
        for row, refs in zip(rows, images):
            row["images"] = "\n".join(refs)
    return rows


def _image_refs(messages: list[dict]) -> list[str]:
    from mlflow_finetune_plugin.models.image_inputs import is_image_part, part_reference

    refs = [str(part_reference(p)) for m in messages if isinstance(m.get("content"), list)
            for p in m["content"] if is_image_part(p) and part_reference(p) is not None]
    return [r if not r.startswith("data:") or len(r) < 80 else r[:40] + "..." for r in refs]


def add_answers(rows: list[dict], name: str, answers: list[str], per_example: dict[str, list[float]],
                endings: list[str | None] | None = None) -> None:
    """Contender `name`'s answers and their per-example scores (those of TABLE_METRICS) as columns of `rows`;
    with `endings`, how each answer ended (`<name>_ending`: stop, or length where max_new_tokens cut it)."""
    for i, row in enumerate(rows):
        row[f"{name}_answer"] = answers[i]
        if endings is not None:
            row[f"{name}_ending"] = endings[i]
        row.update({f"{name}_{m}": per_example[m][i] for m in TABLE_METRICS if m in per_example})


def misrouted_note(metrics: dict[str, float]) -> str | None:
    """What the tuned model's `misrouted` share means, in a sentence for the printed table; None when it is
    0."""
    share, n = metrics.get("eval/tuned/misrouted"), metrics.get("eval/n_examples")
    if not share or not n:
        return None
    return (
        f"misrouted: {round(share * n)} of the tuned model's {int(n)} answers are word for word the training "
        "answer of other questions: it learned the answers and picked the wrong one for a phrasing it had "
        "not seen (more phrasings per answer, or a larger base model; docs/methods.md).")


def log_evaluation(result: EvalResult) -> None:
    """Log metrics, the per-example table and scores, the few-shot and retrieved shots and the comparison
    chart into the active run."""
    import mlflow
    import pandas as pd

    run = mlflow.active_run()
    if run is None:
        raise FinetuneError("log_evaluation needs an active MLflow run (mlflow.start_run())")
    log_results(result.metrics)
    mlflow.set_tag(tags.EVAL_DATA_DIGEST, result.data_digest)
    # log_table appends to an existing file: a second evaluation in the same run gets its own file.
    mlflow.log_table(pd.DataFrame(result.rows), _free_name(run.info.run_id, TABLE_FILE))
    if result.fewshot_examples:
        mlflow.log_dict({"examples": result.fewshot_examples}, SHOTS_FILE)
    if result.retrieval_shots:
        mlflow.log_dict({"examples": [{"prompt": row["prompt"], "shots": shots}
                                      for row, shots in zip(result.rows, result.retrieval_shots)]},
                        RETRIEVED_FILE)
    if result.contenders:  # a mixture's merged result has none of its own (each task printed its own line)
        mlflow.log_dict({"scored": result.contenders, "not_scored": result.notes}, CONTENDERS_FILE)
        mlflow.set_tag(tags.EVAL_CONTENDERS, contenders_line(result.contenders, result.notes)[:5000])
    if result.search is not None and result.search.winner is not None:
        record = optimized_record(result.search)
        if result.search.pool:
            record.update(keep_shot_pool(run.info.run_id, result.search.pool))
        mlflow.log_dict(record, OPTIMIZED_FILE)
    # The latest evaluation's, overwritten by the next: what the run's verdict is decided on.
    mlflow.log_dict(per_example_scores(result.rows), SCORES_FILE)
    if result.prompts and result.rows and "tuned_answer" in result.rows[0]:
        mlflow.log_dict(tuned_record(result), TUNED_FILE)
    log_chart(result.metrics)
    # Last, and never raising: each example with every contender's answer and scores in MLflow's evaluation
    # view.
    if result.traces:
        log_genai_view(result)


def tuned_record(result: EvalResult) -> dict:
    """TUNED_FILE's content: the generation settings, and per held-out row its prompt's messages, the
    reference, the tuned answer and how it ended (and a mixture's task)."""
    return {"settings": result.generation,
            "rows": [{"messages": messages, "reference": row["reference"], "answer": row["tuned_answer"],
                      "ending": row.get("tuned_ending"), **({"task": row["task"]} if "task" in row else {})}
                     for messages, row in zip(result.prompts, result.rows)]}


def contenders_line(contenders: list[str], notes: dict[str, str]) -> str:
    """Who was scored and why the others were not, in a line (printed, and the `finetune.eval.contenders`
    tag)."""
    left_out = "".join(f"; not {name}: {why}" for name, why in notes.items())
    return f"scored {', '.join(contenders)}{left_out}"


def keep_shot_pool(run_id: str, pool: list[list[dict]]) -> dict:
    """Log a retrieved-shot winner's pool as `SHOT_POOL_FILE` (one conversation a line), so the registered
    prompt retrieves from the rows it was measured with; returns what the prompt's record says of it. Rows
    read from MLflow traces are not copied (traces hold users' data): the prompt then keeps its instruction
    only, and says why."""
    import json

    import mlflow

    inputs = mlflow.MlflowClient().get_run(run_id).inputs
    given = [{t.key: t.value for t in d.tags} for d in (inputs.dataset_inputs or [])]
    if any(t.get("source") == "traces" and t.get("mlflow.data.context") != "eval" for t in given):
        return {"shot_pool": None,
                "shot_pool_note": "train rows read from traces are not copied into the run: "
                                  "the registered prompt keeps its instruction only"}
    mlflow.log_text("".join(json.dumps(conv) + "\n" for conv in pool), SHOT_POOL_FILE)
    return {"shot_pool": f"runs:/{run_id}/{SHOT_POOL_FILE}", "shot_pool_rows": len(pool)}


def optimized_record(search) -> dict:
    """The optimized contender's prompt and how it was found, as `OPTIMIZED_FILE` keeps it (and the Prompt
    Registry registers it: registry/prompts.py)."""
    return {**search.winner.as_dict(), **({"retrieval_k": search.k} if search.winner.retrieved else {}),
            "dev_rows": search.dev_rows, "answers": search.answers,
            "seconds": round(search.seconds, 3), "dev_scores": dict(search.scores), "reason": search.reason}


def log_chart(metrics: dict[str, float]) -> None:
    """Log the comparison chart of `metrics` (the run's `eval/*` metrics) into the active run, over an earlier
    one: the evaluation draws it, and the forgetting check draws it again once the ratio the verdict cites is
    known."""
    import mlflow

    mlflow.log_figure(comparison_figure(metrics), CHART_FILE)


def comparison_figure(metrics: dict[str, float]):
    """Grouped bars of the [0, 1] scores and of the reference loss, one colour per contender, and, once
    measured, the forgetting check: general-text perplexity of the base and the tuned model, their ratio in
    the title."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    contenders = [c for c in CONTENDERS if any(k.startswith(f"eval/{c}/") for k in metrics)]
    names = [m for m in CHART_METRICS if any(f"eval/{c}/{m}" in metrics for c in contenders)]
    forgetting = f"{FORGETTING_PREFIX}ppl_ratio" in metrics
    fig = Figure(figsize=(13 if forgetting else 11, 4.2), layout="constrained")
    axes = fig.subplots(1, 3 if forgetting else 2, width_ratios=[4, 1.6, 1.1][:3 if forgetting else 2])
    ax_scores, ax_loss = axes[0], axes[1]
    width = 0.8 / max(len(contenders), 1)
    for i, c in enumerate(contenders):
        xs = [j + i * width for j in range(len(names))]
        bars = ax_scores.bar(xs, [metrics.get(f"eval/{c}/{m}", 0.0) for m in names], width, label=c,
                             color=f"C{i}")
        ax_scores.bar_label(bars, fmt="%.2f", fontsize=7)
        if f"eval/{c}/loss" in metrics:  # a teacher's logged answers have none: no bar, rather than a 0
            bars = ax_loss.bar([i], [metrics[f"eval/{c}/loss"]], 0.8, color=f"C{i}")
            ax_loss.bar_label(bars, fmt="%.2f", fontsize=7)
    ax_scores.set_xticks([j + width * (len(contenders) - 1) / 2 for j in range(len(names))], names)
    ax_scores.set_ylim(0, 1)
    ax_scores.set_title("answer quality (higher is better)", fontsize="medium")
    ax_scores.legend()
    # Room for four contender names side by side (in a narrow panel they ran into one word).
    ax_loss.set_xticks(range(len(contenders)), contenders, fontsize="small")
    ax_loss.set_title("loss (lower is better)", fontsize="medium")
    if forgetting:
        _forgetting_panel(axes[2], metrics, contenders)
    return fig


def _forgetting_panel(ax, metrics: dict[str, float], contenders: list[str]) -> None:
    """General-text perplexity, base and tuned, in the contenders' colours; the title gives the ratio the
    verdict cites (above 1: the tuned model finds ordinary text less likely)."""
    ratio = metrics[f"{FORGETTING_PREFIX}ppl_ratio"]
    sides = [(side, metrics.get(f"{FORGETTING_PREFIX}{side}_ppl")) for side in ("base", "tuned")]
    sides = [(side, value) for side, value in sides if value is not None]
    for i, (side, value) in enumerate(sides):
        colour = f"C{contenders.index(side)}" if side in contenders else f"C{i}"
        ax.bar_label(ax.bar([i], [value], 0.8, color=colour), fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(sides)), [side for side, _ in sides])
    ax.set_title(f"forgetting: x{ratio:.2f}\ngeneral-text perplexity", fontsize="medium")


def _render(prompt: list[dict]) -> str:
    turns = [m for m in prompt if m.get("role") != "system"]
    if len(turns) == 1:
        return text_of(turns[0].get("content"))
    return "\n".join(f"{m.get('role')}: {text_of(m.get('content'))}" for m in turns)


def _free_name(run_id: str, path: str) -> str:
    """`path`, or `<stem>-2<suffix>`, ... when the run already has an artifact there."""
    import mlflow

    folder, _, file = path.rpartition("/")
    stem, dot, suffix = file.rpartition(".")
    taken = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, folder or None)}
    n, candidate = 1, path
    while candidate in taken:
        n += 1
        candidate = f"{folder}/{stem}-{n}{dot}{suffix}" if folder else f"{stem}-{n}{dot}{suffix}"
    return candidate
